"""Scroll segments: the layouts researchers hold, beside the Kaggle one.

- the segment layout: ``<seg>/layers/00.tif .. NN.tif`` (65 layers in older data, more in newer: 109-layer stacks
  exist), with ``<seg>/<seg>_mask.png`` or ``<seg>/mask.png`` (absent: every pixel, with a warning);
- zarr and OME-Zarr surface volumes, ``<seg>.zarr``: an array, or level 0 of a multiscale group; layers on the
  first or the last axis; uint8 or uint16; any chunking; read chunk-wise through the optional ``zarr`` package
  (``pip install 'ink_infer[zarr]'``); the mask beside it, ``<seg>_mask.png``, or inside, ``<seg>.zarr/mask.png``.

The models see 65 layers. Of a longer stack, ``--layers START:STOP`` picks them (STOP - START = 65, the numbering of
the files or of the layer axis), and by default the 65 in the middle; ``--direction reverse`` (or ``--reverse-layers``) turns the
pick around for segments whose depth runs the other way (model layer 0 is then the stack's layer STOP - 1), and
``--direction both`` reads each segment both ways, as two fragments (``discovery``). ``LayerChoice`` holds the
choice; ``Fragment.layers`` the stack indices it gives, in the models' order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ink_infer.errors import UserError
from ink_infer.geometry import N_SLICES

LAYERS_DIR = "layers"
ZARR_SUFFIX = ".zarr"
_LAYER_NAME = re.compile(r"(\d+)\.tiff?", re.IGNORECASE)


@dataclass(frozen=True)
class LayerChoice:
    """``--layers START:STOP`` (None: centred), ``--direction reverse`` (``reverse``), and a zarr store's
    ``--layer-axis`` (first | last; None: from the store, its mask or its shape, ``zarr_store``). ``both``
    (``--direction both``): each segment is found twice, as read and reversed; ``pick`` reads ``reverse`` alone."""

    span: tuple[int, int] | None = None
    reverse: bool = False
    axis: str | None = None
    both: bool = False

    def pick(self, n_layers: int, where: str) -> tuple[int, ...]:
        """The stack indices the models' 65 layers read, in their order; ``UserError`` naming ``where``."""
        if n_layers < N_SLICES:
            raise UserError(f"{where}: {n_layers} layers, the models need {N_SLICES}")
        if self.span is None:
            start = (n_layers - N_SLICES) // 2
            stop = start + N_SLICES
        else:
            start, stop = self.span
            if stop - start != N_SLICES or start < 0 or stop > n_layers:
                raise UserError(
                    f"{where}: --layers {start}:{stop}, expected {N_SLICES} layers within 0:{n_layers} "
                    f"(e.g. {(n_layers - N_SLICES) // 2}:{(n_layers - N_SLICES) // 2 + N_SLICES}, the middle)"
                )
        picked = tuple(range(start, stop))
        return picked[::-1] if self.reverse else picked


def parse_layers(text: str | None) -> tuple[int, int] | None:
    """``--layers START:STOP`` -> (start, stop)."""
    if text is None:
        return None
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"--layers {text!r}: expected START:STOP, e.g. 22:87 (65 layers)") from None
    if stop - start != N_SLICES or start < 0:
        raise UserError(
            f"--layers {text!r}: expected {N_SLICES} layers (STOP - START = {N_SLICES}), START >= 0"
        )
    return start, stop


def is_segment(folder: Path) -> bool:
    return (folder / LAYERS_DIR).is_dir()


def is_zarr(path: Path) -> bool:
    return path.is_dir() and path.name.endswith(ZARR_SUFFIX)


def layer_files(layers_dir: Path, shown: str) -> list[Path]:
    """The stack's layer files ``00.tif .. NN.tif`` in order, numbered from 0 without gaps; ``UserError`` else."""
    numbered: dict[int, Path] = {}
    for entry in sorted(layers_dir.iterdir()):
        match = _LAYER_NAME.fullmatch(entry.name)
        if match is None or entry.name.startswith("."):
            continue
        if int(match[1]) in numbered:
            raise UserError(
                f"{shown}: layers {numbered[int(match[1])].name} and {entry.name} have one number"
            )
        numbered[int(match[1])] = entry
    if not numbered:
        raise UserError(f"{shown}: no layer files (expected 00.tif, 01.tif, ...)")
    missing = [i for i in range(max(numbered) + 1) if i not in numbered]
    if missing:
        raise UserError(f"{shown}: layer {missing[0]} of 0..{max(numbered)} missing")
    return [numbered[i] for i in range(len(numbered))]


def segment_masks(folder: Path) -> list[Path]:
    """A segment's masks that exist, the one used first: ``<seg>_mask.png`` (inside the segment, or beside a
    ``.zarr``), then ``mask.png``."""
    seg = folder.name.removesuffix(ZARR_SUFFIX)
    candidates = [folder / f"{seg}_mask.png", folder.parent / f"{seg}_mask.png", folder / "mask.png"]
    return [c for c in candidates if c.exists()]


def segment_mask(folder: Path) -> Path:
    """Where a segment's mask is: the first of ``segment_masks``, else ``mask.png`` (absent)."""
    return next(iter(segment_masks(folder)), folder / "mask.png")


def segment_id(folder: Path) -> str:
    return folder.name.removesuffix(ZARR_SUFFIX)
