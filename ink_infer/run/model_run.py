"""One model over every fragment: its units' partials reused, the rest computed (build, load, tune, stream, free),
each unit's result checked and saved; the budget check and the per-model fault policy. Returns a ``ModelRun``: the
model's typed result and, when it finished everywhere, its sum maps for the ensemble.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ink_infer.config import ModelSpec
from ink_infer.engine.compiling import compile_model
from ink_infer.engine.tuning import tune
from ink_infer.errors import DeviceError, ModelRunError, UserError
from ink_infer.models import build_model, gp_family
from ink_infer.models.checkpoint import load_weights
from ink_infer.models.swin_attention import freeze_window_bias
from ink_infer.outputs.progress import RunProgress
from ink_infer.outputs.raster import is_large
from ink_infer.outputs.report import PARTIAL_REUSED, PARTIAL_SAVED, FragmentResult, ModelResult
from ink_infer.run import plan
from ink_infer.run.budget import BudgetSkip, EtaMonitor
from ink_infer.run.claims import Claims
from ink_infer.run.faults import MODEL_ERRORS, GuardedModel, RunEnded, check_outputs
from ink_infer.run.partials import PartialStore
from ink_infer.run.plan import FragmentPlan, Unit, Weights
from ink_infer.run.runtime import Runtime, gpu_peaks_gib, host_peak_gib
from ink_infer.run.stop import Interrupted, StopRequest
from ink_infer.run.unit_pass import UnitPass, run_unit
from ink_infer.volumes.remote import WIRE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRunOptions:
    """What running one model needs to know of the run's options."""

    tta: str = "scheduled"
    dry_run: bool = False
    max_windows: int = 64  # dry run: windows per fragment
    batch_size: int | None = None  # None: chosen from the device
    gpu_mem_gb: float = 16.0
    max_nonfinite: float = 0.01
    on_model_error: str = "skip"  # skip | fail
    fresh: bool = False  # --fresh: partials are written but never read
    # the resolved --compile mode (compiling.resolve_mode): none | default | max-autotune
    compile: str = "none"


# in ``ModelRun.sums``, for a large fragment's unit (``raster.is_large``) whose partial is saved: read back from the
# partials when merged, so that a model's sums over a scroll segment are never all in memory
@dataclass(frozen=True)
class InPartials:
    """A unit's sums that are in the partials, not in memory."""


IN_PARTIALS = InPartials()


@dataclass
class ModelRun:
    """What ``run_model`` hands back: the model's result and, when it is ``ok`` in a full run, its sum maps by
    unit id (fixed-point int64 on the unit's block rows, ``Unit.block_rows``; all units or none, or with
    ``claims`` the units this worker took), or ``IN_PARTIALS`` for a large fragment's saved unit."""

    result: ModelResult
    sums: dict[str, np.ndarray | InPartials] = field(default_factory=dict)


def _held(unit: Unit, sum_map: np.ndarray, saved: bool) -> np.ndarray | InPartials:
    """What ``ModelRun.sums`` keeps of a unit: its map, or ``IN_PARTIALS`` for a large fragment's saved unit."""
    return IN_PARTIALS if saved and is_large(unit.fragment.shape) else sum_map


@dataclass(frozen=True)
class UnitDone:
    """One unit finished, computed here or found in the partials: its result, its sums (or ``IN_PARTIALS``; None
    when only the partials hold it, for the merge), what to warn of, and a partial that could not be used."""

    unit_id: str
    result: FragmentResult | None = None
    sums: np.ndarray | InPartials | None = None
    warnings: tuple[str, ...] = ()
    ignored: str | None = None  # why an earlier partial of the unit was not used


@dataclass(frozen=True)
class Loaded:
    """The model loaded for this process's units: what ``load_weights`` found (None: random init) and its tuning."""

    load: dict | None
    tuning: dict


