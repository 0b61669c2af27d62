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
import datetime
import functools
import logging
import time
from collections.abc import Iterator

import numpy as np
import torch

from .budget import EtaMonitor, project, verdicts
from .compiling import resolve_mode, use_cache_under
from .config import BLOCK, RunConfig
from .ensemble import FragmentEnsemble
from .errors import DeviceError, ModelRunError, UserError
from .fragments import find_fragments
from .manifest import load_manifest, sha256_file
from .maps import TILE, write_probability_tiff
from .model_run import ModelRunOptions, RunEnded, run_model
from .outputs import OutputOptions, write_outputs
from .partials import PartialStore, safe_name
from .plan import FragmentPlan, Unit, UnitSettings, assign, model_count, plan_run
from .preflight import check_free_space, check_hashes, check_stride, check_weights, prepare_out
from .progress import RunProgress
from .raster import (
    Raster,
    bands,
    is_large,
    remove_scratch,
    scratch_dir,
    scratch_path,
    turned_band,
    turned_shape,
)
from .results import (
    PARTIAL_REUSED,
    PARTIAL_SAVED,
    FragmentPlanned,
    Interruption,
    PartialsSummary,
    PartReport,
    RunReport,
    write_report,
)
from .rotation import with_rotation
from .runtime import Runtime, environment, rank_device, resolve_devices, start_runtime, torchrun_rank
from .stitch import finalize
from .stop import Interrupted, StopRequest, signal_name
from .workers import (
    WorkerInputs,
    WorkerJob,
    claims_dir,
    compute_share,
    failed_models,
    part_path,
    plan_shares,
    read_parts,
    run_workers,
    share_progress,
    worker_threads,
)

log = logging.getLogger(__name__)


