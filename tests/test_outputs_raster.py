"""Maps read by bands (``raster.py``) and what is computed from them band by band: the exact quantile, the RLE,
the preview, the ink PNG, and one model's map merged from overlapping row ranges."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ink_infer.outputs.maps import write_mask_png
from ink_infer.outputs.previews import PreviewAccumulator
from ink_infer.outputs.raster import Raster, array_piece, turned_band, turned_shape
from ink_infer.outputs.rle import RleEncoder, rle_encode
from ink_infer.outputs.threshold import banded_quantile
from ink_infer.volumes.rotation import turn_back


def array_bands(a: np.ndarray, rows: int = 256):
    """An in-memory map as the consecutive bands the writers take."""
    return (a[y : y + rows] for y in range(0, a.shape[0], rows))


def partition_quantile(values: np.ndarray, q: float) -> float:
    """numpy's linear quantile from the two order statistics, interpolated in float64 (the reference's rule)."""
    v = np.sort(values.astype(np.float64))
    pos = q * (len(v) - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


@pytest.mark.parametrize("kind", ["uniform", "ties", "tiny", "signed"])
def test_the_banded_quantile_is_exact(kind):
    rng = np.random.default_rng(len(kind))
    for trial in range(60):
        n = int(rng.integers(1, 4000))
        if kind == "uniform":
            v = rng.random(n, dtype=np.float32)
        elif kind == "ties":
            v = rng.choice(np.float32([0, 0.25, 0.5, 1]), n)
        elif kind == "tiny":
            v = (rng.random(n) * 1e-3).astype(np.float32)
        else:
            v = rng.normal(size=n).astype(np.float32)
        q = (0.93, 0.0, 1.0, float(rng.random()))[trial % 4]
        parts = np.array_split(v, int(rng.integers(1, 7)))
        assert banded_quantile(lambda: parts, q) == partition_quantile(v, q), (trial, q)  # noqa: B023
    assert banded_quantile(lambda: [np.zeros(0, np.float32)], 0.5) is None


def test_rle_fed_by_bands_is_the_whole_masks():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(x) for x in rng.integers(1, 25, 2))
        mask = rng.random((h, w)) < rng.random()
        enc = RleEncoder()
        cuts = sorted({0, h, *rng.integers(0, h + 1, 3).tolist()})
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            enc.add(mask[a:b])
        flat = np.concatenate([[0], mask.ravel().astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(flat)) + 1
        expected = " ".join(f"{s} {e - s}" for s, e in zip(edges[::2], edges[1::2], strict=True))
        assert enc.text() == rle_encode(mask) == expected


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_raster_in_memory_or_on_disk_adds_and_turns_back_as_numpy(tmp_path, on_disk):
    rng = np.random.default_rng(1)
    shape = (37, 53)
    r = Raster(shape, np.float32, tmp_path / "m.f32" if on_disk else None)
    want = np.zeros(shape, np.float32)
    for y0 in (0, 5, 30):
        v = rng.random((7, 53), dtype=np.float32)
        r.add(y0, v)
        want[y0 : y0 + 7] += v
    np.testing.assert_array_equal(r.piece(0, 37), want)
    for angle in (0, 90, 180, 270):
        turned = turn_back(want, angle)
        assert turned.shape == turned_shape(shape, angle)
        for lo in range(0, turned.shape[0], 8):
            hi = min(lo + 8, turned.shape[0])
            np.testing.assert_array_equal(turned_band(r.piece, shape, angle, lo, hi), turned[lo:hi])
            np.testing.assert_array_equal(turned_band(array_piece(want), shape, angle, lo, hi), turned[lo:hi])
    r.delete()
    assert not (tmp_path / "m.f32").exists()


def test_the_ink_png_written_by_bands_reads_back(tmp_path):
    mask = np.random.default_rng(2).random((301, 517)) < 0.3
    write_mask_png(tmp_path / "m.png", mask.shape, array_bands(mask, 37))
    back = cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint8 and back.shape == mask.shape
    np.testing.assert_array_equal(back, mask * np.uint8(255))
    with pytest.raises(ValueError, match="rows"):
        write_mask_png(tmp_path / "short.png", (400, 517), array_bands(mask))
    assert not (tmp_path / "short.png").exists()


def test_a_preview_built_by_bands_is_the_one_built_whole():
    rng = np.random.default_rng(3)
    h, w = 3000, 1100  # shown at a third: cells of 2 x 2 pixels, resized to the panel
    prob = rng.random((h, w), dtype=np.float32)
    mask = np.zeros((h, w), bool)
    mask[100:2900, 50:1000] = True
    ink = (prob > 0.9) & mask
    whole, banded = PreviewAccumulator((h, w)), PreviewAccumulator((h, w))
    whole.add(prob, ink, mask)
    for y in range(0, h, 256):
        banded.add(prob[y : y + 256], ink[y : y + 256], mask[y : y + 256])
    assert (
        banded.factor == 2 and banded.ink_pixels == int(ink.sum()) and banded.mask_pixels == int(mask.sum())
    )
    for a, b in zip(whole.panels(), banded.panels(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    mean_prob, ink_share, coverage = banded.panels()
    assert coverage.max() == pytest.approx(1) and coverage.min() == 0
    inside = coverage > 0.99
    assert abs(mean_prob[inside].mean() - 0.5) < 0.01 and abs(ink_share[inside].mean() - 0.1) < 0.01


def test_one_models_rows_merged_from_overlapping_ranges_are_the_whole_finalize(tmp_path):
    """``stitch.merge_ranges``: ranges whose block rows overlap (a window reaches past its range) added as they
    come and finished when no later range reaches them give ``finalize`` of the summed whole, bit for bit."""
    from ink_infer.config import ModelSpec
    from ink_infer.engine.stitch import finalize, merge_ranges
    from ink_infer.run.plan import model_count, plan_fragment, split_rows
    from ink_infer.synthetic.fragments import write_dataset
    from ink_infer.volumes.discovery import find_fragments

    write_dataset(tmp_path, test=[("t", 1800, 96)], seed=4)
    plan = plan_fragment(find_fragments(tmp_path)[0][0], stride=32, tta="scheduled")
    spec = ModelSpec(name="m", arch="2.5d", in_chans=1, z_range=(0, 4), tile=256)
    ranges = split_rows(plan, 40)
    assert len(ranges) >= 3
    rng = np.random.default_rng(5)
    whole = np.zeros((len(model_count(plan, spec)) * 32, model_count(plan, spec).shape[1] * 32), np.int64)
    given = {}
    for item in ranges:
        lo, hi = item.block_rows(spec.tile)
        given[item.id] = rng.integers(0, 2**24, ((hi - lo) * 32, whole.shape[1]))
        whole[lo * 32 : hi * 32] += given[item.id]
    assert ranges[0].block_rows(spec.tile)[1] > ranges[1].block_rows(spec.tile)[0]  # they overlap
    merged = np.zeros(plan.shape, np.float32)
    last = -1
    sums = [(*item.block_rows(spec.tile), lambda item=item: given[item.id]) for item in ranges]
    for y0, rows in merge_ranges(sums, model_count(plan, spec), plan.mask):
        assert y0 > last  # in row order, each row once
        last = y0
        merged[y0 : y0 + len(rows)] = rows
    np.testing.assert_array_equal(merged, finalize(whole, model_count(plan, spec), plan.mask))
