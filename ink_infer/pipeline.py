"""The whole story of a run: fragments and weights checked, each model over each fragment, ensemble, threshold,
RLE, submission.csv, report.json and previews.

Loop order: model-outer, fragment-inner (build one model, load it, run every fragment, free it). Each model
re-reads the fragments from disk, but only its own slices, once per pixel (``stream.py``), in a reader thread that
overlaps the device; with full-size models the device is the bottleneck by far (benchmarks/), so re-reading
costs no wall time, while a model-inner loop would hold 18 models and 18 sum maps at once. Model-outer also gives
the budget check and resume their natural unit: one model.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import BLOCK, ModelSpec, RunConfig
from .errors import ModelRunError, UserError
from .fragments import Fragment, Volume, find_fragments, load_mask
from .manifest import Manifest, find_weights, load_manifest, resolve_weights
from .models import build_model
from .models.checkpoint import load_weights
from .predict import PredictStats, predict_fragment
from .report import environment, gpu_peaks_gib, host_peak_gib, write_json, write_preview
from .rle import rle_encode, write_submission
from .stitch import covered_mask, finalize
from .threshold import binarize
from .tiling import coverage_blocks, spread_sample, touched_blocks, tta_ops, window_origins
from .tuning import cap_gpu_memory, tune

log = logging.getLogger(__name__)


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
    mask, warning = load_mask(fragment, shape)
    state_notes = [warning] if warning else []
    touched = touched_blocks(mask)
    origins = window_origins(touched, stride_blocks=stride // BLOCK)
    if min(shape) < 256:
        state_notes.append(
            f"fragment {fragment.id} ({shape[0]}x{shape[1]}) is smaller than one window: zero-padded"
        )
    if len(origins) == 0:
        state_notes.append(f"fragment {fragment.id}: no mask pixel on the 32-pixel grid, empty prediction")
    return FragmentState(
        fragment, shape, mask, touched, origins, tta_ops(len(origins), mode=tta), notes=state_notes
    )


def preflight_weights(manifest: Manifest, cfg: RunConfig) -> dict[str, Path | None]:
    """Every model's weight file resolved (or None for random init when allowed), before any compute."""
    import timm

    paths: dict[str, Path | None] = {}
    for spec in manifest.models:
        if spec.arch == "2.5d" and not timm.is_model(spec.backbone):
            raise UserError(f"{manifest.path}: model {spec.name!r}: unknown timm backbone {spec.backbone!r}")
        if cfg.allow_random_weights:
            # an explicit opt-in for rehearsals without the weights; the report marks each such model
            paths[spec.name] = find_weights(spec, cfg.weights)
        else:
            paths[spec.name] = resolve_weights(spec, cfg.weights)
    return paths


def load_model(
    spec: ModelSpec, path: Path | None, *, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, dict]:
    """Build on CPU, load weights strictly (or seeded random init), move to the device in the run's dtype."""
    torch.manual_seed(0)  # random-init dry runs are reproducible
    model = build_model(spec)
    info = {"random_weights": path is None}
    if path is not None:
        info.update(load_weights(model, path, spec))
    # the reference ran the whole model in float16 on CUDA (weights, BN included) and float32 on CPU
    return model.to(device=device, dtype=dtype).eval(), info


def run(cfg: RunConfig) -> dict:
    """Run the ensemble over every fragment and write the outputs; returns the report dict."""
    t0 = time.perf_counter()
    prepare_out(cfg.out)
    manifest = load_manifest(cfg.manifest)
    threshold = cfg.threshold or manifest.threshold
    fragments, warnings = find_fragments(cfg.data)
    states = [prepare_fragment(f, stride=cfg.stride, tta=cfg.tta) for f in fragments]
    weight_paths = preflight_weights(manifest, cfg)
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
        "models": [],
    }
    deadline = t0 + cfg.budget.hours * 3600 * (1 - cfg.budget.safety_margin)
    for spec in manifest.models:
        entry = run_model(
            spec, weight_paths[spec.name], states, cfg, device=device, dtype=dtype, deadline=deadline
        )
        report["models"].append(entry)
    if cfg.dry_run:
        report["projection"] = verdicts(report["models"], cfg)
    else:
        report["submission"] = finish(states, cfg, threshold)
    report["seconds"] = time.perf_counter() - t0
    report["host_peak_gib"] = host_peak_gib()
    write_json(cfg.out / "report.json", report)
    return report


