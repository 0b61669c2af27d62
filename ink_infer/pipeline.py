"""The whole story of a run: fragments and weights checked, each model over each fragment, ensemble, threshold,
RLE, submission.csv, report.json and previews.

Loop order: model-outer, fragment-inner (build one model, load it, run every fragment, free it). Each model
re-reads the fragments from disk, but only its own slices, once per pixel (``stream.py``), in a reader thread that
overlaps the device; with full-size models the device is the bottleneck by far (benchmarks/), so re-reading
costs no wall time, while a model-inner loop would hold 18 models and 18 sum maps at once. Model-outer also gives
the budget check and resume their natural unit: one model.

Faults. Everything the user can fix (data, manifest, weights failing their hash, an unwritable ``--out``) is found
before any compute and is a ``UserError``. A model that fails while running is recorded in report.json and skipped
(``--on-model-error skip``) or ends the run (``fail``); its results join the ensemble for every fragment or for
none. Windows with NaN or inf outputs are zeroed, counted and reported. Each finished (model, fragment) result is
saved under ``OUT/partials`` (``partials.py``), so a rerun resumes where a crash, a full disk or SIGTERM stopped
it. submission.csv is only ever replaced, atomically, by a complete one: it is absent or valid, never partial.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import BLOCK, ModelSpec, RunConfig, ThresholdSpec
from .errors import ModelRunError, UserError
from .fragments import Fragment, Volume, find_fragments, load_mask
from .manifest import Manifest, find_weights, load_manifest, resolve_weights, verify_file
from .models import build_model
from .models.checkpoint import load_weights
from .partials import Interrupted, PartialStore, StopRequest, fragment_fingerprint
from .predict import PredictStats, predict_fragment
from .report import (
    environment,
    gpu_peaks_gib,
    host_peak_gib,
    interrupted_at,
    interrupted_message,
    project,
    stats_entry,
    verdicts,
    write_preview,
    write_report,
)
from .rle import rle_encode, write_submission
from .stitch import covered_mask, finalize
from .threshold import binarize
from .tiling import coverage_blocks, spread_sample, touched_blocks, tta_ops, window_origins
from .tuning import cap_gpu_memory, tune

log = logging.getLogger(__name__)

RANDOM_SEED = 0  # random-init rehearsals are reproducible, and their partials can be keyed by it
# what a running model may raise and be skipped for; anything else is a bug and keeps its traceback
MODEL_ERRORS = (ModelRunError, RuntimeError, ValueError, ArithmeticError)


class BudgetSkip(Exception):
    """A model's projected end passes the time budget: it is skipped."""


