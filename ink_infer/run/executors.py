"""Who computes the units: one interface, ``Executor.compute(run, stop, t0) -> Computed``, over the ways a run
shares its units out.

- ``InProcess``: nobody else; the merge computes every unit itself as it goes (the default, and dry runs).
- ``DeviceWorkers`` (``--devices``): this process and one spawned worker per other device, over a shared queue.
- ``Parts`` (``--num-parts`` / ``--part-id``, or a torchrun rank): this process's share only; a part (and every
  rank but 0) stops there, rank 0 goes on to merge once every rank has passed the barrier.
- ``MergeOnly`` (``--merge-only``): nothing computed; every unit must be in the partials.

Each returns what the other processes did (``Computed``: their part reports, the units they saved, the models that
failed there), which the merge reads; the outputs are always built by one process, from the partials.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ink_infer.errors import UserError
from ink_infer.outputs.report import ModelResult, PartReport, RunReport
from ink_infer.run.budget import EtaMonitor
from ink_infer.run.plan import Unit
from ink_infer.run.prepare import PreparedRun
from ink_infer.run.shares import (
    PART_REPORT_SUFFIX,
    assign,
    claims_dir,
    compute_share,
    failed_models,
    part_path,
    plan_shares,
    read_parts,
    share_progress,
)
from ink_infer.run.stop import Interrupted, RankLost, StopRequest
from ink_infer.run.workers import WorkerJob, WorkerRun, run_workers, worker_threads, write_shares

log = logging.getLogger(__name__)


@dataclass
class Computed:
    """What other processes of this run did before the merge: their part reports, the (model, unit id) pairs they
    computed and saved, the models that failed or were skipped there (they join the ensemble nowhere).
    ``own_part``: this process computed a part and does not merge (a ``--part-id``, a rank other than 0).
    ``ended``: what ends the run once the parts are recorded (a worker's user, model or device error, a stop)."""

    parts: list[PartReport] = field(default_factory=list)
    saved: frozenset[tuple[str, str]] = frozenset()
    failed: dict[str, ModelResult] = field(default_factory=dict)
    own_part: PartReport | None = None
    ended: Exception | None = None

    @classmethod
    def from_parts(cls, parts: list[PartReport]) -> Computed:
        saved = frozenset(
            (m.name, f)
            for p in parts
            for m in p.models
            for f, r in m.fragments.items()
            if r.partial == "saved"
        )
        return cls(list(parts), saved, failed_models(parts))


class Executor(Protocol):
    def compute(self, run: PreparedRun, stop: StopRequest, t0: float) -> Computed: ...

    def report_path(self, out: Path) -> Path:
        """Where this process's report goes: OUT/report.json, but a part's own in OUT/parts."""
        ...


class _Merging:
    """An executor whose process goes on to merge: its report is report.json."""

    def report_path(self, out: Path) -> Path:
        return out / "report.json"


def executor_for(run: PreparedRun) -> Executor:
    """The executor the options and the environment ask for (a dry run samples every model here: ``--devices``
    and torchrun only change its projection)."""
    cfg = run.cfg
    if cfg.dry_run:
        return InProcess()
    if run.rank is not None:
        return Parts(run.rank.world_size, run.rank.rank, torchrun=True)
    if cfg.num_parts > 1:
        return Parts(cfg.num_parts, cfg.part_id, torchrun=False)
    if cfg.merge_only:
        return MergeOnly()
    if len(run.devices) > 1:
        return DeviceWorkers()
    return InProcess()


class InProcess(_Merging):
    def compute(self, run: PreparedRun, stop: StopRequest, t0: float) -> Computed:
        return Computed()


@dataclass(frozen=True)
class Parts:
    """Part ``i`` of ``n``: a ``--part-id`` or a torchrun rank (which waits at a barrier for the others)."""

    n: int
    i: int
    torchrun: bool

    def label(self, j: int) -> str:
        return f"rank {j} of {self.n}" if self.torchrun else f"part {j} of {self.n}"

    def report_path(self, out: Path) -> Path:
        """This part's own report, OUT/parts/<label>.report.json; rank 0 of torchrun merges: report.json."""
        if self.torchrun and self.i == 0:
            return out / "report.json"
        return part_path(out, self.label(self.i)).with_suffix(PART_REPORT_SUFFIX)

    def compute(self, run: PreparedRun, stop: StopRequest, t0: float) -> Computed:
        cfg = run.cfg
        shares = plan_shares(run.models, run.items, [str(run.runtime.device)] * self.n,
                             [self.label(j) for j in range(self.n)])  # fmt: skip
        share = shares[self.i]
        group = _join_group(cfg.budget.hours) if self.torchrun else None
        ctx = run.context(
            stop, eta=EtaMonitor.for_budget(cfg.budget, t0), store=run.store(),
            progress=share_progress(share, every=cfg.progress_every, quiet=cfg.quiet),
        )  # fmt: skip
        try:
            part = compute_share(share, ctx, cfg.out)
        except BaseException:
            if group is not None:  # let the others go on to the merge; what ends this rank is raised as it is
                _barrier(group, raising=False)
            raise
        if group is not None:
            _barrier(group)  # every rank has saved its units (or failed: rank 0 recomputes what is missing)
        if self.torchrun and self.i == 0:
            return Computed.from_parts(read_parts(cfg.out))  # rank 0 merges every rank's units
        return Computed(own_part=part)


def _join_group(hours: float):
    """torch.distributed over gloo (CPU and GPU alike: only a barrier crosses the network), with a timeout as
    long as the run's budget, since ranks reach the barrier when their share is done."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=hours + 1))
    return dist


def _barrier(group, *, raising: bool = True) -> None:
    """Wait for every rank. A rank that ended first (killed, its node gone) breaks gloo's connection: that is a
    ``RankLost`` here (one line, the interrupted status, a rerun resumes), not gloo's traceback."""
    try:
        group.barrier()
    except RuntimeError as e:  # torch.distributed.DistBackendError and gloo's own errors are RuntimeErrors
        log.debug("the barrier failed: %s", e)
        if raising:
            raise RankLost() from None


class MergeOnly(_Merging):
    def compute(self, run: PreparedRun, stop: StopRequest, t0: float) -> Computed:
        """Every unit of every model that did not fail must have its partial; else one line each."""
        computed = Computed.from_parts(read_parts(run.cfg.out))
        store = run.store()
        found = (
            (spec.name, item.id, store.why_missing(Unit(spec, w, item)))
            for spec, w in run.models
            if spec.name not in computed.failed
            for item in run.items
        )
        missing = [f"model {name}, unit {unit}: {why}" for name, unit, why in found if why is not None]
        if missing:
            raise UserError("\n".join(["--merge-only: " + m for m in missing]))
        return computed


class DeviceWorkers(_Merging):
    """One worker per device computes its share: this process the first device's, one spawned process each
    other's; they share a queue (``claims.py``), so the first to finish takes what is left of the others' shares.
    What a dead worker lost is computed by the merge afterwards; a worker's user, model (``--on-model-error
    fail``) or device error ends the run."""

    def compute(self, run: PreparedRun, stop: StopRequest, t0: float) -> Computed:
        cfg, devices = run.cfg, run.devices
        labels = [f"worker {j} ({d})" for j, d in enumerate(devices)]
        shares = plan_shares(run.models, run.items, devices, labels)
        shared = WorkerRun(
            shares=cfg.out / "parts" / "shares.npz", options=run.options, settings=run.settings, out=cfg.out,
            partials=cfg.partials_dir, gpu_mem_gb=cfg.budget.gpu_mem_gb,
            deadline=EtaMonitor.for_budget(cfg.budget, t0).deadline, threads=worker_threads(devices),
            quiet=cfg.quiet, progress_every=cfg.progress_every, claims=claims_dir(cfg.out),
        )  # fmt: skip
        write_shares(shared.shares, shares)
        jobs = [WorkerJob(j, s.label, s.device, s.units, shared) for j, s in enumerate(shares)]

        def here() -> (
            PartReport
        ):  # the first device's share, in this process, one thread per core as the others
            before = torch.get_num_threads()
            if shared.threads:
                torch.set_num_threads(shared.threads)
            try:
                return compute_share(shares[0], jobs[0].context(run.runtime, stop, shares[0]), cfg.out)
            finally:
                torch.set_num_threads(before)

        computed = Computed.from_parts(run_workers(jobs, stop, here=here))
        if stop.signum is not None:
            computed.ended = Interrupted(stop.signum)
            return computed
        for p in computed.parts:
            ends = p.error_kind.ends_the_run() if p.error_kind is not None else None
            if ends is not None:
                computed.ended = ends(f"{p.label}: {p.error}")
                return computed
            if p.lost:
                log.warning("%s: %s; its %d unfinished unit(s) are computed here", p.label, p.error or p.status,
                            len(p.lost))  # fmt: skip
        return computed


def makespan_hours(report: RunReport, run: PreparedRun) -> float | None:
    """A dry run's projected hours on its devices or ranks: the units' projected times shared out as the run
    would (``shares.assign``), the longest share. None on one device (the sum over models)."""
    workers = run.rank.world_size if run.rank is not None else max(1, len(run.devices))
    if workers == 1:
        return None
    costs = [m.projection.s_per_window * len(item.origins) for m in report.models if m.status == "ok" and m.projection
             for item in run.items]  # fmt: skip
    owner = assign(costs, workers)
    return max(sum(c for c, o in zip(costs, owner, strict=True) if o == w) for w in range(workers)) / 3600
