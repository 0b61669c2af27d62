"""RLE round trips, the percentile threshold (also above 2**24 pixels), and the window rule."""

from __future__ import annotations

import numpy as np
import pytest

from ink_infer.outputs.rle import read_submission, rle_decode, rle_encode, write_submission
from tests.naive_loop import binarize, percentile_threshold


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
