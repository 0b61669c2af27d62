"""The GP TimeSformer's inference: ink_infer's streaming family (``models.gp_family.predict_gp``) against the GP
script's own loop, re-implemented naively as it runs (``inference_timesformer.py`` @0efba1b): the padded 26-layer
uint8 stack whole in memory, every kept window cut into a Python list, batches of 256, each window's probabilities
added on the CPU one at a time into two float64 full-size maps.

    python benchmarks/gp_loop.py                          # 1024 x 1024, the near-zero-cost stand-in model
    python benchmarks/gp_loop.py --model gp --size 384x384  # the real GP architecture, random weights

Each loop runs in its own child process over the same synthetic segment (``layers/00.tif .. 64.tif``, no mask
file: every window of the padded plane, as the GP script runs a segment without one); its windows/s and its peak
RSS are its own; the parent checks the two maps agree within 1e-5. ``--model analytic``: a stand-in (frames
averaged, 16 x 16 pooled: ~0 FLOPs) so that what is measured is the loop, not the model; ``gp``: the real
TimeSformer (38M parameters), whose forward dominates on a CPU.
Goals (#26): >= 3x the windows/s, <= 0.25x the peak RSS, probabilities equal within 1e-5.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DRIVER = """
import resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
sys.argv = ["gp_loop"] + {argv!r}
from benchmarks.gp_loop import child
child()
"""


def make_model(kind: str):
    import torch

    torch.manual_seed(0)
    if kind == "gp":
        from timesformer_pytorch import TimeSformer

        backbone = TimeSformer(dim=512, image_size=64, patch_size=16, num_frames=26, num_classes=16, channels=1,
                               depth=8, heads=6, dim_head=64, attn_dropout=0.1, ff_dropout=0.1)  # fmt: skip

        class GP(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = backbone

            def forward(self, x):
                return self.backbone(x.permute(0, 2, 1, 3, 4)).view(-1, 1, 4, 4)

        return GP().eval()

    class Analytic(torch.nn.Module):
        def forward(self, x):
            return (torch.nn.functional.avg_pool2d(x.mean(dim=2), 16) - 0.3) * 8

    return Analytic().eval()


def gp_script_loop(model, seg: Path) -> tuple[np.ndarray, int]:
    """The GP script's loop: whole padded stack, a list of windows, two float64 maps, accumulated per window."""
    import cv2
    import torch
    import torch.nn.functional as F

    from ink_infer.models.gp_family import gkern

    layers = [cv2.imread(str(seg / "layers" / f"{i:02d}.tif"), 0) for i in range(17, 43)]
    h, w = layers[0].shape
    stack = np.stack(
        [np.clip(np.pad(a, [(0, 256 - h % 256), (0, 256 - w % 256)]), 0, 200) for a in layers], axis=2
    )
    mask = np.ones(stack.shape[:2], np.uint8) * 255
    images, xys = [], []
    for y1 in range(0, stack.shape[0] - 64 + 1, 21):
        for x1 in range(0, stack.shape[1] - 64 + 1, 21):
            if not np.any(mask[y1 : y1 + 64, x1 : x1 + 64] == 0):
                images.append(stack[y1 : y1 + 64, x1 : x1 + 64])
                xys.append([x1, y1, x1 + 64, y1 + 64])
    pred = np.zeros(stack.shape[:2], np.float64)
    count = np.zeros(stack.shape[:2], np.float64)
    kernel = torch.tensor(gkern(), dtype=torch.float64)
    with torch.no_grad():
        for k in range(0, len(images), 256):
            batch = np.stack(images[k : k + 256]).astype(np.float32) * np.float32(1 / 255)
            x = torch.from_numpy(batch).permute(0, 3, 1, 2)[:, None]
            probs = torch.sigmoid(model(x)).float()
            probs = F.interpolate(probs, scale_factor=16, mode="bilinear")
            for i, (x1, y1, x2, y2) in enumerate(xys[k : k + 256]):
                pred[y1:y2, x1:x2] += (probs[i, 0] * kernel).numpy()
                count[y1:y2, x1:x2] += 1
    pred /= np.clip(count, 1, None)
    return np.clip(np.nan_to_num(pred), 0, 1)[:h, :w], len(images)


