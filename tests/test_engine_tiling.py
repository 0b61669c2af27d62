"""Tiling: the blocks a mask touches, window origins in the reference's order, strides, coverage counts, bands."""

from __future__ import annotations

import numpy as np

from ink_infer.engine.tiling import (
    band_plan,
    coverage_blocks,
    reference_order,
    spread_sample,
    touched_blocks,
    tta_ops,
    window_origins,
)


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
