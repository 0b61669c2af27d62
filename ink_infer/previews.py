"""Pictures of a run: each fragment's probability map beside its ink mask, and (demo) the comparison with the truth.

Written atomically (``atomic.py``): a full disk leaves no half-written image behind.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .atomic import atomic_write_bytes

PREVIEW_MAX_SIDE = 1024


def write_preview(path: Path, prob: np.ndarray, ink: np.ndarray, mask: np.ndarray) -> None:
    """PNG of the probability map (left) beside the binary ink mask (right), mask outline in grey.

    prob: ``(H, W)`` float32 in [0, 1]; ink, mask: ``(H, W)`` bool. Downscaled so the longer side is at most 1024.
    The probability panel is contrast-stretched (1st-99th percentile inside the mask).
    """
    h, w = prob.shape
    scale = min(1.0, PREVIEW_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # contrast stretched to the 1st-99th percentile inside the mask: an uncalibrated model's map (all near 0.5)
    # still shows its structure
    inside = prob[mask] if mask.any() else prob.ravel()
    lo, hi = np.percentile(inside, (1, 99)) if inside.size else (0.0, 1.0)
    left = (np.clip((prob - lo) / max(hi - lo, 1e-6), 0, 1) * 255 * mask).astype(np.uint8)
    right = np.where(ink, 255, np.where(mask, 48, 0)).astype(np.uint8)
    left, right = (cv2.resize(a, size, interpolation=cv2.INTER_AREA) for a in (left, right))
    gap = np.full((size[1], 8), 128, dtype=np.uint8)
    img = cv2.applyColorMap(np.hstack([left, gap, right]), cv2.COLORMAP_VIRIDIS)
    _write_png(path, img)


# BGR colours of the truth comparison: found ink, false ink, missed ink, papyrus without ink (outside: black)
TRUTH_COLOURS = {
    "hit": (80, 220, 80),
    "false": (60, 60, 230),
    "missed": (230, 160, 40),
    "papyrus": (60, 60, 60),
}


def write_truth_preview(path: Path, ink: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> None:
    """PNG comparing predicted ``ink`` with ``truth`` (both ``(H, W)`` bool) inside ``mask``: found ink green,
    false ink red, missed ink blue (``TRUTH_COLOURS``), full size."""
    classes = {
        "hit": ink & truth,
        "false": ink & ~truth,
        "missed": ~ink & truth,
        "papyrus": mask & ~ink & ~truth,
    }
    img = np.zeros((*ink.shape, 3), np.uint8)
    for name, where in classes.items():
        img[where] = TRUTH_COLOURS[name]
    _write_png(path, img)


def _write_png(path: Path, img: np.ndarray) -> None:
    """Encode in memory, write atomically: a full disk leaves no half-written image behind."""
    ok, data = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"{path}: could not encode preview")
    atomic_write_bytes(path, data.tobytes())
