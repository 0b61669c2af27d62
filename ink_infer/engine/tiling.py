"""Pure window maths: which 32 x 32 blocks touch the mask, where windows start, their TTA flip, the band plan.

The reference (PIPELINE.md §4–5) cut each fragment into 32 x 32 blocks on the grid ``i < H // 32, j < W // 32``
(remainder rows and columns dropped) and kept the blocks that touch the mask. Every kept block is the TOP-LEFT
corner of one window (stride 32): the window reads blocks ``(i .. i+7, j .. j+7)``, and blocks that were not kept
(outside the mask, or past the grid) read as zeros. The window's PREDICTION still lands on every pixel it spans,
the last ``H % 32`` rows and ``W % 32`` columns included (the reference's accumulators were full-size and each window
was cropped at the image border): predictions and counts live on the cover grid ``(ceil(H / 32), ceil(W / 32))``,
whose last row and column of blocks are partial. No I/O and no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ink_infer.config import ModelSpec
from ink_infer.geometry import BLOCK

# flip op k % 4 of the reference schedule: 0 none, 1 flip H, 2 flip W, 3 flip both


def touched_blocks(mask: np.ndarray, *, block: int = BLOCK) -> np.ndarray:
    """``(H // block, W // block)`` bool: blocks of the grid with at least one mask pixel.

    mask: ``(H, W)`` bool. The last ``H % block`` rows and ``W % block`` columns belong to no block.
    """
    gh, gw = mask.shape[0] // block, mask.shape[1] // block
    cut = mask[: gh * block, : gw * block]
    return cut.reshape(gh, block, gw, block).any(axis=(1, 3))


def cover_grid(shape: tuple[int, int], *, block: int = BLOCK) -> tuple[int, int]:
    """``(ceil(H / block), ceil(W / block))``: the blocks predictions and counts are kept on, partial ones included.

    Origins lie on the floor grid (``touched_blocks``); windows reaching past it cover the remainder rows and
    columns, as in the reference.
    """
    return -(-shape[0] // block), -(-shape[1] // block)


def window_origins(touched: np.ndarray, *, stride_blocks: int = 1) -> np.ndarray:
    """``(N, 2)`` int64 block coordinates (row, col) of the window origins, in the reference's enumeration order.

    Stride 1 block (32 px) is the reference: every touched block is an origin. With a larger stride ``k`` the origins
    lie on the ``k``-block lattice, and a lattice point is used when any block of its ``k x k`` cell touches the mask,
    so every touched block is still covered by some window (windows are at least ``k`` blocks wide).
    """
    if stride_blocks == 1:
        rows, cols = np.nonzero(touched)
    else:
        k = stride_blocks
        gh, gw = touched.shape
        padded = np.zeros((-(-gh // k) * k, -(-gw // k) * k), dtype=bool)
        padded[:gh, :gw] = touched
        cells = padded.reshape(padded.shape[0] // k, k, padded.shape[1] // k, k).any(axis=(1, 3))
        rows, cols = np.nonzero(cells)
        rows, cols = rows * k, cols * k
    origins = np.stack([rows, cols], axis=1).astype(np.int64)
    return origins[reference_order(origins)]


def reference_order(origins: np.ndarray) -> np.ndarray:
    """Permutation that sorts origins as the reference enumerated its patch files.

    The reference globbed ``volume_{row}_{col}.npy`` and sorted the path strings, so ``volume_0_10`` comes before
    ``volume_0_2``. The TTA flip of a window is its rank in that order, modulo 4, so the order must be reproduced
    exactly for a bit-identical schedule.
    """
    names = [f"volume_{r}_{c}.npy" for r, c in origins.tolist()]
    return np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)


def tta_ops(n: int, *, mode: str = "scheduled") -> np.ndarray:
    """``(n,)`` int8 flip op per window in enumeration order: ``k % 4`` (scheduled), all 0 (none).

    ``full`` (the 4 flips of every window, averaged) is not a per-window op: the predictor handles it and this
    returns zeros for it.
    """
    if mode == "scheduled":
        return (np.arange(n) % 4).astype(np.int8)
    return np.zeros(n, dtype=np.int8)


def coverage_blocks(
    origins: np.ndarray,
    grid_shape: tuple[int, int],
    *,
    tile_blocks: int,
    offset_blocks: int = 0,
    side_blocks: int | None = None,
) -> np.ndarray:
    """``(gh, gw)`` int32: how many windows' model footprints cover each block of the grid.

    A window at block ``(r, c)`` reads ``tile_blocks`` blocks; the model sees (and predicts) the centred square of
    ``side_blocks`` blocks starting ``offset_blocks`` in. Footprints are block-aligned, so the count is constant per
    block and is computed here once per geometry with a 2D difference array instead of per pixel. Pass the
    fragment's ``cover_grid`` to count the partial blocks of the remainder rows and columns too (the reference
    rule); footprints are clipped to ``grid_shape``.
    """
    side = tile_blocks if side_blocks is None else side_blocks
    gh, gw = grid_shape
    diff = np.zeros((gh + 1, gw + 1), dtype=np.int32)
    r0 = np.clip(origins[:, 0] + offset_blocks, 0, gh)
    c0 = np.clip(origins[:, 1] + offset_blocks, 0, gw)
    r1 = np.clip(origins[:, 0] + offset_blocks + side, 0, gh)
    c1 = np.clip(origins[:, 1] + offset_blocks + side, 0, gw)
    np.add.at(diff, (r0, c0), 1)
    np.add.at(diff, (r0, c1), -1)
    np.add.at(diff, (r1, c0), -1)
    np.add.at(diff, (r1, c1), 1)
    return diff.cumsum(0).cumsum(1)[:gh, :gw]


@dataclass(frozen=True)
class Band:
    """Rows ``[row0, row0 + n_rows)`` of the block grid hold the origins of windows ``index`` (into origins)."""

    row0: int  # first origin row (in blocks)
    n_rows: int  # origin rows in this band
    index: np.ndarray  # (n,) int64 indices into the origins array

    def pixel_rows(self, tile: int, *, block: int = BLOCK) -> tuple[int, int]:
        """Image rows ``[y0, y1)`` the band must read: its windows' full height."""
        y0 = self.row0 * block
        return y0, y0 + (self.n_rows - 1) * block + tile


