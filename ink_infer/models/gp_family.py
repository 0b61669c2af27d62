"""The Grand Prize TimeSformer's family: how the 2023 GP script (``inference_timesformer.py`` @0efba1b,
``../shared/reference/GP_TIMESFORMER.md``) turns a segment into a probability map, rebuilt to stream.

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

What is ours: the sums live in a band of rows that moves down the plane (windows start in row order, so a row above
the current origin row is final), never two float64 full-size maps; the stack is never whole in memory. The GP's
division by the padded map's global max and its uint8 truncation are a display step (``gp_png``), never part of an
ensemble.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ink_infer.geometry import BLOCK, FIXED_SCALE, N_SLICES

ARCH = "timesformer"  # manifest entries of this family
BATCH = {"cpu": 64, "cuda": 256}  # windows per forward: the GP script's 256 on a GPU
TILE = 64  # window side
STRIDE = 21  # the GP script's tile_size // 3
PAD = 256  # the plane is padded up to (more than) a multiple of this
Z_RANGE = (17, 43)  # the 26 layers of the 65 the model reads
CLIP = 200  # 8-bit values above are clipped
DIVISOR = 255  # albumentations' Normalize(mean 0, std 1) default max_pixel_value: the training scale
UPSCALE = 16  # 4 x 4 logits -> 64 x 64


@dataclass(frozen=True)
class GPSettings:
    """The family's settings: the reference by default; villa's variants by name (``stride`` 32 or 16, ``divisor``
    200, ``any_overlap`` windows: kept when any mask pixel is inside)."""

    stride: int = STRIDE
    divisor: float = DIVISOR
    any_overlap: bool = False
    reverse: bool = False  # the 26 layers in reverse order (the GP script's reversed segments)
    z_range: tuple[int, int] = Z_RANGE  # which of the 65 picked layers (a stack picked reversed: mirrored)


def gkern(size: int = TILE, nsig: float = 1.0) -> np.ndarray:
    """The GP script's blending kernel: the standard normal's mass in ``size`` equal bins over [-nsig, nsig], outer
    product, divided by its sum, then by its max (1.0 at the centre). float64."""
    edges = np.linspace(-nsig, nsig, size + 1)
    cdf = np.array([0.5 * (1.0 + math.erf(e / math.sqrt(2.0))) for e in edges])
    k1 = np.diff(cdf)
    k = np.outer(k1, k1)
    k = k / k.sum()
    return k / k.max()


def padded_shape(height: int, width: int) -> tuple[int, int]:
    """The GP script's padded plane: ``PAD - side % PAD`` more rows and columns (a full ``PAD`` on a multiple)."""
    return height + PAD - height % PAD, width + PAD - width % PAD


