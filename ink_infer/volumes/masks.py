"""A fragment's mask (``mask.png``, a segment's ``<seg>_mask.png``; every pixel when a segment has none) and the
ink labels of training fragments, read as ``(H, W)`` bool and checked against the volume's shape."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import cv2
import numpy as np

from ink_infer.errors import UserError
from ink_infer.volumes.fragment import Fragment, shown_path
from ink_infer.volumes.segments import segment_mask, segment_masks

log = logging.getLogger(__name__)


NO_MASK_FILE = "missing, using every pixel"  # the note of a fragment without a mask file


def load_mask(fragment: Fragment, shape: tuple[int, ...], pyramid=None) -> tuple[np.ndarray, str | None]:
    """The fragment's mask as ``(H, W)`` bool (pixel > 0), ``shape`` being ``(H, W)`` or ``(65, H, W)``.

    ``fragment.mask`` (``--mask``, or a remote store's fetched mask) when set, else ``mask.png`` (a segment's
    ``<seg>_mask.png``). Without one: ``pyramid()`` (the volume's ``pyramid_mask``: the papyrus of an OME-Zarr
    store's coarsest level) when it finds one, else all True; either with a note. The reference binarises with
    PIL ``convert("1")``, which agrees with ``> 0`` on the 0/255 masks Kaggle ships.
    """
    if fragment.mask is not None:
        path = fragment.mask
    else:
        path = fragment.path / "mask.png" if fragment.layout == "kaggle" else segment_mask(fragment.path)
    base = fragment.path.parent.parent
    if not path.exists():
        found = pyramid() if pyramid is not None and fragment.mask is None else None
        if found is None:
            shown = (
                f"{fragment.where}: no mask beside or in the store"
                if fragment.remote
                else shown_path(path, base)
            )
            return np.ones(shape[-2:], bool), f"{shown}: {NO_MASK_FILE}"
        mask, note = found
        if fragment.rotate:
            from ink_infer.volumes.rotation import turn

            mask = np.ascontiguousarray(turn(mask, fragment.rotate))
        return mask, note
    note = None
    others = (
        [] if fragment.layout == "kaggle" or fragment.mask is not None else segment_masks(fragment.path)[1:]
    )
    used = path.read_bytes() if others else b""
    differing = [o for o in others if o.read_bytes() != used]
    if differing:
        note = (f"{shown_path(path, base)} is used as the mask; {shown_path(differing[0], base)} differs from it "
                "and is ignored")  # fmt: skip
    if fragment.rotate:  # the file is in the fragment's own orientation; the run sees it turned
        from ink_infer.volumes.rotation import turn, turns

        h, w = shape[-2:]
        own = (w, h) if turns(fragment.rotate) % 2 else (h, w)
        return np.ascontiguousarray(turn(_read_binary_png(path, own, base), fragment.rotate)), note
    return _read_binary_png(path, shape[-2:], base), note


def load_labels(source: Fragment | Path, shape: tuple[int, ...]) -> np.ndarray:
    """Ink labels as ``(H, W)`` bool from a fragment's ``inklabels.png`` or a PNG path (0/1 or 0/255)."""
    if isinstance(source, Fragment):
        path, base = source.path / "inklabels.png", source.path.parent.parent
    else:
        path, base = Path(source), Path(source).parent.parent
    if not path.exists():
        raise UserError(f"{shown_path(path, base)}: missing; expected an ink label PNG")
    return _read_binary_png(path, shape[-2:], base)


def _read_binary_png(path: Path, shape: tuple[int, ...], base: Path) -> np.ndarray:
    # ANYDEPTH keeps 16-bit PNGs at full depth, so a 0/1 16-bit mask is not shifted down to all zeros.
    with (
        native_stderr_silenced()
    ):  # OpenCV and libpng print their own WARN/ERROR lines; ours is the one that counts
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise UserError(f"{shown_path(path, base)}: not a readable image")
    if image.shape != tuple(shape):
        h, w = image.shape
        raise UserError(f"{shown_path(path, base)}: {h}x{w}, slices {shape[0]}x{shape[1]}")
    return image > 0


@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 points at /dev/null inside the block: C libraries (libpng, OpenCV's loader) write there
    directly, past Python's ``sys.stderr``. Used only around a single image read, before any thread is started."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to save: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
