"""One model's pass over its units in one process: each unit through the engine of its model's family (the
2nd place's window loop, ``engine.predict``; the GP TimeSformer's, ``models.gp_family``), with the progress, the
budget check and the stop request between batches."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ink_infer.engine.predict import PassSettings, PredictStats, predict_fragment
from ink_infer.engine.tiling import Windows, spread_sample
from ink_infer.errors import UserError
from ink_infer.models import gp_family, gp_predict
from ink_infer.run.plan import Unit
from ink_infer.volumes.reader import open_volume


@dataclass
class UnitPass:
    """One model's pass over its units in this process: the loaded model, its batch, and what is done and left
    (the progress figures count over the model; the budget check projects the windows left)."""

    model: torch.nn.Module
    ctx: object  # the model run's context (model_run.ModelRunContext)
    batch_size: int
    fixed_batch: bool  # a compiled model: every batch padded to one shape
    windows_left: int  # this model's windows still to run here, the current unit's included
    windows: int = 0  # finished so far: windows and predict seconds
    seconds: float = 0.0


def run_unit(unit: Unit, pass_: UnitPass) -> tuple[np.ndarray, PredictStats]:
    """One unit through ``predict_fragment`` (in a dry run only a spread sample of its windows)."""
    ctx, frag = pass_.ctx, unit.fragment
    options = ctx.options
    origins, ops = frag.origins, frag.ops
    if options.dry_run:
        idx = spread_sample(len(origins), options.max_windows)
        origins, ops = origins[idx], ops[idx]

    def on_batch(stats: PredictStats) -> None:
        ctx.stop.check()  # SIGTERM / SIGINT: stop between two batches
        if ctx.progress is not None:
            ctx.progress.update(pass_.windows + stats.windows, pass_.seconds + stats.seconds)
        if ctx.eta is not None:
            # the first slab is a tile's height of rows, the later ones a stride's: on a wide segment its read
            # and preparation alone would project hours for the few warm-up batches they are spread over
            ctx.eta.after_batch(
                batches=stats.batches, windows=stats.windows, seconds=stats.seconds - stats.setup_s,
                windows_left=pass_.windows_left - stats.windows,
            )  # fmt: skip

    how = PassSettings(
        ctx.runtime.device, ctx.runtime.dtype, pass_.batch_size, tta=options.tta, row_blocks=unit.block_rows(),
        timed=options.dry_run, fixed_batch=pass_.fixed_batch,
    )  # fmt: skip
    try:
        with open_volume(frag.fragment, frag.touched) as volume:
            if unit.model.arch == gp_family.ARCH:
                sum_map, stats = _gp_unit(unit, volume, pass_, on_batch)
            else:
                sum_map, stats = predict_fragment(
                    pass_.model,
                    unit.model,
                    volume,
                    Windows(frag.touched, origins, ops),
                    how,
                    on_batch=on_batch,
                )
    except OSError as e:  # the data went away or went bad mid-run: no model can read it
        raise UserError(f"{frag.fragment.where}: cannot read ({e.strerror or e})") from None
    pass_.windows_left -= unit.windows
    pass_.windows, pass_.seconds = pass_.windows + stats.windows, pass_.seconds + stats.seconds
    return sum_map, stats


def _gp_unit(unit: Unit, volume, pass_: UnitPass, on_batch) -> tuple[np.ndarray, PredictStats]:
    """A unit of the GP TimeSformer family (``models.gp_family``): its own windows, kernel and count; the same
    fixed-point sums on the unit's block rows as any unit (a dry run: a spread sample of its windows)."""
    options, device = pass_.ctx.options, pass_.ctx.runtime.device
    forward = gp_predict.TorchForward(pass_.model, device)
    settings = gp_family.settings_for(unit.model, unit.fragment.fragment.direction == "reverse")
    t0 = time.perf_counter()
    sums, n = gp_predict.unit_sums(
        forward, volume, unit.fragment, unit.block_rows(), settings, batch_size=pass_.batch_size,
        sample=options.max_windows if options.dry_run else None,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    stats = PredictStats(
        windows=n, seconds=seconds, batch_size=pass_.batch_size, batches=-(-n // pass_.batch_size)
    )
    if options.dry_run and n:
        stats.batch_ms_per_window = [seconds * 1000 / n]
    on_batch(stats)
    return sums, stats
