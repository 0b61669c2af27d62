"""What training optimises and how it is scored: 1/32 label targets, the loss (BCE + soft F0.5 on smoothed
targets), and F0.5 at the best percentile threshold, as the reference validated."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import Tensor

from ink_infer.geometry import BLOCK
from ink_infer.outputs.metrics import fbeta

# label smoothing "0.1" as the reference wrote it: target * (1 - 0.2) + 0.1, so 0 -> 0.1 and 1 -> 0.9
LABEL_SMOOTH = 0.1
FBETA = 0.5
FBETA_SMOOTH = 1e-6


def downsample_labels(lab: Tensor, *, mode: str = "bilinear") -> Tensor:
    """``(B, S, S)`` -> ``(B, 1, S/32, S/32)``.

    ``bilinear``: align_corners=True, as the reference; it samples points, which is fine for the real fragments'
    broad ink. ``area``: the ink fraction of each 32 x 32 cell, which carries more signal per step for thin strokes
    and short runs (the demo models are trained with it, see the README).
    """
    if mode == "area":
        return F.avg_pool2d(lab[:, None], BLOCK)
    g = lab.shape[-1] // BLOCK
    return F.interpolate(lab[:, None], size=(g, g), mode="bilinear", align_corners=True)


def criterion(logits: Tensor, target: Tensor) -> Tensor:
    """BCE + (1 - soft F0.5 over the whole batch), on smoothed targets ``target * 0.8 + 0.1``; float32."""
    logits = logits.float()
    target = target * (1 - 2 * LABEL_SMOOTH) + LABEL_SMOOTH
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    tp, fp, fn = (p * target).sum(), (p * (1 - target)).sum(), ((1 - p) * target).sum()
    b2 = FBETA**2
    f = (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp + FBETA_SMOOTH)
    return bce + (1 - f)


def best_percentile(prob: np.ndarray, truth: np.ndarray, *, x0: float = 0.9) -> tuple[float, float, float]:
    """(F0.5, percentile, threshold) at the percentile threshold Nelder-Mead finds, as the reference's validation."""
    if prob.size == 0:
        return 0.0, x0, 0.0

    def neg_f(q: np.ndarray) -> float:
        thr = np.quantile(prob, float(np.clip(q[0], 0.0, 1.0)))
        return -fbeta(prob > thr, truth, beta=FBETA)

    res = minimize(neg_f, x0=[x0], method="Nelder-Mead")
    q = float(np.clip(res.x[0], 0.0, 1.0))
    return -float(res.fun), q, float(np.quantile(prob, q))
