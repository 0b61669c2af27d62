"""The model registry: ``build_model(spec)`` over one builder per architecture (``spec.arch``).

Every model takes ``(B, spec.n_slices, spec.side, spec.side)`` normalised float input and returns
``(B, 1, spec.side // 32, spec.side // 32)`` logits. Always built with ``pretrained=False``: weights come from
the user's files (see ``checkpoint.py``). Slicing to ``spec.z_range``, cropping to ``spec.side`` and
``normalize_windows`` are the caller's job (the pipeline does them on the device, once per batch).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..config import ModelSpec
from ..errors import UserError
from . import csn3d, inkdet25d

BUILDERS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "2.5d": inkdet25d.from_spec,
    "csn3d": csn3d.from_spec,
}
NORM_EPS = 1e-6


def build_model(spec: ModelSpec) -> nn.Module:
    """A randomly initialised model for ``spec``, on the CPU, float32, in eval mode."""
    builder = BUILDERS.get(spec.arch)
    if builder is None:
        raise UserError(f"model {spec.name!r}: arch {spec.arch!r}, expected one of {sorted(BUILDERS)}")
    return builder(spec).eval()


def normalize_windows(x: Tensor) -> Tensor:
    """Per-sample standardisation as in the reference: ``(x - mean) / (std + 1e-6)`` over all slices and pixels.

    ``x``: ``(B, Z, H, W)`` any float dtype, any device. Returns float32 of the same shape and device; the mean and
    the unbiased (n - 1) std are taken over dims 1-3 in float32, so fp16 inputs do not lose precision in the sums.
    """
    x = x.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True) + NORM_EPS
    return (x - mean) / std


__all__ = ["BUILDERS", "build_model", "normalize_windows"]
