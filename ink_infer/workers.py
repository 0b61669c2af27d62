"""Many devices, many processes: the units of a run shared out (``plan_shares``), one share computed by one process
(``compute_share``), and the worker processes of ``--devices`` (``run_workers``: the first device's share
computed by the parent itself, one spawned process for each other device).

The workers of ``--devices`` also share a queue (``claims.py``): each starts on its planned share, taking each unit
before it computes it, and when its share is done it takes what is left of the others', from the end of their
schedules (the last model first: what the owner would have come to last), each model's units longest first. So
a worker that starts late (a spawned interpreter's seconds of start-up), runs slower, or dies leaves its units to
the others, and the plan's cost estimates only decide where each worker starts.

Every executor computes units and saves them as partials, and nothing else: the outputs are always built by one
process afterwards, from the partials, summing the model maps in manifest order and the row ranges in row order
(``pipeline.py``). So the submission's bytes do not depend on how many devices, ranks or parts computed the units,
nor on the order they finished in. Each share's result is ``OUT/parts/<label>.json`` (a ``PartReport``), written
after every model, so a share that dies leaves what it did.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write_text
from .budget import EtaMonitor
from .claims import Claims, claim_name
from .config import ModelSpec
from .errors import DeviceError, ModelRunError, UserError
from .model_run import ModelRunOptions, RunEnded, run_model
from .partials import PartialStore, safe_name
from .plan import FragmentPlan, Unit, UnitSettings, Weights, assign, unit_cost
from .progress import RunProgress
from .raster import is_large
from .results import ModelResult, PartReport, json_text
from .rotation import with_rotation
from .segments import LayerChoice
from .stop import Interrupted, StopRequest, signal_name

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the parent looks at its workers and at its stop flag


@dataclass(frozen=True)
class Share:
    """What one process computes: for each model, in manifest order, the units (fragments or row ranges) it runs."""

    label: str
    device: str
    models: tuple[tuple[ModelSpec, Weights, tuple[FragmentPlan, ...]], ...]
    # the other shares' units, in the order this process takes them once its own are done (``own_and_spare``)
    spare: tuple[tuple[ModelSpec, Weights, tuple[FragmentPlan, ...]], ...] = ()

    @property
    def units(self) -> list[list[str]]:
        return [[spec.name, item.id] for spec, _, items in self.models for item in items]


def model_flops(spec: ModelSpec) -> float:
    """FLOPs of one window through the model, counted on the meta device (no memory, no weights: ~0.3 s)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .models import build_model

    with torch.device("meta"):
        model = build_model(spec).eval()
        x = torch.empty(1, spec.n_slices, spec.side, spec.side)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def plan_shares(
    models: Sequence[tuple[ModelSpec, Weights]], items: Sequence[FragmentPlan], devices: Sequence[str], labels
) -> list[Share]:
    """The units (every model over every item) assigned to ``len(devices)`` processes by ``plan.assign`` over
    their estimated costs. Deterministic: the same inputs give the same shares on every rank and in every part."""
    flops = {spec.name: model_flops(spec) for spec, _ in models}
    units = [(m, i) for m in range(len(models)) for i in range(len(items))]
    costs = [unit_cost(len(items[i].origins), flops[models[m][0].name]) for m, i in units]
    owner = assign(costs, len(devices))
    shares = []
    for w, device in enumerate(devices):
        own = {(models[m][0].name, items[i].id) for (m, i), o in zip(units, owner, strict=True) if o == w}
        shares.append(Share(labels[w], device, *own_and_spare(models, items, own)))
    return shares


def own_and_spare(models, items: Sequence[FragmentPlan], own: set[tuple[str, str]]):
    """A share's groups (model, weights, items): its ``own`` (model name, unit id) pairs by model in manifest
    order, and every other unit as the spare it takes from the others once its own are done, the last model
    first (what the owners would come to last). Within a model the units go longest first (most windows; ties in
    plan order), for the owner and the others alike: the last units anyone takes are the shortest."""
    longest_first = sorted(items, key=lambda item: -len(item.origins))  # a stable sort: ties keep plan order
    mine, spare = [], []
    for spec, weights in models:
        taken = tuple(item for item in longest_first if (spec.name, item.id) in own)
        rest = tuple(item for item in longest_first if (spec.name, item.id) not in own)
        if taken:
            mine.append((spec, weights, taken))
        if rest:
            spare.append((spec, weights, rest))
    return tuple(mine), tuple(reversed(spare))


