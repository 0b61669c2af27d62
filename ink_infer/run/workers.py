"""The worker processes of ``--devices``: the first device's share computed by the run's own process, one spawned
process for each other device, each with its own CUDA context; their part reports gathered once they end.

A worker receives its share as the parent planned it (``OUT/parts/shares.npz``, written by the parent just before
the workers start: its models with their checked weights and its items with their masks and windows), so it
neither re-reads the manifest nor re-plans the fragments. The file holds JSON and plain arrays, read back with
``allow_pickle=False``: nothing in it is unpickled, whoever could write to OUT.
"""

from __future__ import annotations

import dataclasses
import json
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

import numpy as np

from ink_infer.config import ModelSpec
from ink_infer.errors import DeviceError, ErrorKind, ModelRunError, UserError
from ink_infer.outputs.atomic import atomic_write
from ink_infer.outputs.raster import is_large
from ink_infer.outputs.report import PartReport
from ink_infer.run.budget import EtaMonitor
from ink_infer.run.claims import Claims
from ink_infer.run.model_run import ModelRunContext, ModelRunOptions
from ink_infer.run.partials import PartialStore
from ink_infer.run.plan import FragmentPlan, UnitSettings, Weights
from ink_infer.run.shares import Share, compute_share, lost_units, part_path, read_parts, share_progress
from ink_infer.run.stop import Interrupted, StopRequest, signal_name
from ink_infer.volumes.fragment import Fragment
from ink_infer.volumes.remote import Remote

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the parent looks at its workers and at its stop flag


@dataclass(frozen=True)
class WorkerRun:
    """What every worker of a run shares: where the shares are, how to run models, where to save, the budget's
    deadline (a perf_counter value: CLOCK_MONOTONIC, the same clock in every process of a machine), torch threads
    per CPU worker (one per core; None on GPUs), the progress lines, and the shared queue's folder."""

    shares: Path
    options: ModelRunOptions
    settings: UnitSettings
    out: Path
    partials: Path
    gpu_mem_gb: float
    deadline: float | None
    threads: int | None
    quiet: bool = False
    progress_every: float = 60.0
    claims: Path | None = None  # None: the planned units only


@dataclass(frozen=True)
class WorkerJob:
    """A worker's instructions: a few KB, so that the parent's write of them never blocks (multiprocessing's spawn
    writes them into a pipe the parent itself holds open; a child killed before reading a payload larger than the
    pipe would hang the parent). ``index``: its share in ``run.shares``."""

    index: int
    label: str
    device: str
    units: list[list[str]]  # [model name, unit id] of its planned share
    run: WorkerRun

    @property
    def planned(self) -> set[tuple[str, str]]:
        """The (model name, unit id) pairs of its planned share."""
        return {(m, u) for m, u in self.units}

    def claims_view(self) -> Claims | None:
        return None if self.run.claims is None else Claims(self.run.claims, self.label, self.planned)

    def share(self) -> Share:
        return read_share(self.run.shares, self.index)

    def context(self, runtime, stop: StopRequest, share: Share) -> ModelRunContext:
        """The context this worker's models run in."""
        run = self.run
        return ModelRunContext(
            run.options, runtime, stop, eta=None if run.deadline is None else EtaMonitor(run.deadline),
            store=PartialStore(run.partials, run.settings),
            progress=share_progress(share, every=run.progress_every, quiet=run.quiet), claims=self.claims_view(),
        )  # fmt: skip


def write_shares(path: Path, shares: Sequence[Share]) -> None:
    """The shares as the workers read them (``read_share``): their models and weights as JSON, their items' windows
    as arrays, each fragment's mask once (its row ranges share it)."""
    items = {item.id: item for share in shares for group in share.models + share.spare for item in group[2]}
    arrays, fragments = {}, {}
    for k, item in enumerate(items.values()):
        arrays[f"origins{k}"], arrays[f"ops{k}"] = item.origins, item.ops
        if item.fragment.id not in fragments:
            fragments[item.fragment.id] = len(fragments)
            arrays[f"mask{fragments[item.fragment.id]}"] = item.mask
            arrays[f"touched{fragments[item.fragment.id]}"] = item.touched
    meta = {
        "items": [{"fragment": _plain(dataclasses.asdict(item.fragment)), "shape": list(item.shape),
                   "notes": item.notes, "fingerprint": item.fingerprint, "missing_chunks": item.missing_chunks,
                   "rows": item.rows, "mask": fragments[item.fragment.id]} for item in items.values()],
        "shares": [{"label": share.label, "device": share.device,
                    "models": [_group(g, list(items)) for g in share.models],
                    "spare": [_group(g, list(items)) for g in share.spare]} for share in shares],
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))


