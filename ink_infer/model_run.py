"""One model over every fragment: its units' partials reused, the rest computed (build, load, tune, stream, free),
each unit's result checked and saved; the budget check and the per-model fault policy. Returns a ``ModelRun``: the
model's typed result and, when it finished everywhere, its sum maps for the ensemble.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import plan
from .budget import BudgetSkip, EtaMonitor
from .claims import Claims
from .compiling import compile_model
from .config import ModelSpec
from .errors import DeviceError, ModelRunError, UserError
from .fragments import open_volume
from .models import build_model
from .models.checkpoint import load_weights, state_shapes
from .models.swin_attention import freeze_window_bias
from .partials import PartialStore
from .plan import FragmentPlan, Unit, Weights
from .predict import PredictStats, predict_fragment
from .progress import RunProgress
from .raster import is_large
from .results import PARTIAL_REUSED, PARTIAL_SAVED, FragmentResult, ModelResult
from .runtime import Runtime, gpu_peaks_gib, host_peak_gib
from .stop import Interrupted, StopRequest
from .tiling import spread_sample
from .tuning import tune

log = logging.getLogger(__name__)

# What a model may be skipped for: what a model can cause. Its forward failing (``GuardedModel`` turns that into a
# ModelRunError), its weights going bad mid-run, non-finite outputs beyond ``--max-nonfinite``, and out of memory
# after the batch was halved. Anything else is a bug in ink_infer: it keeps its traceback and ends the run.
MODEL_ERRORS = (ModelRunError, torch.cuda.OutOfMemoryError)


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


# in ``ModelRun.sums``: a large fragment's unit, read back from its partial to be merged
IN_STORE = "in the partials"


@dataclass
class ModelRun:
    """What ``run_model`` hands back: the model's result and, when it is ``ok`` in a full run, its sum maps by
    unit id (fixed-point int64 on the unit's block rows, ``Unit.block_rows``; all units or none, or with
    ``claims`` the units this worker took). A unit of a large fragment (``raster.is_large``) whose partial is saved
    is ``IN_STORE`` instead: a model's sums over a scroll segment are never all in memory."""

    result: ModelResult
    sums: dict[str, np.ndarray | str] = field(default_factory=dict)


def _held(unit: Unit, sum_map: np.ndarray, saved: bool) -> np.ndarray | str:
    """What ``ModelRun.sums`` keeps of a unit: its map, or ``IN_STORE`` for a large fragment's saved unit."""
    return IN_STORE if saved and is_large(unit.fragment.shape) else sum_map


