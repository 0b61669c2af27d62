"""One model over every fragment: partials reused, the rest computed (build, load, tune, stream, free), results
checked, saved and handed to the ensemble; the budget check and the per-model fault policy.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelSpec, RunConfig
from .ensemble import FragmentState, add_to_ensemble, model_count
from .errors import DeviceError, ModelRunError, UserError
from .fragments import open_volume
from .models import build_model
from .models.checkpoint import load_weights, state_shapes
from .partials import PartialStore
from .predict import PredictStats, predict_fragment
from .report import gpu_peaks_gib, host_peak_gib, project, stats_entry
from .stop import Interrupted, StopRequest
from .tiling import spread_sample
from .tuning import tune

log = logging.getLogger(__name__)

RANDOM_SEED = 0  # random-init rehearsals are reproducible, and their partials can be keyed by it
# What a model may be skipped for: what a model can cause. Its forward failing (``GuardedModel`` turns that into a
# ModelRunError), its weights going bad mid-run, non-finite outputs beyond ``--max-nonfinite``, and out of memory
# after the batch was halved. Anything else is a bug in ink_infer: it keeps its traceback and ends the run.
MODEL_ERRORS = (ModelRunError, torch.cuda.OutOfMemoryError)


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


class BudgetSkip(Exception):
    """A model's projected end passes the time budget: it is skipped."""


@dataclass(frozen=True)
class Weights:
    """A model's weight file, checked against the manifest at the start (None: random init, when allowed)."""

    path: Path | None
    sha256: str | None

    @property
    def identity(self) -> str:
        return f"sha256:{self.sha256}" if self.path is not None else f"random:seed={RANDOM_SEED}"


@dataclass
class RunContext:
    """What every model of one run shares: where it computes, until when, the stop flag, the partials."""

    device: torch.device
    dtype: torch.dtype
    deadline: float
    stop: StopRequest
    store: PartialStore | None  # None in a dry run: sampled windows are no result to keep
    fresh: bool  # --fresh: partials are written but never read
    partials: dict  # report["partials"]: reused and ignored (model, fragment) pairs


