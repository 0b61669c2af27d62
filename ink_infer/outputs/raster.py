"""Fragment-sized maps read and written by bands: in memory for a fragment that fits, in a raw file on disk for a
scroll segment that would not (``geometry.LARGE_PIXELS``, ``is_large``).

A 20,000 x 40,000 px segment is 3.2 GB per float32 map; the ensemble's sum of model maps is one such map, kept
for the whole run (models run outer, fragments inner). Past ``LARGE_PIXELS`` it lives in a file instead, and each
access maps the file (``mmap``), touches just its part and unmaps it at once: what a run holds of it is then one
band, while the rest sits in the page cache, which the kernel gives back under memory pressure (a map kept open
would count every page it ever touched in the process's resident memory).

``turned_band``: rows of a map turned back to the fragment's own orientation (``rotation.turn_back``) without
turning the whole map: rows of a map turned by a quarter are columns of the stored one.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ink_infer import geometry
from ink_infer.errors import UserError
from ink_infer.volumes.rotation import turns

BAND_ROWS = 256  # rows per band of the passes over a map (the probability TIFF's tile height)


class Raster:
    """An ``(H, W)`` map of ``dtype``, zeros at first: in memory, or in the raw file ``path`` (row-major)."""

    def __init__(self, shape: tuple[int, int], dtype, path: Path | None = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.path = None if path is None else Path(path)
        self._array = None
        if self.path is None or 0 in self.shape:
            self.path = None
            self._array = np.zeros(self.shape, self.dtype)
        else:
            self._allocate()

    def _allocate(self) -> None:
        """The file, zeros, its blocks taken now: a disk that fills up later would otherwise kill the process
        (SIGBUS) on its first write through a memory map, instead of failing here with a line."""
        size = self.shape[0] * self.shape[1] * self.dtype.itemsize
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                f.truncate(size)
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            self.path.unlink(missing_ok=True)
            raise UserError(
                f"{self.path}: no room for a {size / 2**20:.0f} MB map of a large fragment ({e.strerror or e}): "
                "free some space, or put the partials elsewhere (--partials DIR)"
            ) from None

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def piece(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray:
        """A copy of ``[y0:y1, x0:x1]`` (a view in memory: do not change it)."""
        if self._array is not None:
            return self._array[y0:y1, x0:x1]
        return self._on_file(lambda a: np.array(a[y0:y1, x0:x1]), write=False)

    def add(self, y0: int, values: np.ndarray) -> None:
        """``map[y0 : y0 + len(values)] += values`` (the same float32 addition as in memory)."""
        self._update(y0, values, add=True)

    def write(self, y0: int, values: np.ndarray) -> None:
        """``map[y0 : y0 + len(values)] = values``."""
        self._update(y0, values, add=False)

    def _update(self, y0: int, values: np.ndarray, *, add: bool) -> None:
        def update(a: np.ndarray) -> None:
            rows = a[y0 : y0 + len(values)]
            if add:
                rows += values
            else:
                rows[...] = values

        if self._array is not None:
            update(self._array)
        else:
            self._on_file(update, write=True)

    def delete(self) -> None:
        """Free the map (its file removed)."""
        self._array = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _on_file(self, use, *, write: bool):
        """``use(the whole file as an (H, W) array)``, the file mapped only meanwhile: its pages leave the
        process's resident set when it returns. ``use`` must not hand back a view of the array."""
        access = mmap.ACCESS_WRITE if write else mmap.ACCESS_READ
        with open(self.path, "r+b" if write else "rb") as f, mmap.mmap(f.fileno(), 0, access=access) as m:
            a = np.frombuffer(m, self.dtype).reshape(self.shape)
            try:
                return use(a)
            finally:
                del a  # the map closes only once no array looks into it


# ``piece(y0, y1, x0, x1)``: a copy (or view) of a region of an ``(H, W)`` map
Piece = Callable[[int, int, int, int], np.ndarray]


def array_piece(a: np.ndarray) -> Piece:
    return lambda y0, y1, x0, x1: a[y0:y1, x0:x1]


def turned_shape(shape: tuple[int, int], angle: int) -> tuple[int, int]:
    """The shape of an ``(H, W)`` map turned back by ``angle``."""
    return shape if turns(angle) % 2 == 0 else (shape[1], shape[0])


def turned_band(piece: Piece, shape: tuple[int, int], angle: int, lo: int, hi: int) -> np.ndarray:
    """Rows ``[lo, hi)`` of ``rotation.turn_back(map, angle)``, where ``map`` of ``shape`` is read by ``piece``.

    ``turn_back`` is ``np.rot90(map, -k)``: for ``k = 1`` its rows ``[lo, hi)`` are the map's columns ``[lo, hi)``,
    turned; for ``k = 2`` the map's rows ``[H - hi, H - lo)``; for ``k = 3`` its columns ``[W - hi, W - lo)``."""
    h, w = shape
    k = turns(angle)
    if k == 0:
        return piece(lo, hi, 0, w)
    if k == 1:
        part = piece(0, h, lo, hi)
    elif k == 2:
        part = piece(h - hi, h - lo, 0, w)
    else:
        part = piece(0, h, w - hi, w - lo)
    return np.ascontiguousarray(np.rot90(part, -k))


def bands(height: int, rows: int = BAND_ROWS) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` row bands of ``rows`` covering ``[0, height)``."""
    for lo in range(0, height, rows):
        yield lo, min(height, lo + rows)


def is_large(shape: tuple[int, int]) -> bool:
    """Whether a fragment of ``shape`` keeps its maps on disk (``geometry.LARGE_PIXELS``)."""
    return shape[0] * shape[1] > geometry.LARGE_PIXELS


def scratch_path(root: Path) -> Path:
    """This process's folder for spilled maps under ``root`` (``OUT/partials`` by default; on Kaggle the
    temporary directory): made when the first map spills (``scratch_dir``), removed when the run ends."""
    return Path(root) / f"maps.{os.getpid()}"


def scratch_dir(root: Path) -> Path:
    path = scratch_path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_scratch(path: Path) -> None:
    """Remove the spilled maps' folder, if there is one: the maps this run spilled there (``*.f32``), and the folder
    once empty (never a file that is not one of ours)."""
    if not path.is_dir():
        return
    for f in path.glob("*.f32"):
        f.unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass
