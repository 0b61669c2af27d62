"""The whole story of a run, and the only module that knows it: the options (``RunConfig``) become a plan of units,
the units run model by model, their typed results flow up into the ``RunReport``, and the tail writes the outputs.

    preflight (out, stride, fragments, free space, weights)  ->  plan: FragmentPlan per fragment, Unit per pair
    -> for each model: model_run.run_model -> ModelRun (ModelResult + sum maps)  ->  ensemble.FragmentEnsemble
    -> outputs.write_outputs (threshold, RLE, previews, submission.csv)  |  dry run: budget.project / verdicts
    -> results.RunReport -> report.json (after every model, and at the end)

Loop order: model-outer, fragment-inner (build one model, load it, run every fragment, free it). Each model
re-reads the fragments from disk, but only its own slices, once per pixel (``stream.py``), in a reader thread that
overlaps the device. Measured on an H200 with the 18 reference configs on a fragment-1-sized input, the device
never waited for the reader (0.0 s of read wait per model, benchmarks/RESULTS.md), so re-reading costs no wall
time, while a model-inner loop would hold 18 models and 18 sum maps at once. Model-outer also gives the budget
check and resume their natural unit.

Faults. Everything the user can fix is found before any compute (``preflight.py``) and is a ``UserError``. A model
that fails while running, for what a model can cause (``model_run.MODEL_ERRORS``), is recorded in report.json and
skipped (``--on-model-error skip``) or ends the run (``fail``); its results join the ensemble for every fragment or
for none. A bug keeps its traceback; a CUDA error (``DeviceError``) ends the run. Windows with NaN or inf outputs
are zeroed, counted and reported. Each finished unit is saved under ``OUT/partials`` (``partials.py``), so a rerun
resumes where a crash, a full disk or SIGTERM stopped it. submission.csv is only ever replaced, atomically, by a
complete one: it is absent or valid, never partial.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from .budget import EtaMonitor, project, verdicts
from .config import RunConfig
from .ensemble import FragmentEnsemble
from .errors import DeviceError, ModelRunError, UserError
from .fragments import find_fragments
from .manifest import load_manifest, sha256_file
from .model_run import ModelRunOptions, RunEnded, run_model
from .outputs import OutputOptions, write_outputs
from .partials import PartialStore
from .plan import FragmentPlan, UnitSettings, model_count, plan_fragment
from .preflight import check_free_space, check_stride, check_weights, prepare_out
from .results import FragmentPlanned, Interruption, PartialsSummary, RunReport, write_report
from .runtime import Runtime, environment, start_runtime
from .stop import Interrupted, StopRequest, signal_name

log = logging.getLogger(__name__)


def model_options(cfg: RunConfig, *, fresh: bool) -> ModelRunOptions:
    return ModelRunOptions(
        tta=cfg.tta, dry_run=cfg.dry_run, max_windows=cfg.max_windows, batch_size=cfg.batch_size,
        gpu_mem_gb=cfg.budget.gpu_mem_gb, max_nonfinite=cfg.max_nonfinite, on_model_error=cfg.on_model_error,
        fresh=fresh, quiet=cfg.quiet,
    )  # fmt: skip


def resolved_options(cfg: RunConfig, *, fresh: bool) -> dict:
    """The run's options as report.json records them (provenance: enough to rebuild the command)."""
    return {**dataclasses.asdict(cfg), "fresh": fresh}