@dataclass(frozen=True)
class ModelRunContext:
    """What a model runs within, the same for every model of a process: the options, the device, and the run's
    shared services (stop requests, the budget's clock, the partials, the progress display, a shared queue).

    ``claims``: a worker of a shared queue computes only the units it takes there. ``saved_elsewhere``: the
    (model, unit id) pairs another process of this run computed and saved: read back as ``saved``, not
    ``reused``."""

    options: ModelRunOptions
    runtime: Runtime
    stop: StopRequest
    eta: EtaMonitor | None = None
    store: PartialStore | None = None
    progress: RunProgress | None = None
    claims: Claims | None = None
    saved_elsewhere: frozenset[tuple[str, str]] = frozenset()


def load_model(
    spec: ModelSpec, path: Path | None, *, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, dict | None]:
    """Build on CPU, load weights strictly (or seeded random init), move to the device in the run's dtype; a
    SwinV2 encoder's position bias is then computed once (``models.swin_attention``).

    Returns the model and what ``load_weights`` found (None for random init)."""
    torch.manual_seed(plan.RANDOM_SEED)  # read here, so a test can set it (plan.RANDOM_SEED)
    model = build_model(spec)
    info = load_weights(model, path, spec) if path is not None else None
    model = model.to(device=device, dtype=dtype).eval()
    freeze_window_bias(model, fused=False)  # SwinV2: its position bias is a constant once the weights are in
    return model, info


def _example_batch(spec: ModelSpec, batch: int, runtime: Runtime) -> torch.Tensor:
    """One batch of the shape and dtype the model will see: what it is compiled on."""
    return torch.zeros(
        (batch, spec.n_slices, spec.side, spec.side), device=runtime.device, dtype=runtime.dtype
    )


def unit_windows(unit: Unit, options: ModelRunOptions) -> int:
    """The windows a unit runs: all of them, or in a dry run its spread sample."""
    return min(unit.windows, options.max_windows) if options.dry_run else unit.windows


def run_model(
    spec: ModelSpec, weights: Weights, plans: Sequence[FragmentPlan], ctx: ModelRunContext
) -> ModelRun:
    """One model over every fragment: partials reused (from ``ctx.store``, unless ``options.fresh``), the rest
    computed and saved there (``ctx.progress`` shown as they run). A model that would end past ``ctx.eta``'s
    deadline is skipped; a failing one is recorded and skipped (``RunEnded`` with ``--on-model-error fail``).
    ``RunEnded`` also carries a stop request, data that went bad and a device failure up, with what the model did
    until then.

    With ``ctx.claims`` only the units taken there are computed (the model is not even loaded when it takes none);
    the result and sums then hold those units only."""
    options, runtime, progress = ctx.options, ctx.runtime, ctx.progress
    result = ModelResult(
        spec.name, spec.arch, "running", random_weights=weights.path is None, sha256=weights.sha256
    )
    units = [Unit(spec, weights, p) for p in plans]
    sums: dict[str, np.ndarray | InPartials] = {}
    if runtime.on_cuda:
        torch.cuda.reset_peak_memory_stats(runtime.device)
    t_model = time.perf_counter()
    store = None if options.fresh else ctx.store
    try:
        if (
            ctx.claims is not None
        ):  # a worker of a shared queue: the merge reads the partials, not this process
            found = _free_units(units, store, ctx.claims)
        else:
            found = _reuse_partials(units, store, ctx.saved_elsewhere) if store is not None else []
        _record(result, sums, found)
        done = {d.unit_id for d in found if d.result is not None}
        todo = [u for u in units if u.fragment.id not in done and (ctx.claims is None or ctx.claims.free(u))]
        if progress is not None:
            progress.start_model(spec.name, sum(unit_windows(u, options) for u in todo))
        for event in _compute(spec, weights, todo, ctx) if todo else ():
            if isinstance(event, Loaded):
                result.load, result.tuning = event.load, event.tuning
            else:
                _record(result, sums, [event])
        # in row order, reused or computed (a worker of a shared queue: those it took)
        result.fragments = {p.id: result.fragments[p.id] for p in plans if p.id in result.fragments}
        result.status = "ok"
    except BudgetSkip as e:
        result.status, result.reason = "skipped", str(e)
        log.warning("model %s skipped: %s", spec.name, e)
    except MODEL_ERRORS as e:
        reason = (str(e) if isinstance(e, ModelRunError) else f"{type(e).__name__}: {e}").splitlines()[0]
        result.status, result.reason = "failed", reason
        if options.on_model_error == "fail":
            cause = ModelRunError(f"model {spec.name} failed: {reason} (--on-model-error fail)")
            raise RunEnded(_measured(result, runtime, t_model), cause) from e
        log.error("model %s failed and is skipped: %s", spec.name, reason)
    except Interrupted as e:
        result.status = "interrupted"
        raise RunEnded(_measured(result, runtime, t_model), e) from None
    except (UserError, DeviceError) as e:  # the data went bad mid-run, or the device failed: ends the run
        result.status, result.reason = "failed", str(e)
        raise RunEnded(_measured(result, runtime, t_model), e) from None
    finally:
        if progress is not None:
            reused = sum(f.partial == PARTIAL_REUSED for f in result.fragments.values())
            progress.end_model(result.status, time.perf_counter() - t_model, reused=reused)
    _measured(result, runtime, t_model)
    return ModelRun(result, sums if result.status == "ok" and not options.dry_run else {})


