"""One model's probability map over one fragment, whole: the windows a mask gets, one pass of the engine over
them, each block's window count, and ``sum / count``. What a run does for a (model, fragment) unit, in one call,
for the tests, the benchmarks and a notebook that holds one model (the run itself keeps sums in its partials and
merges row ranges: ``run/``)."""

from __future__ import annotations

import numpy as np
import torch

from ink_infer.config import ModelSpec
from ink_infer.engine.predict import PassSettings, PredictStats, predict_fragment
from ink_infer.engine.stitch import finalize
from ink_infer.engine.tiling import Windows, spec_coverage, windows_of


def probability_map(
    model: torch.nn.Module,
    spec: ModelSpec,
    volume,
    mask: np.ndarray,
    how: PassSettings,
    *,
    stride_blocks: int = 1,
) -> tuple[np.ndarray, np.ndarray, PredictStats, Windows]:
    """``(probability (H, W) float32, window count (ch, cw) int32, the pass's stats, its windows)`` of ``model``
    over ``volume`` (``read_band``) inside ``mask``."""
    windows = windows_of(mask, stride_blocks=stride_blocks, tta=how.tta)
    sum_map, stats = predict_fragment(model, spec, volume, windows, how)
    count = spec_coverage(windows.origins, mask.shape, spec)
    return finalize(sum_map, count, mask), count, stats, windows