def claims_dir(out: Path) -> Path:
    """The shared queue's folder of a ``--devices`` run (removed when its workers have ended)."""
    return out / "parts" / "claims"


def part_path(out: Path, label: str) -> Path:
    return out / "parts" / f"{safe_name(label)}.json"


def write_part(out: Path, part: PartReport) -> None:
    """The share's ``PartReport``, atomically (a progress note: a full disk is logged, not fatal)."""
    from .runtime import host_peak_gib

    part.host_peak_gib = host_peak_gib()
    path = part_path(out, part.label)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json_text(dataclasses.asdict(part)))
    except OSError as e:
        log.warning("%s: cannot write (%s)", path, e.strerror or e)


def read_parts(out: Path) -> list[PartReport]:
    """Every ``OUT/parts/*.json`` that reads as a PartReport (others are left alone)."""
    import json

    parts = []
    for path in sorted((out / "parts").glob("*.json")):
        try:
            parts.append(PartReport.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError, KeyError):
            log.warning("%s: unreadable part report, ignored", path)
    return parts


def compute_share(
    share: Share,
    options: ModelRunOptions,
    runtime,
    *,
    stop: StopRequest,
    store: PartialStore,
    eta: EtaMonitor | None,
    out: Path,
    progress: RunProgress | None = None,
    claims: Claims | None = None,
) -> PartReport:
    """Run the share's units model by model, saving each as a partial; ``OUT/parts/<label>.json`` after every
    model. Raises what ends a run (``RunEnded``'s cause) after recording it in the part report.

    ``claims``: the queue of a ``--devices`` run. The share's units are computed only when taken there, and then
    the other shares' units that are still free (``Share.spare``)."""
    part = PartReport(share.label, share.device)
    t0 = time.perf_counter()
    groups = share.models + (share.spare if claims is not None else ())
    try:
        for spec, weights, items in groups:
            stop.check()
            if claims is not None and not any(claims.free(Unit(spec, weights, item)) for item in items):
                continue
            done = run_model(spec, weights, items, options, runtime, stop=stop, eta=eta, store=store,
                             progress=progress, claims=claims)  # fmt: skip
            if done.result.status == "ok" and not done.result.fragments:
                continue  # the others took every unit of it first
            part.models.append(done.result)
            part.seconds = time.perf_counter() - t0
            write_part(out, part)
            if claims is not None and done.result.status in ("failed", "skipped"):
                _close_model(claims, spec, groups)  # it joins the ensemble nowhere
        part.status = "ok"
    except RunEnded as e:
        part.models.append(e.result)
        part.status, part.error, part.error_kind = _ended(e.cause)
        raise e.cause from None
    except Interrupted as e:
        part.status, part.error, part.error_kind = _ended(e)
        raise
    finally:
        part.seconds = time.perf_counter() - t0
        write_part(out, part)
    return part


def _close_model(claims: Claims, spec: ModelSpec, groups) -> None:
    """Take every unit of a model that failed or was skipped here, so that no other worker computes one."""
    for g_spec, weights, items in groups:
        if g_spec.name == spec.name:
            for item in items:
                claims.take(Unit(spec, weights, item))


