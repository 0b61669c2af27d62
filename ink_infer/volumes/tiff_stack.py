"""A Kaggle fragment's ``surface_volume/00.tif .. 64.tif`` or a segment's ``layers/*.tif``, checked at open (names,
TIFF headers, shapes, dtypes, truncation) and read by bands of rows: ``read_band(y0, y1, z0, z1)`` is rows
[y0, y1) of slices [z0, z1) as ``(z1 - z0, y1 - y0, W)`` uint16 (uint8 data scaled by 257), never the whole volume.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from ink_infer.errors import UserError
from ink_infer.geometry import N_SLICES
from ink_infer.volumes.fragment import Fragment, shown_path
from ink_infer.volumes.segments import (
    LAYERS_DIR,
    layer_files,
)
from ink_infer.volumes.slices import DecodedSlice, MappedSlice, band_buffer, file_stats, open_slice

log = logging.getLogger(__name__)


_SLICE_NAME = re.compile(r"(\d+)\.tiff?", re.IGNORECASE)


class Volume:
    """The 65 slices of one fragment, checked at open and read by bands of rows.

    Slices may be symlinks anywhere (the data folder is the user's own, and researchers link segments from other
    disks); a broken one is refused. ``memmapped`` is True when every slice is uncompressed and memory-mapped (the
    fast path). ``warnings`` lists files that were ignored.
    """

    def __init__(self, fragment: Fragment) -> None:
        self.fragment = fragment
        self._base = fragment.path.parent.parent  # paths in messages are shown relative to it
        if fragment.layout == "segment":
            paths, self.warnings = _layer_paths(fragment, self._base), []
        else:
            paths, self.warnings = _slice_paths(fragment.path / "surface_volume", self._base)
        self.paths = paths
        with contextlib.ExitStack() as stack:
            self._slices: list[MappedSlice | DecodedSlice] = []
            for path in paths:
                source = open_slice(path, shown_path(path, self._base))
                stack.callback(source.close)
                self._slices.append(source)
            shapes = [src.shape for src in self._slices]
            _check_shapes(shapes, paths, self._base)
            _check_dtypes([src.dtype for src in self._slices], paths, self._base)
            single = sum(getattr(src, "single_segment", False) for src in self._slices)
            if single:
                self.warnings.append(
                    f"{shown_path(fragment.path / 'surface_volume', self._base)}: {single} of {len(paths)} slices are "
                    "compressed as a single segment: every band decodes the whole slice (slow)"
                )
            self._closer = stack.pop_all()  # all good: keep the files open until close()
        self.height, self.width = shapes[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(65, H, W)``."""
        return (N_SLICES, self.height, self.width)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    @property
    def memmapped(self) -> bool:
        return all(src.memmapped for src in self._slices)

    def describe(self) -> dict:
        """What the fragment's fingerprint holds of the data: each slice file's size and mtime, in layer order."""
        return {"slices": file_stats(self.paths)}

    def missing_under(self, mask: np.ndarray) -> list[str]:
        """Nothing: every slice file was opened and checked whole (only a zarr store may lack chunks)."""
        return []

    def pyramid_mask(self) -> tuple[np.ndarray, str] | None:
        """None: a TIFF stack has no lower-resolution level to find the papyrus in (only an OME-Zarr pyramid has)."""
        return None

    def read_band(self, y0: int, y1: int, z0: int, z1: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [y0, y1) of slices [z0, z1) as ``(z1 - z0, y1 - y0, W)`` uint16 on the CPU.

        Rows at or beyond H are zero-filled, so a full window height can be read at the bottom. ``out`` (same shape
        and dtype, e.g. a pinned buffer) is filled and returned instead of a new array.
        """
        out = band_buffer(y0, y1, z0, z1, self.width, out)
        rows = max(0, min(y1, self.height) - y0)
        for k, z in enumerate(range(z0, z1)):
            if rows:
                self._slices[z].read_rows(y0, y0 + rows, out[k, :rows])
        out[:, rows:] = 0
        return out

    def close(self) -> None:
        self._closer.close()
        self._slices = []

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _slice_paths(volume_dir: Path, base: Path) -> tuple[list[Path], list[str]]:
    """The 65 slice files ``00.tif .. 64.tif`` (``.tiff`` accepted), in order; UserError listing any gap or extra."""
    shown = shown_path(volume_dir, base)
    if not volume_dir.is_dir():
        raise UserError(f"{shown}: missing; expected a folder of slices 00.tif..64.tif")
    by_index: dict[int, list[Path]] = {}
    extra, warnings = [], []
    for entry in sorted(volume_dir.iterdir()):
        if entry.name.startswith("."):
            continue  # .DS_Store and friends
        match = _SLICE_NAME.fullmatch(entry.name)
        if match is None:
            warnings.append(f"{shown_path(entry, base)}: not a slice, ignored")
        elif len(match[1]) != 2 or int(match[1]) >= N_SLICES:
            extra.append(entry.name)
        else:
            by_index.setdefault(int(match[1]), []).append(entry)
    missing = [f"{z:02d}.tif" for z in range(N_SLICES) if z not in by_index]
    extra += [p.name for paths in by_index.values() if len(paths) > 1 for p in paths]
    if missing or extra:
        parts = [
            f"missing {', '.join(missing)}" if missing else "",
            f"extra {', '.join(extra)}" if extra else "",
        ]
        raise UserError(f"{shown}: expected slices 00.tif..64.tif; {'; '.join(p for p in parts if p)}")
    paths = [by_index[z][0] for z in range(N_SLICES)]
    for path in paths:
        _check_slice_file(path, base)
    return paths, warnings


def _layer_paths(fragment: Fragment, base: Path) -> list[Path]:
    """A segment's 65 layer files, in the models' order (``Fragment.layers``)."""
    layers_dir = fragment.path / LAYERS_DIR
    files = layer_files(layers_dir, shown_path(layers_dir, base))
    paths = [files[i] for i in fragment.layers]
    for path in paths:
        _check_slice_file(path, base)
    return paths


def _check_slice_file(path: Path, base: Path) -> None:
    shown = shown_path(path, base)
    if not path.exists():
        raise UserError(f"{shown}: broken symlink to {path.readlink()}")
    if not path.is_file():
        raise UserError(f"{shown}: not a file")


def _check_dtypes(dtypes: list[np.dtype], paths: list[Path], base: Path) -> None:
    common = Counter(dtypes).most_common(1)[0][0]
    odd = [(p, d) for p, d in zip(paths, dtypes, strict=True) if d != common]
    if odd:
        raise UserError(f"{shown_path(odd[0][0], base)}: dtype {odd[0][1]}, other slices {common}")


def _check_shapes(shapes: list[tuple[int, int]], paths: list[Path], base: Path) -> None:
    common = Counter(shapes).most_common(1)[0][0]
    odd = [(p, s) for p, s in zip(paths, shapes, strict=True) if s != common]
    if odd:
        (path, (h, w)), more = odd[0], f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise UserError(f"{shown_path(path, base)}: {h}x{w}, other slices {common[0]}x{common[1]}{more}")
