"""Fail early, fail clearly: every malformed input a hostile user tried is refused at the start with exit 2 and one
line naming the field, option or file, and no submission is left (or the previous one is); the fault policy
skips a model only for what a model can cause. Stand-in models and data come from conftest.py."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from ink_infer import models
from ink_infer.config import ModelSpec
from ink_infer.manifest import sha256_file
from ink_infer.models.checkpoint import hyper_parameters_for, save_checkpoint
from ink_infer.outputs.rle import read_submission
from ink_infer.run import model_run
from ink_infer.submit import main
from tests.helpers import (
    SHAPES,
    assert_valid_submission,
    model,
    one_error_line,
    report_of,
    run_cli,
    write_manifest,
)
from tests.standins import Standin


def refused(code: int, capsys, out: Path, needle: str, *, previous: bytes | None = None) -> str:
    """Exit 2, exactly one error line holding ``needle`` (returned), no new submission."""
    assert code == 2
    line = one_error_line(capsys)
    assert needle in line, line
    sub = out / "submission.csv"
    assert (sub.read_bytes() == previous) if previous is not None else not sub.exists()
    return line


# --- 1. weights that would silently give a wrong result -------------------------------------------------------


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, 0, -1.0, "heavy", None, True])
def test_a_weight_that_is_not_finite_and_positive_is_refused_at_the_start(
    weight, data, tmp_path, capsys, standins
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "submission.csv").write_text("Id,Predicted\nb,1 1\na,1 1\n")
    previous = (out / "submission.csv").read_bytes()
    m = write_manifest(tmp_path / "m.json", lambda m: m["models"][1].update(weight=weight))  # json writes NaN
    refused(run_cli(data, out, m), capsys, out, f"model 'm3d': weight {weight!r}, expected a finite number > 0",
            previous=previous)  # fmt: skip
    assert not (out / "report.json").exists()  # before any compute


def test_all_models_at_weight_zero_are_refused(data, tmp_path, capsys, standins):
    def zero(m):
        for e in m["models"]:
            e["weight"] = 0

    out = tmp_path / "out"
    refused(run_cli(data, out, write_manifest(tmp_path / "m.json", zero)), capsys, out, "weight 0")


# --- 2. a checkpoint that cannot be loaded is found at the start, not on its model's turn -----------------------


def checkpoints(tmp_path: Path) -> tuple[Path, dict]:
    """Checkpoints of the stand-in for both models of the small manifest; returns (weights dir, manifest)."""
    weights = tmp_path / "weights"
    m = json.loads(write_manifest(tmp_path / "m0.json", lambda m: None).read_text())
    for e in m["models"]:
        spec = ModelSpec(
            name=e["name"], arch=e["arch"], in_chans=e["in_chans"], z_range=tuple(e["z_range"]), tile=e["tile"],
            crop=e.get("crop"), backbone=e.get("backbone"), num_3d_layer=e.get("num_3d_layer"),
            stage_blocks=tuple(e["stage_blocks"]) if e.get("stage_blocks") else None,
        )  # fmt: skip
        path = weights / f"{e['name']}.ckpt"
        save_checkpoint(Standin(), path, hyper_parameters_for(spec))
        e.update(file=path.name, sha256=sha256_file(path), size=path.stat().st_size)
    return weights, m


def rehash(m: dict, weights: Path) -> None:
    for e in m["models"]:
        path = weights / e["file"]
        e.update(sha256=sha256_file(path), size=path.stat().st_size)


@pytest.mark.parametrize("fault", ["truncated", "wrong_keys", "wrong_shape", "text"])
def test_a_last_checkpoint_that_cannot_load_is_refused_before_any_compute(
    fault, data, tmp_path, capsys, monkeypatch, standins
):
    """The manifest's hash matches (taken after the damage), so only opening the file finds it."""
    weights, m = checkpoints(tmp_path)
    last = weights / m["models"][-1]["file"]
    if fault == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif fault == "text":
        last.write_text("hello, not a checkpoint\n")
    else:
        bad = {"state_dict": {"model_ema.module.other" if fault == "wrong_keys" else "model_ema.module.gain":
                              torch.ones(3)}}  # fmt: skip
        torch.save(bad, last)
    rehash(m, weights)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(m))
    built: list[Standin] = []
    # the start checks each checkpoint against its model built by the registry, on the meta device
    monkeypatch.setattr(models, "build_model", lambda spec: built.append(Standin()) or built[-1])
    out = tmp_path / "out"
    code = main(["--data", str(data), "--out", str(out), "--manifest", str(path), "--weights", str(weights),
                 "--stride", "64", "--quiet"])  # fmt: skip
    needle = {"truncated": "not a readable torch checkpoint", "wrong_keys": "does not fit the model",
              "wrong_shape": "shape mismatches", "text": "neither a zip archive nor a pickle"}[fault]  # fmt: skip
    line = refused(code, capsys, out, needle)
    assert str(last) in line
    assert not (out / "report.json").exists()  # refused in the preflight
    assert built and all(m.calls == 0 for m in built)  # models were built (on the meta device), none ran


