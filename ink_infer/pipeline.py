"""The whole story of a run: fragments and weights checked, each model over each fragment, ensemble, threshold,
RLE, submission.csv, report.json and previews.

Loop order: model-outer, fragment-inner (build one model, load it, run every fragment, free it). Each model
re-reads the fragments from disk, but only its own slices, once per pixel (``stream.py``), in a reader thread that
overlaps the device. Measured on an H200 with the 18 reference configs on a fragment-1-sized input, the device
never waited for the reader (0.0 s of read wait per model, benchmarks/RESULTS.md), so re-reading costs no wall
time, while a model-inner loop would hold 18 models and 18 sum maps at once. Model-outer also gives the budget
check and resume their natural unit: one model (``model_run.py``); the ensemble and the outputs are
``ensemble.py``.

Faults. Everything the user can fix (data, manifest, weights failing their hash, an unwritable ``--out``) is found
before any compute and is a ``UserError``. A model that fails while running is recorded in report.json and skipped
(``--on-model-error skip``) or ends the run (``fail``); its results join the ensemble for every fragment or for
none. Windows with NaN or inf outputs are zeroed, counted and reported. Each finished (model, fragment) result is
saved under ``OUT/partials`` (``partials.py``), so a rerun resumes where a crash, a full disk or SIGTERM stopped
it. submission.csv is only ever replaced, atomically, by a complete one: it is absent or valid, never partial.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .config import BLOCK, RunConfig
from .ensemble import FragmentState, finish
from .errors import ModelRunError, UserError
from .fragments import Fragment, find_fragments, load_mask, open_volume
from .manifest import Manifest, find_weights, load_manifest, resolve_weights, verify_file
from .model_run import RunContext, Weights, run_model
from .partials import Interrupted, PartialStore, StopRequest, fragment_fingerprint
from .report import environment, interrupted_at, interrupted_message, verdicts, write_report
from .tiling import touched_blocks, tta_ops, window_origins
from .tuning import cap_gpu_memory

log = logging.getLogger(__name__)


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

    Hashing here costs a read of every file at the start (load_weights reuses the digest while the file's stat is
    unchanged), and buys two things: a corrupt file fails the run in seconds, not at hour 8, and partials can be
    keyed by the weights they came from without loading the model."""
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
