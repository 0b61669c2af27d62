"""The GP TimeSformer family's map, streamed (``gp_family`` says what it is): origin rows in order, the 8-bit rows two
windows share kept, the sums in a band of rows that moves down the plane (a row above the current origin row is
final), never the GP script's whole padded stack and two float64 full-size maps.

A window's contribution ``kernel * upsample(p)`` is never built: the x16 bilinear upsampling is a fixed ``(64, 4)``
matrix ``A`` per axis and every blend weight an outer product ``u u^T``, so the contribution is ``B p B^T`` with
``B = diag(u) A``. An origin row's windows are summed as ``p B^T`` on 4 rows (16x fewer adds than the 64 x 64
tiles), and the band gets ``B`` times that once per origin row; the count, a sum of outer products too, likewise.
The sums differ from the GP script's per-window float64 adds by rounding only (its float32 upsampling included).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ink_infer.geometry import BLOCK, FIXED_SCALE
from ink_infer.models.gp_family import (
    DIVISOR,
    GP_SCRIPT,
    TILE,
    UPSCALE,
    WEIGHTED_FLOOR,
    GPSettings,
    blend_profile,
    kept_origins,
    layer_indices,
    padded_shape,
    scaled,
    to_eight,
    unit_area,
)

CELLS = TILE // UPSCALE  # 4 x 4 logits per window


def upsample_matrix() -> np.ndarray:
    """``(64, 4)`` float64 ``A``: PyTorch's x16 bilinear with ``align_corners=False`` along one axis (source
    ``max((i + 0.5) / 16 - 0.5, 0)``, the last cell repeated past the edge); ``A p A^T`` is the upsampled tile."""
    i = np.arange(TILE)
    src = np.maximum((i + 0.5) / UPSCALE - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    lam = src - i0
    a = np.zeros((TILE, CELLS))
    np.add.at(a, (i, i0), 1.0 - lam)
    np.add.at(a, (i, np.minimum(i0 + 1, CELLS - 1)), lam)
    return a


class BandSums:
    """The sums of the windows over rows ``[top, top + rows)`` of the padded plane: the numerator (blend weighted)
    and the count (ones, or the blend weight under ``count: weights``), float64; rows above the next origin row are
    final and handed out by ``flush``."""

    def __init__(self, width: int, settings: GPSettings = GP_SCRIPT, rows: int = 2 * TILE) -> None:
        self.top, self.stride = 0, settings.stride
        self.numerator = np.zeros((rows, width), np.float64)
        self.count = np.zeros((rows, width), np.float64)
        u = blend_profile(settings)
        self.left = u[:, None] * upsample_matrix()  # B = diag(u) A
        self.counted = u if settings.count == "weights" else np.ones(TILE)
        self.floor = WEIGHTED_FLOOR if settings.count == "weights" else 1.0
        # the current origin row's windows, summed as p B^T (4 rows) and as the count's column profile, over the
        # columns [lo, hi) they reach; multiplied out into the band once per origin row (``_apply``)
        self.row, self.lo, self.hi = None, width, 0
        self.across = np.zeros((CELLS, width))
        self.weight = np.zeros(width)

    def add(self, y: int, xs: np.ndarray, probs: np.ndarray) -> None:
        """The windows of origin row ``y`` at columns ``xs`` (increasing, on the ``stride`` grid), ``probs``
        ``(n, 4, 4)`` (sigmoid of the logits); a row's windows may come in several calls. Windows ``ceil(64 /
        stride)`` grid steps apart never overlap, so each such phase is added in one vectorised step."""
        if y != self.row:
            self._apply()
            self.row = y
        q = np.einsum("nij,bj->nib", probs.astype(np.float64), self.left)  # (n, 4, 64): p B^T
        phases = (xs // self.stride) % -(-TILE // self.stride)
        for phase in np.unique(phases):
            pick = np.nonzero(phases == phase)[0]
            cols = (xs[pick, None] + np.arange(TILE)).ravel()
            self.across[:, cols] += q[pick].transpose(1, 0, 2).reshape(CELLS, -1)
            self.weight[cols] += np.tile(self.counted, len(pick))
        self.lo, self.hi = min(self.lo, int(xs[0])), max(self.hi, int(xs[-1]) + TILE)

    def _apply(self) -> None:
        """The current origin row's windows into the band: ``B`` times their ``p B^T`` sums, and the count. The
        products are ``einsum``'s own loops, not BLAS: its threads would spin against the model's between calls
        (2x slower runs on 2 cores)."""
        if self.row is None:
            return
        rows, cols = slice(self.row - self.top, self.row - self.top + TILE), slice(self.lo, self.hi)
        self.numerator[rows, cols] += np.einsum("ai,iw->aw", self.left, self.across[:, cols])
        self.count[rows, cols] += self.counted[:, None] * self.weight[None, cols]
        self.across[:, cols] = 0.0
        self.weight[cols] = 0.0
        self.row, self.lo, self.hi = None, self.numerator.shape[1], 0

    def flush(self, until: int) -> np.ndarray:
        """The final probabilities of rows ``[top, until)`` (float32; rows no window reached: 0), the band moved
        down past them: the sum over the count clipped at 1 (at 1e-6 for weighted counts), clipped to [0, 1]."""
        self._apply()
        n, held = until - self.top, len(self.numerator)
        done = np.zeros((n, self.numerator.shape[1]), np.float32)
        k = min(n, held)
        done[:k] = np.clip(
            np.nan_to_num(self.numerator[:k] / np.maximum(self.count[:k], self.floor)), 0.0, 1.0
        )
        self.numerator = np.concatenate([self.numerator[k:], np.zeros_like(self.numerator[:k])])
        self.count = np.concatenate([self.count[k:], np.zeros_like(self.count[:k])])
        self.top = until
        return done


def predict_gp(
    forward: Callable[[np.ndarray, float], np.ndarray], volume, mask: np.ndarray | None,
    settings: GPSettings = GP_SCRIPT, *, batch_size: int = 64, area: tuple[int, int, int, int] | None = None,
    sample: int | None = None,
) -> tuple[np.ndarray, int]:  # fmt: skip
    """``(the family's probability map, windows run)`` of ``volume`` (``read_band``, ``height``, ``width``) under
    ``mask`` (``(H, W)`` bool; None: no mask file): ``(H, W)`` float32, or rows ``[y0, y1)`` and columns ``[x0, x1)``
    of the padded plane (``area``: ``(y0, y1, x0, x1)``; only the windows that reach it run; the whole plane,
    ``gp_family.padded_area``, is what ``gp_png`` divides by its max). ``forward(tiles, divisor)``: ``(B, 1, 26, 64,
    64)`` uint8 or float32 (``wants_float``) -> ``(B, 4, 4)`` probabilities (``TorchForward``). ``sample``: only
    that many windows, spread over the plane (a dry run's timing)."""
    h, w = volume.height, volume.width
    y0, y1, x0, x1 = area if area is not None else (0, h, 0, w)
    origins = kept_origins(mask, (h, w), settings, (y0, y1, x0, x1))
    if sample is not None and len(origins) > sample:
        origins = origins[np.linspace(0, len(origins) - 1, sample).round().astype(int)]
    layers = layer_indices(settings)
    lo, hi = min(layers), max(layers) + 1
    pw = padded_shape(h, w)[1]
    sums = BandSums(pw, settings)
    sums.top = int(origins[0, 0]) if len(origins) else y0
    out = np.zeros((y1 - y0, x1 - x0), np.float32)
    slab = _Slab(volume, lo, hi, [i - lo for i in layers], pw)
    as_float = getattr(forward, "wants_float", False)
    for y in (int(v) for v in np.unique(origins[:, 0])):
        _emit(out, sums.top - y0, sums.flush(y), x0)
        stack = slab.rows(y)
        xs = origins[origins[:, 0] == y, 1]
        for k in range(0, len(xs), batch_size):
            part = xs[k : k + batch_size]
            sums.add(
                y,
                part,
                forward(
                    _tiles(stack, part, settings.stride, settings.divisor if as_float else None),
                    settings.divisor,
                ),
            )
    _emit(out, sums.top - y0, sums.flush(max(y1, sums.top)), x0)
    return out, len(origins)


def unit_sums(forward, volume, plan, block_rows: tuple[int, int], settings: GPSettings, *, batch_size: int,
              sample: int | None = None) -> tuple[np.ndarray, int]:  # fmt: skip
    """A unit's result as the engine keeps every unit's: fixed-point sums (``geometry.FIXED_SCALE``) on the
    cover grid's ``block_rows``, ``((hi - lo) * 32, cw * 32)`` int64, which finish (``stitch.finalize``) over a
    count of 1 (``gp_family.gp_coverage``) to this family's map; and the windows run. ``plan``: the item (its
    ``shape``, ``mask``, ``mask_file``, ``rows``)."""
    lo, hi = block_rows
    cw = -(-plan.shape[1] // BLOCK)
    sums = np.zeros(((hi - lo) * BLOCK, cw * BLOCK), np.int64)
    found = unit_area(plan)
    if found is None:
        return sums, 0
    mask, area = found
    prob, n = predict_gp(forward, volume, mask, settings, batch_size=batch_size, area=area, sample=sample)
    top = area[0] - lo * BLOCK
    sums[top : top + len(prob), : prob.shape[1]] = np.rint(prob.astype(np.float64) * FIXED_SCALE)
    return sums, n


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
        stop = min(y + TILE, self.volume.height)
        if stop > start:  # rows of the image; past it the padding's zeros
            raw[:, : stop - start, : self.volume.width] = self.volume.read_band(start, stop, self.lo, self.hi)
        self.top, self.held = y, np.concatenate([keep, to_eight(raw[self.order])], axis=1)
        return self.held


def _tiles(stack: np.ndarray, xs: np.ndarray, stride: int, divisor: float | None) -> np.ndarray:
    """The windows at columns ``xs`` of the slab's rows, ``(n, 1, 26, 64, 64)``: uint8, or (``divisor``) already
    the model's float32. Windows of a batch overlap (3 of 4 columns at stride 21): the columns they span are
    converted once and, when the windows follow each other on the grid, handed over as a strided view of them
    (the model's first op, its patch rearrangement, copies them anyway: one copy fewer than stacking)."""
    if divisor is None:
        return np.stack([stack[:, :, x : x + TILE] for x in xs])[:, None]
    a, b = int(xs[0]), int(xs[-1]) + TILE
    sparse = b - a > 2 * TILE * len(xs)  # a mask's gaps: converting its windows one by one is less
    if sparse:
        return scaled(np.stack([stack[:, :, x : x + TILE] for x in xs])[:, None], divisor)
    span = scaled(stack[:, :, a:b], divisor)
    if len(xs) > 1 and (np.diff(xs) == stride).all():
        f, r, c = span.strides
        return np.lib.stride_tricks.as_strided(
            span, (len(xs), 1, *span.shape[:2], TILE), (c * stride, 0, f, r, c)
        )
    return np.stack([span[:, :, x - a : x - a + TILE] for x in xs])[:, None]


def _emit(out: np.ndarray, top: int, rows: np.ndarray, x0: int) -> None:
    """Final rows starting at row ``top`` of ``out`` (negative: above it), from column ``x0`` of the padded plane,
    into ``out``; what lies outside dropped."""
    start, stop = max(top, 0), min(top + len(rows), out.shape[0])
    if stop > start:
        out[start:stop] = rows[start - top : stop - top, x0 : x0 + out.shape[1]]


class TorchForward:
    """``predict_gp``'s ``forward`` for a torch model (``(B, 1, 26, 64, 64)`` -> ``(B, 16)`` or ``(B, 1, 4, 4)``
    logits): fp16 autocast on CUDA, fp32 on the CPU (as the GP script: its CUDA autocast is off on the CPU), then
    the sigmoid (the x16 upsampling is ``BandSums``')."""

    def __init__(self, model, device="cpu") -> None:
        import torch

        self.model, self.device = model, device
        # on the CPU the tiles come as the model's float32 (numpy turns bytes into floats several times faster
        # than torch there, and a batch's overlapping windows are converted once); to a device they cross as bytes
        self.wants_float = torch.device(device).type == "cpu"

    def __call__(self, tiles: np.ndarray, divisor: float = DIVISOR) -> np.ndarray:
        """``(B, 1, 26, 64, 64)`` uint8 (``to_eight``; made ``v * float32(1 / divisor)`` on the device) or that
        float32 already -> ``(B, 4, 4)`` float32 probabilities."""
        import torch

        if tiles.dtype == np.float32:
            x = torch.from_numpy(tiles).to(self.device)
        elif self.wants_float:
            x = torch.from_numpy(scaled(tiles, divisor))
        else:
            scale = torch.tensor(np.float32(1.0 / divisor), device=self.device)
            x = torch.from_numpy(tiles).to(self.device).float() * scale
        with torch.no_grad(), torch.autocast("cuda", enabled=x.is_cuda):
            logits = self.model(x)
        return torch.sigmoid(logits.reshape(-1, CELLS, CELLS)).float().cpu().numpy()
