"""The Grand Prize TimeSformer's family: what defines how the 2023 GP script (``inference_timesformer.py`` @0efba1b,
``../shared/reference/GP_TIMESFORMER.md``) turns a segment into a probability map, and villa's variants of it by
name. How it is computed, streaming, is ``gp_predict``.

What defines its numbers, kept exactly:
- layers 17..42 of the 65 (``Z_RANGE``; under ``--direction reverse`` the same 26 layers in reverse order, as the GP
  script reverses its selection in place, not the stack);
- 16-bit values as ``v >> 8`` (what OpenCV's 8-bit read gives; ink_infer's uint8 volumes hold ``257 v``, whose high
  byte is ``v``), clipped to 200, times ``float32(1/255)``;
- the plane zero-padded at the bottom and right by ``256 - H % 256`` rows and ``256 - W % 256`` columns (a full 256
  when already a multiple), the mask likewise (no mask file: every pixel valid, the padding included);
- 64-px windows at stride 21 over the padded plane, kept only when wholly inside the mask, row-major;
- 16 logits -> 4 x 4 (row-major) -> sigmoid -> x16 bilinear (``align_corners=False``) -> times ``gkern(64, 1)``
  divided by its max, added to the sum while the count gets ones; the sum divided by the count clipped at 1, clipped
  to [0, 1], cropped to the segment.

villa's variants, each a manifest field of its own (``GPSettings``; absent: the GP script's): ``stride`` (villa: 32,
or 16), ``divisor`` (villa: 200, 1.275x the training scale), ``windows: any`` (kept when any mask pixel is inside),
``blend: hann | gaussian`` (with ``sigma`` px; sum-normalised, as villa's) and ``count: weights`` (the count adds
the blend weight, not ones: a weighted mean, divided by the count clipped at 1e-6).

The GP's division by the padded map's global max and its uint8 truncation are a display step (``gp_png``), never
part of an ensemble.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ink_infer.geometry import BLOCK, N_SLICES

ARCH = "timesformer"  # manifest entries of this family
BATCH = {"cpu": 64, "cuda": 256}  # windows per forward: the GP script's 256 on a GPU (batch_size)
TILE = 64  # window side
STRIDE = 21  # the GP script's tile_size // 3
PAD = 256  # the plane is padded up to (more than) a multiple of this
Z_RANGE = (17, 43)  # the 26 layers of the 65 the model reads
CLIP = 200  # 8-bit values above are clipped
DIVISOR = 255  # albumentations' Normalize(mean 0, std 1) default max_pixel_value: the training scale
UPSCALE = 16  # 4 x 4 logits -> 64 x 64
GAUSSIAN_SIGMA = TILE / 2.5  # villa's BLEND_MODE=gaussian with GAUSSIAN_SIGMA=0: max(1, 64 / 2.5) px
WEIGHTED_FLOOR = 1e-6  # villa divides a weighted count clipped at this


@dataclass(frozen=True)
class GPSettings:
    """The family's settings: the GP script by default; villa's variants by name."""

    stride: int = STRIDE
    divisor: float = DIVISOR
    windows: str = "inside"  # inside: wholly inside the mask (GP); any: touching it (villa V1)
    blend: str = "gp"  # gp: gkern(64, 1) / max; hann: outer Hann / sum (villa V2); gaussian: sigma px / sum
    sigma: float = GAUSSIAN_SIGMA  # blend gaussian only
    count: str = "ones"  # ones: the count adds 1 per window (GP); weights: the blend weight (villa)
    reverse: bool = False  # the 26 layers in reverse order (the GP script's reversed segments)
    z_range: tuple[int, int] = Z_RANGE  # which of the 65 picked layers (a stack picked reversed: mirrored)


GP_SCRIPT = GPSettings()  # the GP script's own settings


def batch_size(device_type: str, requested: int | None = None) -> int:
    """Windows per forward: ``--batch-size`` when given, else ``BATCH`` for the device (the CPU's elsewhere)."""
    return requested or BATCH.get(device_type, BATCH["cpu"])


def settings_for(spec, layers_reversed: bool = False) -> GPSettings:
    """A run's settings for a manifest entry (``config.ModelSpec``: its ``z_range`` and villa fields, None: the
    GP's) over a fragment whose 65 picked layers may run reversed (``--direction reverse``): the GP script reverses
    its 26 selected layers in place, which on the reversed pick are the mirrored range, read in order (files 42,
    41, .., 17 of a 65-layer stack)."""
    z = spec.z_range
    if layers_reversed:
        z = (N_SLICES - z[1], N_SLICES - z[0])
    named = {k: getattr(spec, k, None) for k in ("stride", "divisor", "windows", "blend", "sigma", "count")}
    return GPSettings(z_range=z, **{k: v for k, v in named.items() if v is not None})


def gkern(size: int = TILE, nsig: float = 1.0) -> np.ndarray:
    """The GP script's blending kernel: the standard normal's mass in ``size`` equal bins over [-nsig, nsig], outer
    product, divided by its sum, then by its max (1.0 at the centre). float64."""
    k1 = _normal_bins(size, nsig)
    k = np.outer(k1, k1)
    k = k / k.sum()
    return k / k.max()


def _normal_bins(size: int, nsig: float) -> np.ndarray:
    edges = np.linspace(-nsig, nsig, size + 1)
    cdf = np.array([0.5 * (1.0 + math.erf(e / math.sqrt(2.0))) for e in edges])
    return np.diff(cdf)


def blend_profile(settings: GPSettings) -> np.ndarray:
    """``(64,)`` float64 ``u`` whose outer product is the blend weight of a window (every blend is separable):
    gp: ``gkern(64, 1)`` (max-normalised); hann: ``outer(hanning(64))`` over its sum; gaussian: a Gaussian of
    ``sigma`` px centred on the tile, over its sum."""
    if settings.blend == "hann":
        h = np.hanning(TILE)
        return h / h.sum()
    if settings.blend == "gaussian":
        g = np.exp(-0.5 * ((np.arange(TILE) - (TILE - 1) / 2) / settings.sigma) ** 2)
        return g / g.sum()
    k1 = _normal_bins(TILE, 1.0)
    return k1 / k1.max()  # outer(k1, k1) / sum / max = outer(k1, k1) / max(k1)**2


def padded_shape(height: int, width: int) -> tuple[int, int]:
    """The GP script's padded plane: ``PAD - side % PAD`` more rows and columns (a full ``PAD`` on a multiple)."""
    return height + PAD - height % PAD, width + PAD - width % PAD


def padded_area(height: int, width: int) -> tuple[int, int, int, int]:
    """``(0, ph, 0, pw)``: the whole padded plane as a ``predict_gp`` area."""
    ph, pw = padded_shape(height, width)
    return 0, ph, 0, pw


def padded_mask(mask: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """The mask on the padded plane: zero padding; no mask: every pixel, the padding included (as the GP script)."""
    ph, pw = padded_shape(height, width)
    if mask is None:
        return np.ones((ph, pw), bool)
    out = np.zeros((ph, pw), bool)
    out[:height, :width] = mask
    return out


def kept_origins(
    mask: np.ndarray | None, shape: tuple[int, int], settings: GPSettings = GP_SCRIPT,
    area: tuple[int, int, int, int] | None = None,
) -> np.ndarray:  # fmt: skip
    """``(N, 2)`` int64 ``(y, x)`` of the windows the run keeps, row-major: every ``stride`` on the padded plane of
    a ``shape`` segment, wholly inside ``mask`` (``(H, W)`` bool; None: no mask file, every pixel and the padding
    valid), or touching it under ``windows: any``; with ``area`` (``(y0, y1, x0, x1)`` of the padded plane) only
    those reaching it. One origin row at a time: never a plane-sized table."""
    ph, pw = padded_shape(*shape)
    ys = np.arange(0, ph - TILE + 1, settings.stride)
    xs = np.arange(0, pw - TILE + 1, settings.stride)
    if area is not None:
        y0, y1, x0, x1 = area
        ys, xs = ys[(ys > y0 - TILE) & (ys < y1)], xs[(xs > x0 - TILE) & (xs < x1)]
    if mask is None:
        y, x = np.meshgrid(ys, xs, indexing="ij")
        return np.stack([y.ravel(), x.ravel()], axis=1).astype(np.int64)
    h, w = mask.shape
    found = [np.zeros((0, 2), np.int64)]
    for y in ys:
        cols = np.zeros(pw + 1, np.int64)  # mask pixels per column of rows [y, y + 64), summed along the row
        np.cumsum(mask[y : y + TILE].sum(axis=0, dtype=np.int64), out=cols[1 : w + 1])
        cols[w + 1 :] = cols[w]
        inside = cols[xs + TILE] - cols[xs]
        keep = xs[inside > 0 if settings.windows == "any" else inside == TILE * TILE]
        found.append(np.stack([np.full(len(keep), y), keep], axis=1))
    return np.concatenate(found).astype(np.int64)


def unit_area(plan) -> tuple[np.ndarray | None, tuple[int, int, int, int]] | None:
    """What a unit of this family computes over ``plan`` (a fragment or a row range: its ``shape``, ``mask``,
    ``mask_file``, ``rows``): its mask (None: no mask file) and its ``predict_gp`` area, its own rows of the segment;
    None when it owns no row."""
    y0, y1 = unit_rows(plan.shape, plan.rows)
    if y1 <= y0:
        return None
    return (plan.mask if plan.mask_file else None), (y0, y1, 0, plan.shape[1])


def window_count(plan, settings: GPSettings) -> int:
    """The windows a unit of this family runs over ``plan`` (``unit_area``): what the progress, the budget check
    and a dry run's projection count."""
    found = unit_area(plan)
    if found is None:
        return 0
    mask, area = found
    return len(kept_origins(mask, plan.shape, settings, area))


def layer_indices(settings: GPSettings) -> list[int]:
    """The indices into the 65 picked layers the model reads, in its frame order (reversed in place on request)."""
    picked = list(range(*settings.z_range))
    return picked[::-1] if settings.reverse else picked


def to_eight(raw: np.ndarray) -> np.ndarray:
    """uint16 layers (ink_infer's volumes) -> the GP script's 8-bit values: ``min(v >> 8, 200)`` as uint8."""
    return np.minimum(raw >> 8, CLIP).astype(np.uint8)


def scaled(eight: np.ndarray, divisor: float = DIVISOR) -> np.ndarray:
    """8-bit values -> the model's float32: ``v * float32(1 / divisor)`` (albumentations' Normalize, mean 0, std 1)."""
    return eight.astype(np.float32) * np.float32(1.0 / divisor)


def to_input(raw: np.ndarray, divisor: float = DIVISOR) -> np.ndarray:
    """uint16 layers -> the model's float32: ``min(v >> 8, 200) * float32(1 / divisor)``."""
    return scaled(to_eight(raw), divisor)


def unit_rows(shape: tuple[int, int], rows: tuple[int, int] | None) -> tuple[int, int]:
    """The pixel rows a unit of this family computes: the whole fragment, or a row range's own block rows
    ``[r0, r1)`` (the ranges partition the rows: ``plan.split_rows`` ends the last one past the mask's last row)."""
    if rows is None:
        return 0, shape[0]
    return min(rows[0] * BLOCK, shape[0]), min(rows[1] * BLOCK, shape[0])


def gp_coverage(mask: np.ndarray, rows: tuple[int, int] | None = None) -> np.ndarray:
    """``(ch, cw)`` int32 on the cover grid: 1 where a block holds mask pixels (of a row range's own block rows
    ``[r0, r1)`` only). The family's map is final there (every map is given on the mask's pixels: ``windows: any``
    reaches past them, and what it adds there is dropped as the 2nd place's is), so as a sum over a count of 1 it
    merges and ensembles like any."""
    h, w = mask.shape
    ch, cw = -(-h // BLOCK), -(-w // BLOCK)
    grid = np.zeros((ch * BLOCK, cw * BLOCK), bool)
    grid[:h, :w] = mask
    found = grid.reshape(ch, BLOCK, cw, BLOCK).any(axis=(1, 3)).astype(np.int32)
    if rows is not None:
        found[: rows[0]] = 0
        found[rows[1] :] = 0
    return found


def gp_png(padded_map: np.ndarray, top: float | None = None) -> np.ndarray:
    """The GP script's picture from the map on its padded plane: divided by its global max (``top``: that max, when
    the map comes in bands), ``p * 255`` truncated to uint8, at the padded size, as the script writes it, in float64
    (an all-zero map stays 0, where the script's division gives NaN). A display step only."""
    plane = padded_map.astype(np.float64)
    top = plane.max() if top is None else top
    if top > 0:
        plane = plane / top
    return (plane * 255).astype(np.uint8)
