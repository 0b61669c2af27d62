"""One model over one fragment: stream slabs to the device, cut windows there, normalise, flip, run, stitch.

Shapes: the device holds ``(nz, band_rows, W_pad)`` int16 (uint16 bits) of the model's slices; windows are cut as
``(B, nz, side, side)`` views, converted to float32, normalised per window, cast to the model's dtype (float16 on
CUDA, float32 on CPU, as the reference), and the ``(B, 1, side/32, side/32)`` logits are turned into probabilities
and added to a float32 sum map on the device.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .config import BLOCK, ModelSpec
from .models import normalize_windows
from .stitch import SumMap, upsample_probs
from .stream import SlabReader, keep_pixels, slab_plan
from .tiling import band_plan

log = logging.getLogger(__name__)

# flip dims per op of the reference schedule on (B, C, H, W): 0 none, 1 H, 2 W, 3 H+W
_FLIP_DIMS = {1: (-2,), 2: (-1,), 3: (-2, -1)}


@dataclass
class PredictStats:
    """What one (model, fragment) pass did and cost."""

    windows: int = 0
    seconds: float = 0.0
    wait_read_s: float = 0.0  # time the device waited for the reader
    nonfinite_windows: int = 0
    batch_size: int = 0
    oom_retries: int = 0
    first_batches_s: list[float] = field(
        default_factory=list
    )  # wall time of the first batches (for projection)


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


def windows_to_float(raw: torch.Tensor) -> torch.Tensor:
    """``(B, nz, s, s)`` int16 holding uint16 bits -> float32 in [0, 1] (the reference's ``v / 65535``)."""
    return (raw.to(torch.int32) & 0xFFFF).to(torch.float32) / 65535.0


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
    rows_per_band: int = 8,
    quiet: bool = True,
    desc: str = "",
) -> tuple[np.ndarray, PredictStats]:
    """Sum of window probabilities over the fragment's block grid, ``(gh * 32, gw * 32)`` float32 on the host.

    volume: a ``fragments.Volume`` (``read_band``, ``width``); touched: ``(gh, gw)`` bool blocks read as data;
    origins: ``(N, 2)`` block coords of the windows to run; ops: ``(N,)`` their flip op (``tta="scheduled"``).
    """
    stats = PredictStats(batch_size=batch_size)
    t_start = time.perf_counter()
    gh, gw = touched.shape
    tile, side, off = spec.tile, spec.side, spec.offset
    width_p = (gw + tile // BLOCK) * BLOCK  # room for windows running past the right edge
    acc = SumMap((gh, gw), pad=tile, device=device)
    runner = _Runner(model, dtype=dtype, batch_size=batch_size, pad=device.type == "cuda", stats=stats)
    plan = slab_plan(band_plan(origins, rows_per_band=rows_per_band), tile=tile)
    on_cuda = device.type == "cuda"
    reader = SlabReader(volume.read_band, plan, z_range=spec.z_range, width=volume.width, pin=on_cuda)
    copy_stream = torch.cuda.Stream(device) if on_cuda else None
    bar = tqdm(
        total=len(origins), desc=desc, unit="win", disable=quiet or not sys.stderr.isatty(), leave=False
    )
    held, held_y0 = None, 0
    t_wait = time.perf_counter()
    for read, host in reader:
        stats.wait_read_s += time.perf_counter() - t_wait
        slab = _to_device(host, touched, (read.y0, read.y1), width_p, device=device, stream=copy_stream)
        reader.release()
        band_y0 = read.band.pixel_rows(tile)[0]
        held = slab if read.fresh else torch.cat([held[:, band_y0 - held_y0 :], slab], dim=1)
        held_y0 = band_y0
        for idx in np.array_split(read.band.index, -(-len(read.band.index) // runner.batch_size)):
            t_batch = time.perf_counter()
            rows = (origins[idx, 0] - read.band.row0) * BLOCK + off
            cols = origins[idx, 1] * BLOCK + off
            probs = _predict_windows(runner, held, rows, cols, ops[idx], side=side, tta=tta, stats=stats)
            acc.add(probs, origins[idx, 0] * BLOCK + off, origins[idx, 1] * BLOCK + off)
            stats.windows += len(idx)
            if len(stats.first_batches_s) < 4:
                if on_cuda:
                    torch.cuda.synchronize(device)
                stats.first_batches_s.append(time.perf_counter() - t_batch)
            bar.update(len(idx))
        t_wait = time.perf_counter()
    bar.close()
    sum_map = acc.to_numpy()
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
    """Host ``(nz, r, W)`` int16 -> device ``(nz, r, width_p)`` int16, blocks not read as data zeroed."""
    keep = torch.from_numpy(keep_pixels(touched, rows, width_p))
    if stream is None:
        slab = host.clone()
    else:
        with torch.cuda.stream(stream):
            slab = host.to(device, non_blocking=True)
        torch.cuda.current_stream(device).wait_stream(stream)
        slab.record_stream(torch.cuda.current_stream(device))
        stream.synchronize()  # the host buffer goes back to the reader right after this
    slab = torch.nn.functional.pad(slab, (0, width_p - slab.shape[-1]))
    return slab * keep.to(device=device, dtype=slab.dtype)


def _predict_windows(
    runner: _Runner,
    held: torch.Tensor,
    rows: np.ndarray,
    cols: np.ndarray,
    ops: np.ndarray,
    *,
    side: int,
    tta: str,
    stats: PredictStats,
) -> torch.Tensor:
    """``(B, side, side)`` float32 probabilities of the windows whose model squares start at (rows, cols)."""
    grid = held.unfold(1, side, BLOCK).unfold(2, side, BLOCK)  # (nz, R, C, side, side), a view
    ri = torch.from_numpy(rows // BLOCK).to(held.device)
    ci = torch.from_numpy(cols // BLOCK).to(held.device)
    x = normalize_windows(windows_to_float(grid[:, ri, ci].transpose(0, 1)))
    if tta == "full":
        n = len(x)
        four = np.repeat(np.arange(4, dtype=np.int8), n)
        logits = apply_flips(runner.logits(apply_flips(x.repeat(4, 1, 1, 1), four)), four)
        bad = ~torch.isfinite(logits.view(4, n, -1)).all(2).all(0)
        probs = upsample_probs(logits, side).view(4, n, side, side).mean(0)
    else:
        # flip and bilinear upsampling with align_corners=True commute, so un-flipping the 1/32 logits is exact
        # and 1024x cheaper than un-flipping the upsampled map as the reference did
        logits = apply_flips(runner.logits(apply_flips(x, ops)), ops)
        bad = ~torch.isfinite(logits.flatten(1)).all(1)
        probs = upsample_probs(logits, side)
    if bad.any():
        # a window with NaN or inf logits adds nothing (it is still counted); the report says how many
        stats.nonfinite_windows += int(bad.sum())
        probs[bad] = 0.0
    return probs
