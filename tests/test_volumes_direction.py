"""``--direction forward|reverse|both``: a synthetic segment whose ink is readable one way only (its ink pixels are
bright in the layers above the middle and dark below), read by a stand-in that sees ink where the first half of its
layers is brighter than the second. ``both`` writes the two maps, which differ on the ink and nowhere else, and
report.json's figures name the direction the ink reads in; ``--reverse-layers`` is ``--direction reverse``; a rerun
with another direction reuses the units already computed (partials are per direction); bad values exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from ink_infer import models
from ink_infer.config import RunConfig
from ink_infer.errors import UserError
from ink_infer.outputs.previews import HEADER_HEIGHT, PANEL_GAP, body_of
from ink_infer.outputs.rle import read_submission
from ink_infer.run import model_run
from ink_infer.volumes.discovery import find_fragments
from ink_infer.volumes.segments import LayerChoice
from tests.helpers import model, one_error_line, report_of, run_cli, write_manifest

SHAPE = (256, 320)
INK = (slice(96, 192), slice(96, 256))  # 32-aligned: the stand-in's 1/32 cells see all ink or none
FAR = (slice(0, 32), slice(0, 320))  # two cells and more from the ink: no window that sees ink reaches it


class DepthOrderModel(nn.Module):
    """Logit ``gain * (mean of the first half of its layers - mean of the second half)``, pooled to 1/32: ink where
    the layers brighten towards the top of the models' order, none where the layers are alike."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((1,), 4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        step = x[:, :half].float().mean(1, keepdim=True) - x[:, half:].float().mean(1, keepdim=True)
        return (nn.functional.avg_pool2d(step, 32) * self.gain).to(x.dtype)


@pytest.fixture
def depth_model(monkeypatch) -> None:
    monkeypatch.setattr(model_run, "build_model", lambda spec: DepthOrderModel())
    monkeypatch.setattr(models, "build_model", lambda spec: DepthOrderModel())


@pytest.fixture(scope="module")
def one_model(tmp_path_factory) -> Path:
    """The 2.5D entry of the small manifest alone (its layers 24..40: the stand-in's first half 24..31)."""
    return write_manifest(tmp_path_factory.mktemp("manifest") / "m.json", lambda m: m["models"].pop(1))


