"""Opening a zarr or OME-Zarr surface volume, local or remote: the array found (an array, or level 0 of a
multiscale group, with its lower levels named), its layer axis decided without guessing, and how its chunk files
are named (``ZarrLayout``). Reading it is ``zarr_store.ZarrVolume``'s.

The layer axis: the store's own OME-Zarr ``axes`` when it has them, else ``--layer-axis``, else the mask's shape
(the two spatial axes are the mask's), else the array's shape when it leaves no doubt (one of the first and last
axes is too short to hold the 65 layers, or is at most half of both others); anything else is refused with one line
naming ``--layer-axis``, never read the wrong way round.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ink_infer.errors import UserError
from ink_infer.geometry import N_SLICES
from ink_infer.volumes.remote import Remote
from ink_infer.volumes.slices import SLICE_DTYPES

LAYER_AXES = {"first": 0, "last": 2}


@dataclass(frozen=True)
class ZarrLayout:
    """Where the surface volume is in a store: the array's folder and path, its layer axis (0 or 2), its chunk grid
    (the shard's shape for sharded arrays: one file each) and how its chunk files are named."""

    array_dir: Path | None  # None for a remote store (its chunks are not listed)
    layer_axis: int
    chunks: tuple[int, int, int]
    separator: str  # between a chunk's indices in its file name
    prefix: str  # before them ("c/" for zarr v3's default names)
    levels: tuple[str, ...] = ()  # the multiscale's lower levels, finest first (an array alone: none)
    identity: dict | None = None  # a remote store's version (remote_zarr.store_identity)


def open_zarr_array(path: Path | Remote, *, layer_axis: str | None = None, mask: Path | None = None):
    """``(array, ZarrLayout)`` of the surface volume in ``path`` (a local folder, or a ``Remote`` store);
    ``UserError`` for what is not one, or when its layer axis cannot be told (``layer_axis``: ``--layer-axis``;
    ``mask``: the segment's mask, if any)."""
    node, store = open_node(path)
    array_dir, axes, level, levels = (path if store is None else None), None, "", ()
    if not hasattr(node, "shape"):  # a group: OME-Zarr's level 0, else an array named "0"
        level, axes, levels = _levels(node)
        if level is None or level not in node:
            raise UserError(f"{path}: a zarr group without a multiscales level 0 or an array '0'")
        node = node[level]
        array_dir = path / level if store is None else None
    if len(node.shape) != 3:
        raise UserError(
            f"{path}: a {len(node.shape)}-D array {tuple(node.shape)}, expected 3-D (layers, H, W)"
        )
    if np.dtype(node.dtype) not in SLICE_DTYPES:
        raise UserError(f"{path}: dtype {node.dtype}, expected uint16 or uint8")
    axis = _layer_axis(tuple(node.shape), path, axes=axes, asked=layer_axis, mask=mask)
    separator, prefix = _chunk_names(node)
    grid = getattr(node, "shards", None) or node.chunks
    identity = None
    if store is not None:  # a remote store: its version keys the partials and the chunk cache
        from ink_infer.volumes.remote_zarr import store_identity, use_cache

        identity = store_identity(store, level, node.metadata.to_dict())
        use_cache(store, path, identity)
    layout = ZarrLayout(array_dir, axis, tuple(int(c) for c in grid), separator, prefix, levels, identity)
    return node, layout


def open_node(path: Path | Remote):
    """``(zarr node, the remote store or None)`` at ``path``: a local folder or a ``Remote`` store."""
    try:
        import zarr
    except ImportError:
        raise UserError(
            f"{path}: reading zarr volumes needs the zarr package: pip install 'ink_infer[zarr]'"
        ) from None
    store = None
    if isinstance(path, Remote):
        if repr(path) in _OPENED:
            return _OPENED[repr(path)]
        from ink_infer.volumes.remote_zarr import fetching_store

        store = fetching_store(path)
    try:
        node = zarr.open(str(path) if store is None else store, mode="r")
    except Exception as e:  # zarr raises several kinds for a folder that is not a store
        raise UserError(
            f"{path}: not a readable zarr store ({type(e).__name__}: {e})".splitlines()[0]
        ) from None
    if store is not None:
        _OPENED[repr(path)] = node, store
    return node, store


# Remote stores opened in this run, by their Remote: each is opened once per run and process (a dozen requests
# of metadata each time, otherwise, for the start, the plan and each model's pass); forgotten when a run starts.
_OPENED: dict[str, tuple] = {}


def forget_remote_stores() -> None:
    """A new run reads what the servers say now (a store rewritten between two runs is seen as such)."""
    _OPENED.clear()


def _levels(group) -> tuple[str | None, list | None, tuple[str, ...]]:
    """Level 0's path in a group, the multiscale's ``axes`` (None when it has none) and its other levels' paths."""
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if multiscales:
        try:
            paths = [str(d["path"]) for d in multiscales[0]["datasets"]]
            return paths[0], multiscales[0].get("axes"), tuple(paths[1:])
        except (KeyError, IndexError, TypeError, AttributeError):
            return None, None, ()
    return "0", None, ()


def _layer_axis(
    shape: tuple[int, int, int], path: Path, *, axes, asked: str | None, mask: Path | None
) -> int:
    """The layer axis (0 or 2) by the rules of the module's docstring."""
    if axes:
        names = [(a.get("name") if isinstance(a, dict) else a) for a in axes]
        names = [str(n).lower() for n in names]
        spatial = [i for i, n in enumerate(names) if n in ("y", "x")]
        if len(names) == 3 and len(spatial) == 2 and ({0, 1, 2} - set(spatial)) <= {0, 2}:
            return ({0, 1, 2} - set(spatial)).pop()
    if asked is not None:
        return LAYER_AXES[asked]
    size = png_size(mask) if mask is not None else None
    if size is not None:
        first, last = shape[1:] == size, shape[:2] == size
        if first != last:
            return 0 if first else 2
        if not first:
            raise UserError(
                f"{path}: array {shape} read with the layers first is {shape[1]}x{shape[2]}, last "
                f"{shape[0]}x{shape[1]}; its mask {mask.name} is {size[0]}x{size[1]}: neither fits"
            )
    able = [a for a in (0, 2) if shape[a] >= N_SLICES]
    if len(able) == 1:
        return able[0]
    if not able:  # too few layers either way: LayerChoice.pick says so, of the shorter
        return 2 if shape[2] < shape[0] else 0
    short = min(able, key=lambda a: shape[a])
    if all(shape[short] * 2 <= shape[a] for a in (0, 1, 2) if a != short):
        return short
    raise UserError(
        f"{path}: array {shape}: the layers could be on the first or the last axis; say which with --layer-axis "
        "first|last (or give the store OME-Zarr axes, or the segment its mask)"
    )


def png_size(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` of a PNG from its header (the image itself is not read); None for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return int(height), int(width)


def _chunk_names(array) -> tuple[str, str]:
    """How the array's chunk files are named: the separator between indices and the prefix before them."""
    meta = array.metadata
    if getattr(meta, "zarr_format", 3) == 2:
        return getattr(meta, "dimension_separator", None) or ".", ""
    encoding = meta.chunk_key_encoding
    separator = getattr(encoding, "separator", "/")
    return separator, "c/" if getattr(encoding, "name", "default") == "default" else ""
