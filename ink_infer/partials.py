"""Interruption and resume: what a run that stops early leaves behind, and how the next run picks it up.

Partials. Each (model, fragment) result, the stitched sum map of ``predict_fragment``, is saved under
``OUT/partials`` as soon as it is finished, atomically (temporary file, fsync, ``os.replace``), so a file there is
always complete. It is keyed by a sha256 over everything that decides its bytes: the manifest entry (every
``ModelSpec`` field), the weights (their sha256, or the random-init seed), the fragment (id, shape, mask, and the
slice files' names, sizes and mtimes), stride, TTA mode, device type and dtype, and the ink_infer / torch / timm
versions. A rerun of the same command loads what is there instead of computing it; a file whose key differs is
never used, and is replaced when the new result is saved, so there is at most one file per (model, fragment).

Only the 32 x 32 blocks that some window covers are stored (``finalize`` ignores every other pixel), as float32:
at most 4 bytes per pixel of the fragment per model, in an uncompressed ``.npz`` read back with
``allow_pickle=False`` (nothing in it is unpickled). Compressing the sum map gained little (its float mantissas are
noise to zlib) and cost seconds per map.

Stop requests. SIGTERM and SIGINT set a flag that ``StopRequest.check()`` turns into ``Interrupted`` at the next
safe point (the pipeline checks between batches, fragments and models); a second signal interrupts at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import threading
import zipfile
from pathlib import Path
from types import FrameType

import numpy as np

from .config import BLOCK, ModelSpec

log = logging.getLogger(__name__)

# 2: maps on the cover grid (remainder rows/columns covered) from float16-rounded inputs; format-1 files are
# results of the earlier rule and are never reused
PARTIAL_FORMAT = 2
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class Interrupted(Exception):
    """The run was asked to stop (SIGTERM / SIGINT); ``signum`` gives the exit code ``128 + signum``."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        self.signum = signum
        super().__init__(message or f"interrupted by {signal_name(signum)}")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequest:
    """A context manager holding the SIGTERM / SIGINT handlers for the length of a run.

    The handlers only set a flag: the run stops where ``check()`` is called, so no file is half-written by the
    signal itself. Outside the main thread (where Python cannot install handlers) it only offers ``check()``.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the closest we can restore
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise Interrupted(signum)  # asked twice: the user does not want to wait for the batch
        self.signum = signum
        log.warning(
            "%s: stopping after the current batch (send it again to stop at once)", signal_name(signum)
        )

    def check(self) -> None:
        """Raise ``Interrupted`` if a stop was requested."""
        if self.signum is not None:
            raise Interrupted(self.signum)


def fragment_fingerprint(frag_id: str, path: Path, shape: tuple[int, int], mask: np.ndarray) -> dict:
    """A cheap identity of a fragment's data: id, shape, the mask's hash, and each slice file's size and mtime.

    Sizes and mtimes rather than content hashes: hashing 65 slices of GBs would cost minutes per run, while any
    rewrite of a slice changes its mtime.
    """
    slices = []
    for entry in sorted((path / "surface_volume").iterdir()):
        if not entry.name.startswith("."):
            st = entry.stat()
            slices.append([entry.name, st.st_size, st.st_mtime_ns])
    mask_sha = hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()
    return {"id": frag_id, "shape": list(shape), "mask_sha256": mask_sha, "slices": slices}


def partial_key(
    spec: ModelSpec, *, weights: str, fragment: dict, stride: int, tta: str, device: str, dtype: str
) -> tuple[str, dict]:
    """(sha256 hex digest, the key it hashes) of one (model, fragment) result.

    ``weights``: ``"sha256:<hex>"`` or ``"random:seed=<n>"``; ``fragment``: ``fragment_fingerprint(...)``.
    """
    import timm
    import torch

    from . import __version__

    key = {
        "format": PARTIAL_FORMAT,
        "model": dataclasses.asdict(spec),
        "weights": weights,
        "fragment": fragment,
        "stride": stride,
        "tta": tta,
        "device": device,
        "dtype": dtype,
        "versions": {"ink_infer": __version__, "torch": torch.__version__, "timm": timm.__version__},
    }
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), json.loads(text)


class PartialStore:
    """``OUT/partials``: one ``.npz`` per (model, fragment) holding its covered blocks and the key they belong to.

    ``stride``, ``tta``, ``device`` (type) and ``dtype`` are the run's; the rest of a key comes with each call:
    the model's spec, its weights' identity and the fragment's fingerprint.
    """

    def __init__(self, root: Path, *, stride: int, tta: str, device: str, dtype: str) -> None:
        self.root = Path(root)
        self._run = {"stride": stride, "tta": tta, "device": device, "dtype": dtype}

    def path(self, model: str, fragment: str) -> Path:
        """File of (model, fragment): readable names, plus a short hash so that distinct pairs never collide."""
        tag = hashlib.sha256(f"{model}\0{fragment}".encode()).hexdigest()[:8]
        return self.root / f"{_UNSAFE.sub('_', model)}.{_UNSAFE.sub('_', fragment)}.{tag}.npz"

    def load(
        self, spec: ModelSpec, *, weights: str, fragment: dict, covered: np.ndarray
    ) -> tuple[np.ndarray | None, dict | None, str | None]:
        """``(sum map (gh*32, gw*32) float32, stats saved with it, None)`` when a partial with this key is there;
        else ``(None, None, why)`` where ``why`` is None when there is simply no file.

        ``covered``: ``(ch, cw)`` bool on the cover grid, the blocks some window covers, recomputed by the caller.
        """
        digest, _ = partial_key(spec, weights=weights, fragment=fragment, **self._run)
        path = self.path(spec.name, fragment["id"])
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"][()]))
                if meta.get("digest") != digest:
                    return None, None, "written by a different configuration"
                saved_covered, values = z["covered"], z["values"]
        except FileNotFoundError:
            return None, None, None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            log.warning("%s: unreadable partial, recomputing it (%s)", path, e)
            return None, None, f"unreadable ({type(e).__name__})"
        shape = (int(covered.sum()), BLOCK, BLOCK)
        if not np.array_equal(saved_covered, covered) or values.dtype != np.float32 or values.shape != shape:
            return None, None, "does not match the fragment's windows"
        return _from_blocks(values, covered), meta.get("stats", {}), None

    def save(
        self,
        spec: ModelSpec,
        *,
        weights: str,
        fragment: dict,
        sum_map: np.ndarray,
        covered: np.ndarray,
        stats: dict,
    ) -> str | None:
        """Write (model, fragment)'s partial atomically; returns None, or why it could not be saved.

        A partial is an optimisation: failing to write one (a full disk) is logged and the run goes on."""
        digest, key = partial_key(spec, weights=weights, fragment=fragment, **self._run)
        path = self.path(spec.name, fragment["id"])
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        meta = {"model": spec.name, "fragment": fragment["id"], "digest": digest, "key": key, "stats": stats}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(
                    f, meta=np.array(json.dumps(meta)), covered=covered, values=_to_blocks(sum_map, covered)
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            log.warning("%s: partial not saved (%s); the run goes on without it", path, e.strerror or e)
            return f"not saved ({e.strerror or e})"
        finally:
            tmp.unlink(missing_ok=True)
        return None


def _to_blocks(sum_map: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """``(gh*32, gw*32)`` -> ``(n covered, 32, 32)`` float32, the covered blocks in row-major block order."""
    gh, gw = covered.shape
    return sum_map.reshape(gh, BLOCK, gw, BLOCK).transpose(0, 2, 1, 3)[covered].astype(np.float32, copy=False)


def _from_blocks(values: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Inverse of ``_to_blocks``, zeros in the blocks no window covers."""
    gh, gw = covered.shape
    blocks = np.zeros((gh, gw, BLOCK, BLOCK), dtype=np.float32)
    blocks[covered] = values
    return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3).reshape(gh * BLOCK, gw * BLOCK))
