"""The model registry: ``build_model(spec)`` over one builder per architecture (``spec.arch``).

Every model takes ``(B, spec.n_slices, spec.side, spec.side)`` normalised float input and returns
``(B, 1, spec.side // 32, spec.side // 32)`` logits (the timesformer arch: ``(B, 1, n_slices, 64, 64)`` in,
``(B, 1, 4, 4)`` out). Always built with ``pretrained=False``: weights come from
the user's files (see ``checkpoint.py``). Slicing to ``spec.z_range``, cropping to ``spec.side`` and
normalisation (``engine.windows``) are the caller's job (the pipeline does them on the device, once per batch).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ink_infer.config import ModelSpec
from ink_infer.errors import UserError
from ink_infer.models import csn3d, inkdet25d, timesformer

BUILDERS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "2.5d": inkdet25d.from_spec,
    "csn3d": csn3d.from_spec,
    "timesformer": timesformer.from_spec,  # the Grand Prize model; needs the timesformer extra
}


def build_model(spec: ModelSpec) -> nn.Module:
    """A randomly initialised model for ``spec``, on the CPU, float32, in eval mode."""
    builder = BUILDERS.get(spec.arch)
    if builder is None:
        raise UserError(f"model {spec.name!r}: arch {spec.arch!r}, expected one of {sorted(BUILDERS)}")
    return builder(spec).eval()


__all__ = ["BUILDERS", "build_model"]