def _record(result: ModelResult, sums: dict, found: list[UnitDone]) -> None:
    """The model's record (``result``, owned by ``run_model``) and its sums, with what its units gave."""
    for d in found:
        if d.ignored is not None:
            result.ignored_partials.append([d.unit_id, d.ignored])
        if d.result is not None:
            result.fragments[d.unit_id] = d.result
            result.warnings.extend(d.warnings)
        if d.sums is not None:
            sums[d.unit_id] = d.sums


def _measured(result: ModelResult, runtime: Runtime, t_model: float) -> ModelResult:
    result.seconds = time.perf_counter() - t_model
    result.gpu_peak_gib = gpu_peaks_gib(runtime.device)
    result.host_peak_gib = host_peak_gib()
    return result


def _compute(
    spec: ModelSpec, weights: Weights, todo: list[Unit], ctx: ModelRunContext
) -> Iterator[Loaded | UnitDone]:
    """Build and load the model, tune it, run the units ``todo`` (with ``ctx.claims``: those it takes, the first
    of them before the model is loaded), free it. Yields ``Loaded`` once the model is ready, then a ``UnitDone``
    per unit as it is finished and saved: what is yielded before a failure is the model's record of it."""
    if ctx.claims is not None:
        first = next((i for i, u in enumerate(todo) if ctx.claims.take(u)), None)
        if first is None:  # every unit was taken by other workers meanwhile: nothing to load the model for
            return
        todo = todo[first:]
    model = None
    try:
        model, fixed_batch, loaded = _prepared(spec, weights, todo, ctx)
        yield loaded
        pass_ = UnitPass(model, ctx, loaded.tuning["batch_size"], fixed_batch, sum(u.windows for u in todo))
        for n, unit in enumerate(todo):
            ctx.stop.check()
            if ctx.claims is not None and n > 0 and not ctx.claims.take(unit):
                pass_.windows_left -= unit.windows  # another worker computes it
                continue
            fetched = WIRE.as_dict()
            sum_map, stats = run_unit(unit, pass_)
            frag = FragmentResult.of_pass(stats, str(ctx.runtime.device))
            frag.wire = WIRE.since(fetched) if unit.fragment.fragment.remote else None
            warnings = check_outputs(spec.name, unit.fragment.id, frag, limit=ctx.options.max_nonfinite)
            if ctx.store is not None:
                frag.partial = ctx.store.save(unit, sum_map, frag) or PARTIAL_SAVED
            yield UnitDone(
                unit.fragment.id, frag, _held(unit, sum_map, frag.partial == PARTIAL_SAVED), tuple(warnings)
            )
            del sum_map
    finally:
        # careful release: once per model, not per batch (empty_cache is slow when overused)
        del model
        gc.collect()
        if ctx.runtime.on_cuda:
            torch.cuda.empty_cache()