def run_model(
    spec: ModelSpec,
    path: Path | None,
    states: list[FragmentState],
    cfg: RunConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    deadline: float,
) -> dict:
    """Build, load, tune, run every fragment, free. A model that would end past the budget is skipped; a failing
    one is recorded and skipped (or raised, with ``--on-model-error fail``)."""
    entry: dict = {"name": spec.name, "arch": spec.arch, "status": "ok", "fragments": {}}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_model = time.perf_counter()
    model = None
    try:
        model, info = load_model(spec, path, device=device, dtype=dtype)
        entry.update(info)
        if path is None:
            log.warning("model %s: random weights (--allow-random-weights)", spec.name)
        tuning = tune(
            model,
            spec,
            device=device,
            dtype=dtype,
            gpu_mem_gb=cfg.budget.gpu_mem_gb,
            requested=cfg.batch_size,
        )
        entry["tuning"] = tuning.as_dict()
        total = sum(len(s.origins) for s in states)
        if not cfg.dry_run and tuning.s_per_window is not None:
            _check_eta(total * tuning.s_per_window, deadline, "by its probe")
        results = _run_fragments(
            model, spec, states, cfg, tuning, entry, device=device, dtype=dtype, deadline=deadline
        )
        for s, sum_map in results:
            add_to_ensemble(s, spec, sum_map)
        if cfg.dry_run:
            entry.update(project(entry, states, cfg))
    except BudgetSkip as e:
        entry.update(status="skipped", reason=str(e))
        log.warning("model %s skipped: %s", spec.name, e)
    except (ModelRunError, RuntimeError, ValueError) as e:
        if cfg.on_model_error == "fail":
            raise
        entry.update(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0])
        log.error("model %s failed and is skipped: %s", spec.name, entry["reason"])
    finally:
        # careful release: once per model, not per batch (empty_cache is slow when overused)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    entry["seconds"] = time.perf_counter() - t_model
    entry["gpu_peak_gib"] = gpu_peaks_gib(device)
    entry["host_peak_gib"] = host_peak_gib()
    return entry


def _run_fragments(model, spec, states, cfg, tuning, entry, *, device, dtype, deadline) -> list:
    """Every fragment through ``predict_fragment``; in a dry run only a spread sample of its windows."""
    total = sum(len(s.origins) for s in states)
    done, results = 0, []
    for s in states:
        origins, ops = s.origins, s.ops
        if cfg.dry_run:
            idx = spread_sample(len(origins), cfg.max_windows)
            origins, ops = origins[idx], ops[idx]

        def on_batch(stats: PredictStats, done: int = done) -> None:
            # after a few batches (warm-up behind us) project this model's end from its real rate, once
            if not cfg.dry_run and len(stats.first_batches_s) == 4 and stats.windows > 0:
                stats.first_batches_s.append(0.0)  # mark as checked
                _check_eta(
                    (total - done - stats.windows) * stats.seconds / stats.windows, deadline, "at its rate"
                )

        with open_volume(s.fragment) as volume:
            sum_map, stats = predict_fragment(
                model, spec, volume, s.touched, origins, ops, device=device, dtype=dtype,
                batch_size=tuning.batch_size, tta=cfg.tta, quiet=cfg.quiet, desc=f"{spec.name}/{s.fragment.id}",
                on_batch=on_batch,
            )  # fmt: skip
        done += len(s.origins)
        entry["fragments"][s.fragment.id] = _stats_entry(stats)
        if not cfg.dry_run:
            results.append((s, sum_map))
    return results


def _check_eta(seconds_left: float, deadline: float, how: str) -> None:
    eta = time.perf_counter() + seconds_left
    if eta > deadline:
        raise BudgetSkip(f"projected {how} to end {(eta - deadline) / 60:.1f} min past the time budget")


