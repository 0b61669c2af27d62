"""Resume: what a run that stops early leaves behind, and how the next run picks it up.

Partials. Each (model, fragment) result, the stitched sum map of ``predict_fragment``, is saved under
``OUT/partials`` as soon as it is finished, atomically (temporary file, fsync, ``os.replace``), so a file there is
always complete. It is keyed by ``unit_key`` (below), a sha256 over everything that decides its bytes and nothing
else: the model's output fields (not its file name, checksum or ensemble weight), the weights (their sha256, or the
random-init seed), the fragment (id, shape, mask, and the slice files' names, sizes and mtimes), stride, TTA mode,
device type and dtype, the ink_infer / torch / timm versions and a hash of ink_infer's code (so a rerun after
a code change never reuses what other code computed). A rerun of the same command loads what is there instead of computing it; a file whose key differs is
never used, and is replaced when the new result is saved, so there is at most one file per (model, fragment).

Only the 32 x 32 blocks that some window covers are stored (``finalize`` ignores every other pixel), as the
fixed-point sums of ``stitch.SumMap`` in int32 (int64 when a sum does not fit, past 127 windows per pixel):
at most 4 bytes per pixel of the fragment per model, in an uncompressed ``.npz`` read back with
``allow_pickle=False`` (nothing in it is unpickled). Compressing the sum map gained little (its float mantissas are
noise to zlib) and cost seconds per map.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import re
import zipfile
from pathlib import Path

import numpy as np

from ink_infer.config import ModelSpec
from ink_infer.engine.tiling import blocks_of, image_of
from ink_infer.geometry import BLOCK
from ink_infer.outputs.atomic import atomic_write, note_unwritten
from ink_infer.outputs.report import FragmentResult
from ink_infer.run.plan import Unit, UnitSettings

log = logging.getLogger(__name__)

STORED = (np.dtype(np.int32), np.dtype(np.int64))  # the dtypes a partial's sums are stored in
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """``name`` as a file name part: every run of other characters than letters, digits, ``._-`` is one ``_``."""
    return _UNSAFE.sub("_", name)


class PartialStore:
    """``OUT/partials``: one ``.npz`` per (model, fragment) unit holding its covered blocks and the key they belong to.

    ``settings`` are the run's; the rest of a key comes with each unit."""

    def __init__(self, root: Path, settings: UnitSettings) -> None:
        self.root = Path(root)
        self.settings = settings

    def path(self, model: str, fragment: str) -> Path:
        """File of (model, fragment): readable names, plus a short hash so that distinct pairs never collide.
        ``fragment``: a unit's ``key_id``, so a rerun with another ``--direction`` finds what it can reuse."""
        tag = hashlib.sha256(f"{model}\0{fragment}".encode()).hexdigest()[:8]
        return self.root / f"{safe_name(model)}.{safe_name(fragment)}.{tag}.npz"

    def load(self, unit: Unit) -> tuple[np.ndarray | None, FragmentResult | None, str | None]:
        """``(fixed-point sum map int64 on the unit's block rows, the unit's result saved with it, None)`` when a
        partial with the unit's key is there; else ``(None, None, why)`` where ``why`` is None when there is simply no file."""
        digest, _ = unit_key(unit, self.settings)
        covered = unit.count() > 0
        path = self.path(unit.model.name, unit.fragment.key_id)
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
        if not np.array_equal(saved_covered, covered) or values.dtype not in STORED or values.shape != shape:
            return None, None, "does not match the fragment's windows"
        lo, hi = unit.block_rows()
        return (
            image_of(values.astype(np.int64), covered[lo:hi]),  # the unit's rows only, as computed
            FragmentResult.from_dict(meta.get("stats", {})),
            None,
        )

    def has(self, unit: Unit) -> bool:
        """Whether the unit's partial is there with its key (only the key is read, not the blocks)."""
        return self.saved_result(unit) is not None

    def saved_result(self, unit: Unit) -> FragmentResult | None:
        """The unit's result saved with its partial, if one is there with its key (the blocks are not read)."""
        digest, _ = unit_key(unit, self.settings)
        try:
            with np.load(self.path(unit.model.name, unit.fragment.key_id), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"][()]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        return FragmentResult.from_dict(meta.get("stats", {})) if meta.get("digest") == digest else None

    def why_missing(self, unit: Unit) -> str | None:
        """None when the unit's partial is there with its key; else what is wrong, for a person: no file (its part
        has not finished), a file made with other settings (naming what differs), or an unreadable file."""
        path = self.path(unit.model.name, unit.fragment.key_id)
        digest, key = unit_key(unit, self.settings)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"][()]))
        except FileNotFoundError:
            return f"no partial in {self.root} (its part has not finished)"
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            return f"{path}: unreadable ({type(e).__name__}), recompute its part"
        if meta.get("digest") == digest:
            return None
        saved = meta.get("key") if isinstance(meta.get("key"), dict) else {}
        differ = sorted(k for k in key.keys() | saved.keys() if saved.get(k) != key.get(k))
        return (
            f"{path} was made with other settings ({', '.join(differ) or 'its key'} differ: another stride, "
            "TTA, device, manifest entry, weights, data or version): rerun its part with these options"
        )

    def clear(self) -> int:
        """Remove the partials in the store (and the folder, once empty): after a successful submission on
        Kaggle, where they would land in the notebook's saved output. Only files ink_infer wrote go
        (``owned_files``): ``--partials`` may name a folder of the user's. Returns how many files went."""
        files = owned_files(self.root)
        for f in files:
            f.unlink(missing_ok=True)
        try:
            self.root.rmdir()
        except OSError:
            pass  # not empty (a user's own files) or already gone
        return len(files)

    def save(self, unit: Unit, sum_map: np.ndarray, result: FragmentResult) -> str | None:
        """Write the unit's partial atomically; returns None, or why it could not be saved.

        A partial is an optimisation: failing to write one (a full disk) is logged and the run goes on."""
        digest, key = unit_key(unit, self.settings)
        covered = unit.count() > 0
        path = self.path(unit.model.name, unit.fragment.key_id)
        stats = dataclasses.asdict(result)
        meta = {
            "model": unit.model.name,
            "fragment": unit.fragment.key_id,
            "digest": digest,
            "key": key,
            "stats": stats,
        }
        lo, hi = unit.block_rows()  # the map holds the unit's block rows; no covered block lies outside them
        assert not covered[:lo].any() and not covered[hi:].any(), (unit.fragment.id, lo, hi)
        values = blocks_of(sum_map, covered[lo:hi])
        if values.size and values.max() <= np.iinfo(np.int32).max and values.min() >= 0:
            values = values.astype(np.int32)  # half the bytes: up to 127 windows of probability 1 per pixel
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(
                path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), covered=covered, values=values)
            )
        except OSError as e:
            note_unwritten(log, path, e, "partial not saved; the run goes on without it")
            return f"not saved ({e.strerror or e})"
        return None


