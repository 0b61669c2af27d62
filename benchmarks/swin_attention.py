"""SwinV2's window attention three ways, on one device, in one process: timm's forward (its position-bias MLP
run in every block of every batch), the bias frozen (``models.swin_attention``, the default of every run), and
the bias frozen with the attention through ``scaled_dot_product_attention`` (what tuning picks on CUDA where it
measures it faster).

    python benchmarks/swin_attention.py [--batch 2] [--reps 5] [--device cpu|cuda]

The reference's SwinV2 2.5D config (swinv2_tiny_window8_256, 5 x 7 slices), random weights, fp16 on CUDA and
fp32 on the CPU. Prints ms per window of each, the ratios to timm's forward (interleaved rounds, the median of
each), and the largest difference of the logits from timm's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ink_infer.manifest import load_manifest
from ink_infer.models import build_model
from ink_infer.models.swin_attention import freeze_window_bias

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    spec = next(s for s in load_manifest(ROOT / "weights_manifest.json").models if "swinv2" in s.name)
    timm_model = build_model(spec).to(device=device, dtype=dtype)
    frozen, fused = copy.deepcopy(timm_model), copy.deepcopy(timm_model)
    freeze_window_bias(frozen, fused=False)
    freeze_window_bias(fused, fused=True)
    models = {"timm": timm_model, "frozen bias": frozen, "frozen bias + sdpa": fused}
    x = torch.randn((args.batch, spec.n_slices, spec.side, spec.side), device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        ref = timm_model(x).float()
        diffs = {k: float((m(x).float() - ref).abs().max()) for k, m in models.items()}
        for _ in range(args.reps):  # interleaved, so that the machine's drift falls on all three alike
            for name, model in models.items():
                sync()
                t0 = time.perf_counter()
                model(x)
                sync()
                times[name].append((time.perf_counter() - t0) / args.batch)
    base = statistics.median(times["timm"])
    print(f"{spec.name} on {device} ({dtype}), batch {args.batch}, {args.reps} rounds:")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(
            f"  {name:20s} {1000 * m:8.1f} ms/window   {base / m:5.2f}x timm's   max |logit diff| {diffs[name]:.1e}"
        )


if __name__ == "__main__":
    main()
