"""The reference's augmentations, in numpy + cv2: per window (flips, rot90, shift-scale-rotate, blur / noise,
brightness-contrast, 32-aligned cutout; z-shift and channel shuffle are drawn by the window dataset) and per batch
(mixup of the inputs or of the pooled features, cutmix)."""

from __future__ import annotations

import math

import cv2
import numpy as np
from torch import Tensor

from ink_infer.geometry import BLOCK

FLIP_P, ROT90_P = 0.5, 0.9
SSR_SHIFT, SSR_SCALE, SSR_ROTATE, SSR_P = 0.0625, 0.2, 15.0, 0.9
BLUR_NOISE_P = 0.9  # one of blur / noise (the reference's OneOf also held elastic and grid distortions)
BLUR_KSIZES = (3, 5, 7)
# noise std relative to the window's: the volume is v / 65535, so albumentations' 8-bit levels do not apply
NOISE_STD = (0.05, 0.2)
BC_LIMIT, BC_P = 0.3, 0.3
CUTOUT_P, CUTOUT_BLOCKS = 0.5, (1, 2)
SHIFT_Z_P = 0.5
CHANNEL_SHUFFLE_P = 0.2
CUTMIX_P = 0.5  # when no mixup: cutmix with this probability
MANIFOLD_P = 0.5  # of the mixups, this share mixes the pooled features instead of the inputs


def augment(vol: np.ndarray, lab: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Reference augmentations on ``(Z, T, T)`` float32 in [0, 1] and its ``(T, T)`` float32 0/1 label."""
    if rng.random() < FLIP_P:
        axes = [(1,), (2,), (1, 2)][rng.integers(3)]  # albumentations' Flip: vertical, horizontal or both
        vol, lab = np.flip(vol, axes), np.flip(lab, tuple(a - 1 for a in axes))
    if rng.random() < ROT90_P:
        k = int(rng.integers(4))
        vol, lab = np.rot90(vol, k, axes=(1, 2)), np.rot90(lab, k)
    hwc = np.ascontiguousarray(vol.transpose(1, 2, 0))  # cv2 wants (H, W, C); it takes any number of channels
    lab = np.ascontiguousarray(lab)
    if rng.random() < SSR_P:
        hwc, lab = shift_scale_rotate(hwc, lab, rng)
    if rng.random() < BLUR_NOISE_P:
        if rng.random() < 0.5:
            k = int(rng.choice(BLUR_KSIZES))
            hwc = cv2.GaussianBlur(hwc, (k, k), 0).reshape(hwc.shape)
        else:
            sigma = rng.uniform(*NOISE_STD) * float(hwc.std())
            hwc = hwc + rng.normal(0.0, sigma, hwc.shape).astype(np.float32)
    if rng.random() < BC_P:
        # after the per-window normalisation only the clipping to [0, 1] changes the model's input
        alpha, beta = 1.0 + rng.uniform(-BC_LIMIT, BC_LIMIT), rng.uniform(-BC_LIMIT, BC_LIMIT)
        hwc = np.clip(hwc * alpha + beta, 0.0, 1.0)
    vol = hwc.transpose(2, 0, 1)
    if rng.random() < CUTOUT_P:
        vol, lab = vol.copy(), lab.copy()
        g = lab.shape[0] // BLOCK
        for _ in range(int(rng.integers(CUTOUT_BLOCKS[0], CUTOUT_BLOCKS[1] + 1))):
            by, bx = rng.integers(g, size=2) * BLOCK  # on the 32 grid, so the 1/32 label loses whole cells
            vol[:, by : by + BLOCK, bx : bx + BLOCK] = 0.0
            lab[by : by + BLOCK, bx : bx + BLOCK] = 0.0
    return np.ascontiguousarray(vol, dtype=np.float32), np.ascontiguousarray(lab, dtype=np.float32)


def shift_scale_rotate(
    hwc: np.ndarray, lab: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """albumentations' ShiftScaleRotate(0.0625, 0.2, 15): linear for the volume, nearest for the label, reflect-101."""
    h, w = lab.shape
    angle = rng.uniform(-SSR_ROTATE, SSR_ROTATE)
    scale = rng.uniform(1 - SSR_SCALE, 1 + SSR_SCALE)
    m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, scale)
    m[:, 2] += rng.uniform(-SSR_SHIFT, SSR_SHIFT, 2) * (w, h)
    border = cv2.BORDER_REFLECT_101
    out = cv2.warpAffine(hwc, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=border).reshape(hwc.shape)
    return out, cv2.warpAffine(lab, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=border)


def mix_batch(
    x: Tensor, y: Tensor, rng: np.random.Generator, *, mixup_p: float, alpha: float
) -> tuple[Tensor, Tensor, float | None]:
    """Mixup (input or manifold) with probability ``mixup_p``, else cutmix with p=0.5, against the batch reversed.

    ``x`` ``(B, Z, S, S)`` raw, ``y`` ``(B, S, S)``; ``alpha``: of the Beta(alpha, alpha) mixing weights. Returns
    (x, y, lam for manifold mixup of the features or None).
    """
    if len(x) < 2:
        return x, y, None
    if rng.random() < mixup_p:
        lam = float(rng.beta(alpha, alpha))
        y = lam * y + (1 - lam) * y.flip(0)
        if rng.random() < MANIFOLD_P:
            return x, y, lam
        return lam * x + (1 - lam) * x.flip(0), y, None
    if rng.random() < CUTMIX_P:
        g = x.shape[-1] // BLOCK
        cut = round(g * math.sqrt(1 - float(rng.beta(alpha, alpha))))
        cy, cx = rng.integers(g, size=2)
        y0, y1 = (int(np.clip(v, 0, g)) * BLOCK for v in (cy - cut // 2, cy + cut - cut // 2))
        x0, x1 = (int(np.clip(v, 0, g)) * BLOCK for v in (cx - cut // 2, cx + cut - cut // 2))
        x, y = x.clone(), y.clone()  # a box on the 32 grid, so whole label cells change hands
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        y[..., y0:y1, x0:x1] = y.flip(0)[..., y0:y1, x0:x1]
    return x, y, None