def run(cfg: RunConfig, *, fresh: bool = False) -> RunReport:
    """Run the ensemble over every fragment and write the outputs; returns the run's report.

    ``fresh``: compute everything, ignoring partials of earlier runs (they are still written). Raises
    ``UserError`` (bad input, outputs that cannot be written), ``ModelRunError`` (no model finished, or one failed
    under ``--on-model-error fail``), ``DeviceError`` and ``stop.Interrupted`` (SIGTERM / SIGINT); report.json
    records each.
    """
    t0 = time.perf_counter()
    prepare_out(cfg.out)
    manifest = load_manifest(cfg.manifest)
    check_stride(cfg.stride, manifest)
    threshold = cfg.threshold or manifest.threshold
    fragments, warnings = find_fragments(cfg.data)
    plans = [plan_fragment(f, stride=cfg.stride, tta=cfg.tta) for f in fragments]
    disk = check_free_space(cfg.out, plans, manifest, dry_run=cfg.dry_run)
    weights = check_weights(manifest, cfg.weights, allow_random=cfg.allow_random_weights)
    runtime = start_runtime(cfg.device, gpu_mem_gb=cfg.budget.gpu_mem_gb)
    for p in plans:
        warnings.extend(p.notes)
    for w in warnings:
        log.warning(w)
    report = RunReport(
        status="running", mode="dry-run" if cfg.dry_run else "submit", manifest=str(manifest.path),
        manifest_sha256=sha256_file(manifest.path), data=str(cfg.data), options=resolved_options(cfg, fresh=fresh),
        stride=cfg.stride, tta=cfg.tta, threshold=dataclasses.asdict(threshold),
        environment=environment(runtime.device), gpu_memory_fraction=runtime.gpu_memory_fraction, disk=disk,
        warnings=warnings, fragments={p.id: FragmentPlanned(list(p.shape), len(p.origins)) for p in plans},
        partials=PartialsSummary(dir=None if cfg.dry_run else str(cfg.out / "partials"), fresh=fresh),
    )  # fmt: skip
    with StopRequest() as stop:
        try:
            ensembles = _run_models(
                cfg, manifest.models, weights, plans, runtime, report, stop, t0, fresh=fresh
            )
            stop.check()
            if cfg.dry_run:
                report.projection = verdicts(report.models, cfg.budget)
            else:
                if not any(e.weight_sum for e in ensembles) and any(len(p.origins) for p in plans):
                    raise ModelRunError("no model finished: no submission written")
                report.submission = write_outputs(
                    plans, ensembles, OutputOptions(cfg.out, threshold, cfg.previews),
                    partials_kept=report.partials_kept,
                )  # fmt: skip
        except Interrupted as e:
            running = [m.name for m in report.models if m.status == "interrupted"]
            report.status = "interrupted"
            report.interrupted = Interruption(signal_name(e.signum), running[-1] if running else None)
            write_report(cfg.out, report, t0, final=False)
            raise Interrupted(e.signum, interrupted_message(report, cfg)) from None
        except (ModelRunError, UserError, DeviceError) as e:
            report.status, report.error = "failed", str(e)
            write_report(cfg.out, report, t0, final=False)
            raise
        except (
            Exception
        ) as e:  # a bug: the traceback is kept (exit 1), and report.json still ends in a status
            report.status = "failed"
            report.error = f"internal error: {type(e).__name__}: {e}".splitlines()[0]
            write_report(cfg.out, report, t0, final=False)
            raise
    report.status = "ok"
    write_report(cfg.out, report, t0, final=True)
    return report


def _run_models(
    cfg: RunConfig, models, weights, plans: list[FragmentPlan], runtime: Runtime, report: RunReport,
    stop: StopRequest, t0: float, *, fresh: bool,
) -> list[FragmentEnsemble]:  # fmt: skip
    """Each model over every fragment, its result added to ``report`` (written after each), its maps to the
    ensemble; a dry run projects each model's full run instead."""
    options = model_options(cfg, fresh=fresh)
    settings = UnitSettings(cfg.stride, cfg.tta, runtime.device.type, runtime.dtype_name)
    store = None if cfg.dry_run else PartialStore(cfg.out / "partials", settings)
    eta = None if cfg.dry_run else EtaMonitor.for_budget(cfg.budget, t0)
    ensembles = [FragmentEnsemble(p.shape, p.mask) for p in plans]
    for spec in models:
        stop.check()
        try:
            done = run_model(
                spec, weights[spec.name], plans, options, runtime, stop=stop, eta=eta, store=store
            )
        except RunEnded as e:
            report.add_model(e.result)
            raise e.cause from None
        result = done.result
        if cfg.dry_run and result.status == "ok":
            result = dataclasses.replace(result, projection=project(
                result, total_windows=sum(len(p.origins) for p in plans),
                grid_blocks=sum(p.touched.size for p in plans), touched_blocks=sum(int(p.touched.sum()) for p in plans),
                stride=cfg.stride, scale_to=cfg.scale_to,
            ))  # fmt: skip
        report.add_model(result)
        for p, ens in zip(plans, ensembles, strict=True):
            if done.sums:  # all fragments or none: a model joins the ensemble once it has finished everywhere
                ens.add(done.sums[p.id], model_count(p, spec), spec.weight)
        write_report(cfg.out, report, t0, final=False)  # progress, and what a killed run leaves
    return ensembles


def interrupted_message(report: RunReport, cfg: RunConfig) -> str:
    """The one line an interrupted run ends with: where it stopped, what is kept, how to resume."""
    where = report.interrupted
    during = f" during model {where.model}" if where.model else ""
    return (
        f"interrupted by {where.signal}{during}: no submission written; {report.partials_kept} finished (model, "
        f"fragment) result(s) kept in {cfg.out / 'partials'}: rerun the same command to resume"
    )
