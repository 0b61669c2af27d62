"""The merge: each model over every unit in manifest order, its units computed here or read back from the partials
other processes saved, its map added to each fragment's ensemble; a dry run projects each model's full run instead.

Loop order: model-outer, fragment-inner (build one model, load it, run every fragment, free it). Each model
re-reads the fragments from disk, but only its own slices, once per pixel (``engine.stream``), in a reader thread
that overlaps the device (benchmarks/RESULTS.md: the device never waited for it), while a model-inner loop would
hold every model and every sum map at once. Model-outer also gives the budget check and resume their natural unit.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np

from ink_infer.engine.stitch import merge_ranges
from ink_infer.errors import UserError
from ink_infer.models import gp_family
from ink_infer.outputs.ensemble import FragmentEnsemble
from ink_infer.outputs.maps import TILE, gp_picture_path, probability_path
from ink_infer.outputs.raster import Raster, bands, is_large, scratch_dir, turned_band, turned_shape
from ink_infer.outputs.report import RunReport, write_report
from ink_infer.outputs.write import write_probability
from ink_infer.run.budget import EtaMonitor, project
from ink_infer.run.executors import Computed
from ink_infer.run.faults import RunEnded
from ink_infer.run.gp_picture import padding_margin, write_picture
from ink_infer.run.model_run import InPartials, run_model
from ink_infer.run.partials import PartialStore, safe_name
from ink_infer.run.plan import FragmentPlan, Unit, gp_windows, model_count
from ink_infer.run.prepare import PreparedRun
from ink_infer.run.stop import StopRequest

log = logging.getLogger(__name__)


def run_models(
    run: PreparedRun, report: RunReport, stop: StopRequest, t0: float, computed: Computed
) -> list[FragmentEnsemble]:
    """Each model over every unit, its result added to ``report`` (written after each), its maps to the
    ensemble in manifest order, a fragment's row ranges summed in row order. Units that other processes saved are
    read back; a model that failed elsewhere joins nowhere."""
    cfg = run.cfg
    store = None if cfg.dry_run else run.store()
    ctx = run.context(
        stop, eta=None if cfg.dry_run else EtaMonitor.for_budget(cfg.budget, t0), store=store,
        progress=run.progress(), saved_elsewhere=computed.saved,
    )  # fmt: skip
    if computed.saved:  # --fresh asked the executors to recompute; what they saved this run is read back
        ctx = dataclasses.replace(ctx, options=dataclasses.replace(ctx.options, fresh=False))
    ensembles = [FragmentEnsemble(p.shape, p.mask, _spill(run, p, "ensemble")) for p in run.plans]
    for spec, weights in run.models:
        stop.check()
        if spec.name in computed.failed:
            report.add_model(computed.failed[spec.name])
            ctx.progress.pass_model()
            write_report(cfg.out / "report.json", report, t0, final=False)
            continue
        try:
            done = run_model(spec, weights, run.items, ctx)
        except RunEnded as e:
            report.add_model(e.result)
            raise e.cause from None
        result = done.result
        if cfg.dry_run and result.status == "ok":
            result = dataclasses.replace(result, projection=_projected(run, result, spec))
        report.add_model(result)
        if done.sums:  # all units or none: a model joins the ensemble once it has finished everywhere
            take = functools.partial(_take_sums, done.sums, spec, weights, store)
            for p, ens in zip(run.plans, ensembles, strict=True):
                ranges = [(*item.block_rows(spec.tile), functools.partial(take, item))
                          for item in run.items if item.fragment is p.fragment]  # fmt: skip
                rows = merge_ranges(ranges, model_count(p, spec), p.mask)
                if cfg.save_model_maps or (cfg.gp_png and spec.arch == gp_family.ARCH):
                    rows = _model_map_kept(run, p, spec, weights, rows)
                ens.add_model(model_count(p, spec), spec.weight, rows)
        del done  # the model's maps go before the next model allocates its own
        write_report(
            cfg.out / "report.json", report, t0, final=False
        )  # progress, and what a killed run leaves
    return ensembles


def _projected(run: PreparedRun, result, spec):
    """A dry run's projection of ``spec``'s full run: its own windows (the GP family's are not the 2nd place's)."""
    plans = run.plans
    gp = spec.arch == gp_family.ARCH
    windows = sum(gp_windows(p, spec) if gp else len(p.origins) for p in plans)
    return project(
        result, total_windows=windows, grid_blocks=sum(p.touched.size for p in plans),
        touched_blocks=sum(int(p.touched.sum()) for p in plans), stride=run.cfg.stride, scale_to=run.cfg.scale_to,
        window_px=gp_family.settings_for(spec).stride ** 2 if gp else None,
    )  # fmt: skip


def _spill(run: PreparedRun, plan: FragmentPlan, what: str):
    """The file a large fragment's map of ``what`` lives in, in this run's scratch folder; None: in memory."""
    if not is_large(plan.shape) or run.cfg.dry_run:
        return None
    return scratch_dir(run.cfg.partials_dir) / f"{safe_name(plan.id)}.{safe_name(what)}.f32"


def _take_sums(sums: dict, spec, weights, store: PartialStore | None, item: FragmentPlan) -> np.ndarray:
    """A unit's int64 sums on its block rows, taken out of the model's ``sums``: kept in memory, or (a large
    fragment's) read back from its partial."""
    found = sums.pop(item.id)
    if not isinstance(found, InPartials):
        return found
    loaded, _, why = store.load(Unit(spec, weights, item))
    if loaded is None:
        path = store.path(spec.name, item.key_id)
        raise UserError(
            f"{path}: saved by this run but no longer readable ({why or 'gone'}): rerun the same command"
        )
    return loaded


def _model_map_kept(run: PreparedRun, plan: FragmentPlan, spec, weights, rows):
    """--save-model-maps, --gp-png: ``rows`` passed on, each also kept (in memory, or on disk for a large
    fragment); once they are all through, the model's probability TIFF and its GP picture are written."""
    kept = Raster(plan.shape, np.float32, _spill(run, plan, spec.name))
    top = 0.0  # the map's max, for the GP picture: taken as the rows pass, not read back from a spilled map
    try:
        for y0, prob in rows:
            kept.write(y0, prob)  # before the ensemble weights it in place
            top = max(top, float(prob.max(initial=0.0)))
            yield y0, prob
        if run.cfg.save_model_maps:
            path = probability_path(run.cfg.out, f"{plan.id}.{spec.name}", run.cfg.prob_format)
            angle = plan.fragment.rotate
            shape = turned_shape(plan.shape, angle)
            turned = (turned_band(kept.piece, plan.shape, angle, lo, hi) for lo, hi in bands(shape[0], TILE))
            _written(path, lambda: write_probability(path, shape, turned, run.cfg.prob_format))
        if run.cfg.gp_png and spec.arch == gp_family.ARCH:
            path = gp_picture_path(run.cfg.out, spec.name, plan.id, spec.z_range[0])
            batch = gp_family.batch_size(run.runtime.device.type, run.options.batch_size)
            margin = padding_margin(spec, weights, plan, run.runtime, batch)
            _written(path, lambda: write_picture(path, kept, margin, top))
    finally:
        kept.delete()


def _written(path, write) -> None:
    """An output asked for (--save-model-maps, --gp-png): one that cannot be written ends the run."""
    try:
        write()
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e}); the finished results are kept in the "
                        "partials: rerun the same command once it can be written") from None  # fmt: skip