def _plain(d: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _remote(d: dict | None) -> Remote | None:
    """A fragment's ``Remote`` from its JSON form (its option pairs came back as lists)."""
    if d is None:
        return None
    return Remote(d["url"], tuple((k, v) for k, v in d["options"]), d["cache"], d["cache_bytes"])


def _group(group, ids: list[str]) -> list:
    spec, weights, items = group
    return [dataclasses.asdict(spec), {"path": None if weights.path is None else str(weights.path),
                                       "sha256": weights.sha256}, [ids.index(item.id) for item in items]]  # fmt: skip


def read_share(path: Path, index: int) -> Share:
    """Share ``index`` of ``write_shares``' file, as the parent planned it."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"][()]))
        items = []
        for k, d in enumerate(meta["items"]):
            f = {key: tuple(v) if isinstance(v, list) else v for key, v in d["fragment"].items()}
            fragment = Fragment(**{**f, "path": Path(f["path"]), "remote": _remote(f["remote"]),
                                   **{k: None if f[k] is None else Path(f[k]) for k in ("rotate_cache", "mask")}})  # fmt: skip
            items.append(FragmentPlan(
                fragment, tuple(d["shape"]), z[f"mask{d['mask']}"], z[f"touched{d['mask']}"], z[f"origins{k}"],
                z[f"ops{k}"], notes=d["notes"], fingerprint=d["fingerprint"], missing_chunks=d["missing_chunks"],
                rows=None if d["rows"] is None else tuple(d["rows"]),
            ))  # fmt: skip
    share = meta["shares"][index]

    def groups(key: str) -> tuple:
        return tuple(
            (ModelSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}),
             Weights(None if w["path"] is None else Path(w["path"]), w["sha256"]), tuple(items[i] for i in ids))
            for spec, w, ids in share[key]
        )  # fmt: skip

    return Share(share["label"], share["device"], groups("models"), groups("spare"))


def worker_main(job: WorkerJob) -> None:
    """A worker process: its own device and CUDA context, its share, exit code 0 / 1 / 2 / 128 + signal."""
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s {job.label}: %(message)s")
    import torch

    from ink_infer.run.runtime import start_runtime

    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    code = 0
    with StopRequest() as stop:
        try:
            share = job.share()
            large = any(is_large(item.shape) for _, _, items in share.models for item in items)
            runtime = start_runtime(job.device, gpu_mem_gb=job.run.gpu_mem_gb, large=large)
            compute_share(share, job.context(runtime, stop, share), job.run.out)
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
    run = jobs[0].run
    for job in jobs:
        part_path(run.out, job.label).unlink(
            missing_ok=True
        )  # a part report of an earlier run is not this one's
    if run.claims is not None:
        Claims.reset(run.claims)
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
    written = read_parts(run.out)
    holders = None if run.claims is None else Claims(run.claims, "").holders()
    everyone = [u for job in jobs for u in job.units]
    parts = own + [
        _reported(job, p, written, everyone, holders) for job, p in zip(spawned, procs, strict=True)
    ]
    if run.claims is not None:
        shutil.rmtree(
            run.claims, ignore_errors=True
        )  # claims decide who computes, never a resumed run's work
    run.shares.unlink(missing_ok=True)
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
        report.status, report.error, report.error_kind = "failed", f"the worker died ({why})", ErrorKind.DIED
    return report


def worker_threads(devices: Sequence[str]) -> int | None:
    """Torch threads per CPU worker: the cores shared out (at least one); None for GPU workers."""
    if not all(d == "cpu" for d in devices):
        return None
    return max(1, (os.cpu_count() or 1) // len(devices))
