"""The GP TimeSformer family's inference (#26): ``models/gp_family.predict_gp`` against the GP script's loop written
out here from its description (``../shared/reference/GP_TIMESFORMER.md``): files read with OpenCV's 8-bit read,
layers 17..42, clip 200, / 255, the plane padded to 256, 64-px windows at stride 21 kept when wholly inside the mask,
sigmoid, x16 bilinear, the Gaussian kernel over a count of ones, two float64 full-size maps. The real
timesformer_pytorch model (a narrow one: the loop does not depend on its width) on random weights."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

from ink_infer.models.gp_family import (
    GPSettings,
    gkern,
    gp_png,
    kept_origins,
    padded_area,
    padded_mask,
    to_input,
)
from ink_infer.models.gp_predict import TorchForward, predict_gp
from ink_infer.synthetic.fragments import write_segment
from ink_infer.volumes.fragment import Fragment
from ink_infer.volumes.reader import open_volume

timesformer = pytest.importorskip("timesformer_pytorch")


class Wrapped(torch.nn.Module):
    """The GP wrapper's forward: (B, 1, 26, 64, 64) -> frames first -> backbone -> 16 logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = timesformer.TimeSformer(dim=64, image_size=64, patch_size=16, num_frames=26,
                                                num_classes=16, channels=1, depth=1, heads=2, dim_head=16)  # fmt: skip
        self.eval()

    def forward(self, x):
        return self.backbone(x.permute(0, 2, 1, 3, 4)).view(-1, 1, 4, 4)


def reference_kernel() -> np.ndarray:
    """gkern(64, nsig=1) as the GP script computes it: scipy's normal cdf, sum-normalised, then max-normalised."""
    x = np.linspace(-1, 1, 65)
    k1 = np.diff(norm.cdf(x))
    k = np.outer(k1, k1)
    k = k / k.sum()
    return k / k.max()