def band_plan(origins: np.ndarray, *, rows_per_band: int) -> list[Band]:
    """Groups windows into bands of ``rows_per_band`` consecutive origin rows (only bands holding windows).

    A band is read once (``tile + (rows_per_band - 1) * 32`` rows) and every window of it is cut from it, so each
    pixel is read ``tile / (rows_per_band * 32) + 1`` times instead of once per covering window.
    """
    if len(origins) == 0:
        return []
    band_id = origins[:, 0] // rows_per_band
    bands = []
    for b in np.unique(band_id):
        idx = np.nonzero(band_id == b)[0]
        rows = origins[idx, 0]
        row0 = int(rows.min())
        bands.append(Band(row0=row0, n_rows=int(rows.max()) - row0 + 1, index=idx))
    return bands


def spread_sample(n: int, k: int) -> np.ndarray:
    """``min(n, k)`` indices spread evenly over ``range(n)`` (for dry runs: a sample that sees the whole fragment)."""
    if k >= n:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def blocks_of(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``(gh*32, gw*32, ...)`` image -> ``(n kept, 32, 32, ...)`` of its dtype: the blocks where ``keep`` is True,
    in row-major block order (the reference's patch layout)."""
    gh, gw = keep.shape
    rest = image.shape[2:]
    return image.reshape(gh, BLOCK, gw, BLOCK, *rest).swapaxes(1, 2)[keep]


def image_of(blocks: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Inverse of ``blocks_of``: the ``(gh*32, gw*32, ...)`` image, zeros in the blocks not kept."""
    gh, gw = keep.shape
    rest = blocks.shape[3:]
    out = np.zeros((gh, gw, BLOCK, BLOCK, *rest), dtype=blocks.dtype)
    out[keep] = blocks
    return np.ascontiguousarray(out.swapaxes(1, 2).reshape(gh * BLOCK, gw * BLOCK, *rest))


@dataclass(frozen=True)
class Windows:
    """The windows one pass runs over a fragment: ``touched`` ``(gh, gw)`` bool, the blocks read as data;
    ``origins`` ``(N, 2)`` block coords of the windows, in the reference's order; ``ops`` ``(N,)`` their flip op."""

    touched: np.ndarray
    origins: np.ndarray
    ops: np.ndarray


def windows_of(mask: np.ndarray, *, stride_blocks: int = 1, tta: str = "scheduled") -> Windows:
    """The reference's windows over a ``(H, W)`` bool mask: blocks it touches, origins in the reference's order
    every ``stride_blocks`` blocks, and their flip ops."""
    touched = touched_blocks(mask)
    origins = window_origins(touched, stride_blocks=stride_blocks)
    return Windows(touched, origins, tta_ops(len(origins), mode=tta))


def spec_coverage(origins: np.ndarray, shape: tuple[int, int], spec: ModelSpec) -> np.ndarray:
    """``(ch, cw)`` int32: how many of the model's squares cover each block of the cover grid of a fragment of
    ``shape`` (the partial blocks of the remainder rows and columns included, as the reference counted them)."""
    return coverage_blocks(
        origins, cover_grid(shape), tile_blocks=spec.tile // BLOCK, offset_blocks=spec.offset // BLOCK,
        side_blocks=spec.side // BLOCK,
    )  # fmt: skip
