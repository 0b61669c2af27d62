"""The reference's inference loop, written naively on purpose: the baseline of the engine benchmark and the
ground truth of the "same answer" test.

As the team's notebook did (PIPELINE.md §4–5): every window is assembled on the CPU from its 8 x 8 saved
32 x 32 patches (missing patches are zeros; a patch holds ``float16(raw / 65535)``, the notebook's cell 5),
normalised, flipped by ``k % 4`` in the sorted-file-name order, run, un-flipped after upsampling, and added into
full-size ``(H, W)`` sum and count maps, cropped at the image border. So the last ``H % 32`` rows and ``W % 32``
columns, which belong to no patch (their input is zeros), are still covered by the windows reaching them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

PatchFn = Callable[[int, int], np.ndarray]  # (row, col) -> (65, 32, 32) float32 in [0, 1]


def reference_patch(raw: np.ndarray) -> np.ndarray:
    """The notebook's preprocessing of raw uint16 values: ``float16(float32(raw) / 65535)``, saved as float32."""
    return (raw.astype(np.float32) / np.float32(65535.0)).astype(np.float16).astype(np.float32)


def saved_patches(mask: np.ndarray) -> list[tuple[int, int]]:
    """The patches the reference saved (grid blocks touching the mask), in sorted file-name order."""
    gh, gw = mask.shape[0] // 32, mask.shape[1] // 32
    keep = [
        (i, j)
        for i in range(gh)
        for j in range(gw)
        if mask[i * 32 : (i + 1) * 32, j * 32 : (j + 1) * 32].any()
    ]
    return sorted(keep, key=lambda ij: f"volume_{ij[0]}_{ij[1]}.npy")


def naive_predict(
    patch_at: PatchFn, mask: np.ndarray, model: torch.nn.Module, *, z_range: tuple[int, int], tile: int = 256,
    crop: int | None = None, tta: str = "scheduled",
) -> np.ndarray:  # fmt: skip
    """``(H, W)`` float32 probability map of one model, the reference's way (float32 on the CPU)."""
    h, w = mask.shape
    saved = saved_patches(mask)
    have = set(saved)
    side = crop or tile
    off = (tile - side) // 2
    p_sum = np.zeros((h, w), dtype=np.float32)
    count = np.zeros((h, w), dtype=np.float32)
    n = tile // 32
    for k, (i, j) in enumerate(saved):
        window = np.zeros((65, tile, tile), dtype=np.float32)
        for a in range(n):
            for b in range(n):
                if (i + a, j + b) in have:
                    window[:, a * 32 : (a + 1) * 32, b * 32 : (b + 1) * 32] = patch_at(i + a, j + b)
        x = torch.from_numpy(window[z_range[0] : z_range[1], off : off + side, off : off + side])[None]
        x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-6)
        op = k % 4 if tta == "scheduled" else 0
        dims = {0: (), 1: (2,), 2: (3,), 3: (2, 3)}[op]
        if dims:
            x = x.flip(dims)
        with torch.inference_mode():
            prob = torch.sigmoid(model(x).float())
        prob = F.interpolate(prob, scale_factor=32, mode="bilinear", align_corners=True)
        if dims:
            prob = prob.flip(dims)
        # the prediction pasted at the window's place, cropped at the image border (not at the patch grid)
        y0, x0 = i * 32 + off, j * 32 + off
        y1, x1 = min(y0 + side, h), min(x0 + side, w)
        p_sum[y0:y1, x0:x1] += prob[0, 0, : y1 - y0, : x1 - x0].numpy()
        count[y0:y1, x0:x1] += 1
    count *= mask
    out = np.zeros((h, w), dtype=np.float32)
    np.divide(p_sum, count, out=out, where=count > 0)
    return out


def percentile_threshold(prob: np.ndarray, region: np.ndarray, q: float) -> float | None:
    """The ``q``-quantile of ``prob[region]`` (``(H, W)`` float32 and bool) as a float, or None when the region is
    empty: the engine's exact quantile (``threshold.banded_quantile``) over the whole array at once."""
    from ink_infer.outputs.threshold import banded_quantile

    return banded_quantile(lambda: [prob[region]], q)


def binarize(prob: np.ndarray, region: np.ndarray, q: float) -> tuple[np.ndarray, float | None]:
    """``(H, W)`` bool ink mask of the reference's rule and the threshold used (None: empty region, no ink)."""
    thr = percentile_threshold(prob, region, q)
    if thr is None:
        return np.zeros(prob.shape, dtype=bool), None
    return (prob > thr) & region, thr


def covered_mask(count_blocks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: in the mask and covered by at least one window (``count_blocks`` on the cover grid)."""
    from ink_infer.engine.stitch import covered_piece

    return covered_piece(count_blocks > 0, mask, 0, mask.shape[0], 0, mask.shape[1])
