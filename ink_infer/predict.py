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

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from .config import BLOCK, ModelSpec
from .stitch import SumMap, upsample_probs
from .stream import SlabReader, keep_pixels, rows_per_band_for, slab_plan
from .tiling import band_plan, cover_grid

log = logging.getLogger(__name__)

# one band of raw rows: small on the CPU (host RSS), larger on CUDA (fewer, fuller batches per band)
BAND_BYTES_CPU = 48 * 2**20
BAND_BYTES_CUDA = 256 * 2**20

# batches whose end is synchronised on CUDA, so that the rate the budget checks after them is real
SYNCED_BATCHES = 4

# flip dims per op of the reference schedule on (B, C, H, W): 0 none, 1 H, 2 W, 3 H+W
_FLIP_DIMS = {1: (-2,), 2: (-1,), 3: (-2, -1)}
_CV2_FLIP = {1: 0, 2: 1, 3: -1}  # the same ops as cv2.flip codes on one (H, W) slice


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


def apply_flips(x: torch.Tensor, ops: np.ndarray) -> torch.Tensor:
    """Flip each sample of ``(B, C, H, W)`` by its op; the same call undoes it (flips are involutions)."""
    if not ops.any():
        return x
    x = x.clone()
    for op, dims in _FLIP_DIMS.items():
        sel = torch.from_numpy(np.nonzero(ops == op)[0]).to(x.device)
        if len(sel):
            x[sel] = x[sel].flip(dims)
    return x


# float16(raw / 65535) for every uint16 raw value, computed as the reference did (float32 division, then a cast
# with round-to-nearest-even), so the look-up is the reference's own arithmetic on every device
UNIT_FP16 = (np.arange(65536, dtype=np.float32) / np.float32(65535.0)).astype(np.float16)


