"""One surface-volume slice on disk: validated at open, then read by row ranges without loading the whole file.

Two kinds, chosen per file at open:

- ``MappedSlice``: uncompressed, contiguous data (the data server's layout). Rows are copied out of a read-only
  memory map; nothing is read at open.
- ``DecodedSlice``: compressed or tiled data. Only the strips or tiles that overlap the requested rows are decoded;
  a file stored as one compressed segment is decoded whole, one slice at a time.

Slices are uint16 (the Kaggle data) or uint8 (many scroll segments). uint8 values are served as ``v * 257``, the
same intensity on the uint16 scale (255 -> 65535): the per-window normalisation is invariant to a positive scale,
so uint8 data gives the probabilities of that data in uint16, the reference's float16 rounding of ``raw / 65535``
included (``v * 257 / 65535`` is ``v / 255``).

Every problem found here is a ``UserError`` naming the file (``display`` is the path shown to the user).
"""

from __future__ import annotations

import logging
import mmap
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import tifffile

from ink_infer.errors import UserError
from ink_infer.geometry import N_SLICES

log = logging.getLogger(__name__)

# What a damaged or foreign file makes tifffile (or the zlib / imagecodecs decoders) raise. Caught only around
# file parsing and decoding, where any of them means "this file is bad".
TIFF_ERRORS = (
    tifffile.TiffFileError,
    ValueError,
    OSError,
    EOFError,
    struct.error,
    zlib.error,
    RuntimeError,
    KeyError,
    IndexError,
)


SLICE_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint8))
UINT8_TO_UINT16 = 257  # 255 * 257 = 65535: uint8 intensities on the uint16 scale


def copy_scaled(src: np.ndarray, out: np.ndarray) -> None:
    """``src`` (uint16, or uint8 scaled by 257) into the uint16 ``out``."""
    if src.dtype == np.uint8:
        np.multiply(src, UINT8_TO_UINT16, out=out, dtype=np.uint16)
    else:
        out[...] = src


def band_buffer(y0: int, y1: int, z0: int, z1: int, width: int, out: np.ndarray | None) -> np.ndarray:
    """The ``(z1 - z0, y1 - y0, width)`` uint16 array a volume's ``read_band`` fills: ``out`` when given (checked),
    else a new one; the arguments checked as every volume takes them."""
    if not (0 <= y0 < y1 and 0 <= z0 < z1 <= N_SLICES):
        raise ValueError(
            f"read_band({y0}, {y1}, {z0}, {z1}): expected 0 <= y0 < y1, 0 <= z0 < z1 <= {N_SLICES}"
        )
    shape = (z1 - z0, y1 - y0, width)
    if out is None:
        return np.empty(shape, np.uint16)
    if out.shape != shape or out.dtype != np.uint16:
        raise ValueError(f"read_band out: {out.shape} {out.dtype}, expected {shape} uint16")
    return out


def file_stats(paths) -> list[list]:
    """``[name, size, mtime_ns]`` of each file, in order: a cheap identity of slice files (any rewrite changes it)."""
    stats = []
    for path in paths:
        st = Path(path).stat()
        stats.append([Path(path).name, st.st_size, st.st_mtime_ns])
    return stats


class MappedSlice:
    """An uncompressed slice, memory-mapped. ``read_rows`` copies rows [y0, y1) into a (y1 - y0, W) uint16 array."""

    single_segment = False

    memmapped = True

    def __init__(self, path: Path, page: tifffile.TiffPage, byteorder: str, display: str) -> None:
        self.display = display
        height, width = self.shape = page.shape
        self.dtype = np.dtype(page.dtype)
        self._row_bytes = width * self.dtype.itemsize
        self._offset = int(page.dataoffsets[0])
        with open(path, "rb") as fh:
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        # The file's byte order: copying into a native uint16 array swaps bytes when needed.
        dtype = np.dtype(byteorder + ("u2" if self.dtype.itemsize == 2 else "u1"))
        self._array: np.ndarray | None = np.frombuffer(
            self._mm, dtype=dtype, count=height * width, offset=self._offset
        ).reshape(height, width)

    def read_rows(self, y0: int, y1: int, out: np.ndarray) -> None:
        assert self._array is not None, "slice is closed"
        copy_scaled(self._array[y0:y1], out)
        # Drop the pages just copied from this process's mapping: the data stays in the page cache, but the mapped
        # pages would otherwise count towards RSS until the whole volume (up to 18 GB) looks resident.
        if hasattr(mmap, "MADV_DONTNEED"):
            start = self._offset + y0 * self._row_bytes
            aligned = start - start % mmap.PAGESIZE
            self._mm.madvise(mmap.MADV_DONTNEED, aligned, self._offset + y1 * self._row_bytes - aligned)

    def close(self) -> None:
        self._array = None  # the buffer export must go before the map can close
        self._mm.close()


