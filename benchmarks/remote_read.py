"""A segment read from a loopback S3 server against the same segment on local disk: wall time and peak host RSS.

    python benchmarks/remote_read.py                      # 1024 x 1024, the demo's two trained models
    python benchmarks/remote_read.py --size 2048x1536 --models analytic

A synthetic zarr v3 segment (65 x H x W uint16, chunks 16 x 256 x 256, its mask beside it) is written under
--work, and uploaded to moto's S3 server (``ThreadedMotoServer``) on 127.0.0.1 in this process. Each run is its own
child process (``python -m ink_infer.submit``, every window, stride 32, CPU), so its peak RSS is its own:

- ``local``: ``--data <work>/s1.zarr``, the baseline;
- ``s3 cold``: ``--data s3://bench/s1.zarr`` with an empty chunk cache (every chunk over the wire once);
- ``s3 warm``: the same into a new OUT (every unit computed again) with the cache the cold run filled.

``--repeat`` cycles of the three, interleaved; medians.

``--models demo`` runs the packaged demo ensemble (two small trained models: real compute per window);
``analytic`` the near-zero-cost stand-in (what is left is reading: the worst case for the wire).
Goals (#25): cold <= 1.3x local, warm <= 1.05x; peak RSS within 10 % of the local run's. The moto server shares the
machine's cores with the run (as a nearby object store would not): the cold figure is a pessimistic one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DRIVER = """
import resource, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(2)
if {analytic!r}:
    from ink_infer.run import model_run
    from tests.standins import SampledInputModel
    model_run.build_model = lambda spec: SampledInputModel()
from ink_infer.submit import main
rc = main(sys.argv[1:])
assert rc == 0, rc
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

ANALYTIC = {
    "format": 1,
    "name": "remote-read",
    "models": [{"name": "analytic", "arch": "2.5d", "backbone": "resnet10t", "in_chans": 5, "num_3d_layer": 1,
                "z_range": [15, 50], "tile": 256, "file": None, "sha256": None}],
}  # fmt: skip


def write_store(work: Path, height: int, width: int) -> Path:
    """The segment, rechunked to 16 x 256 x 256 (closer to the open data's chunks than the synthetic writer's)."""
    import numpy as np
    import zarr

    from ink_infer.synthetic.fragments import write_segment

    store = work / "segs" / "s1.zarr"
    if store.exists():
        return store.parent
    small = work / "small"
    write_segment(small, "s1", shape=(height, width), seed=3, layout="zarr")
    source = zarr.open_group(str(small / "s1.zarr"), mode="r")["0"]
    group = zarr.open_group(str(store), mode="w")
    array = group.create_array("0", shape=source.shape, chunks=(16, 256, 256), dtype="uint16")
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}]}]
    for z in range(0, source.shape[0], 16):
        array[z : z + 16] = np.asarray(source[z : z + 16])
    shutil.copy(small / "s1_mask.png", store.parent)
    shutil.rmtree(small)
    return store.parent


def run(data: str, out: Path, args: argparse.Namespace, env: dict, *extra: str) -> tuple[float, int]:
    """``(wall seconds, peak RSS bytes)`` of one child run."""
    manifest = args.manifest
    argv = ["--data", data, "--out", str(out), "--manifest", str(manifest), "--quiet", "--device", "cpu",
            "--no-previews", *extra]  # fmt: skip
    if args.models == "demo":
        argv += ["--weights", str(ROOT / "ink_infer" / "demo")]
    else:
        argv += ["--allow-random-weights"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(root=str(ROOT), analytic=args.models == "analytic"),
                           *argv], capture_output=True, text=True, cwd=ROOT, env=env)  # fmt: skip
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return seconds, int(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1024x1024", help="HxW of the segment")
    parser.add_argument("--models", choices=["demo", "analytic"], default="demo")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kind, interleaved")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ink_infer_remote_bench")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    work = args.work / args.size
    work.mkdir(parents=True, exist_ok=True)
    segs = write_store(work, height, width)
    if args.models == "demo":
        args.manifest = ROOT / "ink_infer" / "demo" / "demo_manifest.json"
    else:
        args.manifest = work / "analytic.json"
        args.manifest.write_text(json.dumps(ANALYTIC))

    import logging

    from tests.servers import moto_s3, upload

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server's line per request

    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    with moto_s3("bench") as (endpoint, fs):
        upload(fs, segs, "bench")
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "OMP_NUM_THREADS": "2"}  # fmt: skip
        found: dict[str, list[tuple[float, int]]] = {"local": [], "s3 cold": [], "s3 warm": []}
        for r in range(args.repeat):  # interleaved, so that a slow spell of the machine hits every kind
            cache = runs / f"cache{r}"
            found["local"].append(run(str(segs / "s1.zarr"), runs / f"local{r}", args, env))
            found["s3 cold"].append(
                run("s3://bench/s1.zarr", runs / f"cold{r}", args, env, "--cache", str(cache))
            )
            found["s3 warm"].append(
                run("s3://bench/s1.zarr", runs / f"warm{r}", args, env, "--cache", str(cache))
            )
    mib = 2**20
    print(f"segment {height}x{width}x65 uint16, chunks 16x256x256, models: {args.models}, {args.repeat} runs each "
          "(medians)")  # fmt: skip
    for kind in ("cold", "warm"):
        v = json.loads((runs / f"{kind}0" / "report.json").read_text())["remote"]
        print(f"  {kind}: {v['requests']} requests, {v['bytes'] / mib:.1f} MiB, {v['cache_hits']} cache hits, "
              f"{v['retries']} retries")  # fmt: skip
    base_s = statistics.median(x for x, _ in found["local"])
    base_rss = statistics.median(x for _, x in found["local"])
    print(f"{'run':8} {'wall s':>7} {'x local':>8} {'peak RSS MiB':>13} {'x local':>8}   wall s of each run")
    for name, each in found.items():
        wall, rss = statistics.median(x for x, _ in each), statistics.median(x for _, x in each)
        runs_s = ", ".join(f"{x:.1f}" for x, _ in each)
        print(
            f"{name:8} {wall:7.1f} {wall / base_s:8.2f} {rss / mib:13.0f} {rss / base_rss:8.2f}   [{runs_s}]"
        )
    print(
        f"(parent: moto server and uploads, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
