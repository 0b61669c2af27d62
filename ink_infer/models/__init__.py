"""The model registry: ``build_model(spec)`` over one builder per architecture (``spec.arch``).

Every model takes ``(B, spec.n_slices, spec.side, spec.side)`` normalised float input and returns
``(B, 1, spec.side // 32, spec.side // 32)`` logits (the timesformer arch: ``(B, 1, n_slices, 64, 64)`` in,
``(B, 1, 4, 4)`` out). Always built with ``pretrained=False``: weights come from
the user's files (see ``checkpoint.py``). Slicing to ``spec.z_range``, cropping to ``spec.side`` and
normalisation (``engine.windows``) are the caller's job (the pipeline does them on the device, once per batch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ink_infer.config import ModelSpec
from ink_infer.errors import UserError

if TYPE_CHECKING:
    from torch import nn

# arch -> "module:builder", imported when a model is built: the package itself stays free of torch, so the
# torch-free start (run.plan, run.preflight) may read a family's geometry (models.gp_family)
BUILDERS: dict[str, str] = {
    "2.5d": "ink_infer.models.inkdet25d:from_spec",
    "csn3d": "ink_infer.models.csn3d:from_spec",
    "timesformer": "ink_infer.models.timesformer:from_spec",  # the Grand Prize model; needs the timesformer extra
}


def build_model(spec: ModelSpec) -> nn.Module:
    """A randomly initialised model for ``spec``, on the CPU, float32, in eval mode."""
    target = BUILDERS.get(spec.arch)
    if target is None:
        raise UserError(f"model {spec.name!r}: arch {spec.arch!r}, expected one of {sorted(BUILDERS)}")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(spec).eval()


__all__ = ["BUILDERS", "build_model"]
