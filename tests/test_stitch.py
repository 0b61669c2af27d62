"""The predictor and stitching against analytic stand-ins and against the reference's naive loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.naive_loop import naive_predict
from ink_infer.config import ModelSpec
from ink_infer.predict import predict_fragment
from ink_infer.stitch import covered_mask, finalize
from ink_infer.threshold import binarize
from ink_infer.tiling import coverage_blocks, touched_blocks, tta_ops, window_origins
from tests.standins import ArrayVolume, ConstantModel, PooledInputModel, blob_mask, random_volume

CPU = torch.device("cpu")


def run_engine(model, spec, vol, mask, *, tta="scheduled", batch_size=5, rows_per_band=3, stride_blocks=1):
    touched = touched_blocks(mask)
    origins = window_origins(touched, stride_blocks=stride_blocks)
    ops = tta_ops(len(origins), mode=tta)
    sum_map, stats = predict_fragment(
        model, spec, vol, touched, origins, ops, device=CPU, dtype=torch.float32, batch_size=batch_size, tta=tta,
        rows_per_band=rows_per_band,
    )  # fmt: skip
    count = coverage_blocks(
        origins,
        touched.shape,
        tile_blocks=spec.tile // 32,
        offset_blocks=spec.offset // 32,
        side_blocks=spec.side // 32,
    )
    return finalize(sum_map, count, mask), count, stats, origins


@pytest.mark.parametrize("shape", [(233, 301), (160, 97), (300, 260)])
def test_constant_model_gives_constant_map_over_covered_mask(shape):
    h, w = shape
    mask = blob_mask(h, w)
    spec = ModelSpec(name="c", arch="2.5d", in_chans=1, z_range=(30, 35), tile=128)
    model = ConstantModel(0.7)
    prob, count, stats, origins = run_engine(model, spec, ArrayVolume(random_volume(h, w)), mask)
    covered = covered_mask(count, mask)
    assert covered.any()
    np.testing.assert_allclose(prob[covered], 1 / (1 + np.exp(-0.7)), rtol=1e-6)
    assert (prob[~covered] == 0).all()
    # the remainder rows/cols past the 32-grid are never covered (the reference gave them count 0)
    assert (prob[(h // 32) * 32 :] == 0).all() and (prob[:, (w // 32) * 32 :] == 0).all()
    assert stats.windows == len(origins) == model.seen == touched_blocks(mask).sum()


@pytest.mark.parametrize("tta", ["scheduled", "none"])
@pytest.mark.parametrize(("tile", "crop"), [(128, None), (192, 128)])
def test_engine_matches_the_naive_reference_loop(tta, tile, crop):
    h, w = 201, 363  # > 10 block columns: the string order differs from row-major
    mask = blob_mask(h, w, seed=3)
    vol = ArrayVolume(random_volume(h, w, seed=4))
    spec = ModelSpec(name="p", arch="2.5d", in_chans=1, z_range=(20, 44), tile=tile, crop=crop)
    model = PooledInputModel(ramp=0.3)
    prob, *_ = run_engine(model, spec, vol, mask, tta=tta)
    expected = naive_predict(vol.patch_at, mask, model, z_range=(20, 44), tile=tile, crop=crop, tta=tta)
    np.testing.assert_allclose(prob, expected, atol=1e-5)
    ink, _ = binarize(prob, mask, 0.9)
    ink_ref, _ = binarize(expected, mask, 0.9)
    assert (ink == ink_ref).mean() >= 0.999


def test_scheduled_flips_change_the_result_of_a_flip_sensitive_model():
    h, w = 200, 200
    mask = np.ones((h, w), dtype=bool)
    vol = ArrayVolume(random_volume(h, w, seed=5))
    spec = ModelSpec(name="p", arch="2.5d", in_chans=1, z_range=(0, 8), tile=128)
    a, *_ = run_engine(PooledInputModel(ramp=1.0), spec, vol, mask, tta="scheduled")
    b, *_ = run_engine(PooledInputModel(ramp=1.0), spec, vol, mask, tta="none")
    assert np.abs(a - b).max() > 1e-3


def test_full_tta_of_a_flip_equivariant_model_equals_no_tta():
    h, w = 170, 230
    mask = blob_mask(h, w, seed=7)
    vol = ArrayVolume(random_volume(h, w, seed=8))
    spec = ModelSpec(name="p", arch="2.5d", in_chans=1, z_range=(10, 20), tile=128)
    full, *_ = run_engine(PooledInputModel(ramp=0.0), spec, vol, mask, tta="full")
    none, *_ = run_engine(PooledInputModel(ramp=0.0), spec, vol, mask, tta="none")
    np.testing.assert_allclose(full, none, atol=1e-6)


def test_band_size_and_batch_size_do_not_change_the_result():
    h, w = 260, 190
    mask = blob_mask(h, w, seed=9)
    vol = ArrayVolume(random_volume(h, w, seed=10))
    spec = ModelSpec(name="p", arch="2.5d", in_chans=1, z_range=(5, 15), tile=128)
    a, *_ = run_engine(PooledInputModel(ramp=0.2), spec, vol, mask, batch_size=1, rows_per_band=1)
    b, *_ = run_engine(PooledInputModel(ramp=0.2), spec, vol, mask, batch_size=64, rows_per_band=16)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_nonfinite_windows_are_counted_and_zeroed():
    class NanModel(ConstantModel):
        def forward(self, x):
            out = super().forward(x)
            out[0] = float("nan")
            return out

    h, w = 128, 128
    mask = np.ones((h, w), dtype=bool)
    spec = ModelSpec(name="n", arch="2.5d", in_chans=1, z_range=(0, 4), tile=128)
    prob, _, stats, _ = run_engine(NanModel(0.0), spec, ArrayVolume(random_volume(h, w)), mask, batch_size=4)
    assert stats.nonfinite_windows == 4  # the first window of each of the 4 batches
    assert np.isfinite(prob).all() and prob.max() <= 0.5


def test_ensemble_is_the_weighted_mean_of_model_maps():
    from ink_infer.ensemble import FragmentState, add_to_ensemble

    h, w = 150, 150
    mask = blob_mask(h, w, seed=11)
    touched = touched_blocks(mask)
    origins = window_origins(touched)
    state = FragmentState(None, (h, w), mask, touched, origins, tta_ops(len(origins)))
    spec_a = ModelSpec(name="a", arch="2.5d", in_chans=1, z_range=(0, 1), tile=128, weight=1.0)
    spec_b = ModelSpec(name="b", arch="2.5d", in_chans=1, z_range=(0, 1), tile=128, weight=3.0)
    count = coverage_blocks(origins, touched.shape, tile_blocks=4)
    grid = (touched.shape[0] * 32, touched.shape[1] * 32)
    ones = np.kron(count, np.ones((32, 32))).astype(np.float32)  # a model predicting 1 everywhere
    add_to_ensemble(state, spec_a, ones)
    add_to_ensemble(state, spec_b, np.zeros(grid, dtype=np.float32))
    prob = state.ensemble / state.weight_sum
    covered = covered_mask(count, mask)
    np.testing.assert_allclose(prob[covered], 0.25)
    assert (prob[~covered] == 0).all()


@pytest.mark.parametrize(("s_in", "side"), [(8, 256), (6, 192), (4, 128)])
def test_separable_upsampling_equals_bilinear_align_corners(s_in, side):
    from ink_infer.stitch import upsample_probs

    logits = torch.randn(3, 1, s_in, s_in)
    ref = torch.nn.functional.interpolate(
        torch.sigmoid(logits), size=(side, side), mode="bilinear", align_corners=True
    )
    torch.testing.assert_close(upsample_probs(logits, side), ref[:, 0], atol=1e-6, rtol=0)


def test_engine_matches_the_naive_loop_with_the_sampled_model():
    from tests.standins import SampledInputModel

    h, w = 190, 390
    mask = blob_mask(h, w, seed=12)
    vol = ArrayVolume(random_volume(h, w, seed=13))
    spec = ModelSpec(name="s", arch="2.5d", in_chans=1, z_range=(15, 50), tile=256)
    prob, *_ = run_engine(SampledInputModel(), spec, vol, mask)
    expected = naive_predict(vol.patch_at, mask, SampledInputModel(), z_range=(15, 50))
    np.testing.assert_allclose(prob, expected, atol=1e-5)


def test_every_batch_of_a_pass_reuses_one_window_buffer(monkeypatch):
    """The CPU cut writes into one buffer per pass (a fresh tens-of-MB tensor per batch costs a page fault per page)."""
    import ink_infer.predict as predict_mod

    pointers, real_cut = [], predict_mod.cut_windows

    def spy(*args, **kwargs):
        out = real_cut(*args, **kwargs)
        pointers.append(out.data_ptr())
        return out

    monkeypatch.setattr(predict_mod, "cut_windows", spy)
    mask = blob_mask(200, 260)
    touched = touched_blocks(mask)
    origins = window_origins(touched)
    spec = ModelSpec(name="p", arch="2.5d", in_chans=1, z_range=(20, 24), tile=64)
    predict_fragment(
        PooledInputModel(), spec, ArrayVolume(random_volume(200, 260)), touched, origins, tta_ops(len(origins)),
        device=torch.device("cpu"), dtype=torch.float32, batch_size=8,
    )  # fmt: skip
    assert len(pointers) >= 3 and len(set(pointers)) == 1
    buf = predict_mod.WindowBuffer()
    big = buf.get((4, 2, 32, 32), torch.device("cpu"))
    assert buf.get((3, 2, 32, 32), torch.device("cpu")).data_ptr() == big.data_ptr()
    assert buf.get((5, 2, 32, 32), torch.device("cpu")).shape == (5, 2, 32, 32)  # grows when needed