def ours(model, seg: Path) -> tuple[np.ndarray, int]:
    from ink_infer.models.gp_family import BATCH
    from ink_infer.models.gp_predict import TorchForward, predict_gp
    from ink_infer.volumes.fragment import Fragment
    from ink_infer.volumes.reader import open_volume

    with open_volume(Fragment("s1", seg, layout="segment", layers=tuple(range(65)))) as volume:
        return predict_gp(TorchForward(model), volume, None, batch_size=BATCH["cpu"])  # a CPU run's batch


def child() -> None:
    import time

    import torch

    loop, kind, seg, out = sys.argv[1:5]
    torch.set_num_threads(2)
    model = make_model(kind)
    t0 = time.perf_counter()
    found, n = (gp_script_loop if loop == "gp" else ours)(model, Path(seg))
    seconds = time.perf_counter() - t0
    np.save(out, found)
    print(n, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def measure(loop: str, kind: str, seg: Path, out: Path) -> tuple[int, float, int]:
    code = DRIVER.format(root=str(ROOT), argv=[loop, kind, str(seg), str(out)])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    n, seconds, rss = proc.stdout.split()
    return int(n), float(seconds), int(rss)


def make_segment(work: Path, height: int, width: int) -> None:
    """The synthetic segment: written whole up to 2048 px a side; larger ones tile a 2048 x 2048 one (rendering
    65 layers of 8192 x 8192 would take half an hour; what is measured here does not depend on the content)."""
    import tifffile

    from ink_infer.synthetic.fragments import write_segment

    if max(height, width) <= 2048:
        write_segment(work, "s1", shape=(height, width), seed=1)
        return
    base = write_segment(work / "base", "s1", shape=(2048, 2048), seed=1)
    (work / "s1" / "layers").mkdir(parents=True, exist_ok=True)
    reps = (-(-height // 2048), -(-width // 2048))
    for f in sorted((base / "layers").glob("*.tif")):
        layer = np.tile(tifffile.imread(f), reps)[:height, :width]
        tifffile.imwrite(work / "s1" / "layers" / f.name, layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1024x1024", help="HxW of the segment")
    parser.add_argument("--model", choices=["analytic", "gp"], default="analytic")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ink_infer_gp_bench")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    work = args.work / args.size
    seg = work / "s1"
    if not (seg / "layers" / "64.tif").exists():
        make_segment(work, height, width)
    (seg / "s1_mask.png").unlink(missing_ok=True)
    figures = {}
    for loop in ("gp", "ours"):
        figures[loop] = measure(loop, args.model, seg, work / f"{loop}.npy")
    diff = np.abs(np.load(work / "gp.npy") - np.load(work / "ours.npy")).max()
    (n, s_gp, rss_gp), (n_ours, s_ours, rss_ours) = figures["gp"], figures["ours"]
    mib = 2**20
    print(f"segment {height}x{width}, no mask, model {args.model}: max |diff| {diff:.2e}")
    print(f"{'loop':6} {'windows run':>11} {'seconds':>8} {'map windows/s':>14} {'peak RSS MiB':>13}")
    print(f"{'GP':6} {n:11d} {s_gp:8.2f} {n / s_gp:14.1f} {rss_gp / mib:13.0f}")
    print(f"{'ours':6} {n_ours:11d} {s_ours:8.2f} {n / s_ours:14.1f} {rss_ours / mib:13.0f}")
    # "map windows/s": the GP loop's windows over each loop's time for the same map (ours skips the windows that
    # only cover the padding's columns and rows, which the map does not show)
    print(
        f"ours / GP: {s_gp / s_ours:.2f}x the windows/s for the same map ({n_ours / s_ours / (n / s_gp):.2f}x per "
        f"window run), {rss_ours / rss_gp:.2f}x the peak RSS"
    )
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
