"""The predictor and stitching against analytic stand-ins and against the reference's naive loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ink_infer.config import ModelSpec
from ink_infer.engine.predict import PassSettings
from ink_infer.engine.probability import probability_map
from ink_infer.engine.stitch import finalize, to_float
from ink_infer.engine.tiling import cover_grid, coverage_blocks, touched_blocks, tta_ops, window_origins
from tests.helpers import predict_pass
from tests.naive_loop import binarize, covered_mask, naive_predict
from tests.standins import ArrayVolume, ConstantModel, PooledInputModel, blob_mask, random_volume

CPU = torch.device("cpu")


def run_engine(model, spec, vol, mask, *, tta="scheduled", batch_size=5, rows_per_band=3, stride_blocks=1):
    """``engine.probability.probability_map`` on the CPU with small bands and batches (many of each)."""
    how = PassSettings(CPU, torch.float32, batch_size, tta=tta, rows_per_band=rows_per_band)
    prob, count, stats, windows = probability_map(model, spec, vol, mask, how, stride_blocks=stride_blocks)
    return prob, count, stats, windows.origins


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
    from ink_infer.outputs.ensemble import FragmentEnsemble

    h, w = 150, 150
    mask = blob_mask(h, w, seed=11)
    origins = window_origins(touched_blocks(mask))
    ens = FragmentEnsemble((h, w), mask)
    whole = (0, h, 0, w)
    assert (
        not ens.mean_piece(*whole).any() and (ens.region_piece("covered")(*whole) == mask).all()
    )  # no model yet
    count = coverage_blocks(origins, cover_grid(mask.shape), tile_blocks=4)
    grid = (count.shape[0] * 32, count.shape[1] * 32)
    ones = np.kron(count, np.ones((32, 32))).astype(np.float32)  # a model predicting 1 everywhere
    ens.add_model(count, 1.0, [(0, finalize(ones, count, mask))])
    ens.add_model(count, 3.0, [(0, finalize(np.zeros(grid, dtype=np.float32), count, mask))])
    prob = ens.mean_piece(*whole)
    covered = covered_mask(count, mask)
    np.testing.assert_allclose(prob[covered], 0.25)
    assert (prob[~covered] == 0).all()
    assert (ens.region_piece("covered")(*whole) == covered).all() and (
        ens.region_piece("mask")(*whole) == mask
    ).all()


def reference_counts(mask: np.ndarray, *, tile: int, crop: int | None) -> np.ndarray:
    """``(H, W)`` windows covering each pixel by the reference rule, pixel by pixel (PIPELINE.md §4-5): every block
    of the floor grid touching the mask is an origin; its model square is pasted into full-size maps cropped at the
    image border, and the count is masked by the fragment mask."""
    h, w = mask.shape
    side = crop or tile
    off = (tile - side) // 2
    count = np.zeros((h, w), dtype=np.int32)
    for i in range(h // 32):
        for j in range(w // 32):
            if mask[i * 32 : (i + 1) * 32, j * 32 : (j + 1) * 32].any():
                count[i * 32 + off : i * 32 + off + side, j * 32 + off : j * 32 + off + side] += 1
    return count * mask


@pytest.mark.parametrize(("tile", "crop"), [(128, None), (192, 128)])
def test_remainder_rows_and_columns_are_covered_with_the_reference_counts(tile, crop):
    """The last H % 32 rows and W % 32 columns belong to no block, but windows reaching them predict there and
    count (the reference's full-size accumulators); they are in the threshold's quantile region."""
    h, w = 215, 307  # 215 % 32 = 23 rows and 307 % 32 = 19 columns past the block grid
    yy, xx = np.mgrid[:h, :w]
    mask = (yy > 60) | (xx > 200)  # reaches the bottom and right edges, and the bottom-right corner
    mask[:40, :40] = False
    vol = ArrayVolume(random_volume(h, w, seed=21))
    spec = ModelSpec(name="c", arch="2.5d", in_chans=1, z_range=(30, 35), tile=tile, crop=crop)
    c = 0.4
    touched = touched_blocks(mask)
    origins = window_origins(touched)
    sum_map, _ = predict_pass(
        ConstantModel(c), spec, vol, touched, origins, tta_ops(len(origins)), device=CPU, dtype=torch.float32,
        batch_size=4, rows_per_band=2,
    )  # fmt: skip
    expected = reference_counts(mask, tile=tile, crop=crop)
    remainder = np.zeros((h, w), dtype=bool)
    remainder[(h // 32) * 32 :] = True
    remainder[:, (w // 32) * 32 :] = True
    # the case under test: the remainder is covered (all of it but, for the crop, its first 32 rows and columns:
    # no model square starts before the first origin plus the crop's offset), the bottom-right corner included
    assert expected[h - 1, w - 1] > 0 and (expected[remainder & mask] > 0).mean() > 0.85
    # the engine's sum of a constant model is count x sigmoid(c): its counts, pixel by pixel, are the reference's
    engine_counts = np.rint(to_float(sum_map)[:h, :w] / (1 / (1 + np.exp(-c)))).astype(np.int32) * mask
    np.testing.assert_array_equal(engine_counts, expected)
    count = coverage_blocks(
        origins, cover_grid(mask.shape), tile_blocks=tile // 32, offset_blocks=spec.offset // 32,
        side_blocks=spec.side // 32,
    )  # fmt: skip
    region = covered_mask(count, mask)
    np.testing.assert_array_equal(region, expected > 0)
    prob = finalize(sum_map, count, mask)
    np.testing.assert_allclose(prob[region], 1 / (1 + np.exp(-c)), rtol=1e-6)
    # the quantile is taken over the remainder too: a map that is high only there moves the threshold
    high_at_edge = np.where(remainder, 1.0, 0.0).astype(np.float32) * region
    q = 1 - (region & remainder).sum() / region.sum() / 2
    _, thr = binarize(high_at_edge, region, q)
    assert thr == 1.0


def test_model_input_is_the_float16_rounded_raw_normalised():
    """Every window the model sees is ``float16(raw / 65535)`` (the notebook's cell 5), zero outside the blocks the
    reference saved, normalised with the window's mean and unbiased std + 1e-6: at an edge window and inside."""
    from tests.naive_loop import reference_patch

    class Recorder(ConstantModel):
        def __init__(self):
            super().__init__(0.0)
            self.inputs = []

        def forward(self, x):
            self.inputs.append(x.clone())
            return super().forward(x)

    h, w = 200, 231
    mask = np.ones((h, w), dtype=bool)
    mask[:64, :64] = False  # blocks outside the mask read as zeros
    raw = random_volume(h, w, seed=31)
    raw[:, :, 7] = 65535  # extremes of the range, and values that float16 cannot hold exactly
    raw[:, 5, :] = 1
    vol = ArrayVolume(raw)
    spec = ModelSpec(name="r", arch="2.5d", in_chans=1, z_range=(10, 22), tile=128)
    touched = touched_blocks(mask)
    origins = window_origins(touched)
    model = Recorder()
    predict_pass(
        model, spec, vol, touched, origins, tta_ops(len(origins), mode="none"), device=CPU, dtype=torch.float32,
        batch_size=3, rows_per_band=2, tta="none",
    )  # fmt: skip
    seen = torch.cat(model.inputs).numpy()
    gh, gw = touched.shape
    inside = next(k for k, (r, c) in enumerate(origins.tolist()) if 0 < r < gh - 4 and 0 < c < gw - 4)
    edge = next(k for k, (r, c) in enumerate(origins.tolist()) if r == gh - 1 and c == gw - 1)
    for k in (inside, edge):
        r, c = origins[k]
        rounded, exact = (np.zeros((65, 128, 128), dtype=np.float64) for _ in range(2))
        for a in range(4):
            for b in range(4):
                if r + a < gh and c + b < gw and touched[r + a, c + b]:
                    ys, xs = slice((r + a) * 32, (r + a + 1) * 32), slice((c + b) * 32, (c + b + 1) * 32)
                    cell = (slice(None), slice(a * 32, (a + 1) * 32), slice(b * 32, (b + 1) * 32))
                    rounded[cell] = reference_patch(raw[:, ys, xs])
                    exact[cell] = raw[:, ys, xs] / 65535.0

        def normalised(x):
            x = x[10:22]
            return (x - x.mean()) / (x.std(ddof=1) + 1e-6)

        np.testing.assert_allclose(seen[k], normalised(rounded), atol=2e-5, rtol=0)
        # the rounding is visible: the unrounded values normalise differently by far more than the tolerance
        assert np.abs(seen[k] - normalised(exact)).max() > 1e-3


@pytest.mark.parametrize(("s_in", "side"), [(8, 256), (6, 192), (4, 128)])
def test_separable_upsampling_equals_bilinear_align_corners(s_in, side):
    from ink_infer.engine.stitch import upsample_probs

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
    import ink_infer.engine.predict as predict_mod

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
    predict_pass(
        PooledInputModel(), spec, ArrayVolume(random_volume(200, 260)), touched, origins, tta_ops(len(origins)),
        device=torch.device("cpu"), dtype=torch.float32, batch_size=8,
    )  # fmt: skip
    assert len(pointers) >= 3 and len(set(pointers)) == 1
    buf = predict_mod.WindowBuffer()
    big = buf.get((4, 2, 32, 32), torch.device("cpu"))
    assert buf.get((3, 2, 32, 32), torch.device("cpu")).data_ptr() == big.data_ptr()
    assert buf.get((5, 2, 32, 32), torch.device("cpu")).shape == (5, 2, 32, 32)  # grows when needed


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tta", ["scheduled", "full"])
def test_the_cuda_engine_gives_the_cpu_engine_sums(dtype, tta):
    """The CUDA branches (table look-up on the device, copy stream, fused affine, padded batches) against the CPU's:
    float32 to float32 rounding; float16, the reference's model dtype, to its precision on a smooth model."""
    h, w = 233, 301
    mask = blob_mask(h, w, seed=3)
    vol = ArrayVolume(random_volume(h, w, seed=4))
    spec = ModelSpec(name="p", arch="2.5d", in_chans=1, z_range=(20, 30), tile=128)
    touched = touched_blocks(mask)
    origins = window_origins(touched)
    ops = tta_ops(len(origins), mode=tta)
    run = dict(tta=tta, batch_size=5, rows_per_band=3)
    cpu, _ = predict_pass(
        PooledInputModel(ramp=0.3), spec, vol, touched, origins, ops, device=CPU, dtype=torch.float32, **run
    )
    cuda, stats = predict_pass(
        PooledInputModel(ramp=0.3),
        spec,
        vol,
        touched,
        origins,
        ops,
        device=torch.device("cuda"),
        dtype=dtype,
        **run,
    )
    assert stats.windows == len(origins) and stats.nonfinite_windows == 0
    np.testing.assert_allclose(cuda, cpu, atol=1e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize(("tile", "crop"), [(128, None), (192, 128)])
def test_a_row_range_keeps_its_sums_on_its_own_rows(tile, crop):
    """``row_blocks``: a unit of origin rows [r0, r1) keeps a map of the block rows its windows reach, not of the
    whole fragment, holding exactly those rows of the whole-fragment map (and the rest of that map is zero)."""
    from ink_infer.run.plan import FragmentPlan

    h, w = 420, 150
    mask = blob_mask(h, w, seed=5)
    vol = ArrayVolume(random_volume(h, w, seed=6))
    spec = ModelSpec(name="p", arch="2.5d", in_chans=1, z_range=(20, 44), tile=tile, crop=crop)
    touched = touched_blocks(mask)
    origins = window_origins(touched)
    r0, r1 = 2, 5
    part = origins[(origins[:, 0] >= r0) & (origins[:, 0] < r1)]
    ops = tta_ops(len(part))
    item = FragmentPlan(None, (h, w), mask, touched, part, ops, rows=(r0, r1))
    lo, hi = item.block_rows(tile)
    assert (lo, hi) == (r0, r1 - 1 + tile // 32) and hi < cover_grid((h, w))[0]

    def run(**kw):
        return predict_pass(PooledInputModel(ramp=0.3), spec, vol, touched, part, ops, device=CPU,
                                dtype=torch.float32, batch_size=4, **kw)[0]  # fmt: skip

    whole, local = run(), run(row_blocks=(lo, hi))
    assert local.shape == ((hi - lo) * 32, whole.shape[1])
    np.testing.assert_array_equal(local, whole[lo * 32 : hi * 32])
    assert not whole[: lo * 32].any() and not whole[hi * 32 :].any()
