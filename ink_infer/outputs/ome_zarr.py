"""The probability map as an OME-Zarr (NGFF 0.4) multiscale image: what VC3D, napari and neuroglancer open.

``OUT/probabilities/<id>.ome.zarr`` (``--prob-format ome-zarr``): a zarr v2 group whose level 0 holds the same
uint8 values as the TIFF, ``round(p * 255)``, and each further level the 2 x 2 mean of the one above (rounded half
up, the last odd row or column alone), halved until the smaller side is under 1024 pixels; chunks of 512 x 512,
zlib. Written band by band as the map's rows come (512 rows of level 0 at a time, the levels below as their rows
are complete), so the map is never whole in memory; into a hidden folder first, renamed into place once complete
(a run that stops leaves the previous image or none, never half of one).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ink_infer.errors import UserError
from ink_infer.outputs.maps import quantised

CHUNK = 512
MIN_SIDE = 1024  # levels are added while the smaller side is at least this


def level_shapes(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """``(H, W)`` of every level, level 0 first: halved (rounding up) until the smaller side is under 1024."""
    shapes = [tuple(shape)]
    while min(shapes[-1]) >= MIN_SIDE:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def halved(rows: np.ndarray) -> np.ndarray:
    """``(2r, W)`` uint8 -> ``(r, ceil(W / 2))``: the 2 x 2 means, rounded half up (an odd last column alone)."""
    acc = rows.astype(np.uint16)
    if acc.shape[1] % 2:
        acc = np.concatenate([acc, acc[:, -1:]], axis=1)
    if acc.shape[0] % 2:
        acc = np.concatenate([acc, acc[-1:]], axis=0)
    total = acc[0::2, 0::2] + acc[1::2, 0::2] + acc[0::2, 1::2] + acc[1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


def multiscales(name: str, n_levels: int) -> list[dict]:
    """The NGFF 0.4 ``multiscales`` attribute of a 2-D ``(y, x)`` pyramid of ``n_levels`` halvings."""
    datasets = [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [2.0**k, 2.0**k]}]}
                for k in range(n_levels)]  # fmt: skip
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    return [{"version": "0.4", "name": name, "axes": axes, "datasets": datasets, "type": "mean"}]


def write_probability_ome_zarr(path: Path, shape: tuple[int, int], bands: Iterable[np.ndarray]) -> None:
    """The ``(H, W)`` float32 map given as consecutive bands of rows, as an OME-Zarr pyramid at ``path``."""
    try:
        import zarr
    except ImportError:
        raise UserError(
            f"{path}: --prob-format ome-zarr needs the zarr package: pip install 'ink_infer[zarr]'"
        ) from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        shapes = level_shapes(shape)
        arrays = [group.create_array(str(k), shape=s, chunks=(CHUNK, CHUNK), dtype="uint8", fill_value=0,
                                     compressors=[_zlib()]) for k, s in enumerate(shapes)]  # fmt: skip
        _write_levels(arrays, bands)
        group.attrs["multiscales"] = multiscales(path.name.removesuffix(".ome.zarr"), len(shapes))
        _replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _zlib():
    from numcodecs import Zlib

    return Zlib(level=6)


def _write_levels(arrays: list, bands: Iterable[np.ndarray]) -> None:
    """Level 0 from ``bands`` (quantised as they come), each level below from the rows of the one above, each
    written a chunk's height of rows at a time (the last rows of a level when its input ends)."""
    pending = [np.zeros((0, a.shape[1]), np.uint8) for a in arrays]  # rows of each level not yet written
    written = [0] * len(arrays)

    def put(k: int, rows: np.ndarray, final: bool) -> None:
        pending[k] = np.concatenate([pending[k], rows]) if len(pending[k]) else rows
        while len(pending[k]) >= CHUNK or (final and len(pending[k])):
            block, pending[k] = pending[k][:CHUNK], pending[k][CHUNK:]
            arrays[k][written[k] : written[k] + len(block)] = block
            written[k] += len(block)
            if k + 1 < len(arrays):
                put(k + 1, halved(block), final=False)  # a full block has even rows: halved exactly
        if final and k + 1 < len(arrays):
            put(k + 1, np.zeros((0, arrays[k + 1].shape[1]), np.uint8), final=True)

    for band in bands:
        put(0, quantised(band), final=False)
    put(0, np.zeros((0, arrays[0].shape[1]), np.uint8), final=True)


def _replace_folder(new: Path, target: Path) -> None:
    """``new`` in place of ``target``: the old one moved aside first, removed once the new one is there."""
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(new, target)
    finally:
        shutil.rmtree(old, ignore_errors=True)