def share_progress(share: Share, *, every: float, quiet: bool) -> RunProgress:
    """Progress lines of one worker, part or rank, prefixed with its label (never bars: several processes share
    the terminal)."""
    windows = sum(len(item.origins) for _, _, items in share.models for item in items)
    n = len(share.models)
    return RunProgress(n, windows // max(n, 1), every=every, quiet=quiet, label=share.label, tty=False)


def _ended(cause: BaseException) -> tuple[str, str, str | None]:
    if isinstance(cause, Interrupted):
        return "interrupted", str(cause), None
    kind = {UserError: "user", ModelRunError: "model", DeviceError: "device"}.get(type(cause), "internal")
    return "failed", str(cause).splitlines()[0] if str(cause) else type(cause).__name__, kind


# --- one spawned process per device (--devices) --------------------------------------------------------------


@dataclass(frozen=True)
class WorkerInputs:
    """What a worker re-plans the run from (the same arithmetic as the parent's, so the same units)."""

    data: Path
    manifest: Path
    stride: int
    tta: str
    unit_windows: int
    weights: dict[str, Weights]  # checked by the parent at the start
    layers: LayerChoice = LayerChoice()  # a segment's 65 layers
    rotate: int = 0  # --rotate
    out: Path | None = None  # where the turned slices are cached (OUT/rotated)


@dataclass(frozen=True)
class WorkerJob:
    """A worker's instructions: a few KB, so that the parent's write of them never blocks (multiprocessing's spawn
    writes them into a pipe the parent itself holds open; a child killed before reading a payload larger than the
    pipe would hang the parent). The worker re-plans its share from ``inputs``."""

    label: str
    device: str
    units: list[list[str]]  # [model name, unit id]
    inputs: WorkerInputs
    options: ModelRunOptions
    settings: UnitSettings
    out: Path
    partials: Path
    gpu_mem_gb: float
    deadline: (
        float | None
    )  # a perf_counter value: CLOCK_MONOTONIC, the same clock in every process of a machine
    threads: int | None  # CPU workers: torch threads each (one per core)
    quiet: bool = False
    progress_every: float = 60.0
    claims: Path | None = None  # the shared queue's folder (``claims.py``); None: the planned units only

    def share(self) -> Share:
        from .fragments import find_fragments
        from .manifest import load_manifest
        from .plan import plan_run

        manifest = load_manifest(self.inputs.manifest)
        fragments, _ = find_fragments(self.inputs.data, layers=self.inputs.layers)
        fragments = with_rotation(fragments, self.inputs.rotate, self.inputs.out)
        _, items = plan_run(fragments, stride=self.inputs.stride, tta=self.inputs.tta,
                            unit_windows=self.inputs.unit_windows)  # fmt: skip
        models = [(spec, self.inputs.weights[spec.name]) for spec in manifest.models]
        return Share(self.label, self.device, *own_and_spare(models, items, self.planned))

    @property
    def planned(self) -> set[tuple[str, str]]:
        """The (model name, unit id) pairs of its planned share."""
        return {(m, u) for m, u in self.units}

    def claims_view(self) -> Claims | None:
        return None if self.claims is None else Claims(self.claims, self.label, self.planned)


def worker_main(job: WorkerJob) -> None:
    """A worker process: its own device and CUDA context, its share, exit code 0 / 1 / 2 / 128 + signal."""
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s {job.label}: %(message)s")
    import torch

    from .runtime import start_runtime

    if job.threads:
        torch.set_num_threads(job.threads)
    code = 0
    with StopRequest() as stop:
        try:
            share = job.share()
            large = any(is_large(item.shape) for _, _, items in share.models for item in items)
            runtime = start_runtime(job.device, gpu_mem_gb=job.gpu_mem_gb, large=large)
            compute_share(
                share, job.options, runtime, stop=stop, store=PartialStore(job.partials, job.settings),
                eta=None if job.deadline is None else EtaMonitor(job.deadline), out=job.out,
                progress=share_progress(share, every=job.progress_every, quiet=job.quiet),
                claims=job.claims_view(),
            )  # fmt: skip
        except Interrupted as e:
            code = 128 + e.signum
        except UserError:
            code = 2
        except (ModelRunError, DeviceError):
            code = 1
    sys.exit(code)


def run_workers(
    jobs: Sequence[WorkerJob], stop: StopRequest, *, here: Callable[[], PartReport] | None = None
) -> list[PartReport]:
    """Start one spawned process per job, wait for all, and return their part reports (``exitcode`` and
    ``lost`` filled in). A stop request is passed on to every worker (SIGTERM: they stop after their batch).

    ``here``: computes the first job's share in this process meanwhile (the parent is the first device's worker:
    one interpreter, one torch import and one CUDA context fewer); what it raises stops the others, and is
    raised once they have ended."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: its own CUDA context
    for job in jobs:
        part_path(job.out, job.label).unlink(
            missing_ok=True
        )  # a part report of an earlier run is not this one's
    queue = jobs[0].claims  # one folder for the run's workers, or None
    if queue is not None:
        Claims.reset(queue)
    spawned = list(jobs[1:] if here is not None else jobs)
    procs = [ctx.Process(target=worker_main, args=(job,), name=job.label) for job in spawned]
    for p in procs:
        p.start()
    own = []
    try:
        if here is not None:
            own.append(here())
    except BaseException:
        _signal_all(procs)
        _wait(procs, stop)
        raise
    _wait(procs, stop)
    written = read_parts(jobs[0].out)
    holders = None if queue is None else Claims(queue, "").holders()
    everyone = [u for job in jobs for u in job.units]
    parts = own + [
        _reported(job, p, written, everyone, holders) for job, p in zip(spawned, procs, strict=True)
    ]
    if queue is not None:
        shutil.rmtree(queue, ignore_errors=True)  # claims decide who computes, never a resumed run's work
    return parts


def _signal_all(procs) -> None:
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)


def _wait(procs, stop: StopRequest) -> None:
    forwarded = False
    try:
        while any(p.is_alive() for p in procs):
            if stop.signum is not None and not forwarded:
                _signal_all(procs)
                forwarded = True
            time.sleep(POLL_S)
    finally:
        for p in procs:
            p.join()


def _reported(job: WorkerJob, p, written: Sequence[PartReport], everyone, holders) -> PartReport:
    """A finished worker's part report (from ``written``, the run's part reports), with its exit code and the
    units it lost (``lost_units``, over ``everyone``'s planned units and the queue's ``holders``)."""
    mine = [r for r in written if r.label == job.label]
    report = mine[0] if mine else PartReport(job.label, job.device)  # died before its first word
    report.exitcode = p.exitcode
    report.lost = lost_units(report, job.units, everyone, holders)
    if p.exitcode and report.status in ("running", "ok"):  # it died without a word: killed, or crashed
        why = signal_name(-p.exitcode) if p.exitcode < 0 else f"exit code {p.exitcode}"
        report.status, report.error, report.error_kind = "failed", f"the worker died ({why})", "died"
    return report


def lost_units(part: PartReport, planned, everyone, holders: dict[str, str] | None) -> list[list[str]]:
    """The [model, unit] pairs a part lost: of those it was ``planned`` (or, with a shared queue's ``holders``,
    those it took among ``everyone``'s, and its planned ones nobody took), each it did not finish, unless its
    model failed or was skipped there (that model joins the ensemble nowhere)."""
    done = {(m.name, f) for m in part.models if m.status == "ok" for f in m.fragments}
    gone = {m.name for m in part.models if m.status in ("failed", "skipped")}
    if holders is None:
        mine = list(planned)
    else:
        taken = [u for u in everyone if holders.get(claim_name(*u)) == part.label]
        mine = taken + [u for u in planned if claim_name(*u) not in holders]
    return [list(u) for u in mine if tuple(u) not in done and u[0] not in gone]


def worker_threads(devices: Sequence[str]) -> int | None:
    """Torch threads per CPU worker: the cores shared out (at least one); None for GPU workers."""
    if not all(d == "cpu" for d in devices):
        return None
    return max(1, (os.cpu_count() or 1) // len(devices))


def failed_models(parts: Sequence[PartReport]) -> dict[str, ModelResult]:
    """Models that failed (or were skipped for the budget) in some part: they join the ensemble nowhere."""
    failed: dict[str, ModelResult] = {}
    for p in parts:
        for m in p.models:
            if m.status in ("failed", "skipped") and m.name not in failed:
                failed[m.name] = m
    return failed
