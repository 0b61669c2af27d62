"""The time budget: when a model would end past it (``EtaMonitor``: skipped, before or while it runs), and a dry
run's arithmetic (``project`` one model's full run, ``verdicts`` for the ensemble against every budget).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from ink_infer.config import Budget
from ink_infer.geometry import BLOCK
from ink_infer.outputs.report import ModelResult, Projection, SizeVerdict, Verdicts

WARMUP_BATCHES = (
    4  # a pass's rate is checked once, after these (cudnn autotuning and allocator growth behind it)
)


class BudgetSkip(Exception):
    """A model's projected end passes the time budget: it is skipped."""


class EtaMonitor:
    """Projects each model's end against the deadline: from its probe before it runs, then from its real rate.

    ``deadline`` is a ``time.perf_counter()`` value: the budget less its safety margin, from the run's start."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    @classmethod
    def for_budget(cls, budget: Budget, t0: float) -> EtaMonitor:
        return cls(t0 + budget.hours * 3600 * (1 - budget.safety_margin))

    def check(self, seconds_left: float, how: str) -> None:
        """Raise ``BudgetSkip`` if ``seconds_left`` more from now ends past the deadline."""
        eta = time.perf_counter() + seconds_left
        if eta > self.deadline:
            raise BudgetSkip(
                f"projected {how} to end {(eta - self.deadline) / 60:.1f} min past the time budget"
            )

    def after_batch(self, *, batches: int, windows: int, seconds: float, windows_left: int) -> None:
        """During one (model, fragment) pass: once ``WARMUP_BATCHES`` batches are done, project the model's
        remaining ``windows_left`` (this pass's and the fragments after it) at the pass's rate so far."""
        if batches == WARMUP_BATCHES and windows > 0:
            self.check(windows_left * seconds / windows, "at its rate")


def project(
    result: ModelResult, *, total_windows: int, grid_blocks: int, touched_blocks: int, stride: int, scale_to,
    window_px: int | None = None,
) -> Projection:  # fmt: skip
    """A dry run's projection of one model's full run: hours for these fragments and for ``scale_to`` sizes.

    ``total_windows``: windows of a full run over these fragments; ``grid_blocks`` / ``touched_blocks``: blocks of
    their grids / touching their masks (the share of a scaled fragment that would hold windows); ``window_px``: a
    family whose windows are not on the ``stride`` grid (the GP's): pixels per window. The rate is the
    median time per window over the timed batches, leaving out each fragment's first (warm-up: cudnn autotuning,
    allocator growth, lazy initialisation), since a few slow batches must not flip the verdict; the 10th and 90th
    percentiles say how much the batches varied. A compiled model's compile seconds are added once."""
    rates = warm_rates(result.fragments.values())
    rate = float(np.median(rates)) / 1000 if rates else 0.0
    spread = [float(v) / 1000 for v in np.percentile(rates, (10, 90))] if rates else None
    k = stride // BLOCK
    share = touched_blocks / grid_blocks if grid_blocks else 1.0
    compile_h = ((result.tuning or {}).get("compile_s") or 0.0) / 3600  # once per model (--compile)

    def windows_in(h: int, w: int) -> float:
        return h * w / window_px if window_px else (h // BLOCK) * (w // BLOCK) / (k * k)

    scaled = {f"{h}x{w}": rate * share * windows_in(h, w) / 3600 + compile_h for h, w in scale_to}
    return Projection(
        s_per_window=rate, projected_hours=rate * total_windows / 3600 + compile_h, projected_hours_scaled=scaled,
        batches=len(rates), s_per_window_p10_p90=spread,
    )  # fmt: skip


def warm_rates(fragments) -> list[float]:
    """ms per window of every timed batch but each fragment's first (all of them when none had a second); a
    fragment timed without per-batch figures counts as one batch at its mean rate."""
    warm, first = [], []
    for f in fragments:
        batches = f.batch_ms_per_window
        if not batches:
            batches = [1000 * f.seconds / f.windows] if f.windows else []
        first.extend(batches[:1])
        warm.extend(batches[1:])
    return warm or first


def verdicts(
    models: Sequence[ModelResult], budget: Budget, *, makespan_hours: float | None = None
) -> Verdicts:
    """Does the full run of the models that ran fit the time, GPU and host budgets (for each projected size)?

    Hours add up over models (they run one after the other) unless ``makespan_hours`` gives the longest share of
    several devices; memory is the largest peak of any one model."""
    ok = [m for m in models if m.status == "ok" and m.projection is not None]
    hours = sum(m.projection.projected_hours for m in ok) if makespan_hours is None else makespan_hours
    sizes = ok[0].projection.projected_hours_scaled if ok else {}
    scaled = {size: sum(m.projection.projected_hours_scaled.get(size, 0.0) for m in ok) for size in sizes}
    gpus = [m.gpu_peak_gib["reserved"] for m in ok if m.gpu_peak_gib]
    gpu = max(gpus) if gpus else None
    host = max((m.host_peak_gib for m in ok), default=0.0)
    limit = budget.hours * (1 - budget.safety_margin)

    def fits(x: float, cap: float) -> str:
        return "fits" if x <= cap else "OVER"

    return Verdicts(
        hours=hours,
        hours_verdict=fits(hours, limit),
        hours_scaled={k: SizeVerdict(v, fits(v, limit)) for k, v in scaled.items()},
        budget_hours=budget.hours,
        budget_hours_after_margin=limit,
        gpu_peak_gib=gpu,
        gpu_verdict="n/a (no GPU used)" if gpu is None else fits(gpu, budget.gpu_mem_gb),
        host_peak_gib=host,
        host_verdict=fits(host, budget.host_mem_gb),
        models_not_ok=[m.name for m in models if m.status != "ok"],
    )
