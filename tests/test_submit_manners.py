"""What a new user meets first: mistyped options, --help, errors in paths and weights before torch loads, files
without hashes, where the partials go and whether a rerun reuses them, and what report.json says about the run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ink_infer.manifest import PACKAGED_MANIFEST, sha256_file
from ink_infer.run import partials
from ink_infer.submit import build_parser, main
from tests.helpers import one_error_line, report_of, run_cli, write_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("typo", "meant"), [("--dryrun", "--dry-run"), ("--weigths", "--weights")])
def test_a_mistyped_option_gets_the_usage_line_and_a_suggestion(typo, meant, capsys):
    with pytest.raises(SystemExit) as info:
        main([typo, "x"] if typo == "--weigths" else [typo])
    assert info.value.code == 2
    usage, error = capsys.readouterr().err.strip().splitlines()
    assert usage.startswith("usage: python -m ink_infer.submit --data DIR")
    assert error == f"error: unrecognized argument {typo} (did you mean {meant}?)"


def test_help_explains_every_option_with_its_default_and_gives_examples():
    parser = build_parser()
    text = " ".join(parser.format_help().split())  # the wrapping aside
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
    assert "(default: 32)" in text and "(default: 0.01)" in text and "(default: scheduled)" in text
    assert "quantile (in [0, 1])" in text and "percentile" not in text.split("examples:")[0].lower()
    examples = text.split("examples:")[1]
    assert examples.count("python -m ink_infer.submit") >= 2 and "--dry-run" in examples


def _cli_in_a_fresh_python(*argv: str) -> subprocess.CompletedProcess:
    """The CLI in a new interpreter, reporting whether torch had been imported when it returned."""
    code = ("import sys; from ink_infer.submit import main; rc = main(sys.argv[1:]); "
            "print('torch imported:', 'torch' in sys.modules); sys.exit(rc)")  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO, timeout=120
    )


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no_data", "--data not found"),
        ("no_manifest", "manifest not found"),
        ("weights_is_a_file", "--weights is a file, expected a folder"),
        ("weights_missing", "18 of 18 weight files of"),
    ],
)
def test_path_and_weights_errors_come_before_torch_is_imported(case, needle, data, tmp_path):
    (tmp_path / "a_file").write_text("")
    argv = {
        "no_data": ["--data", str(tmp_path / "nope")],
        "no_manifest": ["--data", str(data), "--manifest", str(tmp_path / "nope.json")],
        "weights_is_a_file": ["--data", str(data), "--weights", str(tmp_path / "a_file")],
        "weights_missing": ["--data", str(data), "--weights", str(tmp_path)],
    }[case]
    proc = _cli_in_a_fresh_python(*argv, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == "torch imported: False"
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and needle in line


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("devices_misspelt", "'gpu0' is not a device"),
        ("devices_mixed", "all devices must be of one type"),
        ("zarr_2d", "a 2-D array"),
        ("slice_missing", "missing"),
        ("partials_is_a_file", "--partials is a file, expected a folder"),
    ],
)
def test_device_zarr_data_and_partials_errors_come_before_torch_is_imported(case, needle, data, tmp_path):
    """#27 items 10 and 18: what needs no torch is checked before torch loads: a --devices list's spelling, the
    fragments and segments found and opened, --partials."""
    argv = ["--data", str(data), "--allow-random-weights"]
    if case == "devices_misspelt":
        argv += ["--devices", "cpu,gpu0"]
    elif case == "devices_mixed":
        argv += ["--devices", "cpu,cuda:0"]
    elif case == "zarr_2d":
        zarr = pytest.importorskip("zarr")
        (tmp_path / "segs").mkdir()
        zarr.create_array(str(tmp_path / "segs" / "s.zarr"), shape=(64, 64), dtype="uint16")
        argv = ["--data", str(tmp_path / "segs"), "--allow-random-weights"]
    elif case == "slice_missing":
        copy = tmp_path / "data"
        shutil.copytree(data, copy)
        next(copy.glob("test/*/surface_volume/37.tif")).unlink()
        argv = ["--data", str(copy), "--allow-random-weights"]
    else:
        (tmp_path / "a_file").write_text("")
        argv += ["--partials", str(tmp_path / "a_file")]
    proc = _cli_in_a_fresh_python(*argv, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == "torch imported: False"
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and needle in line, line


def test_missing_weights_are_counted_and_the_ways_out_named(data, tmp_path, capsys):
    assert main(["--data", str(data), "--weights", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert f"18 of 18 weight files of {PACKAGED_MANIFEST} missing under {tmp_path}" in line
    first = json.loads(PACKAGED_MANIFEST.read_text())["models"][0]["file"]
    assert f"(first: {first} for model" in line
    assert "--allow-random-weights" in line and "python -m ink_infer.manifest hash" in line


def _checkpoint_manifest(tmp_path: Path, path: Path, *, hashed: bool) -> Path:
    entry = {"file": "m25d.ckpt", "sha256": sha256_file(path) if hashed else None}
    return write_manifest(tmp_path / "m.json", lambda m: m["models"][0].update(entry))


def test_weights_without_a_hash_load_with_a_warning_and_are_reported(
    weights_dir, data, tmp_path, standins, caplog
):
    weights, path, _ = weights_dir
    m = _checkpoint_manifest(tmp_path, path, hashed=False)
    assert run_cli(data, tmp_path / "out", m, "--weights", str(weights)) == 0
    warned = [r.getMessage() for r in caplog.records if "no sha256" in r.getMessage()]
    assert len(warned) == 1 and "1 of 2 weight file(s)" in warned[0] and "--require-hashes" in warned[0]
    assert report_of(tmp_path / "out")["unverified_weights"] == ["m25d"]


def test_require_hashes_refuses_them_before_any_compute(weights_dir, data, tmp_path, standins, capsys):
    weights, path, _ = weights_dir
    m = _checkpoint_manifest(tmp_path, path, hashed=False)
    assert run_cli(data, tmp_path / "out", m, "--weights", str(weights), "--require-hashes") == 2
    line = one_error_line(capsys)
    assert "no sha256" in line and "refused (--require-hashes)" in line
    assert not (tmp_path / "out" / "report.json").exists()
    hashed = _checkpoint_manifest(
        tmp_path, path, hashed=True
    )  # with its hash it runs, and nothing is unverified
    assert run_cli(data, tmp_path / "ok", hashed, "--weights", str(weights), "--require-hashes") == 0
    assert report_of(tmp_path / "ok")["unverified_weights"] == []


def test_partials_go_where_asked_and_are_deleted_after_the_submission_when_not_kept(
    data, manifest, tmp_path, standins, capsys
):
    out, partials = tmp_path / "out", tmp_path / "elsewhere"
    assert run_cli(data, out, manifest, "--partials", str(partials)) == 0
    assert len(list(partials.glob("*.npz"))) == 4 and not (out / "partials").exists()
    assert run_cli(data, out, manifest, "--partials", str(partials), "--no-keep-partials") == 0
    rep = report_of(out)
    assert rep["partials"]["dir"] == str(partials) and rep["partials"]["keep"] is False
    assert rep["partials"]["deleted"] == 4 and not partials.exists()  # reused, then deleted
    assert (out / "submission.csv").is_file()


def test_only_our_own_partials_are_deleted_from_a_users_folder(data, manifest, tmp_path, standins):
    """#27 item 2: ``--partials DIR --no-keep-partials`` deletes the partials this tool wrote, never the user's files
    beside them (an ``.npz`` of theirs, one named like ours, a folder named like our spilled maps')."""
    import numpy as np

    out, partials = tmp_path / "out", tmp_path / "mine"
    partials.mkdir()
    np.savez(partials / "results.npz", x=np.arange(3))
    np.savez(partials / "model.frag.0123abcd.npz", x=np.arange(3))  # our naming, not our content
    (partials / "maps.1").mkdir()
    (partials / "maps.1" / "notes.txt").write_text("mine")
    theirs = sorted(p.name for p in partials.rglob("*"))
    assert run_cli(data, out, manifest, "--partials", str(partials), "--no-keep-partials") == 0
    assert report_of(out)["partials"]["deleted"] == 4
    assert sorted(p.name for p in partials.rglob("*")) == theirs


def test_on_kaggle_the_partials_stay_out_of_the_working_folder(
    data, manifest, tmp_path, standins, monkeypatch
):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    working = tmp_path / "working"
    assert run_cli(data, working, manifest) == 0
    rep = report_of(working)
    assert rep["partials"]["dir"] == str(tmp_path / "tmp" / "ink_infer_partials")
    assert rep["partials"]["deleted"] == 4 and not list(tmp_path.rglob("*.npz"))
    assert sorted(p.name for p in working.iterdir()) == ["previews", "report.json", "submission.csv"]


def test_a_rerun_reuses_only_what_the_same_code_computed_and_says_reused(
    data, manifest, tmp_path, standins, monkeypatch, capsys
):
    out = tmp_path / "out"
    assert run_cli(data, out, manifest) == 0
    capsys.readouterr()
    assert run_cli(data, out, manifest) == 0
    table = capsys.readouterr().out
    assert [ln.split()[1] for ln in table.splitlines() if ln.startswith(("m25d", "m3d"))] == [
        "reused",
        "reused",
    ]
    monkeypatch.setattr(partials, "code_digest", lambda: "other code")  # ink_infer changed since
    assert run_cli(data, out, manifest) == 0
    assert report_of(out)["partials"]["reused"] == []
    assert [
        ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith(("m25d", "m3d"))
    ] == [
        "ok",
        "ok",
    ]


def test_report_records_when_how_and_where_in_absolute_paths(data, manifest, tmp_path, standins, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = Path("relative_out")
    assert run_cli(data, rel, manifest) == 0
    rep = report_of(tmp_path / rel)
    assert rep["started"].endswith("+00:00") and rep["started"][:4].isdigit()
    assert rep["command"][1:3] == ["--data", str(data)]
    assert rep["options"]["out"] == str(tmp_path / rel) and Path(rep["data"]).is_absolute()
    assert rep["partials"]["dir"] == str(tmp_path / rel / "partials") and Path(rep["manifest"]).is_absolute()