def project(entry: dict, states: list[FragmentState], cfg: RunConfig) -> dict:
    """A dry run's projection of one model's full run: hours for these fragments and for ``--scale-to`` sizes.

    The rate leaves out the first batch (warm-up: cudnn autotuning, allocator growth) when there are several."""
    frags = entry["fragments"].values()
    windows = sum(f["windows"] for f in frags)
    seconds = sum(
        f["seconds"] - (f["first_batch_s"] if f["windows"] > f["batch_size"] else 0.0) for f in frags
    )
    counted = sum(f["windows"] - (f["batch_size"] if f["windows"] > f["batch_size"] else 0) for f in frags)
    rate = seconds / max(counted, 1) if windows else 0.0
    total = sum(len(s.origins) for s in states)
    grid = sum(s.touched.size for s in states)
    touched = sum(int(s.touched.sum()) for s in states)
    k = cfg.stride // BLOCK
    scaled = {}
    for h, w in cfg.scale_to:
        est = (touched / grid if grid else 1.0) * (h // BLOCK) * (w // BLOCK) / (k * k)
        scaled[f"{h}x{w}"] = rate * est / 3600
    return {"s_per_window": rate, "projected_hours": rate * total / 3600, "projected_hours_scaled": scaled}


def _stats_entry(stats: PredictStats) -> dict:
    per_window = stats.seconds / stats.windows if stats.windows else None
    return {
        "windows": stats.windows,
        "seconds": stats.seconds,
        "ms_per_window": per_window * 1000 if per_window else None,
        "wait_read_s": stats.wait_read_s,
        "nonfinite_windows": stats.nonfinite_windows,
        "batch_size": stats.batch_size,
        "first_batch_s": stats.first_batches_s[0] if stats.first_batches_s else 0.0,
        "oom_retries": stats.oom_retries,
    }


def verdicts(models: list[dict], cfg: RunConfig) -> dict:
    """The dry run's answer: does the full run fit the time, GPU and host budgets (for each projected size)?"""
    ok = [m for m in models if m["status"] == "ok"]
    hours = sum(m.get("projected_hours", 0.0) for m in ok)
    scaled = {
        size: sum(m["projected_hours_scaled"].get(size, 0.0) for m in ok)
        for size in (ok[0]["projected_hours_scaled"] if ok else {})
    }
    gpus = [m["gpu_peak_gib"]["reserved"] for m in ok if m.get("gpu_peak_gib")]
    gpu = max(gpus) if gpus else None
    host = max((m.get("host_peak_gib", 0.0) for m in ok), default=0.0)
    limit = cfg.budget.hours * (1 - cfg.budget.safety_margin)

    def fits(x: float, cap: float) -> str:
        return "fits" if x <= cap else "OVER"

    return {
        "hours": hours,
        "hours_verdict": fits(hours, limit),
        "hours_scaled": {k: {"hours": v, "verdict": fits(v, limit)} for k, v in scaled.items()},
        "budget_hours": cfg.budget.hours,
        "budget_hours_after_margin": limit,
        "gpu_peak_gib": gpu,
        "gpu_verdict": "n/a (no GPU used)" if gpu is None else fits(gpu, cfg.budget.gpu_mem_gb),
        "host_peak_gib": host,
        "host_verdict": fits(host, cfg.budget.host_mem_gb),
        "models_not_ok": [m["name"] for m in models if m["status"] != "ok"],
    }


def add_to_ensemble(state: FragmentState, spec: ModelSpec, sum_map: np.ndarray) -> None:
    """Add ``weight * (sum / count)`` of one model to the fragment's ensemble (each model normalised by its count)."""
    gh, gw = state.touched.shape
    count = coverage_blocks(
        state.origins,
        (gh, gw),
        tile_blocks=spec.tile // BLOCK,
        offset_blocks=spec.offset // BLOCK,
        side_blocks=spec.side // BLOCK,
    )
    prob = finalize(sum_map, count, state.mask)
    if state.ensemble is None:
        state.ensemble = np.zeros(state.shape, dtype=np.float32)
        state.covered_blocks = np.zeros((gh, gw), dtype=bool)
    state.ensemble += np.float32(spec.weight) * prob
    state.covered_blocks |= count > 0
    state.weight_sum += spec.weight


def finish(states: list[FragmentState], cfg: RunConfig, threshold) -> dict:
    """Ensemble mean, percentile threshold, RLE; submission.csv written atomically, previews beside it."""
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
            write_preview(cfg.out / "previews" / f"{s.fragment.id}.png", prob, ink, s.mask)
    write_submission(rows, cfg.out / "submission.csv")
    return {"path": str(cfg.out / "submission.csv"), "fragments": summary}