def test_two_bad_checkpoints_give_one_line_each(data, tmp_path, capsys, standins):
    weights, m = checkpoints(tmp_path)
    for e in m["models"]:
        (weights / e["file"]).write_text("not a checkpoint")
    rehash(m, weights)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(m))
    out = tmp_path / "out"
    assert main(["--data", str(data), "--out", str(out), "--manifest", str(path), "--weights", str(weights),
                 "--quiet"]) == 2  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(ln.startswith("error: ") and "neither a zip" in ln for ln in lines)


def test_a_checkpoint_that_goes_bad_after_the_start_skips_only_its_model(
    data, tmp_path, capsys, monkeypatch, standins
):
    weights, m = checkpoints(tmp_path)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(m))
    real_compute = model_run._compute

    def damage_then_compute(spec, *args, **kwargs):
        if spec.name == "m3d":  # after the preflight and after m25d finished
            (weights / "m3d.ckpt").write_bytes(b"damaged")
        return real_compute(spec, *args, **kwargs)

    monkeypatch.setattr(model_run, "_compute", damage_then_compute)
    out = tmp_path / "out"
    assert main(["--data", str(data), "--out", str(out), "--manifest", str(path), "--weights", str(weights),
                 "--stride", "64", "--quiet"]) == 0  # fmt: skip
    rep = report_of(out)
    assert model(rep, "m25d")["status"] == "ok"
    assert (
        model(rep, "m3d")["status"] == "failed" and "weights unusable mid-run" in model(rep, "m3d")["reason"]
    )
    assert rep["status"] == "ok"
    assert_valid_submission(out)


# --- 3. a disk too full for the outputs is refused at the start -----------------------------------------------


def test_a_disk_without_room_for_the_outputs_is_refused_with_the_figures(data, manifest, tmp_path, capsys, monkeypatch, standins):  # fmt: skip
    import ink_infer.run.preflight as preflight

    monkeypatch.setattr(
        preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 4096)
    )
    out = tmp_path / "out"
    refused(run_cli(data, out, manifest), capsys, out, "0 MB free, the outputs need about 32 MB")
    assert not (out / "report.json").exists()


def test_room_for_the_outputs_but_not_the_partials_warns_and_runs(data, manifest, tmp_path, monkeypatch, standins, caplog):  # fmt: skip
    import ink_infer.run.preflight as preflight

    free = preflight.OUTPUT_BYTES_PER_FRAGMENT * len(SHAPES) + 1000
    monkeypatch.setattr(
        preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, free)
    )
    out = tmp_path / "out"
    assert run_cli(data, out, manifest) == 0
    assert "the partials need about" in caplog.text
    disk = report_of(out)["disk"]
    assert disk["free_bytes"] == free and disk["partials_bytes"] > 1000


