"""The slab reader: exact rows, errors re-raised in the consumer (never a hang), early stop ends the thread."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from ink_infer.config import ModelSpec
from ink_infer.engine.stream import SlabReader, keep_pixels, rows_per_band_for, slab_plan
from ink_infer.engine.tiling import band_plan, touched_blocks, tta_ops, window_origins
from tests.helpers import predict_pass
from tests.standins import ArrayVolume, ConstantModel, random_volume


def test_slab_plan_reads_every_needed_row_once():
    touched = np.ones((12, 4), dtype=bool)
    origins = window_origins(touched)
    plan = slab_plan(band_plan(origins, rows_per_band=3), tile=128)
    assert plan[0].fresh and (plan[0].y0, plan[0].y1) == (0, 2 * 32 + 128)
    for prev, cur in zip(plan, plan[1:], strict=False):
        assert not cur.fresh and cur.y0 == prev.y1  # only the new rows
    assert plan[-1].y1 == 11 * 32 + 128


def test_reader_yields_the_volume_rows():
    vol = ArrayVolume(random_volume(200, 70))
    origins = window_origins(np.ones((6, 2), dtype=bool))
    plan = slab_plan(band_plan(origins, rows_per_band=2), tile=64)
    got = [
        (r, host.numpy().view(np.uint16).copy())
        for r, host in SlabReader(vol.read_band, plan, z_range=(3, 9), width=70, pin=False)
    ]
    for r, arr in got:
        expect = np.zeros((6, r.y1 - r.y0, 70), np.uint16)
        rows = vol.data[3:9, r.y0 : min(r.y1, 200)]
        expect[:, : rows.shape[1]] = rows
        np.testing.assert_array_equal(arr, expect)


class FailingVolume(ArrayVolume):
    def __init__(self, data, fail_at: int):
        super().__init__(data)
        self.calls, self.fail_at = 0, fail_at

    def read_band(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError("disk went away")
        return super().read_band(*args, **kwargs)


def test_a_reader_error_is_raised_in_the_consumer_not_a_hang():
    h, w = 320, 160
    vol = FailingVolume(random_volume(h, w), fail_at=3)
    mask = np.ones((h, w), dtype=bool)
    touched = touched_blocks(mask)
    origins = window_origins(touched)
    spec = ModelSpec(name="c", arch="2.5d", in_chans=1, z_range=(0, 4), tile=128)
    t0 = time.perf_counter()
    with pytest.raises(OSError, match="disk went away"):
        predict_pass(
            ConstantModel(), spec, vol, touched, origins, tta_ops(len(origins)), device=torch.device("cpu"),
            dtype=torch.float32, batch_size=4, rows_per_band=1,
        )  # fmt: skip
    assert time.perf_counter() - t0 < 30
    assert not [t for t in threading.enumerate() if t.name == "ink_infer-reader"]


def test_a_consumer_that_stops_early_stops_the_reader():
    vol = ArrayVolume(random_volume(640, 64))
    origins = window_origins(np.ones((20, 2), dtype=bool))
    plan = slab_plan(band_plan(origins, rows_per_band=1), tile=64)
    reader = SlabReader(vol.read_band, plan, z_range=(0, 2), width=64, pin=False)
    for _ in reader:
        break
    time.sleep(0.3)
    assert not reader._thread.is_alive()


def test_keep_pixels_zero_blocks_off_the_mask_and_past_the_grid():
    touched = np.array([[True, False], [False, True]])
    keep = keep_pixels(touched, (0, 96), 100)
    assert keep[:32, :32].all() and not keep[:32, 32:].any()
    assert keep[32:64, 32:64].all() and not keep[64:].any() and not keep[:, 64:].any()


def test_rows_per_band_fits_the_budget():
    assert rows_per_band_for(35, 6330, tile=256, budget_bytes=48 * 2**20) == 1
    k = rows_per_band_for(35, 6330, tile=256, budget_bytes=256 * 2**20)
    # the largest power of two that fits: bands never straddle the 16-row stripes row ranges are cut at
    assert k & (k - 1) == 0 and 16 % k == 0
    assert 35 * 6330 * 2 * (256 + (k - 1) * 32) <= 256 * 2**20 < 35 * 6330 * 2 * (256 + (2 * k - 1) * 32)
    assert rows_per_band_for(1, 100, tile=256, budget_bytes=256 * 2**20) == 16
