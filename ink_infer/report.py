"""What a run measured: host and GPU memory peaks, environment, per-fragment stats, the dry run's projection and
verdicts, the JSON report, the table, the preview PNGs."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from .atomic import atomic_write_bytes, atomic_write_text
from .config import BLOCK, RunConfig
from .errors import UserError
from .stop import signal_name

log = logging.getLogger(__name__)

GIB = 1024**3
PREVIEW_MAX_SIDE = 1024


def host_peak_gib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux; it cannot be reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def host_current_gib() -> float:
    """Current resident set size, from /proc/self/status (0 where that file does not exist)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return 0.0


def gpu_peaks_gib(device: torch.device) -> dict[str, float] | None:
    """``max_memory_allocated`` / ``max_memory_reserved`` since the last reset, or None off CUDA."""
    if device.type != "cuda":
        return None
    return {
        "allocated": torch.cuda.max_memory_allocated(device) / GIB,
        "reserved": torch.cuda.max_memory_reserved(device) / GIB,
    }


def environment(device: torch.device) -> dict:
    """Versions and hardware, recorded in every report."""
    import timm

    from . import __version__

    env = {
        "ink_infer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def json_text(data: dict) -> str:
    """``data`` as the indented JSON every report file holds."""
    return json.dumps(data, indent=1, default=_jsonable) + "\n"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically (the previous file or the new one, never half of one)."""
    atomic_write_text(path, json_text(data))


def write_report(out: Path, report: dict, t0: float, *, final: bool) -> None:
    """``out/report.json`` with the run's seconds (since ``t0``, a ``perf_counter``) and host peak so far.

    Only the final report is a must (a ``UserError`` if it cannot be written); the others (after each model, on
    a failure or an interruption) are progress notes that a full disk must not turn into a failed run."""
    report["seconds"] = time.perf_counter() - t0
    report["host_peak_gib"] = host_peak_gib()
    try:
        write_json(out / "report.json", report)
    except OSError as e:
        why = e.strerror or str(e)
        if _replace_in_place(out / "report.json", json_text(report)):
            return
        if final:
            done = "submission.csv was written" if "submission" in report else "no submission in a dry run"
            raise UserError(f"{out / 'report.json'}: cannot write ({why}); {done}") from None
        log.warning("%s: cannot write (%s)", out / "report.json", why)


def _replace_in_place(path: Path, text: str) -> bool:
    """Fallback when the atomic write failed (a full disk has no room for a second copy): truncate the old file,
    which frees its blocks, and write the new one there. If even that fails the file is removed, so no stale
    status is ever left behind, and False is returned."""
    try:
        with open(path, "r+" if path.exists() else "w", encoding="utf-8") as f:
            f.truncate(0)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        path.unlink(missing_ok=True)
        return False


def interrupted_at(report: dict, signum: int) -> dict:
    """The report's ``interrupted`` entry: which signal, and the model that was running (None between models)."""
    running = [m["name"] for m in report["models"] if m["status"] in ("running", "interrupted")]
    return {"signal": signal_name(signum), "model": running[-1] if running else None}


def partials_kept(report: dict) -> int:
    """How many (model, fragment) results of this run are in OUT/partials (saved now, or reused from before)."""
    return sum(
        f.get("partial") in ("saved", "reused") for m in report["models"] for f in m["fragments"].values()
    )


def interrupted_message(report: dict, out: Path) -> str:
    """The one line an interrupted run ends with: where it stopped, what is kept, how to resume."""
    where = report["interrupted"]
    during = f" during model {where['model']}" if where["model"] else ""
    kept = partials_kept(report)
    return (
        f"interrupted by {where['signal']}{during}: no submission written; {kept} finished (model, fragment) "
        f"result(s) kept in {out / 'partials'}: rerun the same command to resume"
    )


def _jsonable(o: object) -> object:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (Path, torch.device)):
        return str(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def stats_entry(stats) -> dict:
    """The report's entry for one (model, fragment) pass, from its ``predict.PredictStats``."""
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


def project(
    entry: dict, *, total_windows: int, grid_blocks: int, touched_blocks: int, stride: int, scale_to
) -> dict:
    """A dry run's projection of one model's full run: hours for these fragments and for ``scale_to`` sizes.

    ``total_windows``: windows of a full run over these fragments; ``grid_blocks`` / ``touched_blocks``: blocks of
    their grids / touching their masks (the share of a scaled fragment that would hold windows). The rate leaves
    out the first batch (warm-up: cudnn autotuning, allocator growth) when there are several."""
    frags = entry["fragments"].values()
    windows = sum(f["windows"] for f in frags)
    seconds = sum(
        f["seconds"] - (f["first_batch_s"] if f["windows"] > f["batch_size"] else 0.0) for f in frags
    )
    counted = sum(f["windows"] - (f["batch_size"] if f["windows"] > f["batch_size"] else 0) for f in frags)
    rate = seconds / max(counted, 1) if windows else 0.0
    k = stride // BLOCK
    scaled = {}
    for h, w in scale_to:
        est = (touched_blocks / grid_blocks if grid_blocks else 1.0) * (h // BLOCK) * (w // BLOCK) / (k * k)
        scaled[f"{h}x{w}"] = rate * est / 3600
    return {
        "s_per_window": rate,
        "projected_hours": rate * total_windows / 3600,
        "projected_hours_scaled": scaled,
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


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` is (key, header, format spec) per column."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_preview(path: Path, prob: np.ndarray, ink: np.ndarray, mask: np.ndarray) -> None:
    """PNG of the probability map (left) beside the binary ink mask (right), mask outline in grey.

    prob: ``(H, W)`` float32 in [0, 1]; ink, mask: ``(H, W)`` bool. Downscaled so the longer side is at most 1024.
    The probability panel is contrast-stretched (1st-99th percentile inside the mask).
    """
    h, w = prob.shape
    scale = min(1.0, PREVIEW_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # contrast stretched to the 1st-99th percentile inside the mask: an uncalibrated model's map (all near 0.5)
    # still shows its structure
    inside = prob[mask] if mask.any() else prob.ravel()
    lo, hi = np.percentile(inside, (1, 99)) if inside.size else (0.0, 1.0)
    left = (np.clip((prob - lo) / max(hi - lo, 1e-6), 0, 1) * 255 * mask).astype(np.uint8)
    right = np.where(ink, 255, np.where(mask, 48, 0)).astype(np.uint8)
    left, right = (cv2.resize(a, size, interpolation=cv2.INTER_AREA) for a in (left, right))
    gap = np.full((size[1], 8), 128, dtype=np.uint8)
    img = cv2.applyColorMap(np.hstack([left, gap, right]), cv2.COLORMAP_VIRIDIS)
    _write_png(path, img)


# BGR colours of the truth comparison: found ink, false ink, missed ink, papyrus without ink (outside: black)
TRUTH_COLOURS = {
    "hit": (80, 220, 80),
    "false": (60, 60, 230),
    "missed": (230, 160, 40),
    "papyrus": (60, 60, 60),
}


def write_truth_preview(path: Path, ink: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> None:
    """PNG comparing predicted ``ink`` with ``truth`` (both ``(H, W)`` bool) inside ``mask``: found ink green,
    false ink red, missed ink blue (``TRUTH_COLOURS``), full size."""
    classes = {
        "hit": ink & truth,
        "false": ink & ~truth,
        "missed": ~ink & truth,
        "papyrus": mask & ~ink & ~truth,
    }
    img = np.zeros((*ink.shape, 3), np.uint8)
    for name, where in classes.items():
        img[where] = TRUTH_COLOURS[name]
    _write_png(path, img)


def _write_png(path: Path, img: np.ndarray) -> None:
    """Encode in memory, write atomically: a full disk leaves no half-written image behind."""
    ok, data = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"{path}: could not encode preview")
    atomic_write_bytes(path, data.tobytes())