def gp_loop(model, seg: Path, mask_png: Path | None, *, reverse: bool = False, stride: int = 21, divisor: int = 255,
            any_overlap: bool = False, weight: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The GP script's predict_fn, naive: the whole padded stack, a per-window list, two float64 maps. villa's
    variants: ``stride``, ``divisor``, windows kept when touching the mask (``any_overlap``), and a blend ``weight``
    added to the count too (divided by the count clipped at 1e-6)."""
    layers = [cv2.imread(str(seg / "layers" / f"{i:02d}.tif"), 0) for i in range(17, 43)]
    h, w = layers[0].shape
    pad0, pad1 = 256 - h % 256, 256 - w % 256
    stack = np.stack([np.clip(np.pad(a, [(0, pad0), (0, pad1)]), 0, 200) for a in layers], axis=2)
    if reverse:
        stack = stack[:, :, ::-1]
    if mask_png is None:
        mask = np.ones(stack.shape[:2], np.uint8) * 255
    else:
        mask = np.pad(cv2.imread(str(mask_png), 0), [(0, pad0), (0, pad1)])
    tiles, xys = [], []
    for y1 in range(0, stack.shape[0] - 64 + 1, stride):
        for x1 in range(0, stack.shape[1] - 64 + 1, stride):
            window = mask[y1 : y1 + 64, x1 : x1 + 64]
            if np.any(window != 0) if any_overlap else not np.any(window == 0):
                tiles.append(stack[y1 : y1 + 64, x1 : x1 + 64])
                xys.append((x1, y1))
    pred = np.zeros(stack.shape[:2], np.float64)
    count = np.zeros(stack.shape[:2], np.float64)
    kernel = reference_kernel() if weight is None else weight
    with torch.no_grad():
        for tile, (x1, y1) in zip(tiles, xys, strict=True):
            x = torch.from_numpy(tile.astype(np.float32) * np.float32(1 / divisor)).permute(2, 0, 1)[
                None, None
            ]
            p = torch.sigmoid(model(x)).float()
            p = F.interpolate(p, scale_factor=16, mode="bilinear")[0, 0].numpy()
            pred[y1 : y1 + 64, x1 : x1 + 64] += p * kernel
            count[y1 : y1 + 64, x1 : x1 + 64] += 1 if weight is None else weight
    pred /= np.clip(count, 1 if weight is None else 1e-6, None)
    return np.clip(np.nan_to_num(pred), 0, 1)


@pytest.fixture(scope="module")
def segment(tmp_path_factory) -> Path:
    """A 65-layer segment, 150 x 170 (padded to 256 x 256), its mask reaching the bottom and right edges."""
    root = tmp_path_factory.mktemp("gp")
    seg = write_segment(root, "s1", shape=(150, 170), seed=2)
    mask = np.zeros((150, 170), np.uint8)
    mask[20:, 10:] = 255  # to the image's edge: the padding beyond it is outside the mask
    cv2.imwrite(str(seg / "s1_mask.png"), mask)
    return seg


@pytest.fixture(scope="module")
def model():
    return Wrapped()


def run(model, seg: Path, *, mask: bool = True, reverse: bool = False, padded: bool = False,
        settings: GPSettings | None = None) -> np.ndarray:  # fmt: skip
    fragment = Fragment("s1", seg, layout="segment", layers=tuple(range(65)))
    own = cv2.imread(str(seg / "s1_mask.png"), 0) > 0 if mask else None
    settings = settings or GPSettings(reverse=reverse)
    with open_volume(fragment) as volume:
        area = padded_area(volume.height, volume.width) if padded else None
        found, _ = predict_gp(TorchForward(model), volume, own, settings, batch_size=7, area=area)
        return found


def hann() -> np.ndarray:
    """villa V2's blend weight, written out: the outer product of two Hann windows over its sum."""
    w = np.outer(np.hanning(64), np.hanning(64))
    return w / w.sum()


def gaussian(sigma: float) -> np.ndarray:
    """A Gaussian of ``sigma`` px centred on the tile (31.5, 31.5), over its sum (villa V1 with sigma 1)."""
    yy, xx = np.mgrid[0:64, 0:64] - 31.5
    w = np.exp(-(yy**2 + xx**2) / (2 * sigma**2))
    return w / w.sum()


VARIANTS = {
    # villa V1's choices: stride 32, / 200, windows touching the mask, a 1-px Gaussian over a weighted count
    "v1": (GPSettings(stride=32, divisor=200, windows="any", blend="gaussian", sigma=1.0, count="weights"),
           {"stride": 32, "divisor": 200, "any_overlap": True, "weight": gaussian(1.0)}),
    # villa V2's blend: Hann over a weighted count, stride 16, / 200
    "v2-hann": (GPSettings(stride=16, divisor=200, blend="hann", count="weights"),
                {"stride": 16, "divisor": 200, "weight": hann()}),
    "gaussian-25.6": (GPSettings(blend="gaussian", count="weights"), {"weight": gaussian(25.6)}),
    "any-overlap": (GPSettings(windows="any"), {"any_overlap": True}),
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_villas_variants_by_name_match_the_loop_written_their_way(model, segment, variant):
    """Each named option against the naive loop changed only where villa's scripts differ from the GP's."""
    settings, loop = VARIANTS[variant]
    want = gp_loop(model, segment, segment / "s1_mask.png", **loop)[:150, :170]
    got = run(model, segment, settings=settings)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    reference = run(model, segment)
    assert np.abs(got - reference).max() > 1e-3  # the option changes the map
    if settings.windows == "any":  # windows reach past the mask's top edge (rows 0..19)
        assert got[:20].any()


@pytest.mark.parametrize("reverse", [False, True])
def test_the_family_matches_the_gp_loop(model, segment, reverse):
    """Within 1e-5 of the GP loop, with the segment's mask (windows crossing into the padding dropped), both ways."""
    want = gp_loop(model, segment, segment / "s1_mask.png", reverse=reverse)[:150, :170]
    got = run(model, segment, reverse=reverse)
    assert got.shape == (150, 170) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert (got > 0).mean() > 0.3 and not got[:20].any()  # covered where the mask is, nothing above it


def test_without_a_mask_the_padding_is_covered_and_gp_png_matches(model, segment):
    """No mask file: every pixel valid, the padding too (windows cover it, as the GP script's do); the GP picture
    (÷ global max of the padded map, uint8 truncation) byte for byte."""
    want = gp_loop(model, segment, None)
    got = run(model, segment, mask=False, padded=True)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert got[150:, 170:].any()  # the padding holds predictions
    png = ((want / want.max()) * 255).astype(np.uint8)
    assert np.mean(gp_png(got) != png) < 1e-3  # a truncation boundary may fall either side of 1e-5
    np.testing.assert_array_less(np.abs(gp_png(got).astype(int) - png), 2)


def test_the_pieces():
    np.testing.assert_allclose(gkern(), reference_kernel(), atol=1e-12)
    k = gkern()
    assert k.max() == 1.0 and abs(k[0, 32] - 0.616) < 1e-3 and abs(k[0, 0] - 0.380) < 1e-3
    raw = np.array([0, 255, 256, 383, 384, 51455, 51456, 65535], np.uint16)
    assert (to_input(raw) * 255).round().tolist() == [0, 0, 1, 1, 1, 200, 200, 200]
    assert to_input(np.uint16(257 * 120)) == np.float32(120) * np.float32(1 / 255)  # uint8 volumes hold 257 v
    plane = padded_mask(np.ones((100, 256), bool), 100, 256)
    assert plane.shape == (256, 512) and not plane[100:].any() and not plane[:, 256:].any()
    origins = kept_origins(np.ones((100, 256), bool), (100, 256))
    assert origins[:, 0].max() <= 100 - 64 and origins[:, 1].max() <= 256 - 64
    assert origins.tolist()[:3] == [[0, 0], [0, 21], [0, 42]]
    any_overlap = kept_origins(np.ones((100, 256), bool), (100, 256), GPSettings(windows="any"))
    assert len(any_overlap) > len(origins) and (any_overlap[:, 0] <= 99).all()
    everything = kept_origins(None, (100, 256))  # no mask file: the padding is valid
    assert len(everything) == len(range(0, 256 - 63, 21)) * len(range(0, 512 - 63, 21))


def test_row_ranges_give_the_rows_of_the_whole_map(model, segment):
    """A row-range unit computes exactly its rows (only the windows reaching them): ranges put together are the
    whole map, whatever the cuts (on the 32-px grid, as runs cut, or anywhere)."""
    fragment = Fragment("s1", segment, layout="segment", layers=tuple(range(65)))
    own = cv2.imread(str(segment / "s1_mask.png"), 0) > 0
    with open_volume(fragment) as volume:
        whole, n = predict_gp(TorchForward(model), volume, own)
        for cuts in ([0, 64, 150], [0, 32, 96, 128, 150], [0, 50, 51, 150]):
            parts = [
                predict_gp(TorchForward(model), volume, own, area=(a, b, 0, 170))
                for a, b in zip(cuts, cuts[1:], strict=False)
            ]
            np.testing.assert_array_equal(np.concatenate([p for p, _ in parts]), whole)
            assert sum(k for _, k in parts) >= n  # windows reaching two ranges run in both
        sampled, k = predict_gp(TorchForward(model), volume, own, sample=5)
    assert k == 5 and sampled.shape == whole.shape
