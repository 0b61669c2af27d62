"""Resume: what a run that stops early leaves behind, and how the next run picks it up.

Partials. Each (model, fragment) result, the stitched sum map of ``predict_fragment``, is saved under
``OUT/partials`` as soon as it is finished, atomically (temporary file, fsync, ``os.replace``), so a file there is
always complete. It is keyed by ``plan.Unit.key``, a sha256 over everything that decides its bytes and nothing
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
import hashlib
import json
import logging
import re
import zipfile
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .config import BLOCK
from .plan import Unit, UnitSettings
from .results import FragmentResult
from .tiling import blocks_of, image_of

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
        """File of (model, fragment): readable names, plus a short hash so that distinct pairs never collide."""
        tag = hashlib.sha256(f"{model}\0{fragment}".encode()).hexdigest()[:8]
        return self.root / f"{safe_name(model)}.{safe_name(fragment)}.{tag}.npz"

    def load(self, unit: Unit) -> tuple[np.ndarray | None, FragmentResult | None, str | None]:
        """``(fixed-point sum map int64 on the unit's block rows, the unit's result saved with it, None)`` when a
        partial with the unit's key is there; else ``(None, None, why)`` where ``why`` is None when there is simply no file."""
        digest, _ = unit.key(self.settings)
        covered = unit.count() > 0
        path = self.path(unit.model.name, unit.fragment.id)
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
        digest, _ = unit.key(self.settings)
        try:
            with np.load(self.path(unit.model.name, unit.fragment.id), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"][()]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        return FragmentResult.from_dict(meta.get("stats", {})) if meta.get("digest") == digest else None

    def clear(self) -> int:
        """Remove every partial in the store (and the folder, once empty): after a successful submission on
        Kaggle, where they would land in the notebook's saved output. Returns how many files went."""
        files = sorted(self.root.glob("*.npz")) if self.root.is_dir() else []
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
        digest, key = unit.key(self.settings)
        covered = unit.count() > 0
        path = self.path(unit.model.name, unit.fragment.id)
        stats = dataclasses.asdict(result)
        meta = {
            "model": unit.model.name,
            "fragment": unit.fragment.id,
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
            log.warning("%s: partial not saved (%s); the run goes on without it", path, e.strerror or e)
            return f"not saved ({e.strerror or e})"
        return None
