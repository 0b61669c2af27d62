"""Pipeline overhead against the reference's naive loop, with a near-zero-cost analytic model, on the CPU.

    python benchmarks/engine_overhead.py [--size 1024x1536] [--z 15:50]

Both sides run the same model (the centre pixel of each 32 x 32 cell averaged over slices: near-zero cost) over the
same synthetic fragment at stride 32 with scheduled TTA:
- naive: the reference's way. The fragment is pre-cut into 32 x 32 float32 ``.npy`` patches on disk (as the team's
  notebook did); every window is assembled from its 64 patches, normalised, run, upsampled, un-flipped and added
  at full resolution (``tests/naive_loop.py``, shared with the tests);
- engine: ``ink_infer.engine.predict.predict_fragment`` reading the TIFF slices directly (streamed slabs, windows cut
  from the band, batched).
Prints windows/s of each, their ratio (goal >= 5x), and how far the two probability maps and thresholded masks agree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ink_infer.config import ModelSpec
from ink_infer.engine.predict import PassSettings, predict_fragment
from ink_infer.engine.stitch import finalize
from ink_infer.engine.tiling import (
    Windows,
    cover_grid,
    coverage_blocks,
    touched_blocks,
    tta_ops,
    window_origins,
)
from ink_infer.synthetic.fragments import write_dataset
from ink_infer.volumes.fragment import Fragment
from ink_infer.volumes.masks import load_mask
from ink_infer.volumes.tiff_stack import Volume
from tests.naive_loop import binarize, naive_predict, reference_patch, saved_patches  # noqa: E402
from tests.standins import SampledInputModel  # noqa: E402


def cut_patches(vol: Volume, mask: np.ndarray, folder: Path) -> None:
    """The reference's preprocessing: one (65, 32, 32) float32 .npy per block touching the mask."""
    for i, j in saved_patches(mask):
        band = vol.read_band(i * 32, (i + 1) * 32, 0, 65)[:, :, j * 32 : (j + 1) * 32]
        np.save(folder / f"volume_{i}_{j}.npy", reference_patch(band))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1024x1536")
    p.add_argument("--z", default="15:50")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    z = tuple(int(v) for v in args.z.split(":"))
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        comp = write_dataset(Path(tmp) / "d", test=[("a", h, w)], seed=3)
        frag = Fragment("a", comp / "test" / "a")
        model = SampledInputModel(ramp=0.3)
        spec = ModelSpec(name="analytic", arch="2.5d", in_chans=1, z_range=z, tile=256)
        with Volume(frag) as vol:
            mask, _ = load_mask(frag, (vol.height, vol.width))
            patches = Path(tmp) / "patches"
            patches.mkdir()
            cut_patches(vol, mask, patches)
            touched = touched_blocks(mask)
            origins = window_origins(touched)
            t0 = time.perf_counter()
            sum_map, stats = predict_fragment(
                model, spec, vol, Windows(touched, origins, tta_ops(len(origins))),
                PassSettings(torch.device("cpu"), torch.float32, batch_size=4),
            )  # fmt: skip
            engine_s = time.perf_counter() - t0
        count = coverage_blocks(origins, cover_grid(mask.shape), tile_blocks=8)
        engine = finalize(sum_map, count, mask)
        t0 = time.perf_counter()
        naive = naive_predict(lambda i, j: np.load(patches / f"volume_{i}_{j}.npy"), mask, model, z_range=z)
        naive_s = time.perf_counter() - t0
    n = len(origins)
    ink_e, _ = binarize(engine, mask, 0.93)
    ink_n, _ = binarize(naive, mask, 0.93)
    print(f"fragment 65x{h}x{w}, slices {z[0]}:{z[1]}, {n} windows at stride 32, scheduled TTA, CPU")
    print(f"naive loop : {n / naive_s:8.1f} windows/s ({naive_s:.1f} s)")
    print(
        f"engine     : {n / engine_s:8.1f} windows/s ({engine_s:.1f} s; waited {stats.wait_read_s:.1f} s on reads)"
    )
    print(f"speed-up   : {naive_s / engine_s:.1f}x (goal >= 5x)")
    print(f"max |engine - naive| = {np.abs(engine - naive).max():.2e} (goal <= 1e-3); "
          f"thresholded masks agree on {(ink_e == ink_n).mean() * 100:.4f} % of pixels (goal >= 99.9 %)")  # fmt: skip


if __name__ == "__main__":
    main()
