"""The submit CLI end to end on synthetic Kaggle-layout folders: outputs, row order, dry runs, bad manifests.

Runs in-process (``submit.main(argv)``) with small real models at a large stride, so the whole path (discovery,
validation, streaming, models, stitching, threshold, RLE, report, previews) is exercised in seconds. Bad input,
failing models, a full disk, signals and resume are in test_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

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


def test_submission_has_the_fragments_shapes_rows_and_ink_inside_the_mask(
    dataset, manifest, tmp_path, capsys
):
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
