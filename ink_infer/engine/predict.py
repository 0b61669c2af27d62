"""One model over one fragment: stream slabs to the device, cut windows there, normalise, flip, run, stitch.

Shapes: the device holds ``(nz, band_rows, W_pad)`` float16 of the model's slices, ``float16(raw / 65535)``: the
reference's test preprocessing rounded every pixel to float16 before the model saw it (PIPELINE.md §4), and that
rounding moves the probabilities (0.011 on average on an irCSN checkpoint), so every device feeds the models the
rounded values. Converting a slab costs one table look-up per pixel, once per band; float16 is also the int16 raw's
size, so the device holds no more than before. Windows are cut as ``(B, nz, side, side)`` views, converted to
float32, normalised per window (mean and std of the rounded values), cast to the model's dtype (float16 on CUDA,
float32 on CPU, as the reference), and the ``(B, 1, side/32, side/32)`` logits are turned into probabilities and
added to a fixed-point sum map on the device (``stitch.SumMap``: exact, so order-independent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ink_infer.config import ModelSpec
from ink_infer.engine.stitch import SumMap, upsample_probs
from ink_infer.engine.stream import SlabReader, keep_pixels, rows_per_band_for, slab_plan
from ink_infer.engine.tiling import Windows, band_plan, cover_grid
from ink_infer.engine.windows import (
    WindowBuffer,
    apply_flips,
    block_sums,
    cut_windows,
    unit_fp16,
    window_affine,
)
from ink_infer.geometry import BLOCK

log = logging.getLogger(__name__)

# one band of raw rows: small on the CPU (host RSS), larger on CUDA (fewer, fuller batches per band)
BAND_BYTES_CPU = 48 * 2**20
BAND_BYTES_CUDA = 256 * 2**20

# batches whose end is synchronised on CUDA, so that the rate the budget checks after them is real
SYNCED_BATCHES = 4


@dataclass
class PredictStats:
    """What one (model, fragment) pass did and cost."""

    windows: int = 0
    seconds: float = 0.0
    wait_read_s: float = 0.0  # time the device waited for the reader
    nonfinite_windows: int = 0
    batch_size: int = 0
    oom_retries: int = 0
    batches: int = 0
    first_batch_s: float = 0.0  # wall time of the first batch (warm-up: cudnn autotuning, allocator growth)
    # from the start to the first batch: the first slab (a tile's height of rows) read and prepared, once per
    # pass, where every later slab is a stride's height
    setup_s: float = 0.0
    batch_ms_per_window: list[float] | None = None  # timed passes (dry runs): each batch's ms per window


class _Runner:
    """Runs the model on window batches with fixed shapes, halving the batch once on CUDA out-of-memory."""

    def __init__(
        self, model: torch.nn.Module, *, dtype: torch.dtype, batch_size: int, pad: bool, stats: PredictStats
    ):
        self.model, self.dtype, self.batch_size, self.pad, self.stats = model, dtype, batch_size, pad, stats

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, nz, s, s)`` float32 normalised -> ``(n, 1, s/32, s/32)`` float32 logits."""
        outs, i = [], 0
        while i < len(x):
            chunk = x[i : i + self.batch_size]
            try:
                outs.append(self._forward(chunk))
            except torch.cuda.OutOfMemoryError:
                if self.stats.oom_retries or self.batch_size == 1:
                    raise
                self.stats.oom_retries += 1
                self.batch_size = max(1, self.batch_size // 2)
                log.warning("CUDA out of memory: batch size halved to %d", self.batch_size)
                torch.cuda.empty_cache()
                continue
            i += len(chunk)
        return torch.cat(outs)

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        n = len(chunk)
        if self.pad and n < self.batch_size:
            # fixed batch shapes let cudnn.benchmark pick kernels once
            chunk = torch.cat([chunk, chunk.new_zeros((self.batch_size - n, *chunk.shape[1:]))])
        with torch.inference_mode():
            return self.model(chunk.to(self.dtype))[:n].float()


@dataclass(frozen=True)
class PassSettings:
    """How one pass runs: where, in which dtype, by batches of how many windows, with which TTA.

    ``row_blocks``: ``(lo, hi)``, keep the sums on those block rows of the cover grid only (a row-range unit:
    ``plan.FragmentPlan.block_rows``; every window must lie inside them). ``timed`` (dry runs): every batch is
    synchronised and its time per window recorded (``PredictStats.batch_ms_per_window``): the windows it cut, ran
    and stitched, not the band reads and uploads a full pass shares among many more windows than a sample does.
    ``fixed_batch``: every batch padded to the batch size (a compiled model: one shape, one compile); on CUDA they
    always are (cudnn.benchmark picks kernels once). ``rows_per_band``: None, from the device's band budget."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int
    tta: str = "scheduled"
    rows_per_band: int | None = None
    row_blocks: tuple[int, int] | None = None
    timed: bool = False
    fixed_batch: bool = False


def predict_fragment(
    model: torch.nn.Module,
    spec: ModelSpec,
    volume,
    windows: Windows,
    how: PassSettings,
    *,
    on_batch: Callable[[PredictStats], None] | None = None,
) -> tuple[np.ndarray, PredictStats]:
    """Sum of window probabilities over the fragment's cover grid (``tiling.cover_grid``: the partial blocks of the
    remainder rows and columns included), ``(ch * 32, cw * 32)`` int64 fixed point (``stitch.FIXED_SCALE``) on
    the host; with ``how.row_blocks = (lo, hi)``, ``((hi - lo) * 32, cw * 32)``.

    volume: anything with ``read_band``, ``height`` and ``width`` (``volumes``). ``on_batch(stats)`` is called
    after every batch (the budget check; it may raise to stop the model).
    """
    stats = PredictStats(batch_size=how.batch_size, batch_ms_per_window=[] if how.timed else None)
    t_start = time.perf_counter()
    tile = spec.tile
    on_cuda = how.device.type == "cuda"
    # on the cover grid: windows reaching the last H % 32 rows / W % 32 columns predict there (the reference rule)
    ch, cw = cover_grid((volume.height, volume.width))
    lo, hi = how.row_blocks if how.row_blocks is not None else (0, ch)
    acc = SumMap((hi - lo, cw), pad=tile, device=how.device)
    runner = _Runner(
        model, dtype=how.dtype, batch_size=how.batch_size, pad=on_cuda or how.fixed_batch, stats=stats
    )
    rows_per_band = how.rows_per_band
    if rows_per_band is None:
        budget = BAND_BYTES_CUDA if on_cuda else BAND_BYTES_CPU
        rows_per_band = rows_per_band_for(spec.n_slices, volume.width, tile=tile, budget_bytes=budget)
    plan = slab_plan(band_plan(windows.origins, rows_per_band=rows_per_band), tile=tile)
    reader = SlabReader(volume.read_band, plan, z_range=spec.z_range, width=volume.width, pin=on_cuda)
    band = _Band(spec, windows, how, runner, acc, y_shift=lo * BLOCK)
    copy_stream = torch.cuda.Stream(how.device) if on_cuda else None
    width_p = (windows.touched.shape[1] + tile // BLOCK) * BLOCK  # room for windows past the right edge
    t_wait = time.perf_counter()
    for read, host in reader:
        stats.wait_read_s += time.perf_counter() - t_wait
        slab = _to_device(
            host, windows.touched, (read.y0, read.y1), width_p, device=how.device, stream=copy_stream
        )
        reader.release()
        band.hold(read, slab)
        for idx in np.array_split(read.band.index, -(-len(read.band.index) // runner.batch_size)):
            t_batch = time.perf_counter()
            if not stats.batches:
                stats.setup_s = t_batch - t_start
            band.run_batch(read.band.row0, idx)
            _account(stats, how, n=len(idx), t_batch=t_batch)
            stats.seconds = time.perf_counter() - t_start
            if on_batch is not None:
                on_batch(stats)
        t_wait = time.perf_counter()
    sum_map = acc.to_fixed()
    stats.seconds = time.perf_counter() - t_start
    return sum_map, stats


def _account(stats: PredictStats, how: PassSettings, *, n: int, t_batch: float) -> None:
    """A batch of ``n`` windows done: counted, and the early batches (every one when timed) synchronised on CUDA,
    so that their times are measured, not queued kernels (the warm-up batch and the early rate)."""
    stats.windows += n
    stats.batches += 1
    if stats.batches <= SYNCED_BATCHES or how.timed:
        if how.device.type == "cuda":
            torch.cuda.synchronize(how.device)
        if stats.batches == 1:
            stats.first_batch_s = time.perf_counter() - t_batch
        if how.timed:
            stats.batch_ms_per_window.append(1000 * (time.perf_counter() - t_batch) / n)


class _Band:
    """The band of rows held on the device (a tile's height when fresh, then slid by a stride's) and its block
    sums; cuts, runs and stitches one batch of its windows at a time."""

    def __init__(self, spec: ModelSpec, windows: Windows, how: PassSettings, runner: _Runner, acc: SumMap,
                 *, y_shift: int) -> None:  # fmt: skip
        self.spec, self.windows, self.how, self.runner, self.acc = spec, windows, how, runner, acc
        self.y_shift = y_shift  # the map's first row
        self.held, self.sums, self.y0 = None, None, 0
        self.buffer = WindowBuffer()

    def hold(self, read, slab: torch.Tensor) -> None:
        slab_sums = block_sums(slab)
        band_y0 = read.band.pixel_rows(self.spec.tile)[0]
        if read.fresh:
            self.held, self.sums = slab, slab_sums
        else:
            drop = band_y0 - self.y0
            self.held = torch.cat([self.held[:, drop:], slab], dim=1)
            self.sums = torch.cat([self.sums[:, drop // BLOCK :], slab_sums], dim=1)
        self.y0 = band_y0

    def run_batch(self, row0: int, idx: np.ndarray) -> None:
        origins, off = self.windows.origins, self.spec.offset
        rows = (origins[idx, 0] - row0) * BLOCK + off
        cols = origins[idx, 1] * BLOCK + off
        probs = _predict_windows(
            self.runner, self.held, self.sums, (rows, cols, self.windows.ops[idx]), side=self.spec.side,
            tta=self.how.tta, buffer=self.buffer,
        )  # fmt: skip
        self.acc.add(probs, origins[idx, 0] * BLOCK + off - self.y_shift, origins[idx, 1] * BLOCK + off)


def _to_device(
    host: torch.Tensor,
    touched: np.ndarray,
    rows: tuple[int, int],
    width_p: int,
    *,
    device: torch.device,
    stream: torch.cuda.Stream | None,
) -> torch.Tensor:
    """Host ``(nz, r, W)`` int16 (uint16 bits) -> device ``(nz, r, width_p)`` float16 ``float16(raw / 65535)``.

    Blocks not read as data are zeroed first (raw 0 is 0.0), as the reference's missing patches were.
    """
    keep = torch.from_numpy(keep_pixels(touched, rows, width_p))
    if stream is None:
        slab = host.mul_(keep[:, : host.shape[-1]])  # in the reader's buffer: it is read anew after release
    else:
        with torch.cuda.stream(stream):
            slab = host.to(device, non_blocking=True)
        torch.cuda.current_stream(device).wait_stream(stream)
        slab.record_stream(torch.cuda.current_stream(device))
        stream.synchronize()  # the host buffer goes back to the reader right after this
        slab *= keep[:, : host.shape[-1]].to(device=device, dtype=slab.dtype)
    return unit_fp16(slab, width_p)


def _predict_windows(
    runner: _Runner,
    held: torch.Tensor,
    sums: torch.Tensor,
    where: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    side: int,
    tta: str,
    buffer: WindowBuffer | None = None,
) -> torch.Tensor:
    """``(B, side, side)`` float32 probabilities of the windows whose model squares start at ``where``'s
    ``(rows, cols)`` pixel offsets in the held band, flipped by its ``ops``."""
    rows, cols, ops = where
    stats = runner.stats
    n = len(rows)
    if tta == "full":
        rows, cols = np.tile(rows, 4), np.tile(cols, 4)
        ops = np.repeat(np.arange(4, dtype=np.int8), n)
    rb = torch.from_numpy(rows // BLOCK).to(held.device)
    cb = torch.from_numpy(cols // BLOCK).to(held.device)
    scale, shift = window_affine(sums, rb, cb, side_blocks=side // BLOCK, n=held.shape[0] * side * side)
    x = cut_windows(held, rows, cols, ops, side=side, scale=scale, shift=shift, buffer=buffer)
    # flip and bilinear upsampling with align_corners=True commute, so un-flipping the 1/32 logits is exact
    # and 1024x cheaper than un-flipping the upsampled map as the reference did
    logits = apply_flips(runner.logits(x), ops)
    del x
    if tta == "full":
        bad = ~torch.isfinite(logits.view(4, n, -1)).all(2).all(0)
        probs = upsample_probs(logits, side).view(4, n, side, side).mean(0)
    else:
        bad = ~torch.isfinite(logits.flatten(1)).all(1)
        probs = upsample_probs(logits, side)
    if bad.any():
        # a window with NaN or inf logits adds nothing (it is still counted); the report says how many
        stats.nonfinite_windows += int(bad.sum())
        probs[bad] = 0.0
    return probs