def model_options(cfg: RunConfig, runtime: Runtime, *, fresh: bool) -> ModelRunOptions:
    return ModelRunOptions(
        tta=cfg.tta, dry_run=cfg.dry_run, max_windows=cfg.max_windows, batch_size=cfg.batch_size,
        gpu_mem_gb=cfg.budget.gpu_mem_gb, max_nonfinite=cfg.max_nonfinite, on_model_error=cfg.on_model_error,
        fresh=fresh, compile=resolve_mode(cfg.compile, runtime.device)[0],
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

    Executors: this process alone (the default); one spawned worker per ``--devices`` entry; one torchrun rank; one
    ``--part-id`` of ``--num-parts``. Each computes its share of the units into partials (``workers.py``); the
    outputs are then built by one process from the partials (``--merge-only``: from partials alone).
    """
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    prepare_out(cfg.out)
    manifest = load_manifest(cfg.manifest)
    check_stride(cfg.stride, manifest)
    threshold = cfg.threshold or manifest.threshold
    fragments, warnings = find_fragments(cfg.data, layers=cfg.layer_choice)
    fragments = with_rotation(fragments, cfg.rotate, cfg.out)
    plans, items = plan_run(fragments, stride=cfg.stride, tta=cfg.tta, unit_windows=cfg.unit_windows)
    disk = check_free_space(
        cfg.out, cfg.partials_dir, plans, manifest, dry_run=cfg.dry_run, model_maps=cfg.save_model_maps
    )
    weights = check_weights(manifest, cfg.weights, allow_random=cfg.allow_random_weights)
    unverified = check_hashes(manifest, weights, require=cfg.require_hashes)
    rank = torchrun_rank()
    devices = resolve_devices(cfg.devices) if cfg.devices else []
    if rank is not None and (cfg.devices or cfg.num_parts > 1 or cfg.merge_only):
        raise UserError(
            "under torchrun each rank is one part: use it without --devices, --num-parts, --merge-only"
        )
    large = any(is_large(p.shape) for p in plans)
    runtime = start_runtime(_own_device(cfg, devices, rank), gpu_mem_gb=cfg.budget.gpu_mem_gb, large=large)
    compile_mode, compile_why = resolve_mode(cfg.compile, runtime.device)
    if compile_mode != "none":
        use_cache_under(cfg.out)
    for p in plans:
        warnings.extend(p.notes)
    for w in warnings:
        log.warning(w)
    report = RunReport(
        status="running", mode=_mode(cfg, rank), started=started, command=list(cfg.argv),
        manifest=str(manifest.path.absolute()), manifest_sha256=sha256_file(manifest.path),
        data=str(cfg.data.absolute()), options=resolved_options(cfg, fresh=fresh),
        stride=cfg.stride, tta=cfg.tta, threshold=dataclasses.asdict(threshold),
        environment={**environment(runtime.device), "compile": {"asked": cfg.compile, "mode": compile_mode,
                                                                 "why": compile_why}},
        gpu_memory_fraction=runtime.gpu_memory_fraction, disk=disk,
        warnings=warnings, fragments={p.id: FragmentPlanned(list(p.shape), len(p.origins)) for p in plans},
        partials=PartialsSummary(dir=None if cfg.dry_run else str(cfg.partials_dir.absolute()), fresh=fresh,
                                 keep=cfg.keep_partials),
        unverified_weights=unverified,
    )  # fmt: skip
    report_path = cfg.out / "report.json"
    models = [(spec, weights[spec.name]) for spec in manifest.models]
    if cfg.dry_run and rank is not None and rank.rank != 0:
        # a dry run is rank 0's alone: it projects the ranks' makespan; nothing is sampled or written here
        report.status, report.mode = "ok", f"rank {rank.rank} of {rank.world_size}"
        return report
    with StopRequest() as stop:
        try:
            elsewhere = Elsewhere()
            if cfg.dry_run:
                pass  # a dry run samples every model here; --devices, torchrun only change its projection
            elif cfg.num_parts > 1 or rank is not None:
                n, i = (rank.world_size, rank.rank) if rank else (cfg.num_parts, cfg.part_id)
                report_path = part_report_path(cfg, n, i, rank)
                part = _compute_part(cfg, models, items, runtime, stop, t0, n, i, rank, fresh=fresh)
                if rank is None or rank.rank != 0:
                    report.parts = [part]
                    for m in part.models:
                        report.add_model(m)
                    report.status = "ok"
                    write_report(report_path, report, t0, final=True)
                    return report
                report_path = cfg.out / "report.json"  # rank 0 merges every rank's units
                elsewhere = Elsewhere.from_parts(read_parts(cfg.out))
                report.parts = elsewhere.parts
            elif len(devices) > 1:
                elsewhere = _compute_on_workers(
                    cfg, models, items, devices, runtime, report, stop, t0, fresh=fresh
                )
            if cfg.merge_only:
                elsewhere = Elsewhere.from_parts(read_parts(cfg.out))
                report.parts = elsewhere.parts
                _check_merge(models, items, runtime, cfg, elsewhere)
            ensembles = _run_models(
                cfg, models, plans, items, runtime, report, stop, t0, elsewhere, fresh=fresh
            )
            stop.check()
            if cfg.dry_run:
                workers = rank.world_size if rank is not None else max(1, len(devices))
                report.projection = verdicts(
                    report.models, cfg.budget, makespan_hours=_makespan(report, items, workers)
                )
            else:
                if not any(e.weight_sum for e in ensembles) and any(len(p.origins) for p in plans):
                    raise ModelRunError("no model finished: no submission written")
                maps = cfg.save_probabilities
                if (
                    maps is None
                ):  # researchers' segments get their pictures of the ink; Kaggle runs a submission
                    maps = any(p.fragment.layout != "kaggle" for p in plans)
                report.submission = write_outputs(
                    plans, ensembles, OutputOptions(cfg.out, threshold, cfg.previews, maps),
                    partials_kept=report.partials_kept, partials_dir=cfg.partials_dir,
                )  # fmt: skip
                remove_scratch(scratch_path(cfg.partials_dir))  # before the partials' folder may go
                if not cfg.keep_partials:  # the submission is written: nothing left to resume
                    report.partials.deleted = PartialStore(cfg.partials_dir, _settings(cfg, runtime)).clear()
        except Interrupted as e:
            running = [m.name for m in report.models if m.status == "interrupted"]
            report.status = "interrupted"
            report.interrupted = Interruption(signal_name(e.signum), running[-1] if running else None)
            write_report(report_path, report, t0, final=False)
            raise Interrupted(e.signum, interrupted_message(report, cfg)) from None
        except (ModelRunError, UserError, DeviceError) as e:
            report.status, report.error = "failed", str(e)
            write_report(report_path, report, t0, final=False)
            raise
        except (
            Exception
        ) as e:  # a bug: the traceback is kept (exit 1), and report.json still ends in a status
            report.status = "failed"
            report.error = f"internal error: {type(e).__name__}: {e}".splitlines()[0]
            write_report(report_path, report, t0, final=False)
            raise
        finally:
            remove_scratch(scratch_path(cfg.partials_dir))  # spilled maps are never resumed from
    report.status = "ok"
    write_report(report_path, report, t0, final=True)
    return report


def _own_device(cfg: RunConfig, devices: list[str], rank) -> str:
    """The device this process computes on: the first of ``--devices``, a torchrun rank's local GPU, or --device."""
    if devices:
        return devices[0]
    return rank_device(rank, cfg.device) if rank is not None else cfg.device


def _mode(cfg: RunConfig, rank) -> str:
    if cfg.dry_run:
        return "dry-run"
    if rank is not None:
        return f"rank {rank.rank} of {rank.world_size}"
    if cfg.num_parts > 1:
        return f"part {cfg.part_id} of {cfg.num_parts}"
    return "merge-only" if cfg.merge_only else "submit"


def part_label(n: int, i: int, rank) -> str:
    return f"rank {i} of {n}" if rank is not None else f"part {i} of {n}"


def part_report_path(cfg: RunConfig, n: int, i: int, rank):
    """A part's own report (report.json is the merge's): OUT/parts/<label>.report.json."""
    return part_path(cfg.out, part_label(n, i, rank)).with_suffix(".report.json")


@dataclasses.dataclass
class Elsewhere:
    """What other processes of this run did: their part reports, the units they saved, the models that failed."""

    parts: list = dataclasses.field(default_factory=list)
    saved: set = dataclasses.field(
        default_factory=set
    )  # (model, unit id) computed and saved by another process
    failed: dict = dataclasses.field(default_factory=dict)  # model name -> its failed / skipped ModelResult

    @classmethod
    def from_parts(cls, parts) -> Elsewhere:
        saved = {
            (m.name, f)
            for p in parts
            for m in p.models
            for f, r in m.fragments.items()
            if r.partial == "saved"
        }
        return cls(list(parts), saved, failed_models(parts))


def _compute_part(cfg, models, items, runtime, stop, t0, n, i, rank, *, fresh: bool) -> PartReport:
    """This process's share of the units (part ``i`` of ``n``), saved as partials; under torchrun, every rank
    waits at a barrier for the others before rank 0 merges."""
    shares = plan_shares(models, items, [str(runtime.device)] * n, [part_label(n, j, rank) for j in range(n)])
    store = PartialStore(cfg.partials_dir, _settings(cfg, runtime))
    eta = EtaMonitor.for_budget(cfg.budget, t0)
    group = _join_group(cfg, rank) if rank is not None else None
    try:
        part = compute_share(
            shares[i],
            model_options(cfg, runtime, fresh=fresh),
            runtime,
            stop=stop,
            store=store,
            eta=eta,
            out=cfg.out,
            progress=share_progress(shares[i], every=cfg.progress_every, quiet=cfg.quiet),
        )
    finally:
        if group is not None:
            group.barrier()  # every rank has saved its units (or failed: rank 0 recomputes what is missing)
    return part


def _join_group(cfg: RunConfig, rank):
    """torch.distributed over gloo (CPU and GPU alike: only a barrier crosses the network), with a timeout as
    long as the run's budget, since ranks reach the barrier when their share is done."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=cfg.budget.hours + 1))
    return dist


def _compute_on_workers(cfg, models, items, devices, runtime, report, stop, t0, *, fresh: bool) -> Elsewhere:
    """One worker per device computes its share: this process the first device's, one spawned process each
    other's; they share a queue (``claims.py``), so the first to finish takes what is left of the others' shares.
    What a dead worker lost is computed here afterwards (reassigned once); a worker's user, model
    (``--on-model-error fail``) or device error ends the run."""
    labels = [f"worker {j} ({d})" for j, d in enumerate(devices)]
    shares = plan_shares(models, items, devices, labels)
    deadline = EtaMonitor.for_budget(cfg.budget, t0).deadline
    where = WorkerInputs(cfg.data, cfg.manifest, cfg.stride, cfg.tta, cfg.unit_windows,
                         {spec.name: w for spec, w in models}, cfg.layer_choice, cfg.rotate, cfg.out)  # fmt: skip
    jobs = [
        WorkerJob(share.label, share.device, share.units, where, model_options(cfg, runtime, fresh=fresh),
                  _settings(cfg, runtime), cfg.out, cfg.partials_dir, cfg.budget.gpu_mem_gb, deadline,
                  worker_threads(devices), cfg.quiet, cfg.progress_every, claims_dir(cfg.out))
        for share in shares
    ]  # fmt: skip
    options = model_options(cfg, runtime, fresh=fresh)

    def here() -> PartReport:  # the first device's share, in this process, one thread per core as the others
        threads, before = worker_threads(devices), torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            return compute_share(
                shares[0], options, runtime, stop=stop, store=PartialStore(cfg.partials_dir, _settings(cfg, runtime)),
                eta=EtaMonitor(deadline), out=cfg.out,
                progress=share_progress(shares[0], every=cfg.progress_every, quiet=cfg.quiet),
                claims=jobs[0].claims_view(),
            )  # fmt: skip
        finally:
            torch.set_num_threads(before)

    parts = run_workers(jobs, stop, here=here)
    report.parts = parts
    stop.check()
    errors = {"user": UserError, "model": ModelRunError, "device": DeviceError, "internal": ModelRunError}
    for p in parts:
        if p.error_kind in errors:
            raise errors[p.error_kind](f"{p.label}: {p.error}")
        if p.lost:
            log.warning("%s: %s; its %d unfinished unit(s) are computed here", p.label, p.error or p.status,
                        len(p.lost))  # fmt: skip
    return Elsewhere.from_parts(parts)


def _check_merge(models, items, runtime, cfg: RunConfig, elsewhere: Elsewhere) -> None:
    """--merge-only: every unit of every model that did not fail must have its partial; else one line each."""
    store = PartialStore(cfg.partials_dir, _settings(cfg, runtime))
    missing = [
        f"model {spec.name}, unit {item.id}: no partial in {store.root} (its part has not finished)"
        for spec, w in models
        if spec.name not in elsewhere.failed
        for item in items
        if not store.has(Unit(spec, w, item))
    ]
    if missing:
        raise UserError("\n".join(["--merge-only: " + m for m in missing]))


def _settings(cfg: RunConfig, runtime: Runtime) -> UnitSettings:
    return UnitSettings(
        cfg.stride,
        cfg.tta,
        runtime.device.type,
        runtime.dtype_name,
        resolve_mode(cfg.compile, runtime.device)[0],
    )


def _makespan(report: RunReport, items, workers: int) -> float | None:
    """A dry run's projected hours on ``workers`` devices: the units' projected times shared out as the run
    would (``plan.assign``), the longest share. None on one device (the sum over models)."""
    if workers == 1:
        return None
    costs = [m.projection.s_per_window * len(item.origins) for m in report.models if m.status == "ok" and m.projection
             for item in items]  # fmt: skip
    owner = assign(costs, workers)
    return max(sum(c for c, o in zip(costs, owner, strict=True) if o == w) for w in range(workers)) / 3600


def _run_models(
    cfg: RunConfig, models, plans: list[FragmentPlan], items: list[FragmentPlan], runtime: Runtime,
    report: RunReport, stop: StopRequest, t0: float, elsewhere: Elsewhere, *, fresh: bool,
) -> list[FragmentEnsemble]:  # fmt: skip
    """Each model over every unit, its result added to ``report`` (written after each), its maps to the
    ensemble in manifest order, a fragment's row ranges summed in row order; a dry run projects each model's full
    run instead. Units that other processes saved are read back; a model that failed elsewhere joins nowhere."""
    options = model_options(cfg, runtime, fresh=fresh and not elsewhere.saved)
    store = None if cfg.dry_run else PartialStore(cfg.partials_dir, _settings(cfg, runtime))
    eta = None if cfg.dry_run else EtaMonitor.for_budget(cfg.budget, t0)
    progress = _progress(cfg, len(models), items)
    ensembles = [FragmentEnsemble(p.shape, p.mask, _spill(cfg, p, "ensemble")) for p in plans]
    for spec, weights in models:
        stop.check()
        if spec.name in elsewhere.failed:
            report.add_model(elsewhere.failed[spec.name])
            progress.pass_model()
            write_report(cfg.out / "report.json", report, t0, final=False)
            continue
        try:
            done = run_model(
                spec, weights, items, options, runtime, stop=stop, eta=eta, store=store, progress=progress
            )
        except RunEnded as e:
            report.add_model(e.result)
            raise e.cause from None
        result = done.result
        for unit_id, frag in result.fragments.items():
            if (spec.name, unit_id) in elsewhere.saved and frag.partial == PARTIAL_REUSED:
                frag.partial = PARTIAL_SAVED  # computed in this run, by another process
        if cfg.dry_run and result.status == "ok":
            result = dataclasses.replace(result, projection=project(
                result, total_windows=sum(len(p.origins) for p in plans),
                grid_blocks=sum(p.touched.size for p in plans), touched_blocks=sum(int(p.touched.sum()) for p in plans),
                stride=cfg.stride, scale_to=cfg.scale_to,
            ))  # fmt: skip
        report.add_model(result)
        if done.sums:  # all units or none: a model joins the ensemble once it has finished everywhere
            for p, ens in zip(plans, ensembles, strict=True):
                ranges = [item for item in items if item.fragment is p.fragment]
                take = functools.partial(_take_sums, done.sums, spec, weights, store)
                rows = _model_rows(p, ranges, spec, take)
                if cfg.save_model_maps:
                    rows = _model_map_kept(cfg, p, spec.name, rows)
                ens.add_model(model_count(p, spec), spec.weight, rows)
        del done  # the model's maps go before the next model allocates its own
        write_report(
            cfg.out / "report.json", report, t0, final=False
        )  # progress, and what a killed run leaves
    return ensembles


def _spill(cfg: RunConfig, plan: FragmentPlan, what: str):
    """The file a large fragment's map of ``what`` lives in, in this run's scratch folder; None: in memory."""
    if not is_large(plan.shape) or cfg.dry_run:
        return None
    return scratch_dir(cfg.partials_dir) / f"{safe_name(plan.id)}.{safe_name(what)}.f32"


def _take_sums(sums: dict, spec, weights, store: PartialStore | None, item: FragmentPlan) -> np.ndarray:
    """A unit's int64 sums on its block rows, taken out of the model's ``sums``: kept in memory, or (a large
    fragment's) read back from its partial."""
    found = sums.pop(item.id)
    if not isinstance(found, str):  # else model_run.IN_STORE
        return found
    unit = Unit(spec, weights, item)
    loaded, _, why = store.load(unit)
    if loaded is None:
        path = store.path(spec.name, item.fragment.id)
        raise UserError(
            f"{path}: saved by this run but no longer readable ({why or 'gone'}): rerun the same command"
        )
    return loaded


def _model_rows(
    plan: FragmentPlan, ranges: list[FragmentPlan], spec, take
) -> Iterator[tuple[int, np.ndarray]]:
    """One model's probability map over a fragment as ``(first row, float32 rows)``, in row order, from its
    units' sums (``take(item)``: int64 on the item's block rows, exact in any order). Each range is added to the
    rows still open as it comes, and the rows that no later range reaches are finished (``stitch.finalize``)
    and handed on: what is held is about one range, never the fragment."""
    count = model_count(plan, spec)
    pending, p_lo = None, 0  # the open block rows' sums, from block row p_lo
    for item in ranges:  # in row order: each range's first block row is at or past the previous one's
        lo, hi = item.block_rows(spec.tile)
        sums = take(item)
        if pending is not None:
            p_hi = p_lo + len(pending) // BLOCK
            done = min(lo, p_hi) - p_lo  # block rows no later range reaches
            yield from _finished_rows(plan, count, pending[: done * BLOCK], p_lo)
            pending, p_lo = pending[done * BLOCK :], p_lo + done
            if not len(pending):
                pending = None
        if pending is None:
            pending, p_lo = sums, lo
            continue
        grown = np.zeros(((max(p_lo + len(pending) // BLOCK, hi) - p_lo) * BLOCK, pending.shape[1]), np.int64)
        grown[: len(pending)] = pending
        grown[(lo - p_lo) * BLOCK : (hi - p_lo) * BLOCK] += sums
        pending = grown
        del sums
    if pending is not None:
        yield from _finished_rows(plan, count, pending, p_lo)


FINISH_BLOCK_ROWS = 8  # block rows finished at a time: 256 pixel rows, as the outputs' bands


def _finished_rows(plan: FragmentPlan, count: np.ndarray, sums: np.ndarray, b0: int):
    """``stitch.finalize`` of ``sums`` (block rows from ``b0``), a few block rows at a time."""
    h = plan.shape[0]
    for c in range(0, len(sums) // BLOCK, FINISH_BLOCK_ROWS):
        y0, y1 = (b0 + c) * BLOCK, min(h, (b0 + c + FINISH_BLOCK_ROWS) * BLOCK)
        if y0 >= h:
            break
        part = sums[c * BLOCK : (c + FINISH_BLOCK_ROWS) * BLOCK]
        yield y0, finalize(part, count[b0 + c : b0 + c + FINISH_BLOCK_ROWS], plan.mask[y0:y1])


def _model_map_kept(cfg: RunConfig, plan: FragmentPlan, model: str, rows):
    """--save-model-maps: ``rows`` passed on, each also kept (in memory, or on disk for a large fragment); once
    they are all through, the model's probability TIFF is written, as the ensemble's is."""
    kept = Raster(plan.shape, np.float32, _spill(cfg, plan, model))
    try:
        for y0, prob in rows:
            kept.write(y0, prob)  # before the ensemble weights it in place
            yield y0, prob
        path = cfg.out / "probabilities" / f"{plan.id}.{model}.tif"
        angle = plan.fragment.rotate
        shape = turned_shape(plan.shape, angle)
        turned = (turned_band(kept.piece, plan.shape, angle, lo, hi) for lo, hi in bands(shape[0], TILE))
        try:
            write_probability_tiff(path, shape, turned)
        except OSError as e:
            log.warning("%s: not written (%s)", path, e.strerror or e)
    finally:
        kept.delete()


def _progress(cfg: RunConfig, n_models: int, items) -> RunProgress:
    """The run's progress display over ``n_models`` models of these items' windows (sampled in a dry run)."""
    per_model = sum(min(len(i.origins), cfg.max_windows) if cfg.dry_run else len(i.origins) for i in items)
    return RunProgress(n_models, per_model, every=cfg.progress_every, quiet=cfg.quiet)


def interrupted_message(report: RunReport, cfg: RunConfig) -> str:
    """The one line an interrupted run ends with: where it stopped, what is kept, how to resume."""
    where = report.interrupted
    during = f" during model {where.model}" if where.model else ""
    return (
        f"interrupted by {where.signal}{during}: no submission written; {report.partials_kept} finished (model, "
        f"fragment) result(s) kept in {cfg.partials_dir}: rerun the same command to resume"
    )
