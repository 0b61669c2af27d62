"""Speed-up of ``--devices cpu,cpu`` (two worker processes, one thread each) over one worker of one thread, on the
demo's two small trained models over a synthetic test set, in one run of this script.

    python benchmarks/workers_speedup.py [--size 2048x2048] [--fragments 2] [--unit-windows 256] [--repeats 1]

Both sides go through ``pipeline.run`` with ``--fresh`` (no partial reused) and the same ``--unit-windows`` (the
same units): the baseline is this process with one torch thread (no worker start-up to pay: the comparison
favours it), the other ``--devices cpu,cpu`` (each worker one thread, sharing a queue of the units). Prints
seconds, the speed-up (goal >= 1.8x on 2 cores), the balance of the two workers (slowest worker's seconds /
mean) and the units each computed, and checks that both submissions are byte-identical.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ink_infer.config import RunConfig
from ink_infer.manifest import DEMO_MANIFEST
from ink_infer.run.pipeline import run
from ink_infer.synthetic.fragments import write_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--size",
        default="2048x2048",
        help="each fragment; smaller jobs weigh the spawned worker's ~7 s of imports more",
    )
    ap.add_argument("--fragments", type=int, default=2)
    ap.add_argument(
        "--unit-windows",
        type=int,
        default=256,
        help="windows per unit: the demo's 2 models x 2 fragments are otherwise 4 units in all",
    )
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        test = [(chr(ord("a") + i), h, w) for i in range(args.fragments)]
        data = write_dataset(tmp / "data", test=test, seed=3)
        timings: dict[str, list[float]] = {"cpu": [], "cpu,cpu": []}
        balance = []
        for r in range(args.repeats):
            for devices in ("cpu", "cpu,cpu"):  # alternated, so a slower stretch of the machine hits both
                out = tmp / f"{devices}-{r}"
                cfg = RunConfig(data=data, out=out, manifest=DEMO_MANIFEST, weights=DEMO_MANIFEST.parent,
                                devices=tuple(devices.split(",")), quiet=True, previews=False,
                                unit_windows=args.unit_windows, fresh=True)  # fmt: skip
                torch.set_num_threads(1 if devices == "cpu" else threads)
                t0 = time.perf_counter()
                report = run(cfg)
                timings[devices].append(time.perf_counter() - t0)
                if devices == "cpu,cpu":
                    secs = [p.seconds for p in report.parts]
                    balance.append(max(secs) / (sum(secs) / len(secs)))
                    for p in report.parts:
                        took = [(m.name, f) for m in p.models for f in m.fragments]
                        print(f"  {p.label}: {p.seconds:.1f} s, {len(took)} units")
            same = (tmp / f"cpu-{r}" / "submission.csv").read_bytes() == (
                tmp / f"cpu,cpu-{r}" / "submission.csv"
            ).read_bytes()
            print(f"repeat {r}: 1 worker {timings['cpu'][-1]:.1f} s, 2 workers {timings['cpu,cpu'][-1]:.1f} s, "
                  f"speed-up {timings['cpu'][-1] / timings['cpu,cpu'][-1]:.2f}x, balance {balance[-1]:.2f}, "
                  f"submissions identical: {same}")  # fmt: skip
        one, two = min(timings["cpu"]), min(timings["cpu,cpu"])
        print(f"best of {args.repeats}: speed-up {one / two:.2f}x (goal >= 1.8x on 2 cores), "
              f"balance {min(balance):.2f} (1.00 is perfect)")  # fmt: skip


if __name__ == "__main__":
    main()
