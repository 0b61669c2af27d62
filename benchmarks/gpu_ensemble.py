"""The 18-model ensemble on one GPU: throughput, achieved TFLOP/s, GPU memory, and the Kaggle-budget projection.

    python benchmarks/gpu_ensemble.py --out OUT [--size 8181x6330] [--minutes 7] [--models 18]

Writes a fragment-1-sized synthetic test fragment (8181 x 6330 x 65, 6.7 GB of uint16 TIFFs), then runs the real
pipeline (``ink_infer.pipeline.run``) with weights_manifest.json's 18 entries at stride 32 with scheduled TTA in
fp16, random weights (the team's checkpoints are not shipped), under a time budget of ``--minutes``: the budget
check skips whatever would end past it, and those models are projected from their fold0 twin (same architecture,
same cost). FLOPs per window come from ``torch.utils.flop_counter`` on one window of each config.
Prints a table and writes OUT/gpu_ensemble.json and OUT/report.json. Runs on the CPU too, for a smoke test
(``--size 640x640 --models 2``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ink_infer.config import Budget, RunConfig  # noqa: E402
from ink_infer.manifest import load_manifest  # noqa: E402
from ink_infer.models import build_model  # noqa: E402
from ink_infer.pipeline import run  # noqa: E402
from ink_infer.summary import format_table  # noqa: E402
from ink_infer.synthetic import write_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FP16_DENSE_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "T4": 65e12, "P100": 18.7e12}
KAGGLE_T4_TFLOPS = 65e12  # Kaggle's T4, fp16 tensor cores, dense


def write_fast(comp: Path, h: int, w: int) -> Path:
    """A Kaggle-layout test fragment of noise (throughput does not depend on the content), ~10x faster to write
    than the synthetic papyrus: one random uint16 slice rolled by a few rows per slice, an elliptic mask."""
    import cv2
    import numpy as np
    import tifffile

    frag = comp / "test" / "a"
    (frag / "surface_volume").mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(0).integers(10000, 50000, size=(h, w), dtype=np.uint16)
    for z in range(65):
        tifffile.imwrite(frag / "surface_volume" / f"{z:02d}.tif", np.roll(base, 7 * z, axis=0))
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (int(w * 0.47), int(h * 0.47)), 0, 0, 360, 255, -1)
    cv2.imwrite(str(frag / "mask.png"), mask)
    (comp / "sample_submission.csv").write_text("Id,Predicted\na,1 1\n")
    return comp


def flops_per_window(spec, device: torch.device, dtype: torch.dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(spec).to(device=device, dtype=dtype)
    x = torch.randn((1, spec.n_slices, spec.side, spec.side), device=device, dtype=dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    del model
    return float(counter.get_total_flops())


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in FP16_DENSE_PEAK.items() if k in name), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/ink_infer_gpu_bench"))
    p.add_argument("--size", default="8181x6330")
    p.add_argument("--minutes", type=float, default=7.0, help="time budget for the ensemble run itself")
    p.add_argument("--models", type=int, default=18, help="first N manifest entries")
    p.add_argument(
        "--fast-data", action="store_true", help="noise slices and an elliptic mask, written in seconds"
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    h, w = (int(v) for v in args.size.split("x"))
    t0 = time.perf_counter()
    comp = args.work / "vesuvius-challenge-ink-detection"
    if not (comp / "sample_submission.csv").exists():
        comp = (
            write_fast(comp, h, w) if args.fast_data else write_dataset(args.work, test=[("a", h, w)], seed=1)
        )
    print(f"synthetic 65x{h}x{w} ready in {time.perf_counter() - t0:.0f} s", flush=True)

    manifest = load_manifest(ROOT / "weights_manifest.json")
    specs = manifest.models[: args.models]
    sub = args.out / "manifest.json"
    raw = json.loads((ROOT / "weights_manifest.json").read_text())
    raw["models"] = raw["models"][: args.models]
    sub.write_text(json.dumps(raw))
    flops = {}
    for spec in specs:
        key = spec.name.rsplit("_fold", 1)[0]
        if key not in flops:
            flops[key] = flops_per_window(spec, device, dtype)
    print("FLOPs per window (G): " + ", ".join(f"{k}: {v / 1e9:.1f}" for k, v in flops.items()), flush=True)

    cfg = RunConfig(
        data=comp, out=args.out, manifest=sub, allow_random_weights=True, quiet=True, previews=False,
        budget=Budget(hours=args.minutes / 60, safety_margin=0.0),
    )  # fmt: skip
    t_run = time.perf_counter()
    report = run(cfg, fresh=True).as_dict()  # measure, never reuse partials of an earlier run
    run_s = time.perf_counter() - t_run
    summarize(report, flops, peak_flops(device), run_s, args.out)


def summarize(report: dict, flops: dict, peak: float | None, run_s: float, out: Path) -> None:
    rows, by_twin, total_model_s = [], {}, 0.0
    for m in report["models"]:
        key = m["name"].rsplit("_fold", 1)[0]
        frags = list(m["fragments"].values())
        windows = sum(f["windows"] for f in frags)
        secs = sum(f["seconds"] for f in frags)
        wps = windows / secs if secs else None
        tflops = flops[key] * wps / 1e12 if wps else None
        if m["status"] == "ok":
            by_twin[key] = m["seconds"]
            total_model_s += m["seconds"]
        rows.append({
            "name": m["name"], "status": m["status"], "windows": windows, "wps": wps, "tflops": tflops,
            "pct": 100 * tflops * 1e12 / peak if (tflops and peak) else None,
            "batch": (m.get("tuning") or {}).get("batch_size"), "cl": str((m.get("tuning") or {}).get("channels_last")),
            "read_wait": sum(f["wait_read_s"] for f in frags), "seconds": m["seconds"],
            "gpu": (m.get("gpu_peak_gib") or {}).get("reserved"),
        })  # fmt: skip
    projected = sum(
        by_twin.get(m["name"].rsplit("_fold", 1)[0], 0.0) for m in report["models"] if m["status"] != "ok"
    )
    cols = [("name", "model", "s"), ("status", "status", "s"), ("windows", "windows", "d"), ("wps", "win/s", ".0f"),
            ("tflops", "TFLOP/s", ".1f"), ("pct", "% peak", ".1f"), ("batch", "batch", "d"), ("cl", "ch_last", "s"),
            ("read_wait", "read wait s", ".1f"), ("seconds", "model s", ".1f"), ("gpu", "GPU GiB", ".2f")]  # fmt: skip
    print(format_table(rows, cols))
    ens = total_model_s + projected
    t4 = sum(
        flops[m["name"].rsplit("_fold", 1)[0]] * sum(f["windows"] for f in m["fragments"].values())
        for m in report["models"]
        if m["status"] == "ok"
    )
    summary = {
        "rows": rows, "run_seconds": run_s, "models_seconds_measured": total_model_s,
        "models_seconds_projected_for_skipped": projected, "ensemble_seconds": ens,
        "flops_per_window": flops, "host_peak_gib": report["host_peak_gib"], "environment": report["environment"],
        "t4_hours_at_30pct_mfu_measured_models": t4 / (0.3 * KAGGLE_T4_TFLOPS) / 3600,
    }  # fmt: skip
    (out / "gpu_ensemble.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"run {run_s:.0f} s; models measured {total_model_s:.0f} s + projected for skipped {projected:.0f} s "
          f"= ensemble {ens:.0f} s on this GPU; host peak {report['host_peak_gib']:.2f} GiB")  # fmt: skip
    print(f"FLOP-based estimate for the measured models on a Kaggle T4 at 30 % of its fp16 peak: "
          f"{summary['t4_hours_at_30pct_mfu_measured_models']:.2f} h")  # fmt: skip


if __name__ == "__main__":
    main()
