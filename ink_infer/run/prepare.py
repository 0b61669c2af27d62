"""A run made ready: its options checked, its data found and planned, its weights checked, its device started, and
the option objects below the story built once (``PreparedRun``); and the head of its report.

Everything the user can fix is found here, before any compute, as a ``UserError``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from ink_infer.config import ModelSpec, RunConfig, ThresholdSpec
from ink_infer.engine.compiling import resolve_mode, use_cache_under
from ink_infer.errors import UserError
from ink_infer.manifest import Manifest, sha256_file
from ink_infer.outputs.progress import RunProgress
from ink_infer.outputs.raster import is_large
from ink_infer.outputs.report import FragmentPlanned, PartialsSummary, RunReport
from ink_infer.run.model_run import ModelRunContext, ModelRunOptions
from ink_infer.run.partials import PartialStore
from ink_infer.run.plan import FragmentPlan, UnitSettings, Weights
from ink_infer.run.preflight import Inputs, check_hashes, check_inputs, check_weights
from ink_infer.run.runtime import (
    DistributedRank,
    Runtime,
    environment,
    rank_device,
    resolve_devices,
    start_runtime,
    torchrun_rank,
)
from ink_infer.run.stop import StopRequest
from ink_infer.volumes.remote import is_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checked:
    """A manifest's weights as ``check_weights`` found them (by model name), and the models without a hash."""

    weights: dict[str, Weights]
    unverified: list[str]


def check_manifest_weights(manifest: Manifest, cfg: RunConfig) -> Checked:
    """Every weight file opened and checked against its model (and its sha256, when the manifest has one)."""
    weights = check_weights(manifest, cfg.weights, allow_random=cfg.allow_random_weights)
    return Checked(weights, check_hashes(manifest, weights, require=cfg.require_hashes))


@dataclass(frozen=True)
class StartChecks:
    """What the start found, for the report: free-space figures, models loaded without a hash, warnings (files
    ignored, masks missing, ...), and the ``--compile`` decision (asked, mode, why)."""

    disk: dict
    unverified: list[str]
    warnings: list[str]
    compile: dict
    fetched: dict | None = None  # remote stores: what the start fetched


@dataclass(frozen=True)
class PreparedRun:
    """One run after its checks: the options, the parsed manifest, the models with their checked weights, the
    fragments' plans and the items the units run over (fragments, or their row ranges), this process's device,
    and what the executors share. Built once by ``prepare``; everything below the story reads it."""

    cfg: RunConfig
    manifest: Manifest
    threshold: ThresholdSpec
    models: tuple[tuple[ModelSpec, Weights], ...]
    plans: tuple[FragmentPlan, ...]
    items: tuple[FragmentPlan, ...]
    runtime: Runtime
    rank: DistributedRank | None  # a torchrun rank, or None
    devices: tuple[str, ...]  # --devices, resolved; () without it
    options: ModelRunOptions
    settings: UnitSettings
    checks: StartChecks

    @property
    def mode(self) -> str:
        cfg, rank = self.cfg, self.rank
        if cfg.dry_run:
            return "dry-run"
        if rank is not None:
            return f"rank {rank.rank} of {rank.world_size}"
        if cfg.num_parts > 1:
            return f"part {cfg.part_id} of {cfg.num_parts}"
        return "merge-only" if cfg.merge_only else "submit"

    def store(self) -> PartialStore:
        return PartialStore(self.cfg.partials_dir, self.settings)

    def context(self, stop: StopRequest, **services) -> ModelRunContext:
        """The context a model runs in, in this process (``services``: eta, store, progress, claims, ...)."""
        return ModelRunContext(self.options, self.runtime, stop, **services)

    def progress(self) -> RunProgress:
        """The run's progress display over every model of these items' windows (sampled in a dry run)."""
        cfg = self.cfg
        per_model = sum(
            min(len(i.origins), cfg.max_windows) if cfg.dry_run else len(i.origins) for i in self.items
        )
        return RunProgress(len(self.models), per_model, every=cfg.progress_every, quiet=cfg.quiet)


def prepare(cfg: RunConfig, inputs: Inputs | None = None, checked: Checked | None = None) -> PreparedRun:
    """Check, find, plan and start, in the order that fails cheapest first; ``inputs``: what the torch-free checks
    found (the CLI runs them before importing torch), else found here; ``checked``: the manifest's weights,
    already checked (else checked here)."""
    inputs = inputs if inputs is not None else check_inputs(cfg)
    manifest, plans, items, disk = inputs.manifest, inputs.plans, inputs.items, inputs.disk
    warnings = list(inputs.warnings)
    checked = checked if checked is not None else check_manifest_weights(manifest, cfg)
    weights, unverified = checked.weights, checked.unverified
    rank = torchrun_rank()
    devices = tuple(resolve_devices(cfg.devices)) if cfg.devices else ()
    if rank is not None and (cfg.devices or cfg.num_parts > 1 or cfg.merge_only):
        raise UserError(
            "under torchrun each rank is one part: use it without --devices, --num-parts, --merge-only"
        )
    own_device = devices[0] if devices else rank_device(rank, cfg.device) if rank is not None else cfg.device
    large = any(is_large(p.shape) for p in plans)
    runtime = start_runtime(own_device, gpu_mem_gb=cfg.budget.gpu_mem_gb, large=large)
    compile_mode, compile_why = resolve_mode(cfg.compile, runtime.device)
    if compile_mode != "none":
        use_cache_under(cfg.out)
    for w in warnings:
        log.warning(w)
    options = ModelRunOptions(
        tta=cfg.tta, dry_run=cfg.dry_run, max_windows=cfg.max_windows, batch_size=cfg.batch_size,
        gpu_mem_gb=cfg.budget.gpu_mem_gb, max_nonfinite=cfg.max_nonfinite, on_model_error=cfg.on_model_error,
        fresh=cfg.fresh, compile=compile_mode,
    )  # fmt: skip
    settings = UnitSettings(cfg.stride, cfg.tta, runtime.device.type, runtime.dtype_name, compile_mode)
    return PreparedRun(
        cfg, manifest, cfg.threshold_over(manifest.threshold), tuple((s, weights[s.name]) for s in manifest.models),
        tuple(plans), tuple(items), runtime, rank, devices, options, settings,
        StartChecks(disk, unverified, warnings, {"asked": cfg.compile, "mode": compile_mode, "why": compile_why},
                    inputs.fetched),
    )  # fmt: skip


def start_report(run: PreparedRun, started: str) -> RunReport:
    """The report's head: when, how and on what the run started (provenance: enough to rebuild the command)."""
    cfg, checks = run.cfg, run.checks
    return RunReport(
        status="running", mode=run.mode, started=started, command=list(cfg.argv),
        manifest=str(run.manifest.path.absolute()), manifest_sha256=sha256_file(run.manifest.path),
        data=str(cfg.data) if is_url(cfg.data) else str(cfg.data.absolute()), options=dataclasses.asdict(cfg),
        stride=cfg.stride, tta=cfg.tta, threshold=dataclasses.asdict(run.threshold),
        environment={**environment(run.runtime.device), "compile": checks.compile},
        gpu_memory_fraction=run.runtime.gpu_memory_fraction, disk=checks.disk,
        warnings=checks.warnings, fragments={p.id: FragmentPlanned(list(p.shape), len(p.origins), p.missing_chunks) for p in run.plans},
        partials=PartialsSummary(dir=None if cfg.dry_run else str(cfg.partials_dir.absolute()), fresh=cfg.fresh,
                                 keep=cfg.keep_partials),
        unverified_weights=checks.unverified,
        remote=checks.fetched,
    )  # fmt: skip
