"""Full-resolution pictures of the ink for researchers: the probability map as a tiled, compressed uint8 TIFF
(BigTIFF when large), written tile by tile, and the binary ink mask as a PNG.

``OUT/probabilities/<id>.tif``: ``round(p * 255)``, 256 x 256 tiles, zlib; ``OUT/probabilities/<id>.<model>.tif``:
one model's map (``--save-model-maps``); ``OUT/masks/<id>.png``: the submission's ink mask, 0/255. Each file is
written to a temporary name and renamed, so a full disk leaves no half-written TIFF behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import tifffile

TILE = 256
BIGTIFF_BYTES = 2**31  # past this (a 50k x 50k segment), classic TIFF offsets overflow


def quantised(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as uint8 levels ``round(p * 255)``."""
    return np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)


def _tiles(prob: np.ndarray) -> Iterator[np.ndarray]:
    """The map's tiles in row-major order, each quantised as it is written (no uint8 copy of the whole map)."""
    h, w = prob.shape
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            tile = np.zeros((TILE, TILE), np.uint8)
            part = prob[y : y + TILE, x : x + TILE]
            tile[: part.shape[0], : part.shape[1]] = quantised(part)
            yield tile


def write_probability_tiff(path: Path, prob: np.ndarray) -> None:
    """``prob`` ``(H, W)`` float32 as a tiled, zlib-compressed uint8 TIFF at ``path``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tifffile.imwrite(
            tmp, _tiles(prob), shape=prob.shape, dtype=np.uint8, tile=(TILE, TILE), compression="zlib",
            bigtiff=prob.size >= BIGTIFF_BYTES, photometric="minisblack", metadata=None,
        )  # fmt: skip
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_mask_png(path: Path, ink: np.ndarray) -> None:
    """The ink mask as a 0/255 PNG at ``path``, atomically."""
    from .atomic import atomic_write_bytes

    ok, data = cv2.imencode(".png", ink.astype(np.uint8) * 255)
    if not ok:
        raise OSError(f"{path}: could not encode the mask")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data.tobytes())