def padded_mask(mask: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """The mask on the padded plane: zero padding; no mask: every pixel, the padding included (as the GP script)."""
    ph, pw = padded_shape(height, width)
    if mask is None:
        return np.ones((ph, pw), bool)
    out = np.zeros((ph, pw), bool)
    out[:height, :width] = mask
    return out


def kept_origins(mask: np.ndarray, settings: GPSettings = GPSettings()) -> np.ndarray:
    """``(N, 2)`` int64 ``(y, x)`` of the windows the run keeps, row-major: every ``stride`` on the padded plane,
    wholly inside ``mask`` (the padded mask), or touching it with ``any_overlap``."""
    ph, pw = mask.shape
    ys = np.arange(0, ph - TILE + 1, settings.stride)
    xs = np.arange(0, pw - TILE + 1, settings.stride)
    inside = np.zeros((ph + 1, pw + 1), np.int64)  # summed-area table of mask pixels
    inside[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    count = inside[y0 + TILE, x0 + TILE] - inside[y0, x0 + TILE] - inside[y0 + TILE, x0] + inside[y0, x0]
    keep = count > 0 if settings.any_overlap else count == TILE * TILE
    return np.stack([y0[keep], x0[keep]], axis=1).astype(np.int64)


def settings_for(z_range: tuple[int, int], layers_reversed: bool) -> GPSettings:
    """A run's settings for a manifest entry's ``z_range`` over a fragment whose 65 picked layers may run reversed
    (``--direction reverse``): the GP script reverses its 26 selected layers in place, which on the reversed pick
    are the mirrored range, read in order (files 42, 41, .., 17 of a 65-layer stack)."""
    if layers_reversed:
        return GPSettings(z_range=(N_SLICES - z_range[1], N_SLICES - z_range[0]))
    return GPSettings(z_range=z_range)


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
    """uint16 layers -> the model's float32: ``min(v >> 8, 200) * float32(1 / divisor)`` (``TorchForward`` does the
    multiply from the uint8 tiles, on the device on CUDA: the same IEEE products)."""
    return scaled(to_eight(raw), divisor)


class BandSums:
    """The sums of the windows over rows ``[top, top + rows)`` of the padded plane: the numerator (float64, kernel
    weighted) and the count (ones); rows above the next origin row are final and handed out by ``flush``."""

    def __init__(self, width: int, rows: int = 2 * TILE) -> None:
        self.top = 0
        self.numerator = np.zeros((rows, width), np.float64)
        self.count = np.zeros((rows, width), np.int32)

    def add(self, y: int, xs: np.ndarray, values: np.ndarray, stride: int) -> None:
        """Windows of one origin row ``y`` at columns ``xs`` (on the ``stride`` grid, increasing), ``values``
        ``(n, 64, 64)`` float64. Windows ``ceil(64 / stride)`` grid steps apart never overlap, so each such phase is
        added in one vectorised step (a per-window loop cost more than a light model itself); a pixel then takes
        its windows in another order than the GP script's, which changes its float64 sum by rounding only."""
        rows = slice(y - self.top, y - self.top + TILE)
        phases = (xs // stride) % -(-TILE // stride)
        for phase in np.unique(phases):
            pick = np.nonzero(phases == phase)[0]
            cols = (xs[pick, None] + np.arange(TILE)).ravel()
            self.numerator[rows, cols] += values[pick].transpose(1, 0, 2).reshape(TILE, -1)
            self.count[rows, cols] += 1

    def flush(self, until: int) -> np.ndarray:
        """The final probabilities of rows ``[top, until)`` (float32; rows no window reached: 0), the band moved
        down past them."""
        n, held = until - self.top, len(self.numerator)
        done = np.zeros((n, self.numerator.shape[1]), np.float32)
        k = min(n, held)
        done[:k] = np.clip(np.nan_to_num(self.numerator[:k] / np.maximum(self.count[:k], 1)), 0.0, 1.0)
        self.numerator = np.concatenate([self.numerator[k:], np.zeros_like(self.numerator[:k])])
        self.count = np.concatenate([self.count[k:], np.zeros_like(self.count[:k])])
        self.top = until
        return done


def predict_gp(
    forward: Callable[[np.ndarray], np.ndarray], volume, mask: np.ndarray | None,
    settings: GPSettings = GPSettings(), *, batch_size: int = 64, rows: tuple[int, int] | None = None,
    padded: bool = False, sample: int | None = None,
) -> tuple[np.ndarray, int]:  # fmt: skip
    """``(the family's probability map, windows run)`` of ``volume`` (``read_band``, ``height``, ``width``) under
    ``mask`` (``(H, W)`` bool; None: no mask file): ``(H, W)`` float32, or rows ``[y0, y1)`` of it (``rows``: a
    row-range unit; only the windows that reach them run), or the whole padded plane (``padded``: what ``gp_png``
    divides by its max). ``forward(tiles, divisor)``: ``(B, 1, 26, 64, 64)`` uint8 -> ``(B, 64, 64)``
    probabilities (``TorchForward``). ``sample``: only that many windows, spread over the plane (a dry run's timing)."""
    h, w = volume.height, volume.width
    plane = padded_mask(mask, h, w)
    origins = kept_origins(plane, settings)
    ph, pw = plane.shape
    y0, y1 = rows if rows is not None else (0, ph if padded else h)
    origins = origins[(origins[:, 0] > y0 - TILE) & (origins[:, 0] < y1)]
    if sample is not None and len(origins) > sample:
        origins = origins[np.linspace(0, len(origins) - 1, sample).round().astype(int)]
    kernel, layers = gkern(), layer_indices(settings)
    lo, hi = min(layers), max(layers) + 1
    order = [i - lo for i in layers]
    sums = BandSums(pw)
    sums.top = int(origins[0, 0]) if len(origins) else y0
    out = np.zeros((y1 - y0, pw if padded else w), np.float32)
    slab = _Slab(volume, lo, hi, order, pw)
    for y in (int(v) for v in np.unique(origins[:, 0])):
        _emit(out, sums.top - y0, sums.flush(y))
        stack = slab.rows(y)
        xs = origins[origins[:, 0] == y, 1]
        for k in range(0, len(xs), batch_size):
            part = xs[k : k + batch_size]
            probs = forward(np.stack([stack[:, :, x : x + TILE] for x in part])[:, None], settings.divisor)
            sums.add(y, part, probs.astype(np.float64) * kernel, settings.stride)
    _emit(out, sums.top - y0, sums.flush(max(y1, sums.top)))
    return out, len(origins)


def unit_rows(shape: tuple[int, int], rows: tuple[int, int] | None) -> tuple[int, int]:
    """The pixel rows a unit of this family computes: the whole fragment, or a row range's own block rows
    ``[r0, r1)`` (the ranges partition the rows: ``plan.split_rows`` ends the last one past the mask's last row)."""
    if rows is None:
        return 0, shape[0]
    return min(rows[0] * BLOCK, shape[0]), min(rows[1] * BLOCK, shape[0])


def unit_sums(forward, volume, plan, block_rows: tuple[int, int], settings: GPSettings, *, batch_size: int,
              sample: int | None = None) -> tuple[np.ndarray, int]:  # fmt: skip
    """A unit's result as the engine keeps every unit's: fixed-point sums (``geometry.FIXED_SCALE``) on the
    cover grid's ``block_rows``, ``((hi - lo) * 32, cw * 32)`` int64, which finish (``stitch.finalize``) over a
    count of 1 (``gp_coverage``) to this family's map; and the windows run. ``plan``: the item (its ``shape``,
    ``mask``, ``rows``)."""
    lo, hi = block_rows
    y0, y1 = unit_rows(plan.shape, plan.rows)
    cw = -(-plan.shape[1] // BLOCK)
    sums = np.zeros(((hi - lo) * BLOCK, cw * BLOCK), np.int64)
    if y1 <= y0:
        return sums, 0
    prob, n = predict_gp(
        forward, volume, plan.mask, settings, batch_size=batch_size, rows=(y0, y1), sample=sample
    )
    top = y0 - lo * BLOCK
    sums[top : top + len(prob), : prob.shape[1]] = np.rint(prob.astype(np.float64) * FIXED_SCALE)
    return sums, n


def gp_coverage(mask: np.ndarray, rows: tuple[int, int] | None = None) -> np.ndarray:
    """``(ch, cw)`` int32 on the cover grid: 1 where a block holds mask pixels (of a row range's own block rows
    ``[r0, r1)`` only). The family's map is final where the mask is (its windows lie wholly inside it), so as a
    sum over a count of 1 it merges and ensembles like any."""
    h, w = mask.shape
    ch, cw = -(-h // BLOCK), -(-w // BLOCK)
    grid = np.zeros((ch * BLOCK, cw * BLOCK), bool)
    grid[:h, :w] = mask
    found = grid.reshape(ch, BLOCK, cw, BLOCK).any(axis=(1, 3)).astype(np.int32)
    if rows is not None:
        found[: rows[0]] = 0
        found[rows[1] :] = 0
    return found


class _Slab:
    """The 8-bit layers of rows ``[y, y + 64)`` of the padded plane, for origin rows in increasing order: the rows
    two windows' rows share (43 of 64 at stride 21) are kept, only the new ones read and converted."""

    def __init__(self, volume, lo: int, hi: int, order: list[int], width: int) -> None:
        self.volume, self.lo, self.hi, self.order, self.width = volume, lo, hi, order, width
        self.top, self.held = 0, np.zeros((len(order), 0, width), np.uint8)

    def rows(self, y: int) -> np.ndarray:
        keep = self.held[:, y - self.top :] if y < self.top + self.held.shape[1] else self.held[:, :0]
        start = y + keep.shape[1]
        raw = np.zeros((self.hi - self.lo, y + TILE - start, self.width), np.uint16)
        raw[:, :, : self.volume.width] = self.volume.read_band(start, y + TILE, self.lo, self.hi)
        self.top, self.held = y, np.concatenate([keep, to_eight(raw[self.order])], axis=1)
        return self.held


def _emit(out: np.ndarray, top: int, rows: np.ndarray) -> None:
    """Final rows starting at row ``top`` of ``out`` (negative: above it) into ``out``; what lies outside dropped."""
    start, stop = max(top, 0), min(top + len(rows), out.shape[0])
    if stop > start:
        out[start:stop] = rows[start - top : stop - top, : out.shape[1]]


class TorchForward:
    """``predict_gp``'s ``forward`` for a torch model (``(B, 1, 26, 64, 64)`` -> ``(B, 16)`` or ``(B, 1, 4, 4)``
    logits): fp16 autocast on CUDA, fp32 on the CPU (as the GP script: its CUDA autocast is off on the CPU), then
    sigmoid and x16 bilinear with ``align_corners=False``, in the GP script's order."""

    def __init__(self, model, device="cpu") -> None:
        self.model, self.device = model, device

    def __call__(self, tiles: np.ndarray, divisor: float = DIVISOR) -> np.ndarray:
        """``(B, 1, 26, 64, 64)`` uint8 (``to_eight``) -> ``(B, 64, 64)`` float32 probabilities; the tiles cross to
        the device as bytes and become ``v * float32(1 / divisor)`` there."""
        import torch
        import torch.nn.functional as F

        scale = np.float32(1.0 / divisor)
        # numpy turns bytes into floats several times faster than torch on the CPU
        if torch.device(self.device).type == "cpu":
            x = torch.from_numpy(scaled(tiles, divisor))
        else:
            x = torch.from_numpy(tiles).to(self.device).float() * torch.tensor(scale, device=self.device)
        with torch.no_grad(), torch.autocast("cuda", enabled=x.is_cuda):
            logits = self.model(x)
        probs = torch.sigmoid(logits.reshape(-1, 1, 4, 4)).float()
        up = F.interpolate(probs, scale_factor=UPSCALE, mode="bilinear", align_corners=False)
        return up[:, 0].cpu().numpy()


def gp_png(padded_map: np.ndarray) -> np.ndarray:
    """The GP script's picture from the map on its padded plane (``predict_gp(..., padded=True)``): divided by its
    global max, ``p * 255`` truncated to uint8, at the padded size, as the script writes it. A display step only."""
    plane = padded_map.astype(np.float64)
    top = plane.max()
    if top > 0:
        plane = plane / top
    return (plane * 255).astype(np.uint8)