# --- 4. every field and number: one schema, one line -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda m: m["threshold"].update(percentile="0.9"), "threshold percentile '0.9', expected a finite number"),
        (lambda m: m["threshold"].update(percentile=None), "threshold percentile None"),
        (lambda m: m["models"][0].update(backbone=["resnet10t"]), "backbone ['resnet10t'], expected a timm model"),
        (lambda m: m["models"][1].update(stage_blocks="abcd"), "stage_blocks 'abcd', expected a list of 4"),
        (lambda m: m["models"][0].update(size="big"), "size 'big', expected a positive integer"),
        (lambda m: m["models"][0].update(num_3d_layer=-1), "num_3d_layer -1, expected a positive integer at most 32"),
        (lambda m: m["models"][0].update(num_3d_layer=1000), "num_3d_layer 1000"),
        (lambda m: m["models"][0].update(tile=True), "tile True, expected a multiple of 32"),
        (lambda m: m["models"][0].update(in_chans=2.0), "in_chans 2.0"),
    ],
    ids=["pct-str", "pct-null", "backbone-list", "stage-blocks-str", "size-str", "3d-layers-neg", "3d-layers-big",
         "tile-bool", "in-chans-float"],
)  # fmt: skip
def test_a_malformed_manifest_field_is_one_line_naming_it(change, needle, data, tmp_path, capsys, standins):
    out = tmp_path / "out"
    refused(run_cli(data, out, write_manifest(tmp_path / "m.json", change)), capsys, out, needle)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--batch-size", "0"], "argument --batch-size: '0', expected a positive integer"),
        (["--batch-size", "-1"], "argument --batch-size: '-1'"),
        (["--max-windows", "0", "--dry-run"], "argument --max-windows: '0', expected a positive integer"),
        (["--max-windows", "-3", "--dry-run"], "argument --max-windows: '-3'"),
        (["--budget-hours", "-1"], "argument --budget-hours: '-1', expected a finite number > 0"),
        (["--budget-hours", "nan"], "argument --budget-hours: 'nan'"),
        (["--threshold", "1.5"], "argument --threshold: '1.5', expected a finite number in [0, 1]"),
        (["--gpu-mem-gb", "0"], "argument --gpu-mem-gb: '0'"),
        (["--stride", "48"], "argument --stride: '48', expected a multiple of 32"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else None,
)
def test_a_bad_cli_number_is_one_line_naming_the_option(argv, needle, data, manifest, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        run_cli(data, out, manifest, *argv)
    refused(info.value.code, capsys, out, needle)


# --- 5. a stride that leaves pixels without a prediction --------------------------------------------------------


@pytest.mark.parametrize("stride", ["160", "512", "100000"])
def test_a_stride_wider_than_the_smallest_model_square_is_refused(stride, data, manifest, tmp_path, capsys):
    """The small manifest's narrowest squares are 128 px (the reference's: the irCSN's 192-px crop)."""
    out = tmp_path / "out"
    code = main(["--data", str(data), "--out", str(out), "--manifest", str(manifest), "--allow-random-weights",
                 "--stride", stride, "--quiet"])  # fmt: skip
    refused(code, capsys, out, f"--stride {stride}: wider than the 128-px square of model 'm25d'")


# --- 6. the fault policy: skip what a model can cause, stop on bugs and on a poisoned device -----------------


def test_a_programming_error_keeps_its_traceback_and_ends_the_run(
    data, manifest, tmp_path, monkeypatch, standins
):
    def broken(*args, **kwargs):
        raise TypeError("a bug in ink_infer")

    monkeypatch.setattr(model_run, "check_outputs", broken)
    out = tmp_path / "out"
    with pytest.raises(TypeError, match="a bug in ink_infer"):  # not swallowed as "model failed"
        run_cli(data, out, manifest)
    rep = report_of(out)
    assert rep["status"] == "failed" and rep["error"].startswith("internal error: TypeError")
    assert not (out / "submission.csv").exists()


def test_a_cuda_error_ends_the_run_instead_of_failing_every_later_model(data, manifest, tmp_path, monkeypatch, capsys):  # fmt: skip
    class Poisoned(Standin):
        def forward(self, x):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    built = []
    monkeypatch.setattr(model_run, "build_model", lambda spec: built.append(spec.name) or Poisoned())
    out = tmp_path / "out"
    assert run_cli(data, out, manifest) == 1
    assert "the device failed" in one_error_line(capsys)
    rep = report_of(out)
    assert rep["status"] == "failed" and built == ["m25d"]  # m3d was never tried
    assert not (out / "submission.csv").exists()


def test_a_dry_run_in_which_a_model_fails_exits_non_zero(data, manifest, tmp_path, capsys, standins):
    standins["m3d"] = {"raise_after": 0}
    out = tmp_path / "out"
    assert run_cli(data, out, manifest, "--dry-run", "--max-windows", "4") == 1
    assert "dry run: 1 model(s) failed: m3d" in capsys.readouterr().err
    assert model(report_of(out), "m3d")["status"] == "failed"


# --- 7. compressed slices: the same submission, byte for byte ---------------------------------------------------


@pytest.mark.parametrize(
    "compression", [{"compression": "lzw"}, {"compression": "lzw", "predictor": True}, {"compression": "zstd"}],
    ids=["lzw", "lzw-predictor", "zstd"],
)  # fmt: skip
def test_compressed_slices_give_a_byte_identical_submission(compression, data, manifest, tmp_path, standins):
    plain = tmp_path / "plain"
    assert run_cli(data, plain, manifest) == 0
    comp = shutil.copytree(data, tmp_path / "comp")
    for tif in sorted((comp / "test").glob("*/surface_volume/*.tif")):
        tifffile.imwrite(tif, tifffile.imread(tif), rowsperstrip=16, **compression)
    with tifffile.TiffFile(next((comp / "test").glob("a/surface_volume/00.tif"))) as t:
        assert t.pages[0].compression != 1  # really compressed
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 0
    assert (out / "submission.csv").read_bytes() == (plain / "submission.csv").read_bytes()


def test_single_segment_slices_are_said_once_per_fragment(data, manifest, tmp_path, standins, caplog):
    comp = shutil.copytree(data, tmp_path / "comp")
    for tif in sorted((comp / "test" / "a").glob("surface_volume/*.tif")):
        tifffile.imwrite(tif, tifffile.imread(tif), compression="zlib", rowsperstrip=10**6)
    assert run_cli(comp, tmp_path / "out", manifest) == 0
    said = [r for r in caplog.records if "single segment" in r.getMessage()]
    assert len(said) == 1 and "65 of 65 slices" in said[0].getMessage()


# --- 8. clear words --------------------------------------------------------------------------------------------


def test_a_header_only_sample_submission_says_it_has_no_rows(data, manifest, tmp_path, capsys):
    comp = shutil.copytree(data, tmp_path / "comp")
    (comp / "sample_submission.csv").write_text("Id,Predicted\n")
    out = tmp_path / "out"
    refused(run_cli(comp, out, manifest), capsys, out, "sample_submission.csv: no rows after the header")


def test_an_id_escaping_test_says_so(data, manifest, tmp_path, capsys):
    comp = shutil.copytree(data, tmp_path / "comp")
    (comp / "sample_submission.csv").write_text("Id,Predicted\n../test/a,1 1\n")
    out = tmp_path / "out"
    refused(run_cli(comp, out, manifest), capsys, out, "row '../test/a' escapes")


def test_an_id_with_spaces_is_written_back_as_the_sample_spells_it(data, manifest, tmp_path, standins):
    comp = shutil.copytree(data, tmp_path / "comp")
    (comp / "sample_submission.csv").write_text("Id,Predicted\n b ,1 1\na,1 1\n")
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 0
    assert [r[0] for r in read_submission(out / "submission.csv")] == [" b ", "a"]


def test_a_damaged_mask_gives_our_line_only(data, manifest, tmp_path, capfd):
    comp = shutil.copytree(data, tmp_path / "comp")
    png = np.frombuffer((comp / "test" / "a" / "mask.png").read_bytes(), dtype=np.uint8)
    (comp / "test" / "a" / "mask.png").write_bytes(png[: len(png) // 3].tobytes())  # libpng complains
    out = tmp_path / "out"
    assert run_cli(comp, out, manifest) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "mask.png" in err[0], err


@pytest.mark.parametrize(
    "case", ["tiff_is_a_folder", "tiff_read_only", "png_is_a_folder", "model_map_folder"]
)
def test_an_output_that_cannot_be_written_is_refused_before_any_compute(case, data, manifest, tmp_path, standins,
                                                                        capsys):  # fmt: skip
    """#27 item 8: ``--save-probabilities`` (and ``--save-model-maps``) outputs checked before compute: a folder or
    a read-only file where one goes is one line, exit 2, and nothing computed."""
    out = tmp_path / "out"
    (out / "probabilities").mkdir(parents=True)
    (out / "masks").mkdir()
    extra = ["--save-probabilities"]
    if case == "tiff_is_a_folder":
        (out / "probabilities" / "a.tif").mkdir()
        needle = "probabilities/a.tif: a folder, where the run writes its probability map"
    elif case == "tiff_read_only":
        (out / "probabilities" / "b.tif").write_bytes(b"")
        (out / "probabilities" / "b.tif").chmod(0o444)
        needle = "probabilities/b.tif: read-only"
        if os.access(out / "probabilities" / "b.tif", os.W_OK):
            pytest.skip("running as a user who may write read-only files (root)")
    elif case == "png_is_a_folder":
        (out / "masks" / "b.png").mkdir()
        needle = "masks/b.png: a folder, where the run writes its ink mask"
    else:
        (out / "probabilities" / "a.m3d.tif").mkdir()
        extra.append("--save-model-maps")
        needle = "probabilities/a.m3d.tif: a folder, where the run writes its model map"
    assert run_cli(data, out, manifest, *extra) == 2
    assert needle in one_error_line(capsys)
    assert not (out / "partials").exists() and not (out / "submission.csv").exists()


def test_a_map_that_fails_to_write_ends_the_run_with_one_line(data, manifest, tmp_path, standins, monkeypatch,
                                                              capsys):  # fmt: skip
    """#27 item 8: a requested map that cannot be written at the end is an error (exit 2), not a warning and 0."""
    from ink_infer.outputs import write

    def fail(path, *args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr(write, "write_mask_png", fail)
    out = tmp_path / "out"
    assert run_cli(data, out, manifest, "--save-probabilities") == 2
    line = one_error_line(capsys)
    assert "masks/" in line and "cannot write (Input/output error)" in line
    assert report_of(out)["status"] == "failed" and (out / "partials").is_dir()
