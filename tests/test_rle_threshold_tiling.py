"""RLE round trips, the percentile threshold (also above 2**24 pixels), and the window rule."""

from __future__ import annotations

import numpy as np
import pytest

from ink_infer.rle import read_submission, rle_decode, rle_encode, write_submission
from ink_infer.threshold import binarize, percentile_threshold
from ink_infer.tiling import (
    band_plan,
    coverage_blocks,
    reference_order,
    spread_sample,
    touched_blocks,
    tta_ops,
    window_origins,
)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 33), (101, 257)])
def test_rle_round_trip_random(shape):
    rng = np.random.default_rng(sum(shape))
    for p in (0.0, 0.1, 0.5, 1.0):
        m = rng.random(shape) < p
        assert (rle_decode(rle_encode(m), shape) == m).all()


def test_rle_runs_touching_first_and_last_pixel():
    m = np.zeros((4, 5), dtype=bool)
    m[0, :2] = True  # starts at pixel 1
    m[3, 3:] = True  # ends at the last pixel, 20
    m[1, 4] = m[2, 0] = True  # a run wrapping a row end: row-major numbering makes it one run
    assert rle_encode(m) == "1 2 10 2 19 2"
    assert rle_encode(np.ones((2, 3), dtype=bool)) == "1 6"
    assert rle_encode(np.zeros((2, 3), dtype=bool)) == ""


@pytest.mark.parametrize("bad", ["1", "0 2", "3 2 4 1", "5 10", "a b"])
def test_rle_decode_rejects_malformed(bad):
    with pytest.raises(ValueError):
        rle_decode(bad, (3, 3))


def test_submission_written_atomically_and_in_order(tmp_path):
    path = tmp_path / "submission.csv"
    write_submission([("b", "1 2"), ("a", "")], path)
    assert path.read_text() == "Id,Predicted\nb,1 2\na,\n"
    assert read_submission(path) == [("b", "1 2"), ("a", "")]
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # no temp file left behind


def test_threshold_matches_numpy_quantile_and_is_strict():
    rng = np.random.default_rng(0)
    prob = rng.random((50, 60)).astype(np.float32)
    region = np.zeros_like(prob, dtype=bool)
    region[10:40, 5:50] = True
    ink, thr = binarize(prob, region, 0.93)
    assert thr == pytest.approx(np.quantile(prob[region].astype(np.float64), 0.93))
    assert (ink == ((prob > thr) & region)).all()
    assert not ink[~region].any()
    # ties: every value equal -> strict '>' selects nothing
    ink, _ = binarize(np.full((8, 8), 0.5, np.float32), np.ones((8, 8), bool), 0.93)
    assert not ink.any()


def test_threshold_above_2_pow_24_pixels():
    n = (1 << 24) + 65536  # torch.quantile refuses inputs above 2**24 elements
    rng = np.random.default_rng(2)
    prob = rng.random(n, dtype=np.float32)
    region = rng.random(n) < 0.999
    thr = percentile_threshold(prob, region, 0.93)
    assert region.sum() > 1 << 24
    assert thr == pytest.approx(np.quantile(prob[region].astype(np.float64), 0.93), rel=1e-12)
    assert (prob[region] > thr).mean() == pytest.approx(0.07, abs=1e-6)


def test_threshold_on_empty_region_gives_empty_prediction():
    ink, thr = binarize(np.ones((4, 4), np.float32), np.zeros((4, 4), bool), 0.93)
    assert thr is None and not ink.any()


def test_touched_blocks_drop_the_remainder_and_see_single_pixels():
    mask = np.zeros((100, 70), dtype=bool)
    mask[33, 40] = True  # block (1, 1)
    mask[99, 10] = True  # remainder row 96..99: belongs to no block
    t = touched_blocks(mask)
    assert t.shape == (3, 2)
    assert t.sum() == 1 and t[1, 1]


def test_window_origins_follow_the_sorted_file_name_order():
    touched = np.zeros((12, 12), dtype=bool)
    touched[0, [1, 2, 10]] = True
    touched[1, 0] = True
    touched[11, 3] = True
    origins = window_origins(touched)
    assert [tuple(o) for o in origins] == [(0, 1), (0, 10), (0, 2), (11, 3), (1, 0)]
    assert reference_order(origins).tolist() == list(range(5))
    assert tta_ops(6).tolist() == [0, 1, 2, 3, 0, 1]
    assert tta_ops(3, mode="none").tolist() == [0, 0, 0]


def test_larger_stride_still_covers_every_touched_block():
    rng = np.random.default_rng(1)
    touched = rng.random((23, 31)) < 0.3
    for k in (2, 3, 4):
        origins = window_origins(touched, stride_blocks=k)
        assert (origins % k == 0).all()
        cover = coverage_blocks(origins, touched.shape, tile_blocks=8)
        assert (cover[touched] > 0).all()


def test_coverage_counts_windows_per_block():
    touched = np.ones((10, 10), dtype=bool)
    origins = window_origins(touched)
    cover = coverage_blocks(origins, touched.shape, tile_blocks=8)
    assert cover[0, 0] == 1 and cover[7, 7] == 64 and cover[9, 9] == 64 and cover[0, 9] == 8
    crop = coverage_blocks(origins, touched.shape, tile_blocks=8, offset_blocks=1, side_blocks=6)
    assert crop[0, 0] == 0 and crop[1, 1] == 1 and crop[9, 9] == 36


def test_band_plan_partitions_windows_by_rows():
    touched = np.zeros((20, 5), dtype=bool)
    touched[[0, 1, 2, 9, 10, 19], 1] = True
    origins = window_origins(touched)
    bands = band_plan(origins, rows_per_band=4)
    assert sorted(np.concatenate([b.index for b in bands]).tolist()) == list(range(len(origins)))
    for b in bands:
        rows = origins[b.index, 0]
        assert rows.min() == b.row0 and rows.max() < b.row0 + b.n_rows <= b.row0 + 4
    assert bands[0].pixel_rows(256) == (0, 2 * 32 + 256)


def test_spread_sample_covers_the_range():
    s = spread_sample(1000, 10)
    assert len(s) == 10 and s[0] == 0 and s[-1] == 999
    assert spread_sample(5, 10).tolist() == [0, 1, 2, 3, 4]
