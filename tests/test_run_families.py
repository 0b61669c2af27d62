"""Model families in one run (#26): a GP TimeSformer entry beside small 2nd-place entries in one manifest. Its map
is the family's own (``models.gp_family``, checked against a direct call), it joins the weighted ensemble, and it
resumes from partials, splits into row ranges and across ``--devices cpu,cpu`` workers with the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from ink_infer.errors import UserError
from ink_infer.models.gp_family import GPSettings
from ink_infer.models.gp_predict import TorchForward, predict_gp
from ink_infer.outputs.maps import quantised
from ink_infer.submit import main
from ink_infer.volumes.discovery import find_fragments
from ink_infer.volumes.masks import load_mask
from ink_infer.volumes.reader import open_volume
from tests.helpers import SMALL_MODELS, report_of
from tests.standins import GPStandin

pytest.importorskip("timesformer_pytorch")

GP_ENTRY = {"name": "gp", "arch": "timesformer", "file": None, "sha256": None, "weight": 2.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two fragments with many GP windows wholly inside their masks; "b" tall enough to be cut into row ranges."""
    from ink_infer.synthetic.fragments import write_dataset

    return write_dataset(tmp_path_factory.mktemp("fam"), test=[("b", 720, 260), ("a", 260, 300)], seed=6)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    m = json.loads(json.dumps(SMALL_MODELS))
    m["models"].append(GP_ENTRY)
    path = tmp_path_factory.mktemp("mixed") / "m.json"
    path.write_text(json.dumps(m))
    return path


def argv(data: Path, out: Path, manifest: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--manifest", str(manifest), "--allow-random-weights",
            "--stride", "64", "--quiet", "--no-previews", "--save-probabilities", "--save-model-maps", *extra]  # fmt: skip


def maps(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "probabilities").glob("*.tif"))}


def test_a_mixed_ensemble_runs_each_family_its_own_way(data, mixed, tmp_path, standins):
    """The GP entry's map is predict_gp's on the same volume and mask; the ensemble is the weighted mean of the three
    maps (weights 1, 1, 2); the report counts the GP windows, not the 2nd place's."""
    out = tmp_path / "out"
    assert main(argv(data, out, mixed)) == 0
    rep = report_of(out)
    assert [m["name"] for m in rep["models"]] == ["m25d", "m3d", "gp"] and all(
        m["status"] == "ok" for m in rep["models"]
    )
    fragment = find_fragments(data)[0][0]
    with open_volume(fragment) as volume:
        mask, _ = load_mask(fragment, (volume.height, volume.width))
        direct, windows = predict_gp(TorchForward(GPStandin().eval()), volume, mask, GPSettings())
    gp_map = tifffile.imread(out / "probabilities" / f"{fragment.id}.gp.tif")
    fixed = (np.rint(direct.astype(np.float64) * 2**24) / 2**24).astype(np.float32)  # the sums' fixed point
    np.testing.assert_array_equal(gp_map, quantised(fixed))
    assert rep["models"][2]["fragments"][fragment.id]["windows"] == windows > 20 and direct.any()
    parts = [tifffile.imread(out / "probabilities" / f"{fragment.id}.{n}.tif").astype(float) / 255
             for n in ("m25d", "m3d", "gp")]  # fmt: skip
    ensemble = tifffile.imread(out / "probabilities" / f"{fragment.id}.tif").astype(float) / 255
    want = (parts[0] + parts[1] + 2 * parts[2]) / 4
    assert np.abs(ensemble - want).max() <= 2.5 / 255  # each map rounded to 1/255 once more


def test_resume_and_row_ranges_give_the_same_bytes(data, mixed, tmp_path, standins):
    """A rerun reuses every unit, the GP's included, byte for byte; the fragments cut into row ranges
    (``--unit-windows 2``) give the very bytes of whole units."""
    out = tmp_path / "out"
    assert main(argv(data, out, mixed)) == 0
    first = maps(out)
    assert main(argv(data, out, mixed)) == 0
    rep = report_of(out)
    assert {m for m, _ in rep["partials"]["reused"]} == {"m25d", "m3d", "gp"}
    assert maps(out) == first
    ranges = tmp_path / "ranges"
    assert main(argv(data, ranges, mixed, "--unit-windows", "2")) == 0
    units = report_of(ranges)["models"][2]["fragments"]
    assert sum(u.startswith("b@") for u in units) >= 2  # really cut into ranges
    assert maps(ranges) == first