def _prepared(
    spec: ModelSpec, weights: Weights, todo: list[Unit], ctx: ModelRunContext
) -> tuple[GuardedModel, bool, Loaded]:
    """The model loaded, checked against the weights checked at the start, tuned, checked against the budget by
    its probe, and compiled (after that check: no compile for a skipped model). Returns the model, whether its
    batches must keep one shape (compiled), and what loading and tuning found."""
    options, runtime = ctx.options, ctx.runtime
    gp = (
        spec.arch == gp_family.ARCH
    )  # the GP script keeps its weights in float32 (autocast on CUDA) and is not tuned
    try:
        dtype = torch.float32 if gp else runtime.dtype
        model, info = load_model(spec, weights.path, device=runtime.device, dtype=dtype)
    except UserError as e:  # checked at the start, so the file changed since: this model's failure alone
        raise ModelRunError(f"weights unusable mid-run: {e}") from None
    model = GuardedModel(model)
    if weights.path is None:
        log.warning("model %s: random weights (--allow-random-weights)", spec.name)
    elif info["sha256"] != weights.sha256:
        raise ModelRunError(f"{weights.path}: changed since it was checked at the start of the run")
    if gp:
        batch = gp_family.batch_size(runtime.device.type, options.batch_size)
        return model, False, Loaded(info, {"batch_size": batch, "compile": "none", "compile_s": 0.0})
    tuning = tune(
        model, spec, device=runtime.device, dtype=runtime.dtype, gpu_mem_gb=options.gpu_mem_gb,
        requested=options.batch_size,
    )  # fmt: skip
    tuned = tuning.as_dict()
    if ctx.eta is not None and tuning.s_per_window is not None:
        ctx.eta.check(sum(u.windows for u in todo) * tuning.s_per_window, "by its probe")
    model.inner, compile_s, eager_why = compile_model(
        model.inner, options.compile, _example_batch(spec, tuning.batch_size, runtime)
    )
    tuned.update(compile=options.compile if eager_why is None else "none", compile_s=compile_s,
                 compile_note=eager_why)  # fmt: skip
    return model, eager_why is None and options.compile != "none", Loaded(info, tuned)


def _free_units(units: list[Unit], store: PartialStore | None, claims: Claims) -> list[UnitDone]:
    """A worker's free units that have a partial (from an earlier run): each taken and found reused, its blocks
    left on disk for the merge. The others (free, without a partial) are the worker's to compute."""
    found = []
    for unit in units:
        if not claims.free(unit):
            continue
        frag = store.saved_result(unit) if store is not None else None
        if frag is not None and claims.take(unit):
            frag.partial = PARTIAL_REUSED
            found.append(UnitDone(unit.fragment.id, frag))
    return found


def _reuse_partials(
    units: list[Unit], store: PartialStore, saved_elsewhere: frozenset[tuple[str, str]]
) -> list[UnitDone]:
    """The units that earlier runs with the same key left in the store, with their sum maps (a large fragment's as
    ``IN_PARTIALS``: read back when merged); those another process of this run saved (``saved_elsewhere``) are
    found ``saved``, the others ``reused``; a partial that cannot be used says why."""
    found: list[UnitDone] = []
    for unit in units:
        frag_id = unit.fragment.id
        sum_map, frag, why = store.load(unit)
        if sum_map is None:
            if why is not None:
                found.append(UnitDone(frag_id, ignored=why))
                log.info("partial of %s on %s not used: %s", unit.model.name, frag_id, why)
            continue
        frag.partial = PARTIAL_SAVED if (unit.model.name, frag_id) in saved_elsewhere else PARTIAL_REUSED
        found.append(
            UnitDone(
                frag_id,
                frag,
                _held(unit, sum_map, True),
                tuple(check_outputs(unit.model.name, frag_id, frag)),
            )
        )
        del sum_map
    reused = sum(d.result is not None for d in found)
    if reused:
        log.info("model %s: %d of %d fragments from %s", units[0].model.name, reused, len(units), store.root)
    return found
