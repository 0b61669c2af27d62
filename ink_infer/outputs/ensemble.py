"""The ensemble over one fragment, model by model: each model's stitched sum divided by its own window count
(``sum / count``, 0 where uncovered), added with its manifest weight; the mean over the models that joined.

The weighted sum is a ``raster.Raster``: in memory, or for a large fragment in a file, and every model's map is
added band by band as its rows are finished (``run/merge.py``), so a scroll segment is never whole in memory.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ink_infer.engine.stitch import covered_piece
from ink_infer.engine.tiling import cover_grid
from ink_infer.outputs.raster import Raster


class FragmentEnsemble:
    """The weighted sum of model probability maps over one fragment, and the blocks some model covered.

    ``spill``: the file the sum lives in (None: memory)."""

    def __init__(self, shape: tuple[int, int], mask: np.ndarray, spill: Path | None = None) -> None:
        self.shape, self.mask = shape, mask
        self.total = Raster(shape, np.float32, spill)  # (H, W) float32; zeros until a model joins
        self.covered_blocks = np.zeros(cover_grid(shape), dtype=bool)  # (ch, cw) on the cover grid
        self.weight_sum = 0.0

    def add_model(self, count: np.ndarray, weight: float, rows: Iterable[tuple[int, np.ndarray]]) -> None:
        """Add ``weight`` times one model's probability map, given as ``(first row, (r, W) float32 rows)`` (each
        changed in place); ``count``: its windows per block (``plan.model_count``)."""
        for y0, prob in rows:
            prob *= np.float32(weight)  # in place: no second temporary
            self.total.add(y0, prob)
        self.covered_blocks |= count > 0
        self.weight_sum += weight

    def mean_piece(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """``[y0:y1, x0:x1]`` of the float32 ensemble probability (zeros before any model joined)."""
        if not self.weight_sum:
            return np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
        return self.total.piece(y0, y1, x0, x1) / self.weight_sum

    def region_piece(self, kind: str):
        """``piece(y0, y1, x0, x1)`` of the bool pixels the threshold's quantile is taken over: ``mask``, or
        ``covered`` (in the mask and covered by some model's window; the whole mask before any model joined)."""
        if kind == "mask" or not self.weight_sum:
            return lambda y0, y1, x0, x1: self.mask[y0:y1, x0:x1]

        return functools.partial(covered_piece, self.covered_blocks, self.mask)

    def delete(self) -> None:
        self.total.delete()
