"""Peak host RSS of a whole CLI run over one large synthetic scroll segment, as a ratio to its size on disk.

    python benchmarks/segment_memory.py --size 16384x16384 --work /data/bench   # the issue's size (35 GB)
    python benchmarks/segment_memory.py --size 4096x4096                        # what a small disk holds

The segment (``<id>/layers/00.tif .. 64.tif``, uint16, uncompressed) is written once under --work and kept. Two
child processes on the CPU:
- ``cli``: ``python -m ink_infer.submit`` over the segment, with one 2.5D entry whose model is the near-zero-cost
  analytic stand-in (``tests.standins.SampledInputModel``), stride 32, every window, the probability TIFF and the
  ink PNG written: the figure is the pipeline's (reading, stitching, partials, ensemble, threshold, outputs);
- ``imports``: the same imports and nothing else (torch alone costs a few hundred MB whatever the input).
Goal (scroll segments issue): peak RSS <= 0.10 x the segment's size on disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import resource, sys
sys.path.insert(0, {root!r})
import torch
from ink_infer.run import model_run
from ink_infer.submit import main
from tests.standins import SampledInputModel
torch.set_num_threads(2)
model_run.build_model = lambda spec: SampledInputModel()
if {run!r}:
    rc = main(sys.argv[1:])
    assert rc == 0, rc
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

MANIFEST = {
    "format": 1,
    "name": "segment-memory",
    "models": [{"name": "analytic", "arch": "2.5d", "backbone": "resnet10t", "in_chans": 5, "num_3d_layer": 1,
                "z_range": [15, 50], "tile": 256, "file": None, "sha256": None}],
}  # fmt: skip


def peak(run: bool, argv: list[str]) -> int:
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(root=str(ROOT), run=run), *argv],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return int(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="4096x4096", help="HxW of the segment")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ink_infer_segment_bench")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    sys.path.insert(0, str(ROOT))
    from ink_infer.synthetic.fragments import write_segment

    seg = args.work / f"segments_{h}x{w}" / "s"
    if not (seg / "layers" / "64.tif").is_file():
        t0 = time.perf_counter()
        write_segment(seg.parent, "s", shape=(h, w), seed=3)
        print(f"wrote {seg} in {time.perf_counter() - t0:.0f} s")
    on_disk = sum(f.stat().st_size for f in (seg / "layers").iterdir())
    manifest = args.work / "manifest.json"
    manifest.write_text(json.dumps(MANIFEST))
    out = args.work / f"out_{h}x{w}"
    argv = ["--data", str(seg), "--out", str(out), "--manifest", str(manifest), "--allow-random-weights",
            "--fresh", "--quiet", "--device", "cpu"]  # fmt: skip
    base = peak(False, argv)
    t0 = time.perf_counter()
    cli = peak(True, argv)
    seconds = time.perf_counter() - t0  # the child's whole life, imports included
    frags = json.loads((out / "report.json").read_text())["models"][0]["fragments"]
    windows = sum(f["windows"] for f in frags.values())
    gib = 2**30
    print(
        f"segment {h}x{w}, 65 layers uint16: {on_disk / gib:.2f} GiB on disk; {windows} windows in {seconds:.0f} s"
    )
    print(f"peak RSS: imports alone {base / gib:.2f} GiB; the CLI run {cli / gib:.2f} GiB "
          f"= {cli / on_disk:.3f} x the segment (goal <= 0.10); above imports {(cli - base) / on_disk:.3f} x")  # fmt: skip
    print(f"  the segment's area at 4 bytes per pixel is {h * w * 4 / gib:.2f} GiB "
          f"({h * w * 4 / on_disk:.3f} x the segment): each full-area float32 map costs that")  # fmt: skip


if __name__ == "__main__":
    main()
