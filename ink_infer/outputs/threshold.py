"""The percentile threshold: ink where ``p > quantile(p[region], q)`` (strict ``>``, q = 0.93 by default).

The region is the covered-and-in-mask pixels (the reference's default) or the whole mask (yukke's variant). This
predicts a fixed fraction of ink whatever the models' calibration. The quantile is numpy's default ("linear", the
same as ``np.quantile`` in the reference: interpolation between the two order statistics around ``q * (n - 1)``,
in float64), computed exactly without ever holding the region's values at once, so that a scroll segment's map
can be read by bands (``raster.py``): two passes of histograms over the float32 values' bit patterns, which sort
as the values do, the first over their upper 16 bits, the second over the lower 16 bits inside the one or two
bins that hold the wanted order statistics. (``torch.quantile`` refuses inputs above 2**24 elements, and a
fragment has tens of millions of pixels.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

_BINS = 1 << 16


def _sort_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys ordered as the float32 ``values`` are (-0.0 just below +0.0; no NaN in a probability map)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    negative = (bits >> 31).astype(bool)
    return np.where(negative, ~bits, bits | np.uint32(0x80000000))


def _from_key(key: int) -> float:
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array([bits], np.uint32).view(np.float32)[0])


def _rank_in(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin that holds the ``rank``-th smallest value (0-based), and that value's rank inside the bin."""
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, rank, side="right"))
    return b, rank - (int(cum[b - 1]) if b else 0)


def banded_quantile(values_in_bands: Callable[[], Iterable[np.ndarray]], q: float) -> float | None:
    """numpy's linear ``q``-quantile of every value the bands hold, or None when there is none.

    ``values_in_bands()``: a fresh iterable of 1-D float32 arrays, the values band by band (called twice)."""
    high = np.zeros(_BINS, np.int64)
    for v in values_in_bands():
        high += np.bincount(_sort_keys(v) >> 16, minlength=_BINS)
    n = int(high.sum())
    if n == 0:
        return None
    pos = q * (n - 1)
    lo = int(np.floor(pos))
    ranks = (lo, min(lo + 1, n - 1))
    wanted = {r: _rank_in(high, r) for r in ranks}  # rank -> (upper bin, rank inside it)
    low = {b: np.zeros(_BINS, np.int64) for b, _ in wanted.values()}
    for v in values_in_bands():
        keys = _sort_keys(v)
        upper = keys >> 16
        for b, counts in low.items():
            counts += np.bincount(keys[upper == b] & 0xFFFF, minlength=_BINS)
    v_lo, v_hi = (_from_key((b << 16) | _rank_in(low[b], r)[0]) for b, r in (wanted[r] for r in ranks))
    return v_lo + (v_hi - v_lo) * (pos - lo)


def ink_of(prob: np.ndarray, in_region: np.ndarray, thr: float | None) -> np.ndarray:
    """The ink mask of probabilities ``prob`` in ``in_region`` (bool, same shape) above ``thr``."""
    return (prob > thr) & in_region if thr is not None else np.zeros(prob.shape, bool)
