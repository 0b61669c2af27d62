"""Per-model device tuning before a run: batch size from a measured memory footprint, channels_last only where
measured faster, and the time per window that the budget check projects from.

Only on CUDA; on the CPU the batch size is fixed (small batches are as fast there) and nothing is probed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .config import ModelSpec

log = logging.getLogger(__name__)

GIB = 1024**3
CPU_BATCH = 4
MAX_BATCH = 128
# of the GPU budget for the model's batches; the rest holds bands, sum maps, cudnn workspaces, allocator slack.
# 0.7 gave 15-18.5 GiB reserved on an H200 under a 16 GiB budget (benchmarks/gpu_ensemble.py), so 0.5.
HEADROOM = 0.5
CHANNELS_LAST_GAIN = 0.05  # adopt channels_last only when at least 5 % faster


@dataclass(frozen=True)
class Tuning:
    batch_size: int
    channels_last: bool = False
    s_per_window: float | None = None  # measured forward time per window at that batch size
    bytes_per_window: float | None = None
    bytes_fixed: float | None = None

    def as_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "channels_last": self.channels_last,
            "ms_per_window_probe": None if self.s_per_window is None else self.s_per_window * 1000,
            "mib_per_window": None if self.bytes_per_window is None else self.bytes_per_window / 2**20,
        }


def tune(
    model: torch.nn.Module,
    spec: ModelSpec,
    *,
    device: torch.device,
    dtype: torch.dtype,
    gpu_mem_gb: float,
    requested: int | None,
) -> Tuning:
    """Batch size and memory format for ``model`` on ``device`` (``requested`` wins when given)."""
    if device.type != "cuda":
        return Tuning(batch_size=requested or CPU_BATCH)
    per_window, fixed = _footprint(model, spec, device=device, dtype=dtype)
    budget = min(gpu_mem_gb * GIB, torch.cuda.get_device_properties(device).total_memory) * HEADROOM
    fitted = int(max(1, min(MAX_BATCH, (budget - fixed) // max(per_window, 1))))
    if fitted >= 8:
        fitted -= fitted % 8
    batch = requested or fitted
    try:
        channels_last, s_per_window = _pick_memory_format(model, spec, batch, device=device, dtype=dtype)
    except torch.cuda.OutOfMemoryError:
        batch = max(1, batch // 2)  # the footprint underestimated this model: one halving, as in the run
        torch.cuda.empty_cache()
        channels_last, s_per_window = _pick_memory_format(model, spec, batch, device=device, dtype=dtype)
    log.info(
        "%s: %.0f MiB per window, batch %d, channels_last %s, %.2f ms/window",
        spec.name, per_window / 2**20, batch, channels_last, s_per_window * 1000,
    )  # fmt: skip
    return Tuning(batch, channels_last, s_per_window, per_window, fixed)


def _example(spec: ModelSpec, n: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn((n, spec.n_slices, spec.side, spec.side), device=device).to(dtype)


def _footprint(
    model: torch.nn.Module, spec: ModelSpec, *, device: torch.device, dtype: torch.dtype
) -> tuple[float, float]:
    """(bytes per window, fixed bytes) from the peak memory of two forward passes of different batch sizes."""
    peaks = []
    for n in (2, 4):
        x = _example(spec, n, device=device, dtype=dtype)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device))
        del x
    per_window = max((peaks[1] - peaks[0]) / 2, 1.0)
    return per_window, max(peaks[0] - 2 * per_window, 0.0)


def _time_forward(model: torch.nn.Module, x: torch.Tensor, *, reps: int = 3) -> float:
    with torch.inference_mode():
        model(x)  # warm-up (cudnn.benchmark picks its kernels here)
        torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
        torch.cuda.synchronize(x.device)
    return (time.perf_counter() - t0) / reps / len(x)


def _pick_memory_format(
    model: torch.nn.Module, spec: ModelSpec, batch: int, *, device: torch.device, dtype: torch.dtype
) -> tuple[bool, float]:
    """Time the 2D encoder's batches in both memory formats; keep channels_last only if measurably faster."""
    x = _example(spec, batch, device=device, dtype=dtype)
    base = _time_forward(model, x)
    encoder = getattr(model, "encoder", None)
    if spec.arch != "2.5d" or encoder is None:
        return False, base
    encoder.to(memory_format=torch.channels_last)
    fast = _time_forward(model, x)
    if fast < base * (1 - CHANNELS_LAST_GAIN):
        return True, fast
    encoder.to(memory_format=torch.contiguous_format)
    return False, base