def write_segment(root: Path, *, reads: str = "forward") -> Path:
    """``root/s1``: 65 layers over an all-papyrus mask; the same smooth papyrus in every layer, and on ``INK``
    +6000 in layers 0..31 and -6000 in 32..64: readable as read (``reads="forward"``), or, with the files written in
    the other order, only with the layers reversed (``"reverse"``)."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    papyrus = 20000 + 20 * yy + 15 * xx
    stack = np.repeat(papyrus[None], 65, axis=0)
    stack[:32, INK[0], INK[1]] += 6000
    stack[32:, INK[0], INK[1]] -= 6000
    if reads == "reverse":
        stack = stack[::-1]
    seg = root / "s1"
    (seg / "layers").mkdir(parents=True)
    for z, layer in enumerate(stack.astype(np.uint16)):
        tifffile.imwrite(seg / "layers" / f"{z:02d}.tif", layer)
    cv2.imwrite(str(seg / "s1_mask.png"), np.full(SHAPE, 255, np.uint8))
    return root


def prob_map(out: Path, name: str) -> np.ndarray:
    return tifffile.imread(out / "probabilities" / f"{name}.tif")


def ink_png(out: Path, name: str) -> np.ndarray:
    return cv2.imread(str(out / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE) > 0


@pytest.mark.parametrize("reads", ["forward", "reverse"])
def test_both_directions_differ_on_the_ink_and_the_report_names_the_readable_one(
    tmp_path, one_model, depth_model, reads
):
    data, out = write_segment(tmp_path / "segs", reads=reads), tmp_path / "out"
    assert run_cli(data, out, one_model, "--direction", "both") == 0
    other = "reverse" if reads == "forward" else "forward"
    good, bad = prob_map(out, f"s1.{reads}"), prob_map(out, f"s1.{other}")
    assert not (out / "probabilities" / "s1.tif").exists()
    assert good[INK].min() > 140 and bad[INK].max() < 116  # ink read the right way, and its negative
    np.testing.assert_array_equal(good[FAR], bad[FAR])  # no ink: the layers are alike either way
    assert set(np.unique(good[FAR])) == {128}  # p = 0.5 there
    assert list(dict(read_submission(out / "submission.csv"))) == ["s1.forward", "s1.reverse"]

    rep = report_of(out)
    compared = rep["submission"]["directions"]["s1"]
    assert compared["higher_mean_probability"] == reads and compared["more_ink"] == reads
    assert compared[reads]["mean_probability"] > 0.5 > compared[other]["mean_probability"]
    assert compared[reads]["mean_probability"] == pytest.approx(good.mean() / 255, abs=3e-3)
    inks = {way: ink_png(out, f"s1.{way}") for way in ("forward", "reverse")}
    for way, ink in inks.items():  # the mask is every pixel: fractions of the whole image
        assert compared[way]["ink_fraction"] == pytest.approx(ink.mean(), abs=1e-12)
    assert inks[reads].any() and inks[reads][INK].sum() == inks[reads].sum()  # found ink lies on the ink
    assert compared["agreement"] == pytest.approx((inks["forward"] == inks["reverse"]).mean(), abs=1e-12)
    assert compared["agreement"] < 1
    assert rep["options"]["direction"] == "both" and rep["options"]["reverse_layers"] is False

    # the side-by-side preview holds the two previews as written, forward on the left, under a header of its own
    both = cv2.imread(str(out / "previews" / "s1.both.png"))
    left, right = (cv2.imread(str(out / "previews" / f"s1.{way}.png")) for way in ("forward", "reverse"))
    below = body_of(both)
    np.testing.assert_array_equal(below[: left.shape[0], : left.shape[1]], left)
    x = left.shape[1] + PANEL_GAP
    np.testing.assert_array_equal(below[: right.shape[0], x : x + right.shape[1]], right)
    assert both.shape[0] == HEADER_HEIGHT + max(left.shape[0], right.shape[0])


def test_reverse_layers_is_direction_reverse(tmp_path, one_model, depth_model):
    data = write_segment(tmp_path / "segs")
    assert run_cli(data, tmp_path / "alias", one_model, "--reverse-layers") == 0
    assert run_cli(data, tmp_path / "named", one_model, "--direction", "reverse") == 0
    for name in ("submission.csv", "probabilities/s1.tif", "masks/s1.png"):
        assert (tmp_path / "alias" / name).read_bytes() == (tmp_path / "named" / name).read_bytes(), name
    partials = [sorted(p.name for p in (tmp_path / d / "partials").glob("*.npz")) for d in ("alias", "named")]
    assert partials[0] == partials[1] and len(partials[0]) == 1
    reversed_map = prob_map(tmp_path / "named", "s1")
    assert reversed_map[INK].max() < 116  # reversed indeed: the ink reads as its negative
    options = [report_of(tmp_path / d)["options"] for d in ("alias", "named")]
    assert options[0] == {**options[1], "argv": options[0]["argv"], "out": options[0]["out"]}
    assert options[0]["direction"] == "reverse" and options[0]["reverse_layers"] is True


@pytest.mark.parametrize("first", ["reverse", "forward"])
def test_a_rerun_with_another_direction_computes_only_what_is_missing(
    tmp_path, one_model, depth_model, first
):
    data, out = write_segment(tmp_path / "segs"), tmp_path / "out"
    other = "forward" if first == "reverse" else "reverse"
    assert run_cli(data, out, one_model, "--direction", first) == 0
    single = prob_map(out, "s1")

    assert run_cli(data, out, one_model, "--direction", "both") == 0
    rep = report_of(out)
    assert rep["partials"]["reused"] == [["m25d", f"s1.{first}"]] and rep["partials"]["ignored"] == []
    units = model(rep, "m25d")["fragments"]
    assert units[f"s1.{first}"]["partial"] == "reused" and units[f"s1.{other}"]["partial"] == "saved"
    np.testing.assert_array_equal(prob_map(out, f"s1.{first}"), single)  # the same map, from the same sums

    assert (
        run_cli(data, out, one_model, "--direction", other) == 0
    )  # what both computed, reused the other way
    assert report_of(out)["partials"]["reused"] == [["m25d", "s1"]]
    np.testing.assert_array_equal(prob_map(out, "s1"), prob_map(out, f"s1.{other}"))


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (("--direction", "sideways"), "--direction"),
        (("--reverse-layers", "--direction", "both"), "--reverse-layers is --direction reverse"),
        (("--reverse-layers", "--direction", "forward"), "--reverse-layers is --direction reverse"),
    ],
)
def test_a_bad_direction_is_one_line_and_exit_2(tmp_path, one_model, capsys, extra, said):
    data = write_segment(tmp_path / "segs")
    try:  # argparse's own refusal of a value is a SystemExit; RunConfig's a return value
        code = run_cli(data, tmp_path / "out", one_model, *extra)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert said in one_error_line(capsys)
    assert not (tmp_path / "out" / "report.json").exists()


def test_run_config_resolves_the_direction_and_its_alias():
    made = lambda **kw: RunConfig(data=Path("d"), out=Path("o"), manifest=Path("m"), **kw)  # noqa: E731
    assert (made().direction, made().reverse_layers) == ("forward", False)
    assert (made(reverse_layers=True).direction, made(direction="reverse").reverse_layers) == (
        "reverse",
        True,
    )
    assert made(direction="both").layer_choice == LayerChoice(both=True)
    with pytest.raises(UserError, match="expected one of forward, reverse, both"):
        made(direction="up")
    with pytest.raises(UserError, match="cannot go with --direction both"):
        made(direction="both", reverse_layers=True)


def test_direction_applies_to_segments_and_leaves_kaggle_fragments_as_they_are(tmp_path):
    root = write_segment(tmp_path / "segs")
    found, _ = find_fragments(root, layers=LayerChoice(both=True))
    assert [(f.id, f.pair, f.direction, f.key_id) for f in found] == [
        ("s1.forward", "s1", "forward", "s1"), ("s1.reverse", "s1", "reverse", "s1.reverse"),
    ]  # fmt: skip
    assert found[0].layers == tuple(range(65)) and found[1].layers == tuple(range(64, -1, -1))
    (one,) = find_fragments(root, layers=LayerChoice(reverse=True))[0]
    assert (one.id, one.direction, one.key_id, one.layers) == ("s1", "reverse", "s1.reverse", found[1].layers)

    kaggle = tmp_path / "kaggle" / "a"
    (kaggle / "surface_volume").mkdir(parents=True)
    for choice in (LayerChoice(both=True), LayerChoice(reverse=True)):
        (frag,) = find_fragments(kaggle, layers=choice)[0]
        assert (frag.id, frag.direction, frag.pair, frag.layers, frag.key_id) == ("a", None, None, None, "a")


def test_a_report_without_both_has_no_directions(tmp_path, one_model, depth_model):
    out = tmp_path / "out"
    assert run_cli(write_segment(tmp_path / "segs"), out, one_model) == 0
    assert json.loads((out / "report.json").read_text())["submission"]["directions"] == {}
    assert not (out / "previews" / "s1.both.png").exists()
