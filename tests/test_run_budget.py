"""The dry run's arithmetic and the budget check, on hand-built results: a projection's rate is the median of the
timed batches less each fragment's warm-up batch, scaled sizes follow the mask's share of the grid and the stride, verdicts add hours
over models and take the largest memory peak, and the ETA check fires once per pass, after the warm-up."""

from __future__ import annotations

import time

import pytest
import torch

from ink_infer.config import Budget
from ink_infer.outputs.report import FragmentResult, ModelResult, Projection
from ink_infer.run import model_run
from ink_infer.run.budget import WARMUP_BATCHES, BudgetSkip, EtaMonitor, project, verdicts
from ink_infer.submit import main
from tests.helpers import report_of, write_manifest


def result(name: str, fragments: dict, status: str = "ok", **kw) -> ModelResult:
    return ModelResult(name, "2.5d", status, fragments=fragments, **kw)


def test_projection_is_the_median_of_the_warm_batches_and_scales_by_mask_share_and_stride():
    m = result("m", {
        # each fragment's first batch is warm-up, left out; one slow batch (900) does not move a median
        "a": FragmentResult(windows=40, seconds=5.0, batch_size=8, batch_ms_per_window=[400, 100, 120, 900, 110]),
        "b": FragmentResult(windows=16, seconds=2.0, batch_size=8, batch_ms_per_window=[300, 130]),
    })  # fmt: skip
    p = project(m, total_windows=3600, grid_blocks=200, touched_blocks=50, stride=64, scale_to=[(3200, 6400)])
    rate = 0.120  # the median of 100, 120, 900, 110, 130 ms
    assert p.s_per_window == pytest.approx(rate)
    assert p.batches == 5
    lo, hi = p.s_per_window_p10_p90
    assert lo == pytest.approx(0.104) and hi == pytest.approx(0.592)  # numpy's linear percentiles
    assert p.projected_hours == pytest.approx(rate * 3600 / 3600)
    # a 3200 x 6400 fragment: 100 x 200 blocks, a quarter of them in the mask, one window per 2 x 2 blocks
    assert p.projected_hours_scaled == {"3200x6400": pytest.approx(rate * 0.25 * 100 * 200 / 4 / 3600)}


def test_a_sample_of_one_batch_per_fragment_counts_those_batches():
    m = result("m", {
        "a": FragmentResult(windows=8, seconds=1.0, batch_size=8, batch_ms_per_window=[125]),
        "b": FragmentResult(windows=4, seconds=0.6, batch_size=8),  # no per-batch figures: its mean
    })  # fmt: skip
    p = project(m, total_windows=100, grid_blocks=1, touched_blocks=1, stride=32, scale_to=[])
    assert p.s_per_window == pytest.approx((0.125 + 0.150) / 2) and p.batches == 2


def test_a_model_with_no_windows_projects_zero():
    p = project(result("m", {"a": FragmentResult()}), total_windows=0, grid_blocks=0, touched_blocks=0, stride=32,
                scale_to=[(64, 64)])  # fmt: skip
    assert p.s_per_window == 0.0 and p.projected_hours == 0.0 and p.projected_hours_scaled == {"64x64": 0.0}


def test_verdicts_add_hours_over_models_take_the_largest_peak_and_name_the_models_that_did_not_run():
    def projected(hours: float, scaled: float) -> Projection:
        return Projection(
            s_per_window=0.1, projected_hours=hours, projected_hours_scaled={"8181x6330": scaled}
        )

    models = [
        result("a", {}, projection=projected(3.0, 4.0), gpu_peak_gib={"allocated": 5.0, "reserved": 9.0},
               host_peak_gib=2.0),
        result("b", {}, projection=projected(4.0, 4.5), gpu_peak_gib={"allocated": 6.0, "reserved": 12.5},
               host_peak_gib=3.5),
        result("c", {}, status="failed", projection=None, host_peak_gib=20.0),  # not counted, but named
    ]  # fmt: skip
    v = verdicts(models, Budget(hours=9.0, host_mem_gb=13.0, gpu_mem_gb=12.0, safety_margin=0.1))
    assert v.hours == pytest.approx(7.0) and v.hours_verdict == "fits"  # 7 h <= 9 h * 0.9
    assert v.budget_hours_after_margin == pytest.approx(8.1)
    assert v.hours_scaled["8181x6330"].hours == pytest.approx(8.5)
    assert v.hours_scaled["8181x6330"].verdict == "OVER"  # 8.5 h > 8.1 h
    assert v.gpu_peak_gib == 12.5 and v.gpu_verdict == "OVER"  # reserved, against --gpu-mem-gb 12
    assert v.host_peak_gib == 3.5 and v.host_verdict == "fits"  # the failed model's 20 GiB is not a verdict
    assert v.models_not_ok == ["c"]