def test_the_real_gp_model_across_two_device_workers(tmp_path, mixed):
    """The real TimeSformer (random weights) and the real small 2nd-place models, without stand-ins: two spawned
    ``--devices cpu,cpu`` workers give the bytes of one process."""
    from ink_infer.synthetic.fragments import write_dataset

    frags = write_dataset(tmp_path / "d", test=[("a", 170, 200)], seed=3)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(argv(frags, one, mixed)) == 0
    assert main(argv(frags, two, mixed, "--devices", "cpu,cpu")) == 0
    assert maps(one) == maps(two) and len(maps(one)) == 4
    assert report_of(one)["models"][2]["fragments"]["a"]["windows"] > 0


def test_a_reversed_segment_reads_the_gp_layers_reversed_in_place(tmp_path, mixed, standins):
    """``--direction reverse``: the GP entry reads files 42, 41, .., 17 (the GP script reverses its 26 selected
    layers in place), not 17..42 of the reversed stack (files 47..22); the map is predict_gp's with reverse."""
    from ink_infer.synthetic.fragments import write_segment
    from ink_infer.volumes.fragment import Fragment

    seg = write_segment(tmp_path / "segs", "s1", shape=(200, 240), seed=8)
    out = tmp_path / "out"
    assert main(argv(seg, out, mixed, "--direction", "reverse")) == 0
    forward = Fragment("s1", seg, layout="segment", layers=tuple(range(65)))
    with open_volume(forward) as volume:
        mask, _ = load_mask(forward, (volume.height, volume.width))
        want, n = predict_gp(TorchForward(GPStandin().eval()), volume, mask, GPSettings(reverse=True))
        ahead, _ = predict_gp(TorchForward(GPStandin().eval()), volume, mask)
    assert n > 0 and not np.array_equal(quantised(want), quantised(ahead))  # the order shows in this stand-in
    fixed = (np.rint(want.astype(np.float64) * 2**24) / 2**24).astype(np.float32)
    np.testing.assert_array_equal(tifffile.imread(out / "probabilities" / "s1.gp.tif"), quantised(fixed))


def test_the_packaged_gp_manifest_by_name(tmp_path):
    """``--manifest gp``: the packaged one-entry manifest (the GP release's file name, no hash); its weights looked
    for under --weights (missing: named); a dry run with random weights samples the real model's windows."""
    from ink_infer.synthetic.fragments import write_segment

    seg = write_segment(tmp_path / "segs", "s1", shape=(200, 240), seed=8)
    out = tmp_path / "out"
    base = ["--data", str(seg), "--out", str(out), "--manifest", "gp", "--quiet", "--device", "cpu"]
    assert (
        main([*base, "--weights", str(tmp_path)]) == 2
    )  # timesformer_GP_scroll1/model.safetensors is not there
    # --stride is the 2nd place's: a GP-only manifest takes any (its windows keep their own 21 px)
    assert main([*base, "--allow-random-weights", "--dry-run", "--max-windows", "3", "--stride", "256"]) == 0
    rep = report_of(out)
    assert rep["manifest"].endswith("gp_timesformer.json")
    (model,) = rep["models"]
    assert model["name"] == "timesformer_GP_scroll1" and model["status"] == "ok"
    assert model["fragments"]["s1"]["windows"] == 3
    # the projection counts the GP's own windows (every 21 px, wholly inside the mask), not the 2nd place's
    from ink_infer.models.gp_family import kept_origins
    from ink_infer.volumes.fragment import Fragment

    fragment = Fragment("s1", seg, layout="segment", layers=tuple(range(65)))
    with open_volume(fragment) as volume:
        mask, _ = load_mask(fragment, (volume.height, volume.width))
    windows = len(kept_origins(mask, mask.shape, area=(0, 200, 0, 240)))
    projection = model["projection"]
    hours, rate = projection["projected_hours"], projection["s_per_window"]
    assert windows > 5 and hours * 3600 / rate == pytest.approx(windows)


