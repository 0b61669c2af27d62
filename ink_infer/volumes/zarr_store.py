"""Zarr and OME-Zarr surface volumes, local or remote (opened by ``zarr_open``): their chunks listed (what a
partial is keyed by, and which are missing), a mask from the pyramid for a segment without one, and bands read
chunk-wise behind the ``read_band`` interface of ``tiff_stack.Volume``.

Chunks are listed once per run from the store's folder (names, sizes, mtimes; never read): their digest keys the
partials and the ``--rotate`` cache, so a store rewritten in place is never mistaken for the old one; and a chunk
that is missing under the mask (zarr would read its fill value, zeros) is counted and named.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ink_infer.errors import UserError
from ink_infer.geometry import BLOCK, N_SLICES
from ink_infer.volumes.remote import Remote
from ink_infer.volumes.segments import LayerChoice
from ink_infer.volumes.slices import band_buffer, copy_scaled
from ink_infer.volumes.zarr_open import ZarrLayout, open_node, open_zarr_array

METADATA_NAMES = (".zarray", ".zgroup", ".zattrs", "zarr.json")


def chunk_files(layout: ZarrLayout) -> dict[tuple[int, int, int], tuple[int, int]]:
    """Every chunk file of the array: its indices -> (size, mtime_ns). Listed, never read."""
    found = {}
    root = layout.array_dir
    for folder, _, files in os.walk(root):
        for name in files:
            if name in METADATA_NAMES:
                continue
            full = os.path.join(folder, name)
            key = os.path.relpath(full, root).replace(os.sep, "/")
            if layout.prefix and not key.startswith(layout.prefix):
                continue
            parts = key[len(layout.prefix) :].split(layout.separator)
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                continue
            st = os.stat(full)
            found[tuple(int(p) for p in parts)] = (st.st_size, st.st_mtime_ns)
    return found


def chunks_digest(files: dict[tuple[int, int, int], tuple[int, int]]) -> str:
    """sha256 over every chunk's indices, size and mtime: what a rewrite of any chunk changes."""
    h = hashlib.sha256()
    for key in sorted(files):
        h.update(repr((key, files[key])).encode())
    return h.hexdigest()


def chunk_name(layout: ZarrLayout, key: tuple[int, int, int]) -> str:
    return layout.prefix + layout.separator.join(map(str, key))


def metadata_files(*folders: Path) -> list[list]:
    """The metadata files (zarr v2 and v3) of the store's top and of its array, with sizes and mtimes."""
    found = []
    for folder in dict.fromkeys(folders):
        for name in METADATA_NAMES:
            f = folder / name
            if f.is_file():
                st = f.stat()
                found.append([f.as_posix(), st.st_size, st.st_mtime_ns])
    return found


