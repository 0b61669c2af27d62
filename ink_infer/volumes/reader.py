"""``open_volume``: any fragment's volume behind one ``read_band`` interface (a TIFF stack, a zarr store, or either
turned by ``--rotate``)."""

from __future__ import annotations

import logging

from ink_infer.volumes.fragment import Fragment
from ink_infer.volumes.segments import (
    ZarrVolume,
)
from ink_infer.volumes.tiff_stack import Volume

log = logging.getLogger(__name__)


def open_volume(fragment: Fragment) -> Volume | ZarrVolume:
    """The fragment's slices (a TIFF stack, a zarr store), turned when the run asks for it (``--rotate``)."""
    volume = ZarrVolume(fragment.path, fragment.layers) if fragment.layout == "zarr" else Volume(fragment)
    if not fragment.rotate:
        return volume
    from ink_infer.volumes.rotation import RotatedVolume

    with volume:
        return RotatedVolume(volume, fragment.rotate, fragment.rotate_cache)
