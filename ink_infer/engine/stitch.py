"""Stitching: per-window probabilities summed into a fragment map, divided by how many windows covered each pixel.

Semantics of the reference (PIPELINE.md §5.4–5.6): sigmoid, bilinear upsampling of each window's 1/32 output with
``align_corners=True``, sum over windows, count masked by the fragment mask, ``sum / count`` where the count is
positive and 0 elsewhere. The reference summed in float16 (a sum of up to 64 probabilities has ~0.03 resolution
there, which is what made ties at the threshold common). We sum in fixed point: each probability rounded to a
multiple of ``2**-24`` (float32's own resolution at 1; 3e-8 at most), the sums kept as int64. Integer sums are
exact, so they do not depend on the order the windows were added in: a fragment computed as row ranges, on any
number of devices, in any order, gives the same sums to the last bit as one pass (``plan.split_rows``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from ink_infer import geometry
from ink_infer.geometry import BLOCK


@functools.lru_cache(maxsize=8)
def _interp_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """``(n_out, n_in)`` float32 1-D linear interpolation with align_corners=True (rows sum to 1)."""
    pos = torch.arange(n_out, dtype=torch.float64) * (n_in - 1) / max(n_out - 1, 1)
    lo = pos.floor().clamp(max=n_in - 1).long()
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = pos - lo
    m = torch.zeros((n_out, n_in), dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1 - frac
    m[torch.arange(n_out), hi] += frac
    return m.to(device=device, dtype=torch.float32)


def upsample_probs(logits: torch.Tensor, side: int) -> torch.Tensor:
    """``(B, 1, s, s)`` logits (any float dtype) -> ``(B, side, side)`` float32 probabilities on the same device.

    Sigmoid first, then bilinear with align_corners=True, as the reference (probabilities, not logits, upsampled).
    Bilinear interpolation is separable, so it is two small matrix products ``A @ P @ A.T`` (the same numbers as
    ``F.interpolate(..., mode="bilinear", align_corners=True)`` to float rounding; several times faster on the CPU).
    """
    probs = torch.sigmoid(logits.float())[:, 0]
    a = _interp_matrix(probs.shape[-1], side, probs.device)
    return a @ probs @ a.T


FIXED_SCALE = geometry.FIXED_SCALE  # a probability p is summed as round(p * FIXED_SCALE)


class SumMap:
    """A fixed-point sum map over a block grid ``(gh * 32, gw * 32)``, plus ``pad`` rows/cols windows may run into.

    Lives on the compute device so windows are added where they were computed; only the finished map crosses to
    the host. The predictor keeps it on the fragment's cover grid (``tiling.cover_grid``), so the remainder rows
    and columns past the last whole block get their predictions as in the reference; pixels past the image itself
    (the rest of the last partial block, and the padding) are dropped by ``finalize``.
    """

    def __init__(self, grid_shape: tuple[int, int], *, pad: int, device: torch.device) -> None:
        gh, gw = grid_shape
        self.shape = (gh * BLOCK, gw * BLOCK)
        self.sum = torch.zeros((self.shape[0] + pad, self.shape[1] + pad), dtype=torch.int64, device=device)
        # on the CPU, numpy's in-place slice add: torch's per-window indexing overhead dominates at these sizes
        self._np = self.sum.numpy() if device.type == "cpu" else None

    def add(self, probs: torch.Tensor, ys: np.ndarray, xs: np.ndarray) -> None:
        """Add ``(N, s, s)`` float32 probabilities whose top-left pixels are ``(ys[i], xs[i])``."""
        s = probs.shape[-1]
        fixed = torch.round(probs * FIXED_SCALE).to(
            torch.int64
        )  # exact scaling (a power of two), then rounding
        acc = self.sum if self._np is None else self._np
        src = fixed if self._np is None else fixed.numpy()
        for p, y, x in zip(src, ys.tolist(), xs.tolist(), strict=True):
            acc[y : y + s, x : x + s] += p

    def to_fixed(self) -> np.ndarray:
        """``(gh * 32, gw * 32)`` int64 sums in units of ``1 / FIXED_SCALE``, on the host."""
        return self.sum[: self.shape[0], : self.shape[1]].cpu().numpy()

    def to_numpy(self) -> np.ndarray:
        """``(gh * 32, gw * 32)`` float32 sums of probabilities, on the host."""
        return to_float(self.to_fixed())


def to_float(fixed: np.ndarray) -> np.ndarray:
    """Fixed-point sums (int) as float32 sums of probabilities (float input is returned as it is)."""
    if not np.issubdtype(fixed.dtype, np.integer):
        return fixed
    return (fixed / FIXED_SCALE).astype(np.float32)


def expand_blocks(blocks: np.ndarray, shape: tuple[int, int], *, block: int = BLOCK) -> np.ndarray:
    """Repeat a ``(gh, gw)`` block map to pixels, on the image's ``shape`` (H, W).

    The grid may be the floor grid (pixels past it are zeros) or the cover grid (its partial blocks are cropped).
    """
    full = np.zeros(shape, dtype=blocks.dtype)
    gh, gw = blocks.shape
    h, w = min(shape[0], gh * block), min(shape[1], gw * block)
    full[:h, :w] = np.repeat(np.repeat(blocks, block, axis=0), block, axis=1)[:h, :w]
    return full


def finalize(sum_map: np.ndarray, count_blocks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` float32 mean probability: ``sum / count`` inside the mask where covered, 0 elsewhere.

    sum_map: ``(gh * 32, gw * 32)`` fixed-point int64 (``SumMap.to_fixed``) or float32 sums; count_blocks: ``(gh, gw)`` windows per block, on the cover grid
    (``tiling.cover_grid``: the remainder rows and columns are covered, as in the reference) or on any smaller
    grid (pixels past it get 0); mask: ``(H, W)`` bool. Works one block row at a time, so no full-size count map
    is ever built (host memory on big fragments).
    """
    h, w = mask.shape
    prob = np.zeros(mask.shape, dtype=np.float32)
    gw = count_blocks.shape[1]
    cols = min(w, gw * BLOCK)
    for i, row in enumerate(count_blocks):
        y0, y1 = i * BLOCK, min(h, (i + 1) * BLOCK)
        if y0 >= h:
            break
        count = np.repeat(row.astype(np.float32), BLOCK)[None, :cols] * mask[y0:y1, :cols]
        np.divide(to_float(sum_map[y0:y1, :cols]), count, out=prob[y0:y1, :cols], where=count > 0)
    return prob


