"""Where a run computes and the process settings that go with it: the device and its dtype, the GPU memory cap,
the cudnn flags, glibc's malloc behaviour; and what every report records of it: versions, host and GPU memory peaks.

Process-wide settings are made here and only here, by the CLIs (submit, train) and by ``pipeline.run``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
from dataclasses import dataclass

import numpy as np
import torch

from ink_infer.errors import UserError

GIB = 1024**3


@dataclass(frozen=True)
class Runtime:
    """The device a run computes on, the dtype its models run in there, and the GPU memory fraction it was held to."""

    device: torch.device
    dtype: torch.dtype
    gpu_memory_fraction: float | None = None

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device that exists here (a ``UserError`` otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def model_dtype(device: torch.device) -> torch.dtype:
    """The reference ran the whole model in float16 on CUDA (weights, BN included) and float32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def start_runtime(device_name: str, *, gpu_mem_gb: float, large: bool = False) -> Runtime:
    """Resolve the device and make the process settings of an inference run on it (``large``: the run holds a
    large fragment, ``raster.is_large``: on the CPU, memory goes before speed)."""
    device = resolve_device(device_name)
    fraction = None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes (the last batch is padded)
        fraction = cap_gpu_memory(device, gpu_mem_gb)
    else:
        # CPU forward passes re-allocate the same activations every batch; a large fragment's band buffers are
        # hundreds of MB, each one kept once freed, so there only the batches' sizes are
        keep_freed_memory(KEEP_FREED_BYTES_LARGE if large else KEEP_FREED_BYTES)
    return Runtime(device, model_dtype(device), fraction)


def cap_gpu_memory(device: torch.device, gpu_mem_gb: float) -> float | None:
    """Hold this process to the GPU budget on a bigger card, so a rehearsal on it behaves as on Kaggle's 16 GB:
    going over raises OutOfMemoryError (and the batch is halved) instead of silently using more. Returns the
    fraction set, or None where the card is no bigger than the budget or there is no CUDA."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = gpu_mem_gb * GIB / total
    if fraction >= 1.0:
        return None
    torch.cuda.set_per_process_memory_fraction(
        fraction, device.index if device.index is not None else torch.cuda.current_device()
    )
    return fraction


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30
KEEP_FREED_BYTES_LARGE = 64 << 20  # above a batch of windows (37 MB for 4 x 35 x 256 x 256 float32)


def keep_freed_memory(limit: int = KEEP_FREED_BYTES) -> bool:
    """Ask glibc to serve big allocations from the heap and keep what is freed, for reuse by the next step.

    A training step, or a CPU forward pass, frees and re-allocates the same activation sizes every time; by default
    each one above glibc's mmap threshold is a fresh mapping whose pages all fault on first touch. Allocations up
    to ``limit`` come from the heap, and up to ``limit`` of freed memory is kept there. Process-wide: it trades
    some peak RSS for the page faults (benchmarks/RESULTS.md). Returns False (and changes nothing) where the C
    library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, ctypes.c_int(limit))
    return bool(ok and mallopt(M_TRIM_THRESHOLD, ctypes.c_int(limit)))


def environment(device: torch.device) -> dict:
    """Versions and hardware, recorded in every report."""
    import timm

    from ink_infer import __version__

    env = {
        "ink_infer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def host_peak_gib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux; it cannot be reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def gpu_peaks_gib(device: torch.device) -> dict[str, float] | None:
    """``max_memory_allocated`` / ``max_memory_reserved`` since the last reset, or None off CUDA."""
    if device.type != "cuda":
        return None
    return {
        "allocated": torch.cuda.max_memory_allocated(device) / GIB,
        "reserved": torch.cuda.max_memory_reserved(device) / GIB,
    }


def resolve_devices(names: tuple[str, ...]) -> list[str]:
    """``--devices`` on this machine: ``all`` as every visible GPU, or the list as given, each GPU checked to exist
    (``UserError`` naming the ones there are). Its spelling was checked before torch loaded
    (``config.check_device_names``)."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if names == ("all",):
        if have == 0:
            raise UserError("--devices all: no GPU is visible on this machine (use --devices cpu,cpu)")
        return [f"cuda:{i}" for i in range(have)]
    for name in names:
        if name != "cpu" and int(name.split(":")[1]) >= have:
            gpus = f"{have} GPU(s): cuda:0 .. cuda:{have - 1}" if have else "no GPU"
            raise UserError(f"--devices {','.join(names)}: {name} does not exist, this machine has {gpus}")
    return list(names)


@dataclass(frozen=True)
class DistributedRank:
    """This process's place under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` from the environment)."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_rank() -> DistributedRank | None:
    """The torchrun rank of this process, or None when not launched by torchrun with more than one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK / WORLD_SIZE / LOCAL_RANK: expected integers (as torchrun sets them)") from None
    return DistributedRank(rank, world, local) if world > 1 else None


def rank_device(rank: DistributedRank, requested: str) -> str:
    """A torchrun rank computes on its local GPU (``cuda:LOCAL_RANK``) unless the CPU was asked for."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{rank.local_rank}"
    return requested
