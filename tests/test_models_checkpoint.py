"""Checkpoint loading: Lightning/EMA/bare layouts load strictly and reproduce the source model; bad files are refused
with a one-line ``UserError`` naming the file or key, before anything in them runs."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from timm.utils import ModelEmaV2
from torch import nn

from ink_infer.config import ModelSpec
from ink_infer.errors import UserError
from ink_infer.manifest import find_weights, load_manifest, sha256_file
from ink_infer.models.checkpoint import (
    check_hyper_parameters,
    hyper_parameters_for,
    load_weights,
    save_checkpoint,
    z_range_of,
)
from ink_infer.models.inkdet25d import InkDet25D
from tests.helpers import TEST_THREADS

ROOT = Path(__file__).resolve().parents[1]
IO_SHAPES = (
    ROOT.parent / "shared" / "reference" / "state_dicts" / "_io_shapes.json"
)  # ../shared beside the checkout
SPEC = ModelSpec(
    name="tiny_fold0",
    arch="2.5d",
    in_chans=2,
    z_range=(20, 24),
    tile=64,
    backbone="test_resnet",
    num_3d_layer=1,
    file="tiny/fold0/best_fbeta.ckpt",
)

torch.set_num_threads(TEST_THREADS)


def small_model(seed: int) -> nn.Module:
    """The SPEC architecture, shrunk (dim 16), with seed-dependent weights and BN statistics."""
    torch.manual_seed(seed)
    model = InkDet25D(SPEC.backbone, SPEC.in_chans, SPEC.num_3d_layer, SPEC.n_slices, dim=16)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.2)
    return model.eval()


def output(model: nn.Module) -> torch.Tensor:
    x = torch.randn(2, SPEC.n_slices, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model(x)


def lightning_dict(model: nn.Module | None, ema: nn.Module | None, **hparams: object) -> dict:
    state = {}
    for prefix, m in (("model.", model), ("model_ema.module.", ema)):
        if m is not None:
            state |= {prefix + k: v.clone() for k, v in m.state_dict().items()}
    hp = hyper_parameters_for(SPEC) | {"shift_z": 2, "lr": 1e-3} | hparams
    return {
        "epoch": 7,
        "global_step": 100,
        "pytorch-lightning_version": "2.0.2",
        "state_dict": state,
        "hyper_parameters": hp,
    }


def write(tmp_path: Path, obj: object, name: str = SPEC.file) -> tuple[Path, ModelSpec]:
    """Save under a weights dir, resolve it like the pipeline does; the spec carries the file's size and sha256."""
    path = tmp_path / "weights" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    spec = dataclasses.replace(SPEC, file=name, size=path.stat().st_size, sha256=sha256_file(path))
    return find_weights(spec, tmp_path / "weights"), spec


def refused(model: nn.Module, path: Path, spec: ModelSpec) -> str:
    with pytest.raises(UserError) as info:
        load_weights(model, path, spec)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_lightning_checkpoint_loads_the_ema_copy_and_reproduces_it(tmp_path: Path) -> None:
    raw, ema = small_model(1), small_model(2)
    path, spec = write(tmp_path, lightning_dict(raw, ema, pos_weight=torch.tensor(2.0)))
    fresh = small_model(3)
    info = load_weights(fresh, path, spec)
    assert info["prefix"] == "model_ema.module." and info["sha256"] == spec.sha256
    assert info["hyper_parameters"]["model_name"] == "test_resnet"
    assert json.loads(json.dumps(info))["hyper_parameters"]["pos_weight"] == 2.0  # report-ready
    torch.testing.assert_close(output(fresh), output(ema), rtol=0, atol=0)
    assert not torch.allclose(output(fresh), output(raw))


