"""``--rotate 90|180|270``: the input turned before inference, the outputs turned back.

The Kaggle hidden test was turned 90 degrees relative to the training fragments, and several top teams turned it
back; a segment may be flattened with its writing sideways. The models see the fragment turned counterclockwise by
the given angle (``np.rot90``); the mask, previews, probability maps and submission.csv are in the fragment's own
orientation.

Rows of a turned image are columns of the original, and a column strip of a slice file touches every page of it,
so the turned slices are written once into a cache, ``OUT/rotated/<id>/<z>.npy`` (uint16 memory maps, one slice
at a time in memory; disk: the 65 slices' size, checked before writing), and read by bands from there like any
uncompressed slice. The cache is rebuilt when its source changes (sizes and mtimes recorded in ``source.json``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ink_infer.errors import UserError, size_text
from ink_infer.geometry import N_SLICES
from ink_infer.volumes.slices import band_buffer


def with_rotation(fragments, angle: int, out: Path) -> list:
    """The fragments as the run sees them: turned by ``angle`` (``--rotate``), each with its cache under OUT."""
    import dataclasses

    if not angle:
        return list(fragments)
    return [dataclasses.replace(f, rotate=angle, rotate_cache=out / "rotated" / f.id) for f in fragments]


def turns(angle: int) -> int:
    """Quarter turns counterclockwise of ``angle`` degrees."""
    return (angle // 90) % 4


def turn(image: np.ndarray, angle: int) -> np.ndarray:
    """``image`` (2-D or more, rows and columns first) turned counterclockwise by ``angle``."""
    return np.rot90(image, turns(angle), axes=(0, 1))


def turn_back(image: np.ndarray, angle: int) -> np.ndarray:
    """Undo ``turn``: back to the fragment's own orientation (contiguous)."""
    return np.ascontiguousarray(np.rot90(image, -turns(angle), axes=(0, 1)))


class RotatedVolume:
    """The 65 slices of ``volume`` turned by ``angle``, served by bands from a cache of memory-mapped ``.npy``.

    The cache is built on the first read (or by ``ensure``, which the run calls once its free-space check has
    counted the cache), from ``volume``, which this object then owns and closes."""

    memmapped = True

    def __init__(self, volume, angle: int, cache: Path) -> None:
        self.warnings = list(volume.warnings)
        self.paths = list(volume.paths)
        self._volume, self._angle, self._cache = volume, angle, cache
        self._source = (
            volume.describe()
        )  # the cache is derived from it: the fingerprint's data stays the source's
        h, w = volume.height, volume.width
        self.height, self.width = (w, h) if turns(angle) % 2 else (h, w)
        self._record = {"angle": angle, "shape": [h, w], "data": self._source}
        self._slices: list | None = None

    def cache_bytes(self, *, rebuild: bool = False) -> int:
        """What ``ensure`` would write: nothing when the cache is there, matches its source and is not rebuilt."""
        if not rebuild and _cache_matches(self._cache, self._record):
            return 0
        return N_SLICES * self.height * self.width * 2

    def ensure(self, *, rebuild: bool = False) -> None:
        """The cache built (again with ``rebuild``: ``--fresh`` bypasses every cache) and mapped."""
        if rebuild or not _cache_matches(self._cache, self._record):
            _build(self._volume, self._angle, self._cache, self._record)
        self._slices = [np.load(self._cache / f"{z:02d}.npy", mmap_mode="r") for z in range(N_SLICES)]

    def missing_under(self, mask: np.ndarray) -> list[str]:
        """The source's chunks missing under ``mask`` (given turned, as the run sees it)."""
        return self._volume.missing_under(turn_back(mask, self._angle))

    def pyramid_mask(self) -> tuple[np.ndarray, str] | None:
        """The source's mask from its pyramid, in the source's own orientation (``load_mask`` turns it)."""
        return self._volume.pyramid_mask()

    @property
    def shape(self) -> tuple[int, int, int]:
        return (N_SLICES, self.height, self.width)

    def describe(self) -> dict:
        """For the fragment's fingerprint: the source's (the angle is in the fingerprint beside it)."""
        return self._source

    def read_band(self, y0: int, y1: int, z0: int, z1: int, *, out: np.ndarray | None = None) -> np.ndarray:
        if self._slices is None:
            self.ensure()
        out = band_buffer(y0, y1, z0, z1, self.width, out)
        rows = max(0, min(y1, self.height) - y0)
        for k, z in enumerate(range(z0, z1)):
            if rows:
                out[k, :rows] = self._slices[z][y0 : y0 + rows]
        out[:, rows:] = 0
        return out

    def close(self) -> None:
        self._slices = None
        self._volume.close()

    def __enter__(self) -> RotatedVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cache_matches(cache: Path, source: dict) -> bool:
    try:
        return json.loads((cache / "source.json").read_text()) == json.loads(json.dumps(source))
    except (OSError, ValueError):
        return False


def _build(volume, angle: int, cache: Path, source: dict) -> None:
    """Turn each slice into ``cache``: one slice in memory at a time; ``source.json`` last, so a cache cut short
    by a crash is never taken as complete. Too little room, or a write that fails, is a ``UserError``."""
    need = N_SLICES * volume.height * volume.width * 2
    try:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "source.json").unlink(missing_ok=True)
        have = sum(f.stat().st_size for f in cache.glob("*.npy")) + shutil.disk_usage(cache).free
        if have < need:
            raise UserError(f"{cache}: {size_text(have)} free, --rotate needs {size_text(need)} for the turned "
                            "slices: free some space or choose another --out")  # fmt: skip
        for z in range(N_SLICES):
            plane = volume.read_band(0, volume.height, z, z + 1)[0]
            turned = np.ascontiguousarray(turn(plane, angle))
            tmp = cache / f".{z:02d}.npy.tmp{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    np.save(f, turned)
                os.replace(tmp, cache / f"{z:02d}.npy")
            finally:
                tmp.unlink(missing_ok=True)
        (cache / "source.json").write_text(json.dumps(source))
    except OSError as e:
        raise UserError(f"{cache}: cannot write the turned slices for --rotate ({e.strerror or e})") from None
