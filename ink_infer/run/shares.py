"""Shares of a run's units: who computes what (``plan_shares``), one share computed by one process
(``compute_share``), and the part reports each share leaves in ``OUT/parts/<label>.json``.

Every executor (a ``--devices`` worker, a ``--part-id``, a torchrun rank) computes units and saves them as partials,
and nothing else: the outputs are always built by one process afterwards, from the partials, summing the model maps
in manifest order and the row ranges in row order (``merge.py``). So the submission's bytes do not depend on how
many devices, ranks or parts computed the units, nor on the order they finished in.

The workers of ``--devices`` also share a queue (``claims.py``): each starts on its planned share, taking each unit
before it computes it, and when its share is done it takes what is left of the others', from the end of their
schedules (the last model first: what the owner would have come to last), each model's units longest first. So
a worker that starts late (a spawned interpreter's seconds of start-up), runs slower, or dies leaves its units to
the others, and the plan's cost estimates only decide where each worker starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ink_infer.config import ModelSpec
from ink_infer.errors import ErrorKind
from ink_infer.outputs.atomic import atomic_write_text, note_unwritten
from ink_infer.outputs.progress import RunProgress
from ink_infer.outputs.report import ModelResult, PartReport, json_text
from ink_infer.run.claims import Claims, claim_name
from ink_infer.run.faults import RunEnded
from ink_infer.run.model_run import ModelRunContext, run_model
from ink_infer.run.partials import safe_name
from ink_infer.run.plan import FragmentPlan, Unit, Weights
from ink_infer.run.stop import Interrupted

log = logging.getLogger(__name__)

PART_REPORT_SUFFIX = ".report.json"  # a part's own RunReport beside the PartReports in OUT/parts


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

    from ink_infer.models import build_model

    with torch.device("meta"):
        model = build_model(spec).eval()
        x = torch.empty(1, spec.n_slices, spec.side, spec.side)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def unit_cost(windows: int, flops_per_window: float) -> float:
    """A unit's cost before anything was measured: its windows times its model's FLOPs per window."""
    return float(windows) * flops_per_window


def assign(costs: list[float], workers: int) -> list[int]:
    """Worker of each unit: longest first onto the least-loaded worker (ties: the lower index), deterministic."""
    load = [0.0] * workers
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        w = min(range(workers), key=lambda w: (load[w], w))
        owner[i] = w
        load[w] += costs[i]
    return owner


def plan_shares(
    models: Sequence[tuple[ModelSpec, Weights]], items: Sequence[FragmentPlan], devices: Sequence[str], labels
) -> list[Share]:
    """The units (every model over every item) assigned to ``len(devices)`` processes by ``assign`` over
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
    from ink_infer.run.runtime import host_peak_gib

    part.host_peak_gib = host_peak_gib()
    path = part_path(out, part.label)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json_text(dataclasses.asdict(part)))
    except OSError as e:
        note_unwritten(log, path, e, "cannot write")


def read_parts(out: Path) -> list[PartReport]:
    """Every ``OUT/parts/*.json`` that reads as a PartReport (others are left alone)."""
    parts = []
    for path in sorted((out / "parts").glob("*.json")):
        if path.name.endswith(PART_REPORT_SUFFIX):
            continue  # a part's own report.json, not a share's record
        try:
            parts.append(PartReport.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError, KeyError):
            log.warning("%s: unreadable part report, ignored", path)
    return parts


def compute_share(share: Share, ctx: ModelRunContext, out: Path) -> PartReport:
    """Run the share's units model by model, saving each as a partial; ``OUT/parts/<label>.json`` after every
    model. Raises what ends a run (``RunEnded``'s cause) after recording it in the part report.

    ``ctx.claims``: the queue of a ``--devices`` run. The share's units are computed only when taken there, and
    then the other shares' units that are still free (``Share.spare``)."""
    part = PartReport(share.label, share.device)
    t0 = time.perf_counter()
    claims = ctx.claims
    groups = share.models + (share.spare if claims is not None else ())
    try:
        for spec, weights, items in groups:
            ctx.stop.check()
            if claims is not None and not any(claims.free(Unit(spec, weights, item)) for item in items):
                continue
            done = run_model(spec, weights, items, ctx)
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


def _ended(cause: BaseException) -> tuple[str, str, ErrorKind | None]:
    if isinstance(cause, Interrupted):
        return "interrupted", str(cause), None
    return "failed", str(cause).splitlines()[0] if str(cause) else type(cause).__name__, ErrorKind.of(cause)


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


def failed_models(parts: Sequence[PartReport]) -> dict[str, ModelResult]:
    """Models that failed (or were skipped for the budget) in some part: they join the ensemble nowhere."""
    failed: dict[str, ModelResult] = {}
    for p in parts:
        for m in p.models:
            if m.status in ("failed", "skipped") and m.name not in failed:
                failed[m.name] = m
    return failed
