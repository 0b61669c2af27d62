"""``--gp-png``: the GP script's own picture of a GP-family model's map, for a researcher comparing with it
(``../shared/reference/GP_TIMESFORMER.md`` §4): the map on the 256-padded plane, uncropped, divided by its global
max, ``p * 255`` truncated to uint8, a greyscale PNG named as the script names it,
``OUT/gp_png/<model>/<id>_prediction_rotated_0_layer_<first layer>.png``, in the segment's own orientation.

The segment's pixels come from the model's map as the run merged it (``merge``). The padding is predicted only on a
segment without a mask file: there the GP script's windows cover it and its values enter the max, so the windows
reaching the padding run once more here, on this process's device (about 5 % of a segment's windows); with a
mask file the padding is outside the mask and 0, as the script's. The map is given on the mask's pixels, so under
``windows: any`` what windows add past the mask is 0 in the picture too. The picture carries the fixed-point map's
rounding (2^-24): a pixel within that of a truncation step may land one level off the script's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ink_infer.config import ModelSpec
from ink_infer.models import gp_family
from ink_infer.models.gp_predict import TorchForward, predict_gp
from ink_infer.outputs.maps import write_png
from ink_infer.outputs.raster import Raster, bands
from ink_infer.run.model_run import load_model
from ink_infer.run.plan import FragmentPlan, Weights
from ink_infer.run.runtime import Runtime
from ink_infer.volumes.reader import open_volume


def padding_margin(
    spec: ModelSpec, weights: Weights, plan: FragmentPlan, runtime: Runtime, batch_size: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The padded map past the segment: its rows ``[H, ph)`` (the padded width) and columns ``[W, pw)`` of rows
    ``[0, H)``, predicted by the windows that reach them; None with a mask file (the padding is outside the mask)."""
    if plan.mask_file:
        return None
    model, _ = load_model(spec, weights.path, device=runtime.device, dtype=torch.float32)
    forward = TorchForward(model, runtime.device)
    settings = gp_family.settings_for(spec, plan.fragment.direction == "reverse")
    h, w = plan.shape
    ph, pw = gp_family.padded_shape(h, w)
    try:
        with open_volume(plan.fragment) as volume:
            below, _ = predict_gp(forward, volume, None, settings, batch_size=batch_size, area=(h, ph, 0, pw))
            right, _ = predict_gp(forward, volume, None, settings, batch_size=batch_size, area=(0, h, w, pw))
    finally:
        del model, forward
    return below, right


def write_picture(
    path: Path, kept: Raster, margin: tuple[np.ndarray, np.ndarray] | None, kept_max: float
) -> None:  # fmt: skip
    """The picture of a model's map ``kept`` (the segment, float32; its max ``kept_max``) and its padding
    ``margin`` (None: zeros), band by band, each through ``gp_family.gp_png`` with the padded plane's max."""
    h, w = kept.shape
    ph, pw = gp_family.padded_shape(h, w)
    below, right = (
        margin if margin is not None else (np.zeros((ph - h, pw), np.float32), np.zeros((h, pw - w)))
    )
    top = max(kept_max, float(below.max(initial=0.0)), float(right.max(initial=0.0)))

    def rows():
        for lo, hi in bands(h):
            yield gp_family.gp_png(np.concatenate([kept.piece(lo, hi), right[lo:hi]], axis=1), top)
        yield gp_family.gp_png(below, top)

    write_png(path, (ph, pw), rows())