def test_villas_variants_are_manifest_fields_and_key_the_partials(data, tmp_path, standins):
    """A GP entry's ``stride``, ``divisor``, ``windows``, ``blend``, ``count`` select villa's behaviours: the map is
    predict_gp's under those settings, and a rerun with another variant recomputes (the partials are keyed by them)."""
    variant = {"stride": 32, "divisor": 200, "windows": "any", "blend": "hann", "count": "weights"}
    manifest = tmp_path / "villa.json"
    manifest.write_text(json.dumps({"format": 1, "name": "villa", "models": [{**GP_ENTRY, **variant}]}))
    out = tmp_path / "out"
    assert main(argv(data, out, manifest)) == 0
    fragment = find_fragments(data)[0][0]
    with open_volume(fragment) as volume:
        mask, _ = load_mask(fragment, (volume.height, volume.width))
        settings = GPSettings(stride=32, divisor=200, windows="any", blend="hann", count="weights")
        want, n = predict_gp(TorchForward(GPStandin().eval()), volume, mask, settings)
        reference, _ = predict_gp(TorchForward(GPStandin().eval()), volume, mask, GPSettings())
    fixed = (np.rint(want.astype(np.float64) * 2**24) / 2**24).astype(np.float32) * mask  # given on the mask
    np.testing.assert_array_equal(
        tifffile.imread(out / "probabilities" / f"{fragment.id}.gp.tif"), quantised(fixed)
    )
    assert report_of(out)["models"][0]["fragments"][fragment.id]["windows"] == n
    assert not np.array_equal(quantised(want * mask), quantised(reference))
    manifest.write_text(
        json.dumps({"format": 1, "name": "villa", "models": [{**GP_ENTRY, **variant, "stride": 16}]})
    )
    assert main(argv(data, out, manifest)) == 0
    assert not report_of(out)["partials"]["reused"]


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"blend": "bilinear"}, "blend 'bilinear', expected one of"),
        ({"stride": 0}, "stride 0, expected"),
        ({"sigma": 2.0}, "'sigma' applies to blend 'gaussian' only"),
        ({"divisor": -1}, "divisor -1, expected"),
        ({"divisor": 0.5}, "divisor 0.5, expected"),
        ({"blend": "gaussian", "sigma": 0.01}, "sigma 0.01, expected"),
    ],
)
def test_a_bad_variant_field_is_one_line(tmp_path, fields, said, capsys):
    from ink_infer.manifest import load_manifest

    path = tmp_path / "m.json"
    path.write_text(json.dumps({"format": 1, "name": "x", "models": [{**GP_ENTRY, **fields}]}))
    with pytest.raises(UserError, match=said):
        load_manifest(path)
    entry = {**SMALL_MODELS["models"][0], "windows": "any"}
    path.write_text(json.dumps({"format": 1, "name": "x", "models": [entry]}))
    with pytest.raises(UserError, match="'windows' applies to timesformer models only"):
        load_manifest(path)


@pytest.mark.parametrize("mask_file", [True, False])
def test_gp_png_is_the_gp_scripts_own_picture(tmp_path, standins, mask_file):
    """``--gp-png``: the GP script's picture (the padded plane, uncropped, ÷ its max, truncated to uint8, under the
    script's file name) against the naive GP loop's; without a mask file the padding holds predictions (windows of
    zeros) that enter the max, as the script's do."""
    import cv2

    from ink_infer.synthetic.fragments import write_segment
    from tests.test_models_gp_family import gp_loop

    seg = write_segment(tmp_path / "segs", "s1", shape=(150, 170), seed=2)
    if not mask_file:
        (seg / "s1_mask.png").unlink()
    manifest = tmp_path / "gp.json"
    manifest.write_text(json.dumps({"format": 1, "name": "gp", "models": [GP_ENTRY]}))
    out = tmp_path / "out"
    assert main(argv(seg, out, manifest, "--gp-png")) == 0
    picture = cv2.imread(
        str(out / "gp_png" / "gp" / "s1_prediction_rotated_0_layer_17.png"), cv2.IMREAD_UNCHANGED
    )
    padded = gp_loop(GPStandin().eval(), seg, seg / "s1_mask.png" if mask_file else None)
    want = (padded / padded.max() * 255).astype(np.uint8)
    assert picture.shape == want.shape == (256, 256) and picture.dtype == np.uint8
    assert np.mean(picture != want) < 1e-3 and np.abs(picture.astype(int) - want).max() <= 1
    assert picture[150:].any() != mask_file and picture.max() == 255


def test_gp_png_without_a_gp_model_is_one_line(data, tmp_path, capsys):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(SMALL_MODELS))
    assert main(argv(data, tmp_path / "out", manifest, "--gp-png")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gp-png" in err[0] and "m.json" in err[0]


def test_torchrun_two_ranks_with_the_gp_family_give_one_process_bytes(tmp_path, mixed):
    """torchrun (two CPU ranks, gloo) over a mixed manifest with the real TimeSformer: the bytes of one process."""
    import os
    import subprocess
    import sys

    from ink_infer.synthetic.fragments import write_dataset

    frags = write_dataset(tmp_path / "d", test=[("a", 170, 200), ("b", 200, 170)], seed=3)
    one, ranks = tmp_path / "one", tmp_path / "ranks"
    assert main(argv(frags, one, mixed)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ink_infer.submit", *argv(frags, ranks, mixed)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert maps(ranks) == maps(one) and len(maps(one)) == 2 * 4
    assert sorted(p["label"] for p in report_of(ranks)["parts"]) == ["rank 0 of 2", "rank 1 of 2"]
