"""Full-resolution pictures of the ink for researchers: the probability map as a tiled, compressed uint8 TIFF
(BigTIFF when large), and the binary ink mask as a PNG, both written band by band from maps that may never be
whole in memory (``raster.py``).

``OUT/probabilities/<id>.tif``: ``round(p * 255)``, 256 x 256 tiles, zlib; ``OUT/probabilities/<id>.<model>.tif``:
one model's map (``--save-model-maps``); ``OUT/masks/<id>.png``: the submission's ink mask, 0/255, 8-bit
greyscale, its rows compressed as they come (zlib, as any PNG). Each file is written to a temporary name and
renamed, so a full disk leaves no half-written file behind.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tifffile

from ink_infer.config import PROB_FORMATS
from ink_infer.outputs.atomic import atomic_write

TILE = 256  # the TIFF's tiles; the bands handed to ``write_probability_tiff`` are this many rows
BIGTIFF_BYTES = 2**31  # past this (a 50k x 50k segment), classic TIFF offsets overflow


def probability_path(out: Path, stem: str, fmt: str) -> Path:
    """``OUT/probabilities/<stem>.tif`` or ``.ome.zarr``: where a probability map of ``--prob-format fmt`` goes."""
    return out / "probabilities" / f"{stem}{PROB_FORMATS[fmt]}"


def gp_picture_path(out: Path, model: str, fragment_id: str, first_layer: int) -> Path:
    """``OUT/gp_png/<model>/<id>_prediction_rotated_0_layer_<first layer>.png``: where ``--gp-png`` writes a GP-family
    model's picture of a fragment, under the GP script's own file name (``run.gp_picture``)."""
    return out / "gp_png" / model / f"{fragment_id}_prediction_rotated_0_layer_{first_layer}.png"


def quantised(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as uint8 levels ``round(p * 255)``."""
    return np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)


def _tiles(width: int, bands: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Row-major tiles of the map given as bands of ``TILE`` rows, each quantised as it is cut."""
    for band in bands:
        for x in range(0, width, TILE):
            tile = np.zeros((TILE, TILE), np.uint8)
            part = band[:, x : x + TILE]
            tile[: part.shape[0], : part.shape[1]] = quantised(part)
            yield tile


def write_probability_tiff(path: Path, shape: tuple[int, int], bands: Iterable[np.ndarray]) -> None:
    """The ``(H, W)`` float32 map given as consecutive bands of ``TILE`` rows (the last may be shorter), as a tiled,
    zlib-compressed uint8 TIFF at ``path``, atomically. The bands are read as the tiles are written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tifffile.imwrite(
            tmp, _tiles(shape[1], bands), shape=shape, dtype=np.uint8, tile=(TILE, TILE), compression="zlib",
            bigtiff=shape[0] * shape[1] >= BIGTIFF_BYTES, photometric="minisblack", metadata=None,
        )  # fmt: skip
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_mask_png(path: Path, shape: tuple[int, int], bands: Iterable[np.ndarray]) -> None:
    """The ``(H, W)`` ink mask given as consecutive bands of rows (bool), as a 0/255 greyscale PNG at ``path``,
    atomically; one band in memory at a time."""
    write_png(path, shape, (np.where(band, np.uint8(255), np.uint8(0)) for band in bands))


def write_png(path: Path, shape: tuple[int, int], bands: Iterable[np.ndarray]) -> None:
    """An ``(H, W)`` 8-bit greyscale picture given as consecutive bands of rows (uint8), as a PNG at ``path``,
    atomically; one band in memory at a time."""
    h, w = shape

    def write(f) -> None:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)))
        packer = zlib.compressobj(6)
        rows = 0
        for band in bands:
            lines = np.zeros(
                (band.shape[0], w + 1), np.uint8
            )  # each row: filter type 0 (none), then its pixels
            lines[:, 1:] = band
            rows += band.shape[0]
            data = packer.compress(lines.tobytes())
            if data:
                f.write(_chunk(b"IDAT", data))
        if rows != h:
            raise ValueError(f"{path}: {rows} rows given for a picture of {h}")
        f.write(_chunk(b"IDAT", packer.flush()) + _chunk(b"IEND", b""))

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
