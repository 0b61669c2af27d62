"""``open_volume``: any fragment's volume behind one ``read_band`` interface (a TIFF stack, a zarr store, or either
turned by ``--rotate``)."""

from __future__ import annotations

import logging

import numpy as np

from ink_infer.volumes.fragment import Fragment
from ink_infer.volumes.tiff_stack import Volume
from ink_infer.volumes.zarr_store import ZarrVolume

log = logging.getLogger(__name__)


def open_volume(fragment: Fragment, touched: np.ndarray | None = None) -> Volume | ZarrVolume:
    """The fragment's slices (a TIFF stack, a zarr store), turned when the run asks for it (``--rotate``).
    ``touched``: the blocks the run reads as data; a zarr store not turned reads only their chunks."""
    if fragment.layout == "zarr":
        volume = ZarrVolume(fragment.remote or fragment.path, fragment.layers, fragment.layer_axis)
        volume.touched = None if fragment.rotate else touched
    else:
        volume = Volume(fragment)
    if not fragment.rotate:
        return volume
    from ink_infer.volumes.rotation import RotatedVolume

    return RotatedVolume(volume, fragment.rotate, fragment.rotate_cache)
