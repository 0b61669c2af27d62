"""The ensemble over one fragment, model by model: each model's stitched sum divided by its own window count
(``sum / count``, 0 where uncovered), added with its manifest weight; the mean over the models that joined.
"""

from __future__ import annotations

import numpy as np

from .stitch import covered_mask, finalize
from .tiling import cover_grid


class FragmentEnsemble:
    """The weighted sum of model probability maps over one fragment, and the blocks some model covered."""

    def __init__(self, shape: tuple[int, int], mask: np.ndarray) -> None:
        self.shape, self.mask = shape, mask
        self.total: np.ndarray | None = None  # (H, W) float32, allocated when the first model joins
        self.covered_blocks = np.zeros(cover_grid(shape), dtype=bool)  # (ch, cw) on the cover grid
        self.weight_sum = 0.0

    def add(self, sum_map: np.ndarray, count: np.ndarray, weight: float) -> None:
        """Add ``weight * (sum / count)`` of one model (``count``: its windows per block, ``plan.model_count``)."""
        prob = finalize(sum_map, count, self.mask)
        if self.total is None:
            self.total = np.zeros(self.shape, dtype=np.float32)
        prob *= np.float32(weight)  # in place: no second fragment-sized temporary
        self.total += prob
        self.covered_blocks |= count > 0
        self.weight_sum += weight

    def mean(self) -> np.ndarray:
        """``(H, W)`` float32 ensemble probability (zeros before any model joined)."""
        if not self.weight_sum:
            return np.zeros(self.shape, dtype=np.float32)
        return self.total / self.weight_sum

    def region(self, kind: str) -> np.ndarray:
        """``(H, W)`` bool pixels the threshold's quantile is taken over: ``mask``, or ``covered`` (in the mask and
        covered by some model's window; the whole mask before any model joined)."""
        if kind == "mask" or not self.weight_sum:
            return self.mask
        return covered_mask(self.covered_blocks, self.mask)
