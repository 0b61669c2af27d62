"""Resume: what a run that stops early leaves behind, and how the next run picks it up.

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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import zipfile
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .config import BLOCK, ModelSpec
from .tiling import blocks_of, image_of

log = logging.getLogger(__name__)

# 2: maps on the cover grid (remainder rows/columns covered) from float16-rounded inputs; format-1 files are
# results of the earlier rule and are never reused
PARTIAL_FORMAT = 2
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


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
        return image_of(values, covered), meta.get("stats", {}), None

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
        meta = {"model": spec.name, "fragment": fragment["id"], "digest": digest, "key": key, "stats": stats}
        values = blocks_of(sum_map, covered).astype(np.float32, copy=False)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(
                path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), covered=covered, values=values)
            )
        except OSError as e:
            log.warning("%s: partial not saved (%s); the run goes on without it", path, e.strerror or e)
            return f"not saved ({e.strerror or e})"
        return None
