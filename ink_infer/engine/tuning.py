"""Per-model device tuning before a run: batch size from a measured memory footprint, the memory format and the
attention kernel only where measured faster, and the time per window that the budget check projects from.

Memory format: channels_last for a 2.5D model's 2D encoder; channels_last_3d for an irCSN, whose depthwise 5-D
convolutions PyTorch sends to cuDNN only in that layout (in the default layout they run on a native kernel).
Attention: a SwinV2 encoder's window attention through ``scaled_dot_product_attention`` or as timm computes it
(``models.swin_attention``; its position bias is frozen either way).

Only on CUDA; on the CPU the batch size is fixed (small batches are as fast there) and nothing is probed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ink_infer.config import ModelSpec
from ink_infer.models.swin_attention import freeze_window_bias

log = logging.getLogger(__name__)

GIB = 1024**3
CPU_BATCH = 4
MAX_BATCH = 128
# of the GPU budget for the model's batches; the rest holds bands, sum maps, cudnn workspaces, allocator slack
# (a larger share overran the budget on a GPU: benchmarks/RESULTS.md)
HEADROOM = 0.5
CHANNELS_LAST_GAIN = 0.05  # adopt channels_last only when at least 5 % faster


@dataclass(frozen=True)
class Tuning:
    batch_size: int
    channels_last: bool = False  # channels_last (2.5D encoder) or channels_last_3d (irCSN)
    s_per_window: float | None = None  # measured forward time per window at that batch size
    bytes_per_window: float | None = None
    bytes_fixed: float | None = None
    fused_attention: bool | None = None  # SwinV2 only: attention through scaled_dot_product_attention

    def as_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "channels_last": self.channels_last,
            "fused_attention": self.fused_attention,
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
    fused, s_per_window = _pick_attention(model, spec, batch, s_per_window, device=device, dtype=dtype)
    log.info(
        "%s: %.0f MiB per window, batch %d, channels_last %s, fused attention %s, %.2f ms/window",
        spec.name, per_window / 2**20, batch, channels_last, fused, s_per_window * 1000,
    )  # fmt: skip
    return Tuning(batch, channels_last, s_per_window, per_window, fixed, fused)


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
    """Time the model's batches in both memory formats (the 2D encoder's channels_last, or the whole irCSN's
    channels_last_3d); keep the other format only if measurably faster."""
    x = _example(spec, batch, device=device, dtype=dtype)
    base = _time_forward(model, x)
    if spec.arch == "2.5d":
        target, fmt = getattr(model, "encoder", None), torch.channels_last
    else:
        target, fmt = model, torch.channels_last_3d
    if target is None:
        return False, base
    set_memory_format(target, fmt)
    fast = _time_forward(model, x)
    if fast < base * (1 - CHANNELS_LAST_GAIN):
        return True, fast
    set_memory_format(target, torch.contiguous_format)
    return False, base


def set_memory_format(module: torch.nn.Module, fmt: torch.memory_format) -> None:
    """Parameters and buffers of ``module`` in ``fmt``: channels_last for the 4-D ones, channels_last_3d for the
    5-D ones (an irCSN also holds 4-D and 1-D tensors, which ``Module.to`` would refuse to convert), contiguous
    for all."""
    rank = {torch.channels_last: 4, torch.channels_last_3d: 5}.get(fmt)
    for t in [*module.parameters(), *module.buffers()]:
        if rank is None and t.dim() in (4, 5) or t.dim() == rank:
            t.data = t.data.contiguous(memory_format=fmt)


def _pick_attention(
    model: torch.nn.Module,
    spec: ModelSpec,
    batch: int,
    base: float,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[bool | None, float]:
    """SwinV2: time the fused attention against timm's (``base``, already measured); keep the faster. None for a
    model without window attention."""
    if not freeze_window_bias(model, fused=True):
        return None, base
    fast = _time_forward(model, _example(spec, batch, device=device, dtype=dtype))
    if fast < base * (1 - CHANNELS_LAST_GAIN):
        return True, fast
    freeze_window_bias(model, fused=False)
    return False, base
