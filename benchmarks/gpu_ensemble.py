"""The 18-model ensemble on one GPU: per config, eager against compiled; then the real pipeline.

    python benchmarks/gpu_ensemble.py --out OUT [--size 8181x6330] [--minutes 9] [--pipeline-minutes 0]

Phase 1, per config (the 9 configs of weights_manifest.json; fold0 and fold1 share one): the model in fp16 with
random weights, tuned as a run tunes it (batch size, memory format, SwinV2 attention kernel: ``tuning.tune``),
then windows/s and TFLOP/s eager, ``torch.compile`` (``--compile-mode``, the fixed batch shape) and its compile
seconds, windows/s and TFLOP/s compiled, % of the fp16 dense peak, and the largest difference of the compiled
logits from the eager ones. A config whose compile would start past ``--minutes`` is left eager (said in the
table). FLOPs per window come from ``torch.utils.flop_counter`` on one window.

Projection: the whole ensemble (each config twice, as its two folds) over a fragment-1-sized fragment at stride 32
with scheduled TTA: its windows (the synthetic fragment's own plan) / windows/s per model, plus one compile per
model, eager and compiled, on this GPU; and on Kaggle's T4 (65 TFLOP/s dense fp16) at the same share of the peak
as measured here (an assumption: the T4's share was never measured).

The GP TimeSformer family (``--gp-size``, 0 skips it): its forward as a run holds it (float32 weights, fp16
autocast) on uint8 tiles, windows/s, TFLOP/s and % of the fp16 peak; then ``predict_gp`` over a synthetic segment
without a mask (the streaming loop around the forward).

Phase 2 (``--pipeline-minutes M``): the real pipeline (``ink_infer.run.pipeline.run``) over that fragment for M
minutes of budget, as before (the budget check skips what would end past it; skipped models are projected from
their fold twin). Writes OUT/gpu_ensemble.json. Runs on the CPU too, for a smoke test
(``--size 640x640 --models 2 --windows 8 --gp-size 128``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ink_infer.config import Budget, RunConfig
from ink_infer.manifest import load_manifest
from ink_infer.models import build_model
from ink_infer.outputs.summary import format_table
from ink_infer.run.pipeline import run
from ink_infer.synthetic.fragments import write_dataset

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


def time_windows(model, x: torch.Tensor, reps: int) -> float:
    """Windows per second of ``model`` on the batch ``x`` over ``reps`` batches, after one warm-up."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        model(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
        sync()
    return reps * len(x) / (time.perf_counter() - t0)


def config_rows(
    specs, device, dtype, *, mode: str, deadline: float, reps: int, windows: int | None
) -> list[dict]:
    """Phase 1: one row per config (the first spec of each), eager and compiled."""
    from ink_infer.engine.compiling import compile_model
    from ink_infer.engine.tuning import tune
    from ink_infer.run.model_run import load_model

    rows, seen = [], set()
    peak = peak_flops(device)
    for spec in specs:
        key = spec.name.rsplit("_fold", 1)[0]
        if key in seen:
            continue
        seen.add(key)
        flops = flops_per_window(spec, device, dtype)
        model, _ = load_model(spec, None, device=device, dtype=dtype)
        tuned = tune(model, spec, device=device, dtype=dtype, gpu_mem_gb=16.0, requested=windows)
        x = torch.randn((tuned.batch_size, spec.n_slices, spec.side, spec.side), device=device).to(dtype)
        eager = time_windows(model, x, reps)
        row = {"config": key, "batch": tuned.batch_size, "channels_last": tuned.channels_last,
               "fused_attention": tuned.fused_attention, "gflop_per_window": flops / 1e9, "eager_wps": eager,
               "eager_tflops": flops * eager / 1e12, "compile_s": None, "compiled_wps": None,
               "compiled_tflops": None, "max_logit_diff": None, "note": None}  # fmt: skip
        if time.perf_counter() > deadline:
            row["note"] = "not compiled: past --minutes"
        else:
            compiled, secs, why = compile_model(model, mode, x)
            row["compile_s"], row["note"] = secs, why
            if why is None:
                row["compiled_wps"] = time_windows(compiled, x, reps)
                row["compiled_tflops"] = flops * row["compiled_wps"] / 1e12
                with torch.inference_mode():
                    row["max_logit_diff"] = float((compiled(x).float() - model(x).float()).abs().max())
            del compiled
        for k in ("eager", "compiled"):
            tf = row[f"{k}_tflops"]
            row[f"{k}_pct"] = 100 * tf * 1e12 / peak if (tf and peak) else None
        rows.append(row)
        print(f"{key}: eager {eager:.0f} win/s; compiled {row['compiled_wps'] or 0:.0f} win/s "
              f"(compile {row['compile_s'] or 0:.0f} s) {row['note'] or ''}", flush=True)  # fmt: skip
        del model, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def project_ensemble(rows: list[dict], specs, windows: int) -> dict:
    """Seconds of the whole ensemble over ``windows`` windows per model, eager and compiled (one compile per
    model), on this device; and on a T4 at the share of the peak measured here (None off a known GPU; compiles
    left out, since they run on the host)."""
    by = {r["config"]: r for r in rows}
    out = {
        "windows_per_model": windows,
        "eager_s": 0.0,
        "compiled_s": 0.0,
        "t4_eager_s": 0.0,
        "t4_compiled_s": 0.0,
    }
    for spec in specs:
        r = by[spec.name.rsplit("_fold", 1)[0]]
        compiled = r["compiled_wps"] is not None
        out["eager_s"] += windows / r["eager_wps"]
        out["compiled_s"] += (
            windows / r["compiled_wps"] + r["compile_s"] if compiled else windows / r["eager_wps"]
        )
        for k in ("eager", "compiled"):
            pct = r[f"{k}_pct"] if (k == "eager" or compiled) else r["eager_pct"]
            if pct is None or out[f"t4_{k}_s"] is None:
                out[f"t4_{k}_s"] = None
            else:
                out[f"t4_{k}_s"] += windows * r["gflop_per_window"] * 1e9 / (pct / 100 * KAGGLE_T4_TFLOPS)
    return out


