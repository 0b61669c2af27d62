"""The demo's bytes, recorded before the house was reorganised by stage (commit 8a641f4): the submission.csv of a
plain run, of ``--devices cpu,cpu`` and of two parts + ``--merge-only``, and the probability maps, pixel for pixel.
A refactor that changes a single probability's rounding fails here."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import tifffile

from ink_infer.submit import main
from tests.helpers import recorded_demo_maps

pytestmark = pytest.mark.xdist_group("demo")  # shares the session's demo run (conftest.demo_run)
GOLDEN = Path(__file__).parent / "golden"
RECORDED_CSV = (GOLDEN / "demo_submission.csv").read_bytes()


@pytest.fixture
def demo_data(demo_run: Path) -> Path:
    """The session's plain ``--demo`` run, with its probability maps (and its data, under OUT/demo_data)."""
    return demo_run


def demo_argv(data_out: Path, out: Path, *extra: str) -> list[str]:
    """A --demo run over the data written by ``data_out``'s run (copied: --demo writes its data under OUT)."""
    shutil.copytree(data_out / "demo_data", out / "demo_data")
    return ["--demo", "--out", str(out), "--quiet", *extra]


def test_a_plain_demo_run_gives_the_recorded_bytes(demo_data: Path) -> None:
    assert (demo_data / "submission.csv").read_bytes() == RECORDED_CSV


def test_the_probability_maps_are_the_recorded_pixels(demo_data: Path) -> None:
    recorded = recorded_demo_maps()
    found = {}
    for path in sorted((demo_data / "probabilities").glob("*.tif")):
        pixels = tifffile.imread(path)
        found[path.name] = [
            list(pixels.shape),
            str(pixels.dtype),
            hashlib.sha256(pixels.tobytes()).hexdigest(),
        ]
    assert found == recorded


def test_two_devices_give_the_recorded_bytes(demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "devices"
    assert main(demo_argv(demo_data, out, "--devices", "cpu,cpu")) == 0
    assert (out / "submission.csv").read_bytes() == RECORDED_CSV


def test_parts_and_a_merge_give_the_recorded_bytes(demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    argv = demo_argv(demo_data, out)
    for part in ("0", "1"):
        assert main([*argv, "--num-parts", "2", "--part-id", part]) == 0
        assert not (out / "submission.csv").exists()
    assert main([*argv, "--merge-only"]) == 0
    assert (out / "submission.csv").read_bytes() == RECORDED_CSV