def expected_state(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The model's ``{key: shape}``, built on the meta device (no memory, ~0.2 s for a reference config)."""
    with torch.device("meta"):
        return state_shapes(build_model(spec))


def load_model(
    spec: ModelSpec, path: Path | None, *, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, dict]:
    """Build on CPU, load weights strictly (or seeded random init), move to the device in the run's dtype."""
    torch.manual_seed(RANDOM_SEED)
    model = build_model(spec)
    info = {"random_weights": path is None}
    if path is not None:
        info.update(load_weights(model, path, spec))
    # the reference ran the whole model in float16 on CUDA (weights, BN included) and float32 on CPU
    return model.to(device=device, dtype=dtype).eval(), info


def run_model(
    spec: ModelSpec,
    weights: Weights,
    states: list[FragmentState],
    cfg: RunConfig,
    ctx: RunContext,
    entry: dict,
) -> None:
    """One model over every fragment, filling its report ``entry``: partials reused, the rest computed (build,
    load, tune, run, free), then all of its maps added to the ensemble. A model that would end past the budget is
    skipped; a failing one is recorded and skipped (or ends the run, with ``--on-model-error fail``)."""
    entry.update(random_weights=weights.path is None, sha256=weights.sha256)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t_model = time.perf_counter()
    try:
        results = _reuse_partials(spec, weights, states, ctx, entry)
        todo = [s for s in states if s.fragment.id not in results]
        if todo:
            results.update(_compute(spec, weights, todo, cfg, ctx, entry))
        # report fragments in row order, whether reused or computed
        entry["fragments"] = {s.fragment.id: entry["fragments"][s.fragment.id] for s in states}
        if cfg.dry_run:
            entry.update(_projection(entry, states, cfg))
        else:
            # all fragments or none: a model joins the ensemble everywhere once it has finished everywhere
            for s in states:
                add_to_ensemble(s, spec, results[s.fragment.id])
        entry["status"] = "ok"
    except BudgetSkip as e:
        entry.update(status="skipped", reason=str(e))
        log.warning("model %s skipped: %s", spec.name, e)
    except MODEL_ERRORS as e:
        reason = (str(e) if isinstance(e, ModelRunError) else f"{type(e).__name__}: {e}").splitlines()[0]
        entry.update(status="failed", reason=reason)
        if cfg.on_model_error == "fail":
            raise ModelRunError(f"model {spec.name} failed: {reason} (--on-model-error fail)") from e
        log.error("model %s failed and is skipped: %s", spec.name, reason)
    except Interrupted:
        entry["status"] = "interrupted"
        raise
    except (UserError, DeviceError) as e:  # the data went bad mid-run, or the device failed: ends the run
        entry.update(status="failed", reason=str(e))
        raise
    finally:
        entry["seconds"] = time.perf_counter() - t_model
        entry["gpu_peak_gib"] = gpu_peaks_gib(ctx.device)
        entry["host_peak_gib"] = host_peak_gib()


def _compute(
    spec: ModelSpec, weights: Weights, todo: list[FragmentState], cfg: RunConfig, ctx: RunContext, entry: dict
) -> dict[str, np.ndarray]:
    """Build and load the model, tune it, run the fragments ``todo``, free it. Returns their sum maps by id."""
    model = None
    try:
        try:
            model, info = load_model(spec, weights.path, device=ctx.device, dtype=ctx.dtype)
        except UserError as e:  # checked at the start, so the file changed since: this model's failure alone
            raise ModelRunError(f"weights unusable mid-run: {e}") from None
        model = GuardedModel(model)
        entry.update(info)
        if weights.path is None:
            log.warning("model %s: random weights (--allow-random-weights)", spec.name)
        elif info["sha256"] != weights.sha256:
            raise ModelRunError(f"{weights.path}: changed since it was checked at the start of the run")
        tuning = tune(
            model, spec, device=ctx.device, dtype=ctx.dtype, gpu_mem_gb=cfg.budget.gpu_mem_gb,
            requested=cfg.batch_size,
        )  # fmt: skip
        entry["tuning"] = tuning.as_dict()
        if not cfg.dry_run and tuning.s_per_window is not None:
            _check_eta(sum(len(s.origins) for s in todo) * tuning.s_per_window, ctx.deadline, "by its probe")
        return _run_fragments(model, spec, weights, todo, cfg, tuning.batch_size, ctx, entry)
    finally:
        # careful release: once per model, not per batch (empty_cache is slow when overused)
        del model
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def _run_fragments(
    model: torch.nn.Module,
    spec: ModelSpec,
    weights: Weights,
    todo: list[FragmentState],
    cfg: RunConfig,
    batch_size: int,
    ctx: RunContext,
    entry: dict,
) -> dict[str, np.ndarray]:
    """Every fragment of ``todo`` through ``predict_fragment`` (in a dry run only a spread sample of its windows),
    each result checked and saved as a partial as soon as it is done."""
    total = sum(len(s.origins) for s in todo)
    done, results = 0, {}
    for s in todo:
        ctx.stop.check()
        origins, ops = s.origins, s.ops
        if cfg.dry_run:
            idx = spread_sample(len(origins), cfg.max_windows)
            origins, ops = origins[idx], ops[idx]

        def on_batch(stats: PredictStats, done: int = done) -> None:
            ctx.stop.check()  # SIGTERM / SIGINT: stop between two batches
            # after a few batches (warm-up behind us) project this model's end from its real rate, once
            if not cfg.dry_run and len(stats.first_batches_s) == 4 and stats.windows > 0:
                stats.first_batches_s.append(0.0)  # mark as checked
                rate = stats.seconds / stats.windows
                _check_eta((total - done - stats.windows) * rate, ctx.deadline, "at its rate")

        try:
            with open_volume(s.fragment) as volume:
                sum_map, stats = predict_fragment(
                    model, spec, volume, s.touched, origins, ops, device=ctx.device, dtype=ctx.dtype,
                    batch_size=batch_size, tta=cfg.tta, quiet=cfg.quiet, desc=f"{spec.name}/{s.fragment.id}",
                    on_batch=on_batch,
                )  # fmt: skip
        except OSError as e:  # the data went away or went bad mid-run: no model can read it
            raise UserError(f"{s.fragment.path}: cannot read ({e.strerror or e})") from None
        done += len(s.origins)
        stats_e = stats_entry(stats)
        entry["fragments"][s.fragment.id] = stats_e
        _check_outputs(spec, s.fragment.id, stats_e, entry, limit=cfg.max_nonfinite)
        if not cfg.dry_run:
            failed = ctx.store.save(
                spec, weights=weights.identity, fragment=s.fingerprint, sum_map=sum_map,
                covered=model_count(s, spec) > 0, stats=stats_e,
            )  # fmt: skip
            stats_e["partial"] = failed or "saved"
            results[s.fragment.id] = sum_map
    return results


def _check_outputs(spec: ModelSpec, frag_id: str, stats: dict, entry: dict, *, limit: float = 1.0) -> None:
    """Warn about NaN/inf windows and OOM retries; a model whose NaN/inf windows on a fragment are all of them, or
    more than the ``limit`` fraction (``--max-nonfinite``), has failed."""
    bad, n = stats["nonfinite_windows"], stats["windows"]
    if bad and bad == n:
        raise ModelRunError(f"all {n} windows of fragment {frag_id} gave NaN or inf")
    if bad > limit * n:
        raise ModelRunError(
            f"{bad} of {n} windows of fragment {frag_id} gave NaN or inf, more than --max-nonfinite {limit:g}"
        )
    new = []
    if bad:
        new.append(
            f"model {spec.name}, fragment {frag_id}: {bad} of {n} windows gave NaN or inf: "
            "zeroed (they add 0 to the sum and still count)"
        )
    if stats["oom_retries"]:
        new.append(f"model {spec.name}, fragment {frag_id}: CUDA out of memory, batch size halved")
    for w in new:
        log.warning(w)
    entry.setdefault("warnings", []).extend(new)


def _reuse_partials(
    spec: ModelSpec, weights: Weights, states: list[FragmentState], ctx: RunContext, entry: dict
) -> dict[str, np.ndarray]:
    """The sum maps of this model that earlier runs with the same key left in ``OUT/partials``, by fragment id."""
    found: dict[str, np.ndarray] = {}
    if ctx.store is None or ctx.fresh:
        return found
    for s in states:
        covered = model_count(s, spec) > 0
        sum_map, stats, why = ctx.store.load(
            spec, weights=weights.identity, fragment=s.fingerprint, covered=covered
        )
        if sum_map is None:
            if why is not None:
                ctx.partials.setdefault("ignored", []).append([spec.name, s.fragment.id, why])
                log.info("partial of %s on %s not used: %s", spec.name, s.fragment.id, why)
            continue
        found[s.fragment.id] = sum_map
        entry["fragments"][s.fragment.id] = {**stats, "partial": "reused"}
        _check_outputs(spec, s.fragment.id, stats, entry)
        ctx.partials["reused"].append([spec.name, s.fragment.id])
    if found:
        log.info("model %s: %d of %d fragments from %s", spec.name, len(found), len(states), ctx.store.root)
    return found


def _check_eta(seconds_left: float, deadline: float, how: str) -> None:
    eta = time.perf_counter() + seconds_left
    if eta > deadline:
        raise BudgetSkip(f"projected {how} to end {(eta - deadline) / 60:.1f} min past the time budget")


def _projection(entry: dict, states: list[FragmentState], cfg: RunConfig) -> dict:
    return project(
        entry,
        total_windows=sum(len(s.origins) for s in states),
        grid_blocks=sum(s.touched.size for s in states),
        touched_blocks=sum(int(s.touched.sum()) for s in states),
        stride=cfg.stride,
        scale_to=cfg.scale_to,
    )