def test_verdicts_without_a_gpu_say_so():
    v = verdicts([result("a", {}, projection=Projection(0.1, 1.0, {}), host_peak_gib=1.0)], Budget())
    assert v.gpu_peak_gib is None and v.gpu_verdict.startswith("n/a")


def test_the_eta_check_fires_once_per_pass_after_the_warm_up_and_projects_what_is_left():
    eta = EtaMonitor(time.perf_counter() + 60)  # one minute left
    eta.check(30, "by its probe")  # fits
    with pytest.raises(BudgetSkip, match="by its probe to end"):
        eta.check(120, "by its probe")
    # 1 s per window so far, 100 windows left: 100 s > 60 s, but only judged at the end of the warm-up
    for batches in range(1, WARMUP_BATCHES):
        eta.after_batch(batches=batches, windows=batches, seconds=batches, windows_left=100)
    with pytest.raises(BudgetSkip, match="at its rate"):
        eta.after_batch(batches=WARMUP_BATCHES, windows=4, seconds=4.0, windows_left=100)
    eta.after_batch(batches=WARMUP_BATCHES + 1, windows=5, seconds=5.0, windows_left=100)  # not judged again
    eta.after_batch(batches=WARMUP_BATCHES, windows=4, seconds=0.4, windows_left=100)  # 10 s left: fits


def test_the_budget_deadline_keeps_the_safety_margin_back():
    eta = EtaMonitor.for_budget(Budget(hours=1.0, safety_margin=0.25), t0=100.0)
    assert eta.deadline == pytest.approx(100.0 + 2700.0)


class KnownCost(torch.nn.Module):
    """A stand-in whose cost is known: ``warmup`` seconds on its first call (lazy initialisation, autotuning),
    then ``per_window`` seconds per window; constant logits (no compute of its own to blur the figures)."""

    def __init__(self, per_window: float, warmup: float) -> None:
        super().__init__()
        self.per_window, self.warmup, self.calls = per_window, warmup, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.per_window * len(x) + (self.warmup if self.calls == 1 else 0.0))
        return torch.zeros((len(x), 1, x.shape[-2] // 32, x.shape[-1] // 32), dtype=x.dtype)


def test_the_dry_run_projects_a_known_cost_full_run(data, tmp_path, monkeypatch) -> None:
    """A dry run's projection against the full run it projects, with a model whose cost is known: the warm-up
    (2.5 s, 50 windows' worth) stays out of the rate, and the projection lands on the full run's time per window."""
    # sleeps long beside the few ms of cutting and stitching, so that a loaded machine moves both runs little
    per_window, warmup = 0.05, 2.5
    monkeypatch.setattr(model_run, "build_model", lambda spec: KnownCost(per_window, warmup))
    manifest = write_manifest(tmp_path / "one.json", lambda m: m["models"].pop())  # m25d alone
    argv = ["--data", str(data), "--manifest", str(manifest), "--allow-random-weights", "--stride", "32",
            "--batch-size", "2", "--quiet", "--no-previews"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "dry"), "--dry-run", "--max-windows", "8"]) == 0
    dry = report_of(tmp_path / "dry")["models"][0]
    projection = dry["projection"]
    timed = [len(f["batch_ms_per_window"]) for f in dry["fragments"].values()]
    assert min(timed) >= 4 and projection["batches"] == sum(timed) - len(timed)  # less each fragment's first
    windows = sum(f["windows"] for f in dry["fragments"].values())
    # the sleep is a floor (cutting and stitching windows add a few ms of their own); the warm-up is left out,
    # where a plain mean would have carried it (warmup / windows more per window)
    assert per_window <= projection["s_per_window"] < per_window + 0.5 * warmup / windows
    sampled = sum(f["seconds"] for f in dry["fragments"].values()) / windows
    assert sampled > per_window + 0.8 * warmup / windows
    lo, hi = projection["s_per_window_p10_p90"]
    assert lo <= projection["s_per_window"] <= hi

    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    full = report_of(tmp_path / "full")["models"][0]
    full_seconds = sum(f["seconds"] for f in full["fragments"].values())
    full_windows = sum(f["windows"] for f in full["fragments"].values())
    assert full_windows > 2 * windows  # the projection reaches past what it sampled
    # what the full run spent on its windows, its one warm-up aside: the figure the projection stands for
    assert projection["projected_hours"] * 3600 == pytest.approx(full_seconds - warmup, rel=0.2)