@functools.lru_cache(maxsize=4)
def _unit_table(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(UNIT_FP16).to(device)


def unit_fp16(raw_bits: torch.Tensor, width: int | None = None, *, z_chunk: int = 8) -> torch.Tensor:
    """``(nz, r, w)`` int16 holding uint16 bits -> ``(nz, r, width)`` float16 ``float16(raw / 65535)`` on the same
    device, zero-padded on the right to ``width`` (default ``w``)."""
    nz, r, w = raw_bits.shape
    out = torch.zeros((nz, r, width or w), dtype=torch.float16, device=raw_bits.device)
    if raw_bits.device.type == "cpu":
        bits, dst = raw_bits.numpy().view(np.uint16), out.numpy()
        for z in range(nz):  # one slice at a time: numpy indexes through an int64 copy of the indices
            dst[z, :, :w] = UNIT_FP16[bits[z]]
        return out
    table = _unit_table(raw_bits.device)
    for z0 in range(0, nz, z_chunk):  # int32 indices a few slices at a time: bounded temporaries
        out[z0 : z0 + z_chunk, :, :w] = table[raw_bits[z0 : z0 + z_chunk].to(torch.int32) & 0xFFFF]
    return out


def block_sums(slab: torch.Tensor, *, z_chunk: int = 8) -> torch.Tensor:
    """``(nz, r, Wp)`` float16 slab -> ``(2, r/32, Wp/32)`` float64 per-block sums of ``v`` and ``v**2``.

    ``v = float16(raw / 65535)`` is the reference's pixel value. Summing each block once per band lets every
    window's mean and std come from 64 block sums instead of a pass over its 2.3 M values (the window's own
    normalisation in the reference, which dominated the CPU cost). ``v`` and ``v**2`` are exact in float32 (11-bit
    mantissas) and are summed in float64, so the window statistics are those of the rounded values to float64
    rounding.
    """
    nz, r, wp = slab.shape
    out = torch.zeros((2, r // BLOCK, wp // BLOCK), dtype=torch.float64, device=slab.device)
    for z0 in range(0, nz, z_chunk):
        v = slab[z0 : z0 + z_chunk].float()
        v = v.view(v.shape[0], r // BLOCK, BLOCK, wp // BLOCK, BLOCK)
        out[0] += v.sum(dim=(0, 2, 4), dtype=torch.float64)
        out[1] += (v * v).sum(dim=(0, 2, 4), dtype=torch.float64)
    return out


def window_affine(sums: torch.Tensor, rb: torch.Tensor, cb: torch.Tensor, *, side_blocks: int, n: int):
    """Per-window ``scale, shift`` so that ``v * scale + shift`` is the reference's normalised window.

    sums: ``(2, R, C)`` block sums of the held band; rb, cb: ``(B,)`` top-left block of each model square;
    n: values per window (slices x side x side). Normalisation: ``(v - mean) / (std + 1e-6)``, unbiased std,
    over the model's slices and square, zero blocks included (as the reference).
    """
    integral = torch.nn.functional.pad(sums.cumsum(1).cumsum(2), (1, 0, 1, 0))
    r1, c1 = rb + side_blocks, cb + side_blocks
    tot = integral[:, r1, c1] - integral[:, rb, c1] - integral[:, r1, cb] + integral[:, rb, cb]  # (2, B)
    mean = tot[0] / n
    var = ((tot[1] - tot[0] * mean) / (n - 1)).clamp_min(0.0)
    std = var.sqrt() + 1e-6
    scale = 1.0 / std
    shift = -mean / std
    return scale.float().view(-1, 1, 1, 1), shift.float().view(-1, 1, 1, 1)


class WindowBuffer:
    """One ``(B, nz, side, side)`` float32 batch buffer, reused for every batch of a (model, fragment) pass.

    On the CPU a batch of windows is tens of MB: above glibc's largest mmap threshold (32 MB), so a fresh tensor per
    batch is a fresh mapping whose every page faults on first touch. Measured with ``benchmarks/engine_overhead.py``
    (2 cores): ~650k page faults and ~5 ms/window per pass without reuse, ~80k and ~2 ms/window with it.
    """

    def __init__(self) -> None:
        self._storage: torch.Tensor | None = None

    def get(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        n = int(np.prod(shape))
        if self._storage is None or self._storage.numel() < n or self._storage.device != device:
            self._storage = None  # drop the old one before allocating its successor
            self._storage = torch.empty(n, dtype=torch.float32, device=device)
        return self._storage[:n].view(shape)


def cut_windows(
    held: torch.Tensor,
    rows: np.ndarray,
    cols: np.ndarray,
    ops: np.ndarray,
    *,
    side: int,
    scale: torch.Tensor,
    shift: torch.Tensor,
    buffer: WindowBuffer | None = None,
) -> torch.Tensor:
    """``(B, nz, side, side)`` float32 normalised windows ``v * scale + shift`` cut from the held float16 band,
    each flipped by its op, written into ``buffer`` (a fresh one if None).

    On the CPU this is OpenCV, slice by slice: ``addWeighted`` converts the strided float16 view and applies the
    affine in one pass (flipped windows are flipped while still float16, half the bytes). Measured on 2 cores
    (``benchmarks/engine_overhead.py``): ~2x faster than numpy's multiply-then-add, itself ~10x faster than torch's
    strided ``copy_``. On CUDA, one ``copy_`` per window and one fused affine per batch.
    """
    shape = (len(rows), held.shape[0], side, side)
    out = (buffer or WindowBuffer()).get(shape, held.device)
    windows = zip(rows.tolist(), cols.tolist(), ops.tolist(), strict=True)
    if held.device.type == "cpu":
        src, dst = held.numpy(), out.numpy()
        sc, sh = scale.view(-1).tolist(), shift.view(-1).tolist()
        for i, (r, c, op) in enumerate(windows):
            for z in range(src.shape[0]):
                view = src[z, r : r + side, c : c + side]
                if op:
                    view = cv2.flip(view, _CV2_FLIP[op])
                cv2.addWeighted(view, sc[i], view, 0.0, sh[i], dst=dst[i, z], dtype=cv2.CV_32F)
        return out
    for i, (r, c, op) in enumerate(windows):
        view = held[:, r : r + side, c : c + side]
        out[i].copy_(view.flip(_FLIP_DIMS[op]) if op else view)
    return out.mul_(scale).add_(shift)


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


def predict_fragment(
    model: torch.nn.Module,
    spec: ModelSpec,
    volume,
    touched: np.ndarray,
    origins: np.ndarray,
    ops: np.ndarray,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    tta: str = "scheduled",
    rows_per_band: int | None = None,
    row_blocks: tuple[int, int] | None = None,
    timed: bool = False,
    on_batch: Callable[[PredictStats], None] | None = None,
    fixed_batch: bool = False,
) -> tuple[np.ndarray, PredictStats]:
    """Sum of window probabilities over the fragment's cover grid (``tiling.cover_grid``: the partial blocks of the
    remainder rows and columns included), ``(ch * 32, cw * 32)`` int64 fixed point (``stitch.FIXED_SCALE``) on
    the host.

    volume: a ``fragments.Volume`` (``read_band``, ``width``); touched: ``(gh, gw)`` bool blocks read as data;
    origins: ``(N, 2)`` block coords of the windows to run; ops: ``(N,)`` their flip op (``tta="scheduled"``).
    ``on_batch(stats)`` is called after every batch (the budget check; it may raise to stop the model).
    ``row_blocks``: ``(lo, hi)``, keep the sums on those block rows of the cover grid only (a row-range unit:
    ``plan.FragmentPlan.block_rows``; every window must lie inside them); the map is then ``((hi - lo) * 32,
    cw * 32)``. ``timed`` (dry runs): every batch is synchronised and its time per window recorded
    (``stats.batch_ms_per_window``): the windows it cut, ran and stitched, not the band reads and uploads a full
    pass shares among many more windows than a sample does. ``fixed_batch``: every batch padded to the batch size
    (a compiled model: one shape, one compile); on CUDA they always are (cudnn.benchmark picks kernels once).
    """
    stats = PredictStats(batch_size=batch_size, batch_ms_per_window=[] if timed else None)
    t_start = time.perf_counter()
    gw = touched.shape[1]
    tile, side, off = spec.tile, spec.side, spec.offset
    width_p = (gw + tile // BLOCK) * BLOCK  # room for windows running past the right edge
    # on the cover grid: windows reaching the last H % 32 rows / W % 32 columns predict there (the reference rule)
    ch, cw = cover_grid((volume.height, volume.width))
    lo, hi = row_blocks if row_blocks is not None else (0, ch)
    acc = SumMap((hi - lo, cw), pad=tile, device=device)
    y_shift = lo * BLOCK  # the map's first row
    runner = _Runner(
        model, dtype=dtype, batch_size=batch_size, pad=device.type == "cuda" or fixed_batch, stats=stats
    )
    on_cuda = device.type == "cuda"
    if rows_per_band is None:
        budget = BAND_BYTES_CUDA if on_cuda else BAND_BYTES_CPU
        rows_per_band = rows_per_band_for(spec.n_slices, volume.width, tile=tile, budget_bytes=budget)
    plan = slab_plan(band_plan(origins, rows_per_band=rows_per_band), tile=tile)
    reader = SlabReader(volume.read_band, plan, z_range=spec.z_range, width=volume.width, pin=on_cuda)
    copy_stream = torch.cuda.Stream(device) if on_cuda else None
    held, sums, held_y0 = None, None, 0
    buffer = WindowBuffer()
    t_wait = time.perf_counter()
    for read, host in reader:
        stats.wait_read_s += time.perf_counter() - t_wait
        slab = _to_device(host, touched, (read.y0, read.y1), width_p, device=device, stream=copy_stream)
        reader.release()
        slab_sums = block_sums(slab)
        band_y0 = read.band.pixel_rows(tile)[0]
        if read.fresh:
            held, sums = slab, slab_sums
        else:
            drop = band_y0 - held_y0
            held = torch.cat([held[:, drop:], slab], dim=1)
            sums = torch.cat([sums[:, drop // BLOCK :], slab_sums], dim=1)
        held_y0 = band_y0
        for idx in np.array_split(read.band.index, -(-len(read.band.index) // runner.batch_size)):
            t_batch = time.perf_counter()
            if not stats.batches:
                stats.setup_s = t_batch - t_start
            rows = (origins[idx, 0] - read.band.row0) * BLOCK + off
            cols = origins[idx, 1] * BLOCK + off
            probs = _predict_windows(
                runner, held, sums, rows, cols, ops[idx], side=side, tta=tta, stats=stats, buffer=buffer
            )
            acc.add(probs, origins[idx, 0] * BLOCK + off - y_shift, origins[idx, 1] * BLOCK + off)
            stats.windows += len(idx)
            stats.batches += 1
            if stats.batches <= SYNCED_BATCHES or timed:
                if on_cuda:  # measured times, not queued kernels: the warm-up batch and the early rate
                    torch.cuda.synchronize(device)
                if stats.batches == 1:
                    stats.first_batch_s = time.perf_counter() - t_batch
                if timed:
                    stats.batch_ms_per_window.append(1000 * (time.perf_counter() - t_batch) / len(idx))
            stats.seconds = time.perf_counter() - t_start
            if on_batch is not None:
                on_batch(stats)
        t_wait = time.perf_counter()
    sum_map = acc.to_fixed()
    stats.seconds = time.perf_counter() - t_start
    return sum_map, stats


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
    rows: np.ndarray,
    cols: np.ndarray,
    ops: np.ndarray,
    *,
    side: int,
    tta: str,
    stats: PredictStats,
    buffer: WindowBuffer | None = None,
) -> torch.Tensor:
    """``(B, side, side)`` float32 probabilities of the windows whose model squares start at (rows, cols)."""
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