class ZarrVolume:
    """A zarr (or OME-Zarr level 0) surface volume with the ``read_band`` interface of ``tiff_stack.Volume``.

    ``layers``: the stack indices the models' 65 layers read, and ``axis`` the layer axis, both decided when the
    fragment was found. Reads are chunk-wise: a band of rows touches only the chunks it overlaps."""

    memmapped = False

    def __init__(self, path: Path | Remote, layers: tuple[int, ...] | None, axis: int | None = None) -> None:
        asked = (
            None if axis is None else {0: "first", 2: "last"}[axis]
        )  # as decided when the fragment was found
        array, self.layout = open_zarr_array(path, layer_axis=asked)
        self.layer_axis = self.layout.layer_axis
        self.path = path
        self.paths: list[Path] = []  # no per-layer files (the fingerprint uses the chunks' listing)
        self.warnings: list[str] = []
        self._array = array
        n_layers = array.shape[self.layer_axis]
        self.layers = layers if layers is not None else LayerChoice().pick(n_layers, str(path))
        rows = array.shape[1:] if self.layer_axis == 0 else array.shape[:2]
        self.height, self.width = int(rows[0]), int(rows[1])
        self._files: dict | None = None
        self.touched: np.ndarray | None = (
            None  # the run's touched blocks: only their chunks are read (read_band)
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (N_SLICES, self.height, self.width)

    def chunk_files(self) -> dict[tuple[int, int, int], tuple[int, int]]:
        if self._files is None:
            self._files = {} if self.layout.array_dir is None else chunk_files(self.layout)
        return self._files

    def describe(self) -> dict:
        """What the fingerprint of a zarr volume holds: its metadata, and its chunks' names, sizes and mtimes (a
        remote store's chunks are not listed: its metadata and what the server says of it stand for them)."""
        a = self._array
        found = {
            "shape": list(a.shape),
            "dtype": str(a.dtype),
            "chunks": list(a.chunks),
            "layer_axis": self.layer_axis,
        }
        if self.layout.identity is not None:
            return {**found, "remote": self.layout.identity}
        files = self.chunk_files()
        return {**found, "metadata": metadata_files(self.path, self.layout.array_dir),
                "chunk_files": len(files), "chunks_digest": chunks_digest(files)}  # fmt: skip

    def missing_under(self, mask: np.ndarray) -> list[str]:
        """The chunks of the models' layers that hold mask pixels and are not in the store (zarr reads them as its
        fill value), by name, in index order. A remote store is not listed: the chunks its server does not have
        are counted as they are read (``remote.WIRE``)."""
        if self.layout.array_dir is None:
            return []
        layout, files = self.layout, self.chunk_files()
        cz = layout.chunks[self.layer_axis]
        ch, cw = (layout.chunks[1], layout.chunks[2]) if self.layer_axis == 0 else layout.chunks[:2]
        zs = sorted({z // cz for z in self.layers})
        missing = []
        for cy in range(-(-self.height // ch)):
            for cx in range(-(-self.width // cw)):
                if not mask[cy * ch : (cy + 1) * ch, cx * cw : (cx + 1) * cw].any():
                    continue
                for z in zs:
                    key = (z, cy, cx) if self.layer_axis == 0 else (cy, cx, z)
                    if key not in files:
                        missing.append(chunk_name(layout, key))
        return missing

    def pyramid_mask(self) -> tuple[np.ndarray, str] | None:
        """A mask for a segment that has none, from the pyramid's coarsest level: papyrus wherever a layer there is
        non-zero, grown by one coarse pixel (so a papyrus edge is never cut off), brought to full size by nearest
        neighbour. Scans are zero outside the papyrus, so empty regions are never fetched at full resolution.
        None for a store without lower levels."""
        if not self.layout.levels:
            return None
        from scipy.ndimage import binary_dilation

        node, _ = open_node(self.path)
        name = self.layout.levels[-1]
        level = node[name]
        if len(level.shape) != 3:
            return None
        coarse = np.asarray(level[...])
        spatial = [a for a in (0, 1, 2) if a != self.layer_axis]
        papyrus = binary_dilation((coarse > 0).any(axis=self.layer_axis), iterations=1)
        hc, wc = (level.shape[a] for a in spatial)
        rows = np.arange(self.height) * hc // self.height
        cols = np.arange(self.width) * wc // self.width
        mask = papyrus[rows][:, cols]
        note = (f"{self.path}: no mask; the papyrus found in pyramid level {name!r} ({hc}x{wc}): "
                f"{mask.mean():.1%} of the {self.height}x{self.width} pixels")  # fmt: skip
        return mask, note

    def read_band(self, y0: int, y1: int, z0: int, z1: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [y0, y1) of the models' layers [z0, z1) as ``(z1 - z0, y1 - y0, W)`` uint16 (uint8 x 257). With
        ``touched`` set, only the chunk columns holding a touched block in these rows are read (zeros elsewhere:
        the engine zeroes every other block anyway), so papyrus-free chunks of a remote store are never fetched."""
        out = band_buffer(y0, y1, z0, z1, self.width, out)
        rows = max(0, min(y1, self.height) - y0)
        picked = self.layers[z0:z1]
        lo, hi = min(picked), max(picked) + 1  # contiguous: the pick is a range, maybe reversed
        spans = self._spans(y0, y0 + rows) if rows else []
        if spans != [(0, self.width)]:
            out[:] = 0
        for x0, x1 in spans:
            region = (slice(lo, hi), slice(y0, y0 + rows), slice(x0, x1))
            if self.layer_axis != 0:
                region = (slice(y0, y0 + rows), slice(x0, x1), slice(lo, hi))
            block = self._read(region)
            if self.layer_axis != 0:
                block = np.moveaxis(block, 2, 0)
            copy_scaled(block[[i - lo for i in picked]], out[:, :rows, x0:x1])
        out[:, rows:] = 0
        return out

    def _spans(self, y0: int, y1: int) -> list[tuple[int, int]]:
        """Column spans ``[x0, x1)`` of rows ``[y0, y1)`` to read, whole chunk columns: every column without
        ``touched``, else those whose chunks hold a touched block in these rows."""
        if self.touched is None:
            return [(0, self.width)]
        gh = self.touched.shape[0]
        b0, b1 = y0 // BLOCK, min(gh, -(-y1 // BLOCK))
        cols = np.nonzero(self.touched[b0:b1].any(axis=0))[0] if b1 > b0 else np.zeros(0, int)
        cw = self.layout.chunks[2] if self.layer_axis == 0 else self.layout.chunks[1]
        spans: list[tuple[int, int]] = []
        for k in sorted(
            {int(c) * BLOCK // cw for c in cols} | {(int(c) * BLOCK + BLOCK - 1) // cw for c in cols}
        ):
            x0, x1 = k * cw, min((k + 1) * cw, self.width)
            if spans and spans[-1][1] == x0:
                spans[-1] = (spans[-1][0], x1)
            else:
                spans.append((x0, x1))
        return spans

    def _read(self, region: tuple[slice, ...]) -> np.ndarray:
        try:
            return np.asarray(self._array[region])
        except Exception as e:  # noqa: BLE001 - codecs raise many types; the bad chunk is named below
            raise UserError(self._bad_chunk(region, e)) from None

    def _bad_chunk(self, region: tuple[slice, ...], error: Exception) -> str:
        """One line naming the chunk of ``region`` that cannot be read (each is tried alone), and why."""
        grid = self.layout.chunks
        spans = [
            range(s.start or 0, n if s.stop is None else s.stop)
            for s, n in zip(region, self._array.shape, strict=True)
        ]
        keys = [range(r.start // g, -(-r.stop // g)) for r, g in zip(spans, grid, strict=True)]
        for key in ((a, b, c) for a in keys[0] for b in keys[1] for c in keys[2]):
            try:
                np.asarray(
                    self._array[tuple(slice(k * g, (k + 1) * g) for k, g in zip(key, grid, strict=True))]
                )
            except Exception as e:  # noqa: BLE001
                why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                return f"{self.path}: chunk {chunk_name(self.layout, key)} cannot be read ({why})"
        why = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        return f"{self.path}: cannot be read ({why})"

    def close(self) -> None:
        self._array = None

    def __enter__(self) -> ZarrVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
