"""The whole story of a run: fragments and weights checked, each model over each fragment, ensemble, threshold,
RLE, submission.csv, report.json and previews.

Loop order: model-outer, fragment-inner (build one model, load it, run every fragment, free it). Each model
re-reads the fragments from disk, but only its own slices, once per pixel (``stream.py``), in a reader thread that
overlaps the device. Measured on an H200 with the 18 reference configs on a fragment-1-sized input, the device
never waited for the reader (0.0 s of read wait per model, benchmarks/RESULTS.md), so re-reading costs no wall
time, while a model-inner loop would hold 18 models and 18 sum maps at once. Model-outer also gives the budget
check and resume their natural unit: one model (``model_run.py``); the ensemble and the outputs are
``ensemble.py``.

Faults. Everything the user can fix (data, manifest fields, weights failing their hash or not fitting their model,
a stride wider than a model square, an ``--out`` that is unwritable or too full) is found before any compute and
is a ``UserError``. A model that fails while running, for what a model can cause (``model_run.MODEL_ERRORS``), is
recorded in report.json and skipped (``--on-model-error skip``) or ends the run (``fail``); its results join the
ensemble for every fragment or for none. A bug keeps its traceback; a CUDA error (``DeviceError``) ends the run. Windows with NaN or inf outputs are zeroed, counted and reported. Each finished (model, fragment) result is
saved under ``OUT/partials`` (``partials.py``), so a rerun resumes where a crash, a full disk or SIGTERM stopped
it. submission.csv is only ever replaced, atomically, by a complete one: it is absent or valid, never partial.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from .config import BLOCK, RunConfig
from .ensemble import FragmentState, finish, model_count
from .errors import DeviceError, ModelRunError, UserError
from .fragments import Fragment, find_fragments, load_mask, open_volume
from .manifest import Manifest, find_weights, load_manifest, resolve_weights, verify_file
from .model_run import RunContext, Weights, expected_state, run_model
from .models.checkpoint import check_checkpoint
from .partials import PartialStore, fragment_fingerprint
from .report import environment, interrupted_at, interrupted_message, partials_kept, verdicts, write_report
from .runtime import cap_gpu_memory
from .stop import Interrupted, StopRequest
from .tiling import touched_blocks, tta_ops, window_origins

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


# what a run writes besides partials, per fragment: its submission row, two previews, its share of report.json
OUTPUT_BYTES_PER_FRAGMENT = 16 * 2**20


def check_free_space(out: Path, states: list[FragmentState], manifest: Manifest, *, dry_run: bool) -> dict:
    """Free space under ``out`` against what the run will write, before any compute.

    Partials: the covered 32 x 32 blocks of every (model, fragment) as float32 (files already there are replaced,
    so their size counts as free); outputs: ``OUTPUT_BYTES_PER_FRAGMENT``. Too little for the outputs is refused;
    too little for the partials is a warning (they are what a rerun resumes from, not the result). Returns the
    figures for report.json."""
    free = shutil.disk_usage(out).free
    partials = 0
    if not dry_run:
        for spec in manifest.models:
            for s in states:
                partials += int((model_count(s, spec) > 0).sum()) * BLOCK * BLOCK * 4
        partials -= (
            sum(f.stat().st_size for f in (out / "partials").glob("*.npz"))
            if (out / "partials").is_dir()
            else 0
        )
    outputs = OUTPUT_BYTES_PER_FRAGMENT * len(states)
    figures = {"free_bytes": free, "partials_bytes": max(partials, 0), "outputs_bytes": outputs}
    mb = 2**20
    if free < outputs:
        raise UserError(
            f"{out}: {free / mb:.0f} MB free, the outputs need about {outputs / mb:.0f} MB "
            f"(and the partials {max(partials, 0) / mb:.0f} MB): free some space or choose another --out"
        )
    if free < outputs + partials:
        log.warning(
            "%s: %.0f MB free, the partials need about %.0f MB: results that cannot be saved are not kept for a "
            "rerun (the submission is unaffected)", out, free / mb, partials / mb,
        )  # fmt: skip
    return figures


def check_stride(stride: int, manifest: Manifest) -> None:
    """A stride wider than a model's square leaves pixels between its windows without a prediction: refused."""
    narrowest = min(manifest.models, key=lambda m: m.side)
    if stride > narrowest.side:
        raise UserError(
            f"--stride {stride}: wider than the {narrowest.side}-px square of model {narrowest.name!r}, so pixels "
            f"between its windows would get no prediction; use at most {narrowest.side} (reference: 32)"
        )


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
    bad = []
    for spec in manifest.models:  # opened (keys, shapes, hyper-parameters), not loaded: seconds for 18 files
        path = weights[spec.name].path
        if path is None:
            continue
        try:
            expected = expected_state(spec)
        except (RuntimeError, ValueError) as e:  # timm or our builders refusing the entry's configuration
            raise UserError(
                f"{manifest.path}: model {spec.name!r} cannot be built: {e}".splitlines()[0]
            ) from None
        try:
            check_checkpoint(path, spec, expected)
        except UserError as e:  # unreadable files come here too: _safe_load names them
            bad.append(str(e))
    if bad:
        raise UserError("\n".join(bad))  # one line per bad file
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
    check_stride(cfg.stride, manifest)
    threshold = cfg.threshold or manifest.threshold
    fragments, warnings = find_fragments(cfg.data)
    states = [prepare_fragment(f, stride=cfg.stride, tta=cfg.tta) for f in fragments]
    disk = check_free_space(cfg.out, states, manifest, dry_run=cfg.dry_run)
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
        "disk": disk,
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
                report["submission"] = finish(states, cfg, threshold, partials_kept=partials_kept(report))
        except Interrupted as e:
            report.update(status="interrupted", interrupted=interrupted_at(report, e.signum))
            write_report(cfg.out, report, t0, final=False)
            raise Interrupted(e.signum, interrupted_message(report, cfg.out)) from None
        except (ModelRunError, UserError, DeviceError) as e:
            report.update(status="failed", error=str(e))
            write_report(cfg.out, report, t0, final=False)
            raise
        except (
            Exception
        ) as e:  # a bug: the traceback is kept (exit 1), and report.json still ends in a status
            report.update(status="failed", error=f"internal error: {type(e).__name__}: {e}".splitlines()[0])
            write_report(cfg.out, report, t0, final=False)
            raise
    report["status"] = "ok"
    write_report(cfg.out, report, t0, final=True)
    return report