class DecodedSlice:
    """A compressed or tiled slice. ``read_rows`` decodes the segments (strips or tiles) overlapping [y0, y1)."""

    memmapped = False

    def __init__(self, tif: tifffile.TiffFile, display: str) -> None:
        self.display = display
        self._tif = tif
        self._page = tif.pages[0]
        self._lock = threading.Lock()  # seek + read on the shared file handle must not interleave
        page = self._page
        self.dtype = np.dtype(page.dtype)
        self._height, self._width = self.shape = page.shape
        if page.is_tiled:
            self._seg_h, self._seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self._seg_h, self._seg_w = min(int(page.rowsperstrip) or self._height, self._height), self._width
        self._across = -(-self._width // self._seg_w)
        if len(page.dataoffsets) != self._across * -(-self._height // self._seg_h):
            raise UserError(f"{display}: {len(page.dataoffsets)} data segments, expected one greyscale plane")
        # said once per volume by its opener, not once per slice (tiff_stack.Volume)
        self.single_segment = len(page.dataoffsets) == 1
        first = (min(self._seg_h, self._height), min(self._seg_w, self._width))
        self._decode_segment(
            0, first
        )  # fails now, not mid-run, when the codec is missing or the data is damaged

    def read_rows(self, y0: int, y1: int, out: np.ndarray) -> None:
        for row in range(y0 // self._seg_h, (y1 - 1) // self._seg_h + 1):
            for col in range(self._across):
                sy, sx = row * self._seg_h, col * self._seg_w
                bottom, right = min(y1, sy + self._seg_h, self._height), min(self._width, sx + self._seg_w)
                seg = self._decode_segment(row * self._across + col, (bottom - sy, right - sx))
                top = max(y0, sy)
                copy_scaled(seg[top - sy : bottom - sy, : right - sx], out[top - y0 : bottom - y0, sx:right])

    def _decode_segment(self, index: int, min_shape: tuple[int, int]) -> np.ndarray:
        """Segment ``index`` as a 2-D array (the file's dtype) of at least ``min_shape`` (edge tiles come padded)."""
        page = self._page
        try:
            with self._lock:
                fh = self._tif.filehandle
                fh.seek(page.dataoffsets[index])
                data = fh.read(page.databytecounts[index])
            seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except TIFF_ERRORS as err:
            raise UserError(f"{self.display}: cannot decode image data ({err})") from err
        if seg is None or seg.ndim != 4 or seg.shape[1] < min_shape[0] or seg.shape[2] < min_shape[1]:
            got = "nothing" if seg is None else "x".join(map(str, seg.shape))
            raise UserError(
                f"{self.display}: segment {index} decoded to {got}, expected {min_shape[0]}x{min_shape[1]}"
            )
        return seg.reshape(seg.shape[1], seg.shape[2])

    def close(self) -> None:
        self._tif.close()


def open_slice(path: Path, display: str) -> MappedSlice | DecodedSlice:
    """Open and check one slice file; reads the TIFF header, not the pixels (except one segment if compressed)."""
    try:
        tif = tifffile.TiffFile(path)
    except TIFF_ERRORS as err:
        raise UserError(f"{display}: not a readable TIFF ({err})") from err
    try:
        page = tif.pages[0]
        _check_page(page, tif.filehandle.size, display)
        if not page.is_memmappable:
            return DecodedSlice(tif, display)  # keeps the file open for later reads
        mapped = MappedSlice(path, page, tif.byteorder, display)
    except TIFF_ERRORS as err:
        tif.close()
        raise UserError(f"{display}: not a readable TIFF ({err})") from err
    except UserError:
        tif.close()
        raise
    tif.close()
    return mapped


def _check_page(page: tifffile.TiffPage, file_size: int, display: str) -> None:
    if len(page.shape) != 2:
        raise UserError(f"{display}: image of shape {page.shape}, expected one greyscale plane")
    if np.dtype(page.dtype) not in SLICE_DTYPES:
        raise UserError(f"{display}: dtype {page.dtype}, expected uint16 or uint8")
    if not page.dataoffsets or not any(page.databytecounts):
        raise UserError(f"{display}: no image data")
    end = max(int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts, strict=True))
    if end > file_size:
        raise UserError(f"{display}: truncated: {file_size} bytes, image data runs to byte {end}")
    if (
        page.compression == 1
        and sum(page.databytecounts) < page.shape[0] * page.shape[1] * page.dtype.itemsize
    ):
        expected = page.shape[0] * page.shape[1] * page.dtype.itemsize
        raise UserError(
            f"{display}: {sum(page.databytecounts)} bytes of uncompressed data, expected {expected}"
        )
