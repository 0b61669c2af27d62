"""F-beta score of binary masks (the competition's metric is F0.5 per fragment)."""

from __future__ import annotations

import numpy as np


def fbeta(pred: np.ndarray, truth: np.ndarray, *, beta: float = 0.5, mask: np.ndarray | None = None) -> float:
    """F-beta of two ``(H, W)`` bool masks (optionally only inside ``mask``); 0 when both are empty of true positives."""
    if mask is not None:
        pred, truth = pred[mask], truth[mask]
    tp = float(np.count_nonzero(pred & truth))
    fp = float(np.count_nonzero(pred & ~truth))
    fn = float(np.count_nonzero(~pred & truth))
    b2 = beta * beta
    denom = (1 + b2) * tp + b2 * fn + fp
    return (1 + b2) * tp / denom if denom > 0 else 0.0