@dataclass
class FragmentState:
    """One fragment's windows and the ensemble built over it, model by model."""

    fragment: Fragment
    shape: tuple[int, int]
    mask: np.ndarray  # (H, W) bool
    touched: np.ndarray  # (gh, gw) bool
    origins: np.ndarray  # (N, 2) block coords, reference order
    ops: np.ndarray  # (N,) flip op
    ensemble: np.ndarray | None = None  # (H, W) float32, weighted sum of model probability maps
    covered_blocks: np.ndarray | None = None  # (gh, gw) bool: covered by some model
    weight_sum: float = 0.0
    notes: list[str] = field(default_factory=list)
    fingerprint: dict | None = (
        None  # partials.fragment_fingerprint: what a partial of this fragment is keyed by
    )


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def prepare_out(out: Path) -> None:
    """Create ``out`` and prove it is writable before any compute, so a run never dies at the last step."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".ink_infer_write_test_{id(out)}"
        probe.write_bytes(b"")
        probe.unlink()
        (out / "previews").mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: --out is not writable ({e.strerror or e})") from None


def open_volume(fragment: Fragment) -> Volume:
    """The fragment's slices, refusing any (symlinked) slice that resolves outside the folder of fragments.

    The folder is taken after resolving, so a data mount that is itself a symlink (as Kaggle's may be) is fine.
    """
    return Volume(fragment, root=fragment.path.resolve().parent)


def prepare_fragment(fragment: Fragment, *, stride: int, tta: str) -> FragmentState:
    """Validate the volume (all slices, before any compute), read the mask, plan the windows."""
    with open_volume(fragment) as vol:
        shape = (vol.height, vol.width)
        state_notes = list(vol.warnings)  # files in surface_volume/ that are not slices, ignored
    mask, warning = load_mask(fragment, shape)
    if warning:
        state_notes.append(warning)
    touched = touched_blocks(mask)
    origins = window_origins(touched, stride_blocks=stride // BLOCK)
    if min(shape) < 256:
        state_notes.append(
            f"fragment {fragment.id} ({shape[0]}x{shape[1]}) is smaller than one window: zero-padded"
        )
    if len(origins) == 0:
        state_notes.append(f"fragment {fragment.id}: no mask pixel on the 32-pixel grid, empty prediction")
    return FragmentState(
        fragment, shape, mask, touched, origins, tta_ops(len(origins), mode=tta), notes=state_notes,
        fingerprint=fragment_fingerprint(fragment.id, fragment.path, shape, mask),
    )  # fmt: skip


def preflight_weights(manifest: Manifest, cfg: RunConfig) -> dict[str, Weights]:
    """Every model's weight file resolved inside ``--weights`` and checked (size, sha256), before any compute.

    Hashing here costs a read of every file at the start (load_weights reads it again), and buys two things: a
    corrupt file fails the run in seconds, not at hour 8, and partials can be keyed by the weights they came from
    without loading the model."""
    import timm

    weights: dict[str, Weights] = {}
    for spec in manifest.models:
        if spec.arch == "2.5d" and not timm.is_model(spec.backbone):
            raise UserError(f"{manifest.path}: model {spec.name!r}: unknown timm backbone {spec.backbone!r}")
        if cfg.allow_random_weights:
            # an explicit opt-in for rehearsals without the weights; the report marks each such model
            path = find_weights(spec, cfg.weights)
        else:
            path = resolve_weights(spec, cfg.weights)
        try:
            digest = verify_file(spec, path) if path is not None else None
        except OSError as e:
            raise UserError(f"{path}: cannot read weights ({e.strerror or e})") from None
        weights[spec.name] = Weights(path, digest)
    return weights


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


def run(cfg: RunConfig, *, fresh: bool = False) -> dict:
    """Run the ensemble over every fragment and write the outputs; returns the report dict.

    ``fresh``: compute everything, ignoring partials of earlier runs (they are still written). Raises
    ``UserError`` (bad input, outputs that cannot be written), ``ModelRunError`` (no model finished, or one failed
    under ``--on-model-error fail``) and ``partials.Interrupted`` (SIGTERM / SIGINT); report.json records each.
    """
    t0 = time.perf_counter()
    prepare_out(cfg.out)
    manifest = load_manifest(cfg.manifest)
    threshold = cfg.threshold or manifest.threshold
    fragments, warnings = find_fragments(cfg.data)
    states = [prepare_fragment(f, stride=cfg.stride, tta=cfg.tta) for f in fragments]
    weights = preflight_weights(manifest, cfg)
    device = resolve_device(cfg.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes (the last batch is padded)
    gpu_fraction = cap_gpu_memory(device, cfg.budget.gpu_mem_gb)
    for s in states:
        warnings.extend(s.notes)
    for w in warnings:
        log.warning(w)
    report = {
        "status": "running",
        "mode": "dry-run" if cfg.dry_run else "submit",
        "manifest": str(manifest.path),
        "data": str(cfg.data),
        "stride": cfg.stride,
        "tta": cfg.tta,
        "threshold": {"percentile": threshold.percentile, "region": threshold.region},
        "environment": environment(device),
        "gpu_memory_fraction": gpu_fraction,
        "warnings": warnings,
        "fragments": {s.fragment.id: {"shape": list(s.shape), "windows": len(s.origins)} for s in states},
        "partials": {"dir": None if cfg.dry_run else str(cfg.out / "partials"), "fresh": fresh, "reused": []},
        "models": [],
    }
    deadline = t0 + cfg.budget.hours * 3600 * (1 - cfg.budget.safety_margin)
    with StopRequest() as stop:
        store = PartialStore(
            cfg.out / "partials", stride=cfg.stride, tta=cfg.tta, device=device.type,
            dtype=str(dtype).removeprefix("torch."),
        )  # fmt: skip
        ctx = RunContext(
            device, dtype, deadline, stop, None if cfg.dry_run else store, fresh, report["partials"]
        )
        try:
            for spec in manifest.models:
                stop.check()
                entry = {"name": spec.name, "arch": spec.arch, "status": "running", "fragments": {}}
                report["models"].append(entry)
                run_model(spec, weights[spec.name], states, cfg, ctx, entry)
                report["warnings"].extend(entry.get("warnings", []))
                write_report(cfg.out, report, t0, final=False)  # progress, and what a killed run leaves
            stop.check()
            if cfg.dry_run:
                report["projection"] = verdicts(report["models"], cfg)
            else:
                report["submission"] = finish(states, cfg, threshold)
        except Interrupted as e:
            report.update(status="interrupted", interrupted=interrupted_at(report, e.signum))
            write_report(cfg.out, report, t0, final=False)
            raise Interrupted(e.signum, interrupted_message(report, cfg.out)) from None
        except (ModelRunError, UserError) as e:
            report.update(status="failed", error=str(e))
            write_report(cfg.out, report, t0, final=False)
            raise
    report["status"] = "ok"
    write_report(cfg.out, report, t0, final=True)
    return report


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
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        entry.update(status="failed", reason=reason)
        if cfg.on_model_error == "fail":
            raise ModelRunError(f"model {spec.name} failed: {reason} (--on-model-error fail)") from e
        log.error("model %s failed and is skipped: %s", spec.name, reason)
    except Interrupted:
        entry["status"] = "interrupted"
        raise
    except UserError as e:  # fixable input found mid-run (a checkpoint that does not fit): ends the run
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
        model, info = load_model(spec, weights.path, device=ctx.device, dtype=ctx.dtype)
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
        _check_outputs(spec, s.fragment.id, stats_e, entry)
        if not cfg.dry_run:
            failed = ctx.store.save(
                spec, weights=weights.identity, fragment=s.fingerprint, sum_map=sum_map,
                covered=model_count(s, spec) > 0, stats=stats_e,
            )  # fmt: skip
            stats_e["partial"] = failed or "saved"
            results[s.fragment.id] = sum_map
    return results


def _check_outputs(spec: ModelSpec, frag_id: str, stats: dict, entry: dict) -> None:
    """Warn about NaN/inf windows and OOM retries; a model with no finite window on a fragment has failed."""
    bad, n = stats["nonfinite_windows"], stats["windows"]
    if bad and bad == n:
        raise ModelRunError(f"all {n} windows of fragment {frag_id} gave NaN or inf")
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


def model_count(state: FragmentState, spec: ModelSpec) -> np.ndarray:
    """``(gh, gw)`` int32: how many of the model's squares cover each block of the fragment's grid."""
    return coverage_blocks(
        state.origins,
        state.touched.shape,
        tile_blocks=spec.tile // BLOCK,
        offset_blocks=spec.offset // BLOCK,
        side_blocks=spec.side // BLOCK,
    )


def add_to_ensemble(state: FragmentState, spec: ModelSpec, sum_map: np.ndarray) -> None:
    """Add ``weight * (sum / count)`` of one model to the fragment's ensemble (each model normalised by its count)."""
    count = model_count(state, spec)
    prob = finalize(sum_map, count, state.mask)
    if state.ensemble is None:
        state.ensemble = np.zeros(state.shape, dtype=np.float32)
        state.covered_blocks = np.zeros(state.touched.shape, dtype=bool)
    state.ensemble += np.float32(spec.weight) * prob
    state.covered_blocks |= count > 0
    state.weight_sum += spec.weight


def finish(states: list[FragmentState], cfg: RunConfig, threshold: ThresholdSpec) -> dict:
    """Ensemble mean, percentile threshold, RLE; submission.csv written atomically, previews beside it.

    A preview that cannot be written is a warning; submission.csv that cannot be written is a ``UserError`` and
    leaves the previous file (or none) in place."""
    if not any(s.weight_sum for s in states) and any(len(s.origins) for s in states):
        raise ModelRunError("no model finished: no submission written")
    rows, summary = [], {}
    for s in states:
        prob = s.ensemble / s.weight_sum if s.weight_sum else np.zeros(s.shape, dtype=np.float32)
        if threshold.region == "mask" or s.covered_blocks is None:
            region = s.mask
        else:
            region = covered_mask(s.covered_blocks, s.mask)
        ink, thr = binarize(prob, region, threshold.percentile)
        rows.append((s.fragment.id, rle_encode(ink)))
        summary[s.fragment.id] = {
            "threshold": thr,
            "ink_fraction": float(ink.mean()),
            "region_pixels": int(region.sum()),
        }
        if cfg.previews:
            path = cfg.out / "previews" / f"{s.fragment.id}.png"
            try:
                write_preview(path, prob, ink, s.mask)
            except OSError as e:
                log.warning("%s: preview not written (%s)", path, e.strerror or e)
    path = cfg.out / "submission.csv"
    try:
        write_submission(rows, path)
    except OSError as e:
        raise UserError(
            f"{path}: cannot write ({e.strerror or e}): no new submission written; finished models are kept in "
            f"{cfg.out / 'partials'}, rerun the same command once there is room"
        ) from None
    return {"path": str(path), "fragments": summary}