class RunEnded(Exception):
    """The run ends during this model (a stop request, data gone bad, a device failure, ``--on-model-error
    fail``): ``result`` is what the model did until then, ``cause`` what ended it (re-raised by the pipeline)."""

    def __init__(self, result: ModelResult, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.result, self.cause = result, cause


def cuda_poisoned(e: BaseException) -> bool:
    """A CUDA error (illegal access, device-side assert, launch failure) leaves the context unusable."""
    accel = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises this for CUDA errors
    return (accel is not None and isinstance(e, accel)) or "CUDA error" in str(e)


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


def expected_state(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The model's ``{key: shape}``, built on the meta device (no memory, ~0.2 s for a reference config)."""
    with torch.device("meta"):
        return state_shapes(build_model(spec))


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


def fragment_result(stats: PredictStats, device: torch.device) -> FragmentResult:
    per_window = stats.seconds / stats.windows if stats.windows else None
    return FragmentResult(
        windows=stats.windows, seconds=stats.seconds, ms_per_window=per_window * 1000 if per_window else None,
        wait_read_s=stats.wait_read_s, nonfinite_windows=stats.nonfinite_windows, batch_size=stats.batch_size,
        first_batch_s=stats.first_batch_s, oom_retries=stats.oom_retries, device=str(device),
        batch_ms_per_window=stats.batch_ms_per_window,
    )  # fmt: skip


def run_model(
    spec: ModelSpec,
    weights: Weights,
    plans: Sequence[FragmentPlan],
    options: ModelRunOptions,
    runtime: Runtime,
    *,
    stop: StopRequest,
    eta: EtaMonitor | None = None,
    store: PartialStore | None = None,
    progress: RunProgress | None = None,
    claims: Claims | None = None,
) -> ModelRun:
    """One model over every fragment: partials reused (from ``store``, unless ``options.fresh``), the rest computed
    and saved there (``progress`` shown as they run). A model that would end past ``eta``'s deadline is skipped;
    a failing one is recorded and skipped (``RunEnded`` with ``--on-model-error fail``). ``RunEnded`` also carries
    a stop request, data that went bad and a device failure up, with what the model did until then.

    ``claims``: a worker of a shared queue computes only the units it takes there (the model is not even loaded
    when it takes none); its result and sums then hold those units only."""
    result = ModelResult(
        spec.name, spec.arch, "running", random_weights=weights.path is None, sha256=weights.sha256
    )
    units = [Unit(spec, weights, p) for p in plans]
    sums: dict[str, np.ndarray] = {}
    if runtime.on_cuda:
        torch.cuda.reset_peak_memory_stats(runtime.device)
    t_model = time.perf_counter()
    try:
        if claims is not None:  # a worker of a shared queue: the merge reads the partials, not this process
            todo = _free_units(units, None if options.fresh else store, claims, result)
        else:
            if store is not None and not options.fresh:
                sums.update(_reuse_partials(units, store, result))
            todo = [u for u in units if u.fragment.id not in sums]
        if progress is not None:
            progress.start_model(spec.name, sum(unit_windows(u, options) for u in todo))
        if todo:
            sums.update(_compute(spec, weights, todo, options, runtime, result, stop=stop, eta=eta, store=store,
                                 progress=progress, claims=claims))  # fmt: skip
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


def _measured(result: ModelResult, runtime: Runtime, t_model: float) -> ModelResult:
    result.seconds = time.perf_counter() - t_model
    result.gpu_peak_gib = gpu_peaks_gib(runtime.device)
    result.host_peak_gib = host_peak_gib()
    return result


def _compute(
    spec: ModelSpec,
    weights: Weights,
    todo: list[Unit],
    options: ModelRunOptions,
    runtime: Runtime,
    result: ModelResult,
    *,
    stop: StopRequest,
    eta: EtaMonitor | None,
    store: PartialStore | None,
    progress: RunProgress | None = None,
    claims: Claims | None = None,
) -> dict[str, np.ndarray]:
    """Build and load the model, tune it, run the units ``todo`` (with ``claims``: those it takes, the first of
    them before the model is loaded), free it. Returns their sum maps by fragment."""
    if claims is not None:
        first = next((i for i, u in enumerate(todo) if claims.take(u)), None)
        if first is None:  # every unit was taken by other workers meanwhile: nothing to load the model for
            return {}
        todo = todo[first:]
    model = None
    try:
        try:
            model, info = load_model(spec, weights.path, device=runtime.device, dtype=runtime.dtype)
        except UserError as e:  # checked at the start, so the file changed since: this model's failure alone
            raise ModelRunError(f"weights unusable mid-run: {e}") from None
        model = GuardedModel(model)
        result.load = info
        if weights.path is None:
            log.warning("model %s: random weights (--allow-random-weights)", spec.name)
        elif info["sha256"] != weights.sha256:
            raise ModelRunError(f"{weights.path}: changed since it was checked at the start of the run")
        tuning = tune(
            model, spec, device=runtime.device, dtype=runtime.dtype, gpu_mem_gb=options.gpu_mem_gb,
            requested=options.batch_size,
        )  # fmt: skip
        result.tuning = tuning.as_dict()
        if eta is not None and tuning.s_per_window is not None:
            eta.check(sum(u.windows for u in todo) * tuning.s_per_window, "by its probe")
        model.inner, compile_s, eager_why = compile_model(  # after the check: no compile for a skipped model
            model.inner, options.compile, _example_batch(spec, tuning.batch_size, runtime)
        )
        result.tuning.update(compile=options.compile if eager_why is None else "none", compile_s=compile_s,
                             compile_note=eager_why)  # fmt: skip
        sums = {}
        windows_left = sum(u.windows for u in todo)
        done = _Done()
        for n, unit in enumerate(todo):
            stop.check()
            if claims is not None and n > 0 and not claims.take(unit):
                windows_left -= unit.windows  # another worker computes it
                continue
            sum_map, stats = _run_unit(
                model, unit, options, runtime, tuning.batch_size, stop, eta, windows_left, progress, done,
                fixed_batch=eager_why is None and options.compile != "none",
            )  # fmt: skip
            windows_left -= unit.windows
            done.windows, done.seconds = done.windows + stats.windows, done.seconds + stats.seconds
            frag = fragment_result(stats, runtime.device)
            result.fragments[unit.fragment.id] = frag
            result.warnings.extend(
                check_outputs(spec.name, unit.fragment.id, frag, limit=options.max_nonfinite)
            )
            if store is not None:
                frag.partial = store.save(unit, sum_map, frag) or PARTIAL_SAVED
            sums[unit.fragment.id] = _held(unit, sum_map, frag.partial == PARTIAL_SAVED)
            del sum_map
        return sums
    finally:
        # careful release: once per model, not per batch (empty_cache is slow when overused)
        del model
        gc.collect()
        if runtime.on_cuda:
            torch.cuda.empty_cache()


@dataclass
class _Done:
    """The model's units finished so far in this pass: windows and predict seconds (the progress figures)."""

    windows: int = 0
    seconds: float = 0.0


def _run_unit(
    model: torch.nn.Module,
    unit: Unit,
    options: ModelRunOptions,
    runtime: Runtime,
    batch_size: int,
    stop: StopRequest,
    eta: EtaMonitor | None,
    windows_left: int,
    progress: RunProgress | None = None,
    done: _Done | None = None,
    *,
    fixed_batch: bool = False,
) -> tuple[np.ndarray, PredictStats]:
    """One unit through ``predict_fragment`` (in a dry run only a spread sample of its windows); ``windows_left``:
    this model's windows still to run, this unit's included (the budget check projects them); ``done``: what the
    model's earlier units did (``progress`` counts over the model)."""
    done = done or _Done()
    frag = unit.fragment
    origins, ops = frag.origins, frag.ops
    if options.dry_run:
        idx = spread_sample(len(origins), options.max_windows)
        origins, ops = origins[idx], ops[idx]

    def on_batch(stats: PredictStats) -> None:
        stop.check()  # SIGTERM / SIGINT: stop between two batches
        if progress is not None:
            progress.update(done.windows + stats.windows, done.seconds + stats.seconds)
        if eta is not None:
            # the first slab is a tile's height of rows, the later ones a stride's: on a wide segment its read
            # and preparation alone would project hours for the few warm-up batches they are spread over
            eta.after_batch(
                batches=stats.batches, windows=stats.windows, seconds=stats.seconds - stats.setup_s,
                windows_left=windows_left - stats.windows,
            )  # fmt: skip

    try:
        with open_volume(frag.fragment) as volume:
            return predict_fragment(
                model, unit.model, volume, frag.touched, origins, ops, device=runtime.device, dtype=runtime.dtype,
                batch_size=batch_size, tta=options.tta, row_blocks=unit.block_rows(), timed=options.dry_run,
                on_batch=on_batch, fixed_batch=fixed_batch,
            )  # fmt: skip
    except OSError as e:  # the data went away or went bad mid-run: no model can read it
        raise UserError(f"{frag.fragment.path}: cannot read ({e.strerror or e})") from None


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


def _free_units(
    units: list[Unit], store: PartialStore | None, claims: Claims, result: ModelResult
) -> list[Unit]:
    """A worker's units still free in the queue and without a partial; one with its partial (from an earlier run)
    is taken and recorded as reused, its blocks left on disk for the merge."""
    free = []
    for unit in units:
        if not claims.free(unit):
            continue
        frag = store.saved_result(unit) if store is not None else None
        if frag is None:
            free.append(unit)
        elif claims.take(unit):
            frag.partial = PARTIAL_REUSED
            result.fragments[unit.fragment.id] = frag
    return free


def _reuse_partials(units: list[Unit], store: PartialStore, result: ModelResult) -> dict[str, np.ndarray]:
    """The sum maps of the units that earlier runs with the same key left in the store, by fragment id (a large
    fragment's as ``IN_STORE``: read back when merged)."""
    found: dict[str, np.ndarray] = {}
    for unit in units:
        frag_id = unit.fragment.id
        sum_map, frag, why = store.load(unit)
        if sum_map is None:
            if why is not None:
                result.ignored_partials.append([frag_id, why])
                log.info("partial of %s on %s not used: %s", unit.model.name, frag_id, why)
            continue
        frag.partial = PARTIAL_REUSED
        found[frag_id] = _held(unit, sum_map, True)
        del sum_map
        result.fragments[frag_id] = frag
        result.warnings.extend(check_outputs(unit.model.name, frag_id, frag))
    if found:
        log.info(
            "model %s: %d of %d fragments from %s", units[0].model.name, len(found), len(units), store.root
        )
    return found
