"""Scroll segments: the layouts researchers hold, beside the Kaggle one.

- the segment layout: ``<seg>/layers/00.tif .. NN.tif`` (65 layers in older data, more in newer: 109-layer stacks
  exist), with ``<seg>/<seg>_mask.png`` or ``<seg>/mask.png`` (absent: every pixel, with a warning);
- zarr and OME-Zarr surface volumes, ``<seg>.zarr``: an array, or level 0 of a multiscale group; layers on the
  first or the last axis; uint8 or uint16; any chunking; read chunk-wise through the optional ``zarr`` package
  (``pip install 'ink_infer[zarr]'``); the mask beside it, ``<seg>_mask.png``, or inside, ``<seg>.zarr/mask.png``.

The models see 65 layers. Of a longer stack, ``--layers START:STOP`` picks them (STOP - START = 65, the numbering of
the files or of the layer axis), and by default the 65 in the middle; ``--reverse-layers`` turns the pick around for
segments whose depth runs the other way (model layer 0 is then the stack's layer STOP - 1). ``LayerChoice`` holds
the choice; ``Fragment.layers`` the stack indices it gives, in the models' order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ink_infer.errors import UserError
from ink_infer.geometry import N_SLICES
from ink_infer.volumes.slices import SLICE_DTYPES, band_buffer, copy_scaled

LAYERS_DIR = "layers"
ZARR_SUFFIX = ".zarr"
_LAYER_NAME = re.compile(r"(\d+)\.tiff?", re.IGNORECASE)


@dataclass(frozen=True)
class LayerChoice:
    """``--layers START:STOP`` (None: centred) and ``--reverse-layers``."""

    span: tuple[int, int] | None = None
    reverse: bool = False

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


class ZarrVolume:
    """A zarr (or OME-Zarr level 0) surface volume with the ``read_band`` interface of ``tiff_stack.Volume``.

    ``layers``: the stack indices the models' 65 layers read (``LayerChoice.pick``), chosen when the fragment was
    found. Reads are chunk-wise: a band of rows touches only the chunks it overlaps."""

    memmapped = False

    def __init__(self, path: Path, layers: tuple[int, ...] | None) -> None:
        array, self.layer_axis, self._array_dir = open_zarr_array(path)
        self.path = path
        self.paths: list[Path] = []  # no per-layer files (the fingerprint uses the array's metadata)
        self.warnings: list[str] = []
        self._array = array
        n_layers = array.shape[self.layer_axis]
        self.layers = layers if layers is not None else LayerChoice().pick(n_layers, str(path))
        rows = array.shape[1:] if self.layer_axis == 0 else array.shape[:2]
        self.height, self.width = int(rows[0]), int(rows[1])
        self.dtype_in = np.dtype(array.dtype)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (N_SLICES, self.height, self.width)

    def describe(self) -> dict:
        """What the fingerprint of a zarr volume holds: its metadata (shape, dtype, chunks, the layer axis)."""
        a = self._array
        return {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks),
                "layer_axis": self.layer_axis, "metadata": metadata_files(self.path, self._array_dir)}  # fmt: skip

    def read_band(self, y0: int, y1: int, z0: int, z1: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [y0, y1) of the models' layers [z0, z1) as ``(z1 - z0, y1 - y0, W)`` uint16 (uint8 x 257)."""
        out = band_buffer(y0, y1, z0, z1, self.width, out)
        rows = max(0, min(y1, self.height) - y0)
        picked = self.layers[z0:z1]
        lo, hi = min(picked), max(picked) + 1  # contiguous: the pick is a range, maybe reversed
        if rows:
            if self.layer_axis == 0:
                block = np.asarray(self._array[lo:hi, y0 : y0 + rows, :])
            else:
                block = np.moveaxis(np.asarray(self._array[y0 : y0 + rows, :, lo:hi]), 2, 0)
            order = [i - lo for i in picked]
            copy_scaled(block[order], out[:, :rows])
        out[:, rows:] = 0
        return out

    def close(self) -> None:
        self._array = None

    def __enter__(self) -> ZarrVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_zarr_array(path: Path):
    """The surface volume's array in ``path``, its layer axis (0 or 2) and its folder; ``UserError`` for what is
    not one."""
    try:
        import zarr
    except ImportError:
        raise UserError(
            f"{path}: reading zarr volumes needs the zarr package: pip install 'ink_infer[zarr]'"
        ) from None
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:  # zarr raises several kinds for a folder that is not a store
        raise UserError(
            f"{path}: not a readable zarr store ({type(e).__name__}: {e})".splitlines()[0]
        ) from None
    array_dir = path
    if not hasattr(node, "shape"):  # a group: OME-Zarr's level 0, else an array named "0"
        level = _level0(node)
        if level is None or level not in node:
            raise UserError(f"{path}: a zarr group without a multiscales level 0 or an array '0'")
        node, array_dir = node[level], path / level
    if len(node.shape) != 3:
        raise UserError(
            f"{path}: a {len(node.shape)}-D array {tuple(node.shape)}, expected 3-D (layers, H, W)"
        )
    if np.dtype(node.dtype) not in SLICE_DTYPES:
        raise UserError(f"{path}: dtype {node.dtype}, expected uint16 or uint8")
    d0, _, d2 = node.shape
    # the layer axis is the short one (65-109 layers against thousands of pixels); first when it is ambiguous
    axis = 2 if d2 < d0 and d2 < node.shape[1] else 0
    return node, axis, array_dir


def _level0(group) -> str | None:
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if multiscales:
        try:
            return str(multiscales[0]["datasets"][0]["path"])
        except (KeyError, IndexError, TypeError):
            return None
    return "0"


def metadata_files(*folders: Path) -> list[list]:
    """The metadata files (zarr v2 and v3) of the store's top and of its array, with sizes and mtimes: what a
    rewrite changes, read without listing the chunks (millions of files in a large store)."""
    found = []
    for folder in dict.fromkeys(folders):
        for name in (".zarray", ".zgroup", ".zattrs", "zarr.json"):
            f = folder / name
            if f.is_file():
                st = f.stat()
                found.append([f.as_posix(), st.st_size, st.st_mtime_ns])
    return found