def covered_piece(
    covered_blocks: np.ndarray, mask: np.ndarray, y0: int, y1: int, x0: int, x1: int
) -> np.ndarray:
    """``[y0:y1, x0:x1]`` of the pixels in the mask and covered by some window: ``covered_blocks`` ``(gh, gw)`` bool, on the cover grid or a smaller
    one (pixels past it are not covered), spread to those pixels, and the mask's."""
    gh, gw = covered_blocks.shape
    rows, cols = np.arange(y0, y1) // BLOCK, np.arange(x0, x1) // BLOCK
    blocks = covered_blocks[np.ix_(np.minimum(rows, gh - 1), np.minimum(cols, gw - 1))]
    blocks &= (rows < gh)[:, None] & (cols < gw)[None, :]
    return blocks & mask[y0:y1, x0:x1]


FINISH_BLOCK_ROWS = 8  # block rows finished at a time: 256 pixel rows, as the outputs' bands


def merge_ranges(
    ranges: Iterable[tuple[int, int, Callable[[], np.ndarray]]], count_blocks: np.ndarray, mask: np.ndarray
) -> Iterator[tuple[int, np.ndarray]]:
    """One model's probability map over a fragment as ``(first row, float32 rows)``, in row order, from its row
    ranges' sums: ``ranges`` gives each range's block rows ``[lo, hi)`` and a function returning its int64
    fixed-point sums on them, in row order (each range's first block row at or past the previous one's). Ranges may
    overlap (a window reaches past its range): each is added to the rows still open as it comes, and the rows no
    later range reaches are finished (``finalize`` with ``count_blocks`` and ``mask``) and handed on, so what is
    held is about one range, never the fragment. Integer sums: the same bits as ``finalize`` of the summed whole."""
    pending, p_lo = None, 0  # the open block rows' sums, from block row p_lo
    for lo, hi, take in ranges:
        sums = take()
        if pending is not None:
            p_hi = p_lo + len(pending) // BLOCK
            done = min(lo, p_hi) - p_lo  # block rows no later range reaches
            yield from _finished_rows(count_blocks, mask, pending[: done * BLOCK], p_lo)
            pending, p_lo = pending[done * BLOCK :], p_lo + done
            if not len(pending):
                pending = None
        if pending is None:
            pending, p_lo = sums, lo
            continue
        grown = np.zeros(((max(p_lo + len(pending) // BLOCK, hi) - p_lo) * BLOCK, pending.shape[1]), np.int64)
        grown[: len(pending)] = pending
        grown[(lo - p_lo) * BLOCK : (hi - p_lo) * BLOCK] += sums
        pending = grown
        del sums
    if pending is not None:
        yield from _finished_rows(count_blocks, mask, pending, p_lo)


def _finished_rows(count_blocks: np.ndarray, mask: np.ndarray, sums: np.ndarray, b0: int):
    """``finalize`` of ``sums`` (block rows from ``b0``), a few block rows at a time."""
    h = mask.shape[0]
    for c in range(0, len(sums) // BLOCK, FINISH_BLOCK_ROWS):
        y0, y1 = (b0 + c) * BLOCK, min(h, (b0 + c + FINISH_BLOCK_ROWS) * BLOCK)
        if y0 >= h:
            break
        part = sums[c * BLOCK : (c + FINISH_BLOCK_ROWS) * BLOCK]
        yield y0, finalize(part, count_blocks[b0 + c : b0 + c + FINISH_BLOCK_ROWS], mask[y0:y1])