_OWN_NAME = re.compile(r".+\.[0-9a-f]{8}\.npz")  # PartialStore.path's pattern


def owned_files(root: Path) -> list[Path]:
    """The partials ink_infer wrote in ``root``: named as ``PartialStore.path`` names them and holding its record
    (a ``meta`` with the unit's model, fragment and key digest). Any other file, ``.npz`` or not, is the user's."""
    if not root.is_dir():
        return []
    owned = []
    for f in sorted(root.glob("*.npz")):
        if not _OWN_NAME.fullmatch(f.name):
            continue
        try:
            with np.load(f, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"][()]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            continue
        if isinstance(meta, dict) and {"model", "fragment", "digest"} <= meta.keys():
            owned.append(f)
    return owned


# 3: fixed-point sums (stitch.SumMap); 2: float32 maps on the cover grid from float16-rounded inputs; files of an
# earlier format are never reused
PARTIAL_FORMAT = 3

# ModelSpec fields that do not change a model's output: where its file is, its checksum and size (the weights'
# identity is keyed by their sha256 instead), and its weight in the ensemble (applied after the unit)
NOT_OUTPUT_FIELDS = ("file", "sha256", "size", "weight")


def output_fields(spec: ModelSpec) -> dict:
    """The spec's fields that decide its output bytes, JSON-ready."""
    return {k: v for k, v in dataclasses.asdict(spec).items() if k not in NOT_OUTPUT_FIELDS}


def unit_key(unit: Unit, settings: UnitSettings) -> tuple[str, dict]:
    """(sha256 hex digest, the key it hashes): everything that decides the unit's bytes, and nothing else.

    The model's output fields, its weights' identity (sha256, or the random-init seed), the fragment's
    fingerprint, the run's ``settings``, the ink_infer / torch / timm versions and ink_infer's code hash."""
    import timm
    import torch

    from ink_infer import __version__

    key = {
        "format": PARTIAL_FORMAT,
        "model": output_fields(unit.model),
        "weights": unit.weights.identity,
        "fragment": unit.fragment.fingerprint,
        "rows": None if unit.fragment.rows is None else list(unit.fragment.rows),
        **dataclasses.asdict(settings),
        "versions": {
            "ink_infer": __version__,
            "code": code_digest(),
            "torch": torch.__version__,
            "timm": timm.__version__,
        },  # fmt: skip
    }
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), json.loads(text)


@functools.cache
def code_digest() -> str:
    """sha256 of ink_infer's own code (every ``.py`` file of the package, by relative path): a result computed by
    other code, even of the same version number, is never reused (``unit_key``)."""
    root = Path(__file__).resolve().parent.parent  # the package, not run/
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        if "__pycache__" not in f.parts:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
