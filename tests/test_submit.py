"""The submit CLI end to end on synthetic Kaggle-layout folders: outputs, row order, dry runs, bad manifests.

Runs in-process (``submit.main(argv)``) with small real models at a large stride, so the whole path (discovery,
validation, streaming, models, stitching, threshold, RLE, report, previews) is exercised in seconds. Bad input,
failing models, a full disk, signals and resume are in test_run_inputs.py and test_run_faults.py.
"""

from __future__ import annotations

import json

import cv2
import pytest

from ink_infer.outputs.rle import read_submission, rle_decode
from ink_infer.submit import main
from tests.helpers import SMALL_MODELS, run_cli


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


# --- threshold overrides and provenance, over the reference run's partials (stand-ins: nothing is recomputed) -----


def frag_outputs(out) -> dict:
    return json.loads((out / "report.json").read_text())["submission"]["fragments"]


def mask_pixels(data, frag_id: str) -> int:
    return int((cv2.imread(str(data / "test" / frag_id / "mask.png"), cv2.IMREAD_GRAYSCALE) > 0).sum())


def test_threshold_override_sets_the_quantile_and_keeps_the_manifest_region(
    data, manifest, reference, tmp_path
):
    import shutil

    out = shutil.copytree(reference, tmp_path / "out")
    base = frag_outputs(reference)
    assert run_cli(data, out, manifest, "--threshold", "0.5") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["threshold"] == {"percentile": 0.5, "region": "covered"}
    assert (
        len(report["partials"]["reused"]) == 4
    )  # the threshold is applied after the units: nothing recomputed
    for frag_id, f in frag_outputs(out).items():
        h, w = report["fragments"][frag_id]["shape"]
        assert f["region_pixels"] == base[frag_id]["region_pixels"]
        # ink: the pixels above the region's median (ink only inside the region)
        assert f["ink_fraction"] * h * w == pytest.approx(0.5 * f["region_pixels"], rel=0.02)
        assert base[frag_id]["ink_fraction"] * h * w == pytest.approx(0.07 * f["region_pixels"], rel=0.1)
        assert f["threshold"] < base[frag_id]["threshold"]


def test_threshold_region_override_thresholds_over_the_whole_mask(data, manifest, reference, tmp_path):
    import shutil

    out = shutil.copytree(reference, tmp_path / "out")
    assert run_cli(data, out, manifest, "--threshold-region", "mask") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["threshold"] == {"percentile": 0.93, "region": "mask"}  # the manifest's percentile kept
    for frag_id, f in frag_outputs(out).items():
        h, w = report["fragments"][frag_id]["shape"]
        assert f["region_pixels"] == mask_pixels(data, frag_id)
        assert f["ink_fraction"] * h * w == pytest.approx(0.07 * f["region_pixels"], rel=0.1)


def test_report_records_the_resolved_options_and_the_manifest_hash(data, manifest, reference):
    from ink_infer.manifest import sha256_file

    report = json.loads((reference / "report.json").read_text())
    assert report["manifest_sha256"] == sha256_file(manifest)
    opts = report["options"]
    assert opts["stride"] == 64 and opts["tta"] == "scheduled" and opts["allow_random_weights"] is True
    assert opts["manifest"] == str(manifest) and opts["data"] == str(data) and opts["fresh"] is False
    assert opts["budget"] == {"hours": 9.0, "host_mem_gb": 13.0, "gpu_mem_gb": 16.0, "safety_margin": 0.1}
