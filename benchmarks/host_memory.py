"""Peak host RSS while streaming one large synthetic fragment, as a ratio to the volume's size on disk.

    python benchmarks/host_memory.py --size 4096x4096          # foundation issue (goal <= 0.25)
    python benchmarks/host_memory.py --size 8192x6144          # engine issue (goal < 0.25)

The fragment is written once under --work (kept for reruns). Two child processes on the CPU, each at stride 32
over every window:
- ``stream``: the whole path from disk to the RLE (reader thread, slabs, windows, normalisation, stitching,
  finalize, threshold, RLE) with a near-zero-cost analytic model, so the figure is the pipeline's, not a model's;
- ``imports``: the same imports and nothing else (torch alone costs a few hundred MB of RSS whatever the input).
``--cli`` adds a third: ``python -m ink_infer.submit`` with a small real 2.5D model (35 slices, 5 x 7, tile 256,
random weights) at a stride of one window; its activations live in host memory on the CPU (on a GPU, on the GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMPORTS = """
import resource, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
import numpy as np, torch
from ink_infer.config import ModelSpec
from ink_infer.volumes.discovery import Fragment, Volume, load_mask
from ink_infer.engine.predict import PassSettings, predict_fragment
from ink_infer.engine.tiling import Windows
from ink_infer.outputs.rle import rle_encode
from ink_infer.engine.stitch import finalize
from ink_infer.engine.tiling import coverage_blocks, touched_blocks, tta_ops, window_origins
from tests.naive_loop import binarize
from tests.standins import PooledInputModel
torch.set_num_threads(2)
"""

STREAM = """
frag = Fragment("a", Path({frag!r}))
spec = ModelSpec(name="analytic", arch="2.5d", in_chans=5, z_range=(15, 50), tile=256)
t0 = time.perf_counter()
with Volume(frag) as vol:
    mask, _ = load_mask(frag, (vol.height, vol.width))
    touched = touched_blocks(mask)
    origins = window_origins(touched)
    sum_map, stats = predict_fragment(PooledInputModel(), spec, vol, Windows(touched, origins, tta_ops(len(origins))),
                                      PassSettings(torch.device("cpu"), torch.float32, batch_size=4))
prob = finalize(sum_map, coverage_blocks(origins, touched.shape, tile_blocks=8), mask)
del sum_map
ink, _ = binarize(prob, mask, 0.93)
rle = rle_encode(ink)
print(stats.windows, time.perf_counter() - t0)
"""

PEAK = "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"

MANIFEST = {
    "format": 1,
    "name": "bench-host-memory",
    "threshold": {"percentile": 0.93, "region": "covered"},
    "models": [
        {"name": "r10t_5x7", "arch": "2.5d", "backbone": "resnet10t", "in_chans": 5, "num_3d_layer": 1,
         "z_range": [15, 50], "tile": 256, "file": None, "sha256": None},
    ],
}  # fmt: skip


def child(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return out.split()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="4096x4096")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ink_infer_bench_mem")
    p.add_argument("--cli", action="store_true", help="also run the submit CLI with a small real model")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    data = args.work / f"{h}x{w}"
    comp = data / "vesuvius-challenge-ink-detection"
    if not (comp / "sample_submission.csv").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ink_infer.synthetic.fragments",
                str(data),
                "--train",
                "0",
                "--test",
                f"a:{h}x{w}",
            ],
            check=True,
        )
    frag = comp / "test" / "a"
    disk = sum(f.stat().st_size for f in (frag / "surface_volume").glob("*.tif"))
    gib = 1024**3
    base = int(child(IMPORTS.format(root=str(ROOT)) + PEAK)[-1])
    windows, seconds, peak = child(IMPORTS.format(root=str(ROOT)) + STREAM.format(frag=str(frag)) + PEAK)
    peak = int(peak)
    print(f"volume 65x{h}x{w}: {disk / gib:.2f} GiB on disk")
    print(f"stream (analytic model, {windows} windows, {float(seconds):.0f} s): peak RSS {peak / gib:.3f} GiB = "
          f"{peak / disk:.3f} x the volume; imports alone {base / gib:.3f} GiB; above them {(peak - base) / gib:.3f} GiB "
          f"= {(peak - base) / disk:.3f} x (goal <= 0.25)")  # fmt: skip
    if args.cli:
        manifest = args.work / "manifest.json"
        manifest.write_text(json.dumps(MANIFEST))
        out = args.work / f"out_{h}x{w}"
        cmd = [sys.executable, "-m", "ink_infer.submit", "--data", str(comp), "--out", str(out), "--manifest",
               str(manifest), "--allow-random-weights", "--device", "cpu", "--stride", "256", "--quiet", "--no-previews", "--fresh"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
        report = json.loads((out / "report.json").read_text())
        cli_peak = report["host_peak_gib"] * gib
        print(f"submit CLI (resnet10t 5x7 on the CPU, stride 256): peak RSS {cli_peak / gib:.3f} GiB = "
              f"{cli_peak / disk:.3f} x the volume; above imports {(cli_peak - base) / disk:.3f} x")  # fmt: skip


if __name__ == "__main__":
    main()
