"""Inputs the run refuses (exit 2, one line naming the file, nothing written) and inputs it tolerates (a warning,
and a valid submission), driven through the CLI with analytic stand-in models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch

from ink_infer.manifest import sha256_file
from ink_infer.outputs.rle import read_submission, rle_decode
from ink_infer.submit import main
from ink_infer.synthetic.fragments import write_dataset
from tests.helpers import (
    SHAPES,
    assert_valid_submission,
    model,
    one_error_line,
    report_of,
    run_cli,
    write_manifest,
)

# --- bad input: exit 2, one line naming the file, nothing written ---------------------------------------------


def corrupt(kind: str, comp: Path, tmp_path: Path) -> str:
    """Apply one bad input to a copied competition folder; returns text the error line must contain."""
    vol = comp / "test" / "a" / "surface_volume"
    h, w = SHAPES["a"]
    if kind == "missing_slice":
        (vol / "37.tif").unlink()
        return "missing 37.tif"
    if kind == "extra_slice":
        shutil.copy(vol / "00.tif", vol / "65.tif")
        return "extra 65.tif"
    if kind == "slice_shape":
        tifffile.imwrite(vol / "37.tif", np.zeros((100, 120), np.uint16))
        return "37.tif: 100x120, other slices 120x170"
    if kind == "slice_dtype":
        tifffile.imwrite(vol / "12.tif", np.zeros((h, w), np.float32))
        return "12.tif"
    if kind == "mask_shape":
        cv2.imwrite(str(comp / "test" / "a" / "mask.png"), np.full((100, 100), 255, np.uint8))
        return "mask.png: 100x100"
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
        return "'zz' names a fragment that is not in"
    if kind == "symlink_broken":  # #27 item 20: a link to another disk is followed; a broken one is refused
        (vol / "30.tif").unlink()
        (vol / "30.tif").symlink_to(tmp_path / "elsewhere" / "30.tif")
        return "30.tif: broken symlink to"
    raise AssertionError(kind)


BAD_INPUTS = ["missing_slice", "extra_slice", "slice_shape", "slice_dtype", "mask_shape", "truncated_tiff",
              "corrupt_tiff", "non_tiff", "sample_names_missing", "symlink_broken"]  # fmt: skip


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_naming_the_file(kind, data, manifest, tmp_path, capsys):
    comp = shutil.copytree(data, tmp_path / "comp")
    needle = corrupt(kind, comp, tmp_path)
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 2
    assert needle in one_error_line(capsys)
    assert not (out / "submission.csv").exists() and not (out / "report.json").exists()


def test_unwritable_out_exits_2(data, manifest, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_cli(data, blocker / "out", manifest) == 2
    assert "--out is not writable" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"sha256": "0" * 64}, "sha256"),
        ({"size": 12}, "manifest says 12"),
        ({"file": "../outside.ckpt"}, "escapes --weights"),
        ({"file": "link.ckpt"}, "outside --weights"),
    ],
    ids=["hash", "size", "dotdot", "symlink"],
)
def test_weights_failing_their_check_or_escaping_exit_2_before_any_compute(
    entry, needle, weights_dir, data, tmp_path, capsys, standins
):
    weights, path, _ = weights_dir
    shutil.copy(path, tmp_path / "outside.ckpt")
    (weights / "link.ckpt").symlink_to(tmp_path / "outside.ckpt")
    real = {"file": "m25d.ckpt", "sha256": sha256_file(path), "size": path.stat().st_size}
    m = write_manifest(tmp_path / "m.json", lambda m: m["models"][0].update({**real, **entry}))
    out = tmp_path / "out"
    assert main(["--data", str(data), "--out", str(out), "--manifest", str(m), "--weights", str(weights),
                 "--allow-random-weights", "--quiet"]) == 2  # fmt: skip
    assert needle in one_error_line(capsys)
    assert not (out / "report.json").exists()  # refused in the preflight, before any model ran


def test_good_checkpoint_is_loaded_weights_only_and_its_hash_reported(
    weights_dir, data, tmp_path, monkeypatch, standins
):
    weights, path, _ = weights_dir
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    m = write_manifest(
        tmp_path / "m.json", lambda m: m["models"][0].update(file="m25d.ckpt", sha256=sha256_file(path))
    )
    out = tmp_path / "out"
    assert run_cli(data, out, m, "--weights", str(weights)) == 0
    assert loads and all(k.get("weights_only") is True for k in loads)
    rep = report_of(out)
    assert model(rep, "m25d")["sha256"] == sha256_file(path) and not model(rep, "m25d")["random_weights"]
    assert model(rep, "m3d")["random_weights"] and model(rep, "m3d")["sha256"] is None
    assert {"torch", "timm", "cuda", "cudnn"} <= set(rep["environment"])


# --- inputs that are tolerated: a warning, and a valid submission ----------------------------------------------


def test_missing_mask_falls_back_to_every_pixel_with_a_warning(data, manifest, tmp_path, standins):
    comp = shutil.copytree(data, tmp_path / "comp")
    (comp / "test" / "a" / "mask.png").unlink()
    (comp / "test" / "b" / "surface_volume" / "notes.txt").write_text("a non-TIFF among the slices")
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 0
    warnings = report_of(out)["warnings"]
    assert any("mask.png: missing, using every pixel" in w for w in warnings)
    assert any("notes.txt: not a slice, ignored" in w for w in warnings)
    assert rle_decode(assert_valid_submission(out)["a"], SHAPES["a"]).any()


def test_empty_mask_gives_an_empty_prediction(data, manifest, tmp_path, standins):
    comp = shutil.copytree(data, tmp_path / "comp")
    cv2.imwrite(str(comp / "test" / "a" / "mask.png"), np.zeros(SHAPES["a"], np.uint8))
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 0
    rows = assert_valid_submission(out)
    assert rows["a"] == "" and rows["b"] != ""
    assert any("no mask pixel" in w for w in report_of(out)["warnings"])


def test_missing_sample_submission_falls_back_to_sorted_ids(data, manifest, tmp_path, standins):
    comp = shutil.copytree(data, tmp_path / "comp")
    (comp / "sample_submission.csv").unlink()
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 0
    assert [r[0] for r in read_submission(out / "submission.csv")] == ["a", "b"]
    assert any("no sample_submission.csv" in w for w in report_of(out)["warnings"])


def test_fragment_smaller_than_one_window_is_zero_padded(manifest, tmp_path, standins):
    comp = write_dataset(tmp_path / "d", test=[("a", 100, 90)], seed=1)
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 0
    ((frag_id, rle),) = read_submission(out / "submission.csv")
    assert frag_id == "a" and rle_decode(rle, (100, 90)).any()
    assert any("smaller than one window" in w for w in report_of(out)["warnings"])


def test_slices_and_segments_linked_from_another_disk_are_followed(
    data, manifest, tmp_path, reference, standins
):
    """#27 item 20: the data folder is the user's own; slices (and whole fragments) that are symlinks to another
    folder are read through the links and give the bytes of the copies."""
    comp = shutil.copytree(data, tmp_path / "comp")
    elsewhere = tmp_path / "other_disk"
    elsewhere.mkdir()
    vol = comp / "test" / "a" / "surface_volume"
    for f in sorted(vol.glob("*.tif"))[:10]:  # some slices linked one by one
        f.rename(elsewhere / f.name)
        f.symlink_to(elsewhere / f.name)
    (comp / "test" / "b").rename(elsewhere / "b")  # a whole fragment linked
    (comp / "test" / "b").symlink_to(elsewhere / "b")
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 0
    assert (out / "submission.csv").read_bytes() == (reference / "submission.csv").read_bytes()
