"""The percentile threshold: ink where ``p > quantile(p[region], q)`` (strict ``>``, q = 0.93 by default).

The region is the covered-and-in-mask pixels (the reference's default) or the whole mask (yukke's variant). This
predicts a fixed fraction of ink whatever the models' calibration. numpy's quantile is used (linear interpolation,
the same as ``np.quantile`` in the reference): ``torch.quantile`` refuses inputs above 2**24 elements, and a
fragment has tens of millions of pixels.
"""

from __future__ import annotations

import numpy as np


def percentile_threshold(prob: np.ndarray, region: np.ndarray, q: float) -> float | None:
    """The ``q``-quantile of ``prob[region]`` as a float, or None when the region is empty.

    prob: ``(H, W)`` float32; region: ``(H, W)`` bool.
    """
    values = prob[region]  # a copy, partitioned in place below: no second full-size copy on 100 M pixels
    n = values.size
    if n == 0:
        return None
    # numpy's default ("linear") quantile: interpolate between the two order statistics around q * (n - 1),
    # in float64 so the interpolation is not rounded to float32
    pos = q * (n - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, n - 1)
    values.partition((lo, hi) if hi != lo else lo)
    v_lo, v_hi = float(values[lo]), float(values[hi])
    return v_lo + (v_hi - v_lo) * (pos - lo)


def binarize(prob: np.ndarray, region: np.ndarray, q: float) -> tuple[np.ndarray, float | None]:
    """``(H, W)`` bool ink mask and the threshold used (None: empty region, empty prediction)."""
    thr = percentile_threshold(prob, region, q)
    if thr is None:
        return np.zeros(prob.shape, dtype=bool), None
    return (prob > thr) & region, thr