def test_model_prefix_alone_is_used(tmp_path: Path) -> None:
    raw = small_model(1)
    path, spec = write(tmp_path, lightning_dict(raw, None))
    fresh = small_model(3)
    assert load_weights(fresh, path, spec)["prefix"] == "model."
    torch.testing.assert_close(output(fresh), output(raw), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_bare_state_dict_loads(tmp_path: Path, suffix: str) -> None:
    src = small_model(4)
    path, spec = write(tmp_path, src.state_dict(), name=f"tiny/bare{suffix}")
    fresh = small_model(5)
    info = load_weights(fresh, path, spec)
    assert info["prefix"] == "" and info["hyper_parameters"] is None
    torch.testing.assert_close(output(fresh), output(src), rtol=0, atol=0)


def test_save_checkpoint_round_trip_with_timm_ema(tmp_path: Path) -> None:
    model = small_model(6)
    ema = ModelEmaV2(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    ema.update(model)  # now the EMA differs from the model
    path = tmp_path / "run" / "fold0" / "best_fbeta.ckpt"
    save_checkpoint(
        model, path, hyper_parameters_for(SPEC) | {"out": tmp_path, "blocks": (1, 2)}, ema_model=ema
    )
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["out"] == str(tmp_path) and raw["hyper_parameters"]["blocks"] == [1, 2]
    n = len(model.state_dict())
    assert sum(k.startswith("model.") for k in raw["state_dict"]) == n
    assert sum(k.startswith("model_ema.module.") for k in raw["state_dict"]) == n
    fresh = small_model(7)
    load_weights(fresh, path, SPEC)
    torch.testing.assert_close(output(fresh), output(ema.module), rtol=0, atol=0)
    assert not list(path.parent.glob("*.tmp"))


def test_wrong_sha256_is_refused_before_loading(tmp_path: Path) -> None:
    path, spec = write(tmp_path, lightning_dict(small_model(1), None))
    msg = refused(small_model(2), path, dataclasses.replace(spec, sha256="0" * 64))
    assert str(path) in msg and "sha256" in msg


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path, spec = write(tmp_path, lightning_dict(small_model(1), None))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert "bytes" in refused(small_model(2), path, spec)  # the manifest's size catches it first
    msg = refused(small_model(2), path, dataclasses.replace(spec, size=None, sha256=None))
    assert str(path) in msg and "not a readable torch checkpoint" in msg


def test_not_a_torch_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights" / "junk.ckpt"
    path.parent.mkdir()
    path.write_text("this is not a checkpoint\n" * 10)
    msg = refused(small_model(1), path, dataclasses.replace(SPEC, file="junk.ckpt"))
    assert str(path) in msg


class Exploit:
    """Unpickling this would run a shell command (creating the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    obj = lightning_dict(small_model(1), None)
    obj["hyper_parameters"]["payload"] = Exploit(marker)
    path, spec = write(tmp_path, obj)
    msg = refused(small_model(2), path, spec)
    assert str(path) in msg and "refused to unpickle" in msg and "system" in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda sd: sd.pop("model_ema.module.head.3.bias"), "missing: head.3.bias"),
        (
            lambda sd: sd.__setitem__("model_ema.module.extra.weight", torch.zeros(3)),
            "unexpected: extra.weight",
        ),
        (
            lambda sd: sd.__setitem__("model_ema.module.head.3.bias", torch.zeros(2)),
            "head.3.bias (2,) vs model (1,)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_key_mismatch_is_refused(tmp_path: Path, edit, expected: str) -> None:
    obj = lightning_dict(None, small_model(1))
    edit(obj["state_dict"])
    path, spec = write(tmp_path, obj)
    msg = refused(small_model(2), path, spec)
    assert str(path) in msg and expected in msg


@pytest.mark.parametrize(
    ("hparams", "expected"),
    [
        ({"num_3d_layer": 6}, "num_3d_layer=6"),
        ({"model_name": "resnetrs50"}, "model_name='resnetrs50'"),
        ({"in_chans": 3}, "in_chans=3"),
        ({"end_z": -15}, "end_z=-15 (slices [20, 50])"),
    ],
    ids=["num_3d_layer", "model_name", "in_chans", "end_z"],
)
def test_disagreeing_hyper_parameters_are_refused(tmp_path: Path, hparams: dict, expected: str) -> None:
    path, spec = write(tmp_path, lightning_dict(None, small_model(1), **hparams))
    msg = refused(small_model(2), path, spec)
    assert str(path) in msg and expected in msg and SPEC.name in msg


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    msg = refused(small_model(1), tmp_path / "nope.ckpt", SPEC)
    assert "nope.ckpt" in msg


def test_z_range_of_negative_end() -> None:
    assert z_range_of(15, -15) == (15, 50)
    assert z_range_of(16, -17) == (16, 48)
    assert z_range_of(0, None) == (0, 65)


def test_manifest_specs_agree_with_reference_hyper_parameters(tmp_path: Path) -> None:
    """The team's constructor kwargs (depth as the string "50") pass the check for every manifest entry."""
    if not IO_SHAPES.is_file():
        pytest.skip(f"{IO_SHAPES} not available")
    io = json.loads(IO_SHAPES.read_text())
    for spec in load_manifest(ROOT / "weights_manifest.json").models:
        kwargs = io[spec.name.rsplit("_fold", 1)[0]]["ctor_kwargs"]
        check_hyper_parameters(kwargs, spec, tmp_path / "x.ckpt")
        check_hyper_parameters(hyper_parameters_for(spec), spec, tmp_path / "x.ckpt")
        if spec.arch == "csn3d":
            with pytest.raises(UserError, match="depth='101'"):
                check_hyper_parameters(kwargs | {"depth": "101"}, spec, tmp_path / "x.ckpt")


def test_manifest_widths_build_the_small_model_and_guard_its_checkpoint(tmp_path: Path) -> None:
    """``dim`` / ``base_channels`` / ``head_dim`` reach the builders, go into hyper_parameters, and a checkpoint
    of another width is refused by name; reference checkpoints (no widths saved) mean the reference widths."""
    from ink_infer.models import build_model

    small = dataclasses.replace(SPEC, dim=16)
    model = build_model(small)
    assert model.conv_proj[0].out_channels == 16
    assert hyper_parameters_for(small)["dim"] == 16 and "dim" not in hyper_parameters_for(SPEC)
    check_hyper_parameters(hyper_parameters_for(small), small, tmp_path / "x.ckpt")
    with pytest.raises(UserError, match="dim=512, manifest model 'tiny_fold0' says 16"):
        check_hyper_parameters(hyper_parameters_for(SPEC), small, tmp_path / "x.ckpt")
    csn = ModelSpec(
        name="c", arch="csn3d", in_chans=1, z_range=(20, 36), tile=64, stage_blocks=(1, 1, 1, 1),
        base_channels=8, head_dim=24,
    )  # fmt: skip
    net = build_model(csn)
    assert net.backbone.conv1[0].out_channels == 8 and net.head[1].out_channels == 24
    with torch.inference_mode():
        assert net(torch.randn(1, 16, 64, 64)).shape == (1, 1, 2, 2)
    with pytest.raises(UserError, match="base_channels=16"):
        check_hyper_parameters({"base_channels": 16}, csn, tmp_path / "x.ckpt")
