"""What a model may fail for, and what then: the per-model fault policy's pieces.

A failure a model can cause (its forward raising, its weights going bad, NaN/inf outputs beyond
``--max-nonfinite``, out of memory after the batch was halved) is a ``ModelRunError`` or in ``MODEL_ERRORS``: the
model is skipped or ends the run (``--on-model-error``). A CUDA error poisons the process: ``DeviceError``, the run
ends. Anything else is a bug in ink_infer and keeps its traceback.
"""

from __future__ import annotations

import logging

import torch

from ink_infer.errors import DeviceError, ModelRunError, cuda_poisoned
from ink_infer.outputs.report import FragmentResult, ModelResult

log = logging.getLogger(__name__)

# What a model may be skipped for: what a model can cause. Its forward failing (``GuardedModel`` turns that into a
# ModelRunError), its weights going bad mid-run, non-finite outputs beyond ``--max-nonfinite``, and out of memory
# after the batch was halved. Anything else is a bug in ink_infer: it keeps its traceback and ends the run.
MODEL_ERRORS = (ModelRunError, torch.cuda.OutOfMemoryError)


class RunEnded(Exception):
    """The run ends during this model (a stop request, data gone bad, a device failure, ``--on-model-error
    fail``): ``result`` is what the model did until then, ``cause`` what ended it (re-raised by the pipeline)."""

    def __init__(self, result: ModelResult, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.result, self.cause = result, cause


class GuardedModel(torch.nn.Module):
    """The model, with what its forward raises sorted out: out of memory passes through (the predictor halves the
    batch), a CUDA error is a ``DeviceError`` (the run ends), any other failure of the forward is the model's
    (``ModelRunError``: the model is skipped under ``--on-model-error skip``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.inner(x)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, ArithmeticError, NotImplementedError) as e:
            first = f"{type(e).__name__}: {e}".splitlines()[0]
            if cuda_poisoned(e):
                raise DeviceError(f"the device failed ({first}); results so far are in partials") from e
            raise ModelRunError(first) from e


def check_outputs(name: str, frag_id: str, frag: FragmentResult, *, limit: float = 1.0) -> list[str]:
    """The warnings of one unit (NaN/inf windows, OOM retries); a model whose NaN/inf windows on a fragment are
    all of them, or more than the ``limit`` fraction (``--max-nonfinite``), has failed (``ModelRunError``)."""
    bad, n = frag.nonfinite_windows, frag.windows
    if bad and bad == n:
        raise ModelRunError(f"all {n} windows of fragment {frag_id} gave NaN or inf")
    if bad > limit * n:
        raise ModelRunError(
            f"{bad} of {n} windows of fragment {frag_id} gave NaN or inf, more than --max-nonfinite {limit:g}"
        )
    warnings = []
    if bad:
        warnings.append(
            f"model {name}, fragment {frag_id}: {bad} of {n} windows gave NaN or inf: "
            "zeroed (they add 0 to the sum and still count)"
        )
    if frag.oom_retries:
        warnings.append(f"model {name}, fragment {frag_id}: CUDA out of memory, batch size halved")
    for w in warnings:
        log.warning(w)
    return warnings