def gp_row(device: torch.device, *, reps: int, batch: int | None, size: int) -> dict:
    """The GP TimeSformer family (``--manifest gp``): its model as a run holds it (float32 weights, fp16 autocast
    on CUDA) through ``TorchForward`` on uint8 tiles (the upload, the conversion and the sigmoid included), then
    ``predict_gp`` over a synthetic ``size``-px square segment without a mask (the streaming loop around it)."""
    import numpy as np

    from ink_infer.models.gp_family import batch_size
    from ink_infer.models.gp_predict import TorchForward, predict_gp
    from ink_infer.run.model_run import load_model
    from ink_infer.volumes.fragment import Fragment
    from ink_infer.volumes.reader import open_volume

    spec = load_manifest(ROOT / "ink_infer" / "gp_timesformer.json").models[0]
    flops = flops_per_window(spec, device, torch.float32)
    model, _ = load_model(spec, None, device=device, dtype=torch.float32)
    forward = TorchForward(model, device)
    batch = batch_size(device.type, batch)
    tiles = np.random.default_rng(0).integers(0, 201, (batch, 1, 26, 64, 64), dtype=np.uint8)
    forward(tiles)  # warm-up (cuDNN / autotuning)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        forward(tiles)
    sync()
    wps = reps * batch / (time.perf_counter() - t0)
    from ink_infer.synthetic.fragments import write_segment

    seg = Path("/tmp/ink_infer_gpu_bench") / "gp" / "s1"
    if not (seg / "layers" / "64.tif").exists():
        write_segment(seg.parent, "s1", shape=(size, size), seed=1)
    with open_volume(Fragment("s1", seg, layout="segment", layers=tuple(range(65)))) as volume:
        t0 = time.perf_counter()
        _, n = predict_gp(forward, volume, None, batch_size=batch)
        loop_wps = n / (time.perf_counter() - t0)
    peak = peak_flops(device)
    row = {"config": spec.name, "batch": batch, "gflop_per_window": flops / 1e9, "forward_wps": wps,
           "forward_tflops": flops * wps / 1e12, "segment": f"{size}x{size}", "segment_windows": n,
           "segment_wps": loop_wps}  # fmt: skip
    row["forward_pct"] = 100 * row["forward_tflops"] * 1e12 / peak if peak else None
    print(f"GP TimeSformer: forward {wps:.0f} win/s ({row['forward_tflops']:.1f} TFLOP/s, "
          f"{row['forward_pct'] or 0:.1f} % of the fp16 peak); over a {size}-px segment {loop_wps:.0f} win/s "
          f"({n} windows)", flush=True)  # fmt: skip
    del model, forward
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/ink_infer_gpu_bench"))
    p.add_argument("--size", default="8181x6330")
    p.add_argument("--minutes", type=float, default=9.0, help="no config starts compiling past this")
    p.add_argument("--pipeline-minutes", type=float, default=0.0, help="phase 2's budget; 0: skipped")
    p.add_argument("--models", type=int, default=18, help="first N manifest entries")
    p.add_argument("--compile-mode", default="default", choices=["default", "max-autotune"])
    p.add_argument("--reps", type=int, default=10, help="timed batches per config and mode")
    p.add_argument("--windows", type=int, default=None, help="batch size (default: what tuning picks)")
    p.add_argument(
        "--fast-data", action="store_true", help="noise slices and an elliptic mask, written in seconds"
    )
    p.add_argument("--gp-size", type=int, default=2048,
                   help="the GP family's synthetic segment, px a side; 0: the GP family is not measured")  # fmt: skip
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import logging

    from ink_infer.engine.compiling import use_cache_under
    from ink_infer.run.plan import plan_fragment
    from ink_infer.volumes.discovery import find_fragments

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    t_start = time.perf_counter()
    use_cache_under(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    h, w = (int(v) for v in args.size.split("x"))
    comp = args.work / "vesuvius-challenge-ink-detection"
    if not (comp / "sample_submission.csv").exists():
        comp = (
            write_fast(comp, h, w) if args.fast_data else write_dataset(args.work, test=[("a", h, w)], seed=1)
        )
    windows = len(plan_fragment(find_fragments(comp)[0][0], stride=32, tta="scheduled").origins)
    print(
        f"synthetic 65x{h}x{w} ready in {time.perf_counter() - t_start:.0f} s: {windows} windows", flush=True
    )

    manifest = load_manifest(ROOT / "weights_manifest.json")
    specs = manifest.models[: args.models]
    rows = config_rows(specs, device, dtype, mode=args.compile_mode, deadline=t_start + 60 * args.minutes,
                       reps=args.reps, windows=args.windows)  # fmt: skip
    cols = [("config", "config", "s"), ("batch", "batch", "d"), ("channels_last", "ch_last", "s"),
            ("fused_attention", "sdpa", "s"), ("gflop_per_window", "GFLOP/win", ".1f"),
            ("eager_wps", "eager win/s", ".0f"), ("eager_tflops", "TFLOP/s", ".1f"), ("eager_pct", "% peak", ".1f"),
            ("compile_s", "compile s", ".0f"), ("compiled_wps", "compiled win/s", ".0f"),
            ("compiled_tflops", "TFLOP/s", ".1f"), ("compiled_pct", "% peak", ".1f"),
            ("max_logit_diff", "max |diff|", ".1e"), ("note", "note", "s")]  # fmt: skip
    printable = [{k: str(v) if isinstance(v, bool) else v for k, v in r.items()} for r in rows]
    print(format_table(printable, cols))
    ensemble = project_ensemble(rows, specs, windows)
    summary = {"configs": rows, "ensemble": ensemble, "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}  # fmt: skip
    if args.gp_size:
        summary["gp_family"] = gp_row(device, reps=args.reps, batch=args.windows, size=args.gp_size)
    print(
        f"the {len(specs)}-model ensemble over {windows} windows per model, this device: eager "
        f"{ensemble['eager_s'] / 60:.1f} min, compiled {ensemble['compiled_s'] / 60:.1f} min (compiles included)"
    )
    if ensemble["t4_eager_s"] is not None:
        print(
            f"on a T4 at the same share of its fp16 peak (65 TFLOP/s; not measured): eager "
            f"{ensemble['t4_eager_s'] / 3600:.2f} h, compiled {ensemble['t4_compiled_s'] / 3600:.2f} h"
        )
    if args.pipeline_minutes > 0:
        sub = args.out / "manifest.json"
        raw = json.loads((ROOT / "weights_manifest.json").read_text())
        raw["models"] = raw["models"][: args.models]
        sub.write_text(json.dumps(raw))
        flops = {r["config"]: r["gflop_per_window"] * 1e9 for r in rows}
        cfg = RunConfig(
            data=comp, out=args.out, manifest=sub, allow_random_weights=True, quiet=True, previews=False,
            budget=Budget(hours=args.pipeline_minutes / 60, safety_margin=0.0), compile="auto",
            fresh=True,  # measure, never reuse partials of an earlier run
        )  # fmt: skip
        t_run = time.perf_counter()
        report = run(cfg).as_dict()
        summary["pipeline"] = summarize(
            report, flops, peak_flops(device), time.perf_counter() - t_run, args.out
        )
    (args.out / "gpu_ensemble.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {args.out / 'gpu_ensemble.json'} after {time.perf_counter() - t_start:.0f} s")


def summarize(report: dict, flops: dict, peak: float | None, run_s: float, out: Path) -> dict:
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
    print(f"run {run_s:.0f} s; models measured {total_model_s:.0f} s + projected for skipped {projected:.0f} s "
          f"= ensemble {ens:.0f} s on this GPU; host peak {report['host_peak_gib']:.2f} GiB")  # fmt: skip
    print(f"FLOP-based estimate for the measured models on a Kaggle T4 at 30 % of its fp16 peak: "
          f"{summary['t4_hours_at_30pct_mfu_measured_models']:.2f} h")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
