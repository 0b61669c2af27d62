"""``--compile none|default|max-autotune|auto``: each model through ``torch.compile`` on the run's fixed batch shape.

Batches are padded to one shape whenever a model is compiled (``predict._Runner``), and the model is compiled with
``dynamic=False``, so it compiles once (again only if an out-of-memory halves the batch). The compile happens in a
warm-up forward before the first window (``compile_model``), timed, and recorded with the model's tuning in
report.json; a dry run's projection adds it once per model (``budget.project``). A model that fails to compile
runs eager, with a warning: compiling is an optimisation, never a reason to lose a model.

``auto`` compiles on CUDA when Triton and a C compiler are there (inductor needs both), else runs eager; why is
recorded in report.json (``environment.compile``). Compiled outputs differ from eager ones by float rounding
(the fused kernels add in another order), so the mode is part of every partial's key (``plan.UnitSettings``).

The inductor cache goes under ``OUT/inductor_cache`` (``TORCHINDUCTOR_CACHE_DIR``, unless the user set it), so a
rerun into the same OUT reuses the compiled kernels. A warm cache can be shipped to Kaggle as a dataset and named
with ``TORCHINDUCTOR_CACHE_DIR``; it is valid only for the same torch, Triton and GPU model (kaggle/README.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ink_infer.errors import DeviceError, cuda_poisoned

log = logging.getLogger(__name__)

C_COMPILERS = ("cc", "gcc", "clang")


def resolve_mode(asked: str, device: torch.device) -> tuple[str, str | None]:
    """The mode a run uses for ``--compile asked`` on ``device``, and (``auto``) why."""
    if asked != "auto":
        return asked, None
    if device.type != "cuda":
        return (
            "none",
            "auto: eager, since compiling pays on CUDA (use --compile default to compile on the CPU)",
        )
    if importlib.util.find_spec("triton") is None:
        return "none", "auto: eager, since Triton is not installed"
    if not any(shutil.which(c) for c in C_COMPILERS):
        return "none", "auto: eager, since no C compiler (cc, gcc, clang) is on PATH"
    return "default", "auto: torch.compile default mode (CUDA, Triton and a C compiler are present)"


def use_cache_under(out: Path) -> None:
    """Inductor's cache under ``out`` (``OUT/inductor_cache``), unless ``TORCHINDUCTOR_CACHE_DIR`` is set."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(out).absolute() / "inductor_cache"))


@contextlib.contextmanager
def _torch_warnings_silenced():
    """torch's own warnings while inductor compiles (``No CUDA runtime is found, using CUDA_HOME=...`` on the CPU,
    and the like) are not the user's to act on, and would break ``--quiet``: errors only, in the block. A compile
    that fails is reported by the run itself (the model runs eager, with a warning of ours)."""
    logger = logging.getLogger("torch")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def compile_model(
    model: torch.nn.Module, mode: str, example: torch.Tensor
) -> tuple[torch.nn.Module, float | None, str | None]:
    """``(model to run, compile seconds, why it runs eager)``: ``model`` compiled in ``mode`` and warmed up on
    ``example`` (one batch of the run's fixed shape and dtype), or ``model`` itself for ``none`` or when compiling
    fails."""
    if mode == "none":
        return model, None, None
    compiled = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode(), _torch_warnings_silenced():
            compiled(example)
        if example.is_cuda:
            torch.cuda.synchronize(example.device)
    except Exception as e:  # a missing compiler, an unsupported op (inductor raises many types): eager
        if cuda_poisoned(e):  # not the compiler's fault, and every later model would fail the same way
            raise DeviceError(
                f"the device failed while compiling ({type(e).__name__}: {e})".splitlines()[0]
            ) from e
        why = f"compile failed, runs eager: {type(e).__name__}: {e}".splitlines()[0][:300]
        log.warning("%s", why)
        return model, None, why
    return compiled, time.perf_counter() - t0, None
