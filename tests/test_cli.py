"""The submit CLI end to end on synthetic Kaggle-layout folders: outputs, row order, and every bad input.

Runs in-process (``submit.main(argv)``) with small real models at a large stride, so the whole path (discovery,
validation, streaming, models, stitching, threshold, RLE, report, previews) is exercised in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from ink_infer.rle import read_submission, rle_decode
from ink_infer.submit import main
from ink_infer.synthetic import write_dataset

SMALL_MODELS = {
    "format": 1,
    "name": "test-small",
    "threshold": {"percentile": 0.93, "region": "covered"},
    "models": [
        {"name": "m25d", "arch": "2.5d", "backbone": "resnet10t", "in_chans": 4, "num_3d_layer": 1,
         "z_range": [24, 40], "tile": 128, "file": None, "sha256": None},
        {"name": "m3d", "arch": "csn3d", "stage_blocks": [1, 1, 1, 1], "in_chans": 1, "z_range": [24, 40],
         "tile": 192, "crop": 128, "file": None, "sha256": None},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    # odd sizes, and a sample order that is not sorted
    return write_dataset(root, test=[("b", 215, 343), ("a", 161, 290)], seed=5)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "m.json"
    path.write_text(json.dumps(SMALL_MODELS))
    return path


def run_cli(data: Path, out: Path, manifest: Path, *extra: str) -> int:
    argv = ["--data", str(data), "--out", str(out), "--manifest", str(manifest), "--allow-random-weights"]
    return main([*argv, "--stride", "64", "--quiet", *extra])


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_submission_has_the_fragments_shapes_rows_and_ink_inside_the_mask(dataset, manifest, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(dataset, out, manifest) == 0
    rows = read_submission(out / "submission.csv")
    assert [r[0] for r in rows] == ["b", "a"]  # sample_submission.csv order
    for frag_id, rle in rows:
        mask = cv2.imread(str(dataset / "test" / frag_id / "mask.png"), cv2.IMREAD_GRAYSCALE) > 0
        ink = rle_decode(rle, mask.shape)
        assert ink.any() and not ink[~mask].any()
        assert 0.02 < ink.sum() / mask.sum() < 0.10  # ~7 % of the covered mask at percentile 0.93
        assert (out / "previews" / f"{frag_id}.png").stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert [m["status"] for m in report["models"]] == ["ok", "ok"]
    assert all(m["random_weights"] for m in report["models"])
    assert report["models"][0]["fragments"]["b"]["windows"] > 0
    assert report["environment"]["torch"]
    assert "m25d" in capsys.readouterr().out  # the final table


def test_dry_run_writes_a_report_and_no_submission(dataset, manifest, tmp_path, capsys):
    out = tmp_path / "dry"
    assert run_cli(dataset, out, manifest, "--dry-run", "--max-windows", "3", "--scale-to", "8181x6330") == 0
    assert not (out / "submission.csv").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "dry-run"
    assert all(f["windows"] <= 3 for m in report["models"] for f in m["fragments"].values())


def corrupt(kind: str, comp: Path) -> str:
    """Apply one bad input to a copied competition folder; returns text the error line must contain."""
    vol = comp / "test" / "a" / "surface_volume"
    if kind == "missing_slice":
        (vol / "37.tif").unlink()
        return "37.tif"
    if kind == "extra_slice":
        shutil.copy(vol / "00.tif", vol / "65.tif")
        return "65.tif"
    if kind == "slice_shape":
        tifffile.imwrite(vol / "37.tif", np.zeros((100, 120), np.uint16))
        return "37.tif"
    if kind == "slice_dtype":
        tifffile.imwrite(vol / "12.tif", np.zeros((161, 290), np.float32))
        return "12.tif"
    if kind == "mask_shape":
        cv2.imwrite(str(comp / "test" / "a" / "mask.png"), np.full((100, 100), 255, np.uint8))
        return "mask.png"
    if kind == "truncated_tiff":
        data = (vol / "20.tif").read_bytes()
        (vol / "20.tif").write_bytes(data[: len(data) // 2])
        return "20.tif"
    if kind == "corrupt_tiff":
        (vol / "21.tif").write_bytes(os.urandom(5000))
        return "21.tif"
    if kind == "non_tiff":
        (vol / "22.tif").write_text("not an image")
        return "22.tif"
    if kind == "sample_names_missing":
        (comp / "sample_submission.csv").write_text("Id,Predicted\nb,1 1\nzz,1 1\n")
        return "zz"
    raise AssertionError(kind)


BAD_INPUTS = ["missing_slice", "extra_slice", "slice_shape", "slice_dtype", "mask_shape", "truncated_tiff",
              "corrupt_tiff", "non_tiff", "sample_names_missing"]  # fmt: skip


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_naming_the_file(kind, dataset, manifest, tmp_path, capsys):
    comp = copy_dataset(dataset, tmp_path / "comp")
    needle = corrupt(kind, comp)
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert not (out / "submission.csv").exists()


def test_missing_mask_falls_back_to_every_pixel_with_a_warning(dataset, manifest, tmp_path):
    comp = copy_dataset(dataset, tmp_path / "comp")
    (comp / "test" / "a" / "mask.png").unlink()
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 0
    report = json.loads((out / "report.json").read_text())
    assert any("mask" in w for w in report["warnings"])
    rows = dict(read_submission(out / "submission.csv"))
    assert rle_decode(rows["a"], (161, 290)).any()


def test_empty_mask_gives_an_empty_prediction(dataset, manifest, tmp_path):
    comp = copy_dataset(dataset, tmp_path / "comp")
    cv2.imwrite(str(comp / "test" / "a" / "mask.png"), np.zeros((161, 290), np.uint8))
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 0
    rows = dict(read_submission(out / "submission.csv"))
    assert rows["a"] == "" and rows["b"] != ""


def test_missing_sample_submission_falls_back_to_sorted_ids(dataset, manifest, tmp_path):
    comp = copy_dataset(dataset, tmp_path / "comp")
    (comp / "sample_submission.csv").unlink()
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 0
    assert [r[0] for r in read_submission(out / "submission.csv")] == ["a", "b"]
    assert any("sample_submission" in w for w in json.loads((out / "report.json").read_text())["warnings"])


def test_fragment_smaller_than_one_window_is_zero_padded(manifest, tmp_path):
    comp = write_dataset(tmp_path / "d", test=[("a", 100, 90)], seed=1)
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 0
    (frag_id, rle), = read_submission(out / "submission.csv")
    assert rle_decode(rle, (100, 90)).shape == (100, 90)
    assert any("smaller than one window" in w for w in json.loads((out / "report.json").read_text())["warnings"])


def test_unwritable_out_exits_2(dataset, manifest, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_cli(dataset, blocker / "out", manifest) == 2
    err = capsys.readouterr().err
    assert "--out" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda m: m["models"][0].update(colour="red"), "unknown keys ['colour']"),
        (lambda m: m["models"][0].pop("tile"), "missing keys ['tile']"),
        (lambda m: m["models"][0].update(z_range=[40, 70]), "outside the volume"),
        (lambda m: m["models"][0].update(file="../../etc/passwd"), "escapes --weights"),
        (lambda m: m["models"][0].update(backbone="no_such_net"), "unknown timm backbone"),
    ],
)
def test_bad_manifest_exits_2_naming_the_entry(change, needle, dataset, tmp_path, capsys):
    m = json.loads(json.dumps(SMALL_MODELS))
    change(m)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(m))
    assert run_cli(dataset, tmp_path / "out", path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "m25d" in err, err


def test_entry_without_weights_needs_the_flag(dataset, manifest, tmp_path, capsys):
    argv = ["--data", str(dataset), "--out", str(tmp_path / "o"), "--manifest", str(manifest), "--quiet"]
    assert main(argv) == 2
    assert "--allow-random-weights" in capsys.readouterr().err
