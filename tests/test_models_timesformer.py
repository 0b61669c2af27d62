"""The Grand Prize TimeSformer (arch ``timesformer``): its state-dict layout against the reference's key list, its
output layout, its manifest entries, and its weight files: Lightning checkpoints and safetensors load strictly and
reproduce the model; bad files are one line; a checkpoint that only unpickles by running code is never unpickled
by ink_infer's own process, only by ``manifest convert`` in a child, and only with the file's sha256."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ink_infer.config import ModelSpec
from ink_infer.errors import UserError
from ink_infer.manifest import load_manifest, sha256_file
from ink_infer.manifest import main as manifest_main
from ink_infer.models import build_model
from ink_infer.models.checkpoint import check_hyper_parameters, load_weights
from ink_infer.models.timesformer import GPTimeSformer
from ink_infer.run.preflight import check_weights
from ink_infer.submit import main as submit_main
from tests.helpers import TEST_THREADS

needs_tsf = pytest.mark.skipif(
    importlib.util.find_spec("timesformer_pytorch") is None
    or importlib.util.find_spec("safetensors") is None,
    reason="timesformer-pytorch / safetensors not installed: pip install 'ink_infer[timesformer]'",
)
SPEC = ModelSpec(name="gp", arch="timesformer", in_chans=26, z_range=(17, 43), tile=64, with_norm=False)
SPEC_NORM = dataclasses.replace(SPEC, name="gp_norm", with_norm=True)
GP_HPARAMS = {"pred_shape": [117, 93], "size": 64, "with_norm": False}  # what GP-train saves

torch.set_num_threads(TEST_THREADS)


def reference_keys(with_norm: bool) -> dict[str, tuple[int, ...]]:
    """GP_TIMESFORMER.md §1's key list, written out from the document (not from the model)."""
    keys = {
        "backbone.cls_token": (1, 512),
        "backbone.to_patch_embedding.weight": (512, 256),
        "backbone.to_patch_embedding.bias": (512,),
        "backbone.frame_rot_emb.inv_freqs": (32,),
        "backbone.image_rot_emb.scales": (16,),
    }
    for i in range(8):
        for j in (0, 1):  # time attention, space attention
            p = f"backbone.layers.{i}.{j}."
            keys |= {p + "fn.to_qkv.weight": (1152, 512), p + "fn.to_out.0.weight": (512, 384),
                     p + "fn.to_out.0.bias": (512,), p + "norm.weight": (512,), p + "norm.bias": (512,)}  # fmt: skip
        p = f"backbone.layers.{i}.2."
        keys |= {p + "fn.net.0.weight": (4096, 512), p + "fn.net.0.bias": (4096,), p + "fn.net.3.weight": (512, 2048),
                 p + "fn.net.3.bias": (512,), p + "norm.weight": (512,), p + "norm.bias": (512,)}  # fmt: skip
    keys |= {"backbone.to_out.0.weight": (512,), "backbone.to_out.0.bias": (512,),
             "backbone.to_out.1.weight": (16, 512), "backbone.to_out.1.bias": (16,)}  # fmt: skip
    if with_norm:
        keys |= {f"normalization.{k}": (1,) for k in ("weight", "bias", "running_mean", "running_var")}
        keys["normalization.num_batches_tracked"] = ()
    return keys


def seeded(spec: ModelSpec, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(spec)
    if spec.with_norm:
        with torch.no_grad():
            model.normalization.weight.fill_(1.7)
            model.normalization.running_mean.fill_(0.3)
            model.normalization.running_var.fill_(2.0)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """Built once per module (38 M parameters each): the model and the model with its input norm."""
    if importlib.util.find_spec("timesformer_pytorch") is None:
        pytest.skip("timesformer-pytorch not installed: pip install 'ink_infer[timesformer]'")
    return {"plain": seeded(SPEC, 1), "norm": seeded(SPEC_NORM, 2)}


@pytest.fixture(scope="module")
def window() -> torch.Tensor:
    """One window, (1, 1, 26, 64, 64) float32 in the GP's input range [0, 200/255]."""
    return torch.rand(1, 1, 26, 64, 64, generator=torch.Generator().manual_seed(0)) * (200 / 255)


def out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


@pytest.fixture(scope="module")
def expected(models, window) -> dict[str, torch.Tensor]:
    """Each model's logits on the window, computed once."""
    return {kind: out(model, window) for kind, model in models.items()}


def fresh(spec: ModelSpec) -> nn.Module:
    """The model to load into: built on the meta device, then given uninitialised CPU memory (no random init,
    which costs seconds for 38 M parameters here): a strict load has to fill every tensor."""
    with torch.device("meta"):
        model = build_model(spec)
    return model.to_empty(device="cpu")


@pytest.fixture(scope="module")
def weights(models, tmp_path_factory) -> Path:
    """A weights folder with the GP-layout checkpoint of each model (written once)."""
    root = tmp_path_factory.mktemp("weights")
    for name, model in models.items():
        hp = GP_HPARAMS | {"with_norm": name == "norm"}
        torch.save(
            {"epoch": 12, "state_dict": model.state_dict(), "hyper_parameters": hp}, root / f"{name}.ckpt"
        )
    return root


def spec_for(path: Path, spec: ModelSpec = SPEC) -> ModelSpec:
    return dataclasses.replace(spec, file=path.name, size=path.stat().st_size, sha256=sha256_file(path))


def one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# -- the model ---------------------------------------------------------------------------------------------------


@needs_tsf
@pytest.mark.parametrize("kind", ["plain", "norm"])
def test_state_dict_is_the_reference_layout(models, kind: str) -> None:
    model = models[kind]
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == reference_keys(kind == "norm")
    assert len(got) == (142 if kind == "norm" else 137)
    n_params = sum(p.numel() for p in model.backbone.parameters())
    assert n_params == 37_959_696
    assert all(v.dtype == torch.float32 for k, v in model.state_dict().items() if "num_batches" not in k)


@needs_tsf
def test_output_shape_and_row_major_cells(models, window) -> None:
    x = torch.cat([window, window.flip(-1)])
    y = out(models["plain"], x)
    assert y.shape == (2, 1, 4, 4) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert not torch.equal(y[0], y[1])

    class Counting(
        nn.Module
    ):  # logit k = k + 100 * (the frame index the model saw last in its first frame slot)
        def forward(self, v: torch.Tensor) -> torch.Tensor:
            assert v.shape == (2, 26, 1, 64, 64)  # frames first, one channel
            return torch.arange(16.0).expand(v.shape[0], 16) + 100 * v[:, 3, 0, 0, 0, None]

    with torch.device("meta"):
        wrapper = GPTimeSformer()
    wrapper.backbone = Counting()
    frames = torch.arange(26.0)[None, None, :, None, None].expand(2, 1, 26, 64, 64)
    cells = out(wrapper, frames)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    torch.testing.assert_close(cells[:, 0], (4 * rows + cols + 300.0).expand(2, 4, 4))  # k -> (k // 4, k % 4)


def test_without_timesformer_pytorch_a_one_line_error_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timesformer_pytorch", None)  # import fails as if not installed
    with pytest.raises(UserError) as info:
        build_model(SPEC)
    assert "pip install 'ink_infer[timesformer]'" in one_line(info)


# -- the manifest ------------------------------------------------------------------------------------------------


def manifest_with(tmp_path: Path, **entry: object) -> Path:
    path = tmp_path / "m.json"
    base = {"name": "gp", "arch": "timesformer", "file": "gp.safetensors", "sha256": None, "weight": 1.0}
    path.write_text(json.dumps({"format": 1, "models": [base | entry]}))
    return path


def test_a_bare_timesformer_entry_gets_the_reference_defaults(tmp_path: Path) -> None:
    spec = load_manifest(manifest_with(tmp_path)).models[0]
    assert (spec.arch, spec.z_range, spec.in_chans, spec.tile, spec.crop, spec.with_norm) == (
        "timesformer", (17, 43), 26, 64, None, False,
    )  # fmt: skip
    spec = load_manifest(manifest_with(tmp_path, with_norm=True, z_range=[16, 42])).models[0]
    assert spec.with_norm is True and spec.z_range == (16, 42) and spec.in_chans == 26


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"tile": 128}, "tile 64, no crop"),
        ({"crop": 32}, "tile 64, no crop"),
        ({"in_chans": 13}, "in_chans 13"),
        ({"with_norm": "yes"}, "with_norm 'yes', expected true or false"),
        ({"z_range": [50, 70]}, "z_range [50, 70] outside"),
        ({"backbone": "resnet10t"}, "'backbone' applies to 2.5d models only"),
    ],
)
def test_bad_timesformer_entries_are_one_line(tmp_path: Path, entry: dict, expected: str) -> None:
    with pytest.raises(UserError) as info:
        load_manifest(manifest_with(tmp_path, **entry))
    assert expected in one_line(info)


def test_with_norm_belongs_to_timesformer_entries(tmp_path: Path) -> None:
    path = manifest_with(tmp_path, arch="2.5d", backbone="resnet10t", num_3d_layer=1, in_chans=4, z_range=[24, 40],
                         tile=64, with_norm=True)  # fmt: skip
    with pytest.raises(UserError, match="'with_norm' applies to timesformer models only"):
        load_manifest(path)


def test_gp_hyper_parameters_are_checked(tmp_path: Path) -> None:
    check_hyper_parameters(GP_HPARAMS | {"enc": ""}, SPEC, tmp_path / "x.ckpt")
    with pytest.raises(UserError, match="with_norm=True, manifest model 'gp' says False"):
        check_hyper_parameters(GP_HPARAMS | {"with_norm": True}, SPEC, tmp_path / "x.ckpt")
    with pytest.raises(UserError, match="size=256"):
        check_hyper_parameters(GP_HPARAMS | {"size": 256}, SPEC, tmp_path / "x.ckpt")


# -- weight files ------------------------------------------------------------------------------------------------


@needs_tsf
@pytest.mark.parametrize("kind", ["plain", "norm"])
def test_lightning_checkpoint_loads_and_reproduces_its_model(expected, weights, window, kind: str) -> None:
    path = weights / f"{kind}.ckpt"
    spec = spec_for(path, SPEC_NORM if kind == "norm" else SPEC)
    model = fresh(spec)
    info = load_weights(model, path, spec)
    assert info["prefix"] == "" and info["n_tensors"] == (142 if kind == "norm" else 137)
    assert info["hyper_parameters"]["with_norm"] == (kind == "norm")
    torch.testing.assert_close(out(model, window), expected[kind], rtol=0, atol=0)
    check_weights(load_manifest(manifest_of(weights, spec)), weights, allow_random=False)  # the start's check


def manifest_of(root: Path, *specs: ModelSpec) -> Path:
    entries = [{"name": s.name, "arch": s.arch, "file": s.file, "sha256": s.sha256, "with_norm": s.with_norm}
               for s in specs]  # fmt: skip
    path = root / f"{specs[0].name}.manifest.json"
    path.write_text(json.dumps({"format": 1, "models": entries}))
    return path


@needs_tsf
@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda sd: sd.__setitem__("backbone.to_out.1.bias", torch.zeros(8)),
         "backbone.to_out.1.bias (8,) vs model (16,)"),
        (lambda sd: sd.pop("backbone.cls_token"), "1 missing: backbone.cls_token"),
        (lambda sd: sd.__setitem__("normalization.weight", torch.ones(1)), "1 unexpected: normalization.weight"),
    ],
    ids=["shape", "missing", "unexpected"],
)  # fmt: skip
def test_a_checkpoint_that_does_not_fit_fails_the_start_in_one_line(
    models, data, tmp_path: Path, capsys, edit, expected: str
) -> None:
    state = dict(models["plain"].state_dict())
    edit(state)
    root = tmp_path / "weights"
    root.mkdir()
    path = root / "bad.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": GP_HPARAMS}, path)
    manifest = manifest_of(root, spec_for(path))
    argv = [
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--manifest",
        str(manifest),
        "--weights",
        str(root),
    ]
    assert submit_main([*argv, "--dry-run", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and expected in err, err


@needs_tsf
@pytest.mark.parametrize("spelling", ["ours", "model.", "no backbone."])
def test_safetensors_loads_in_each_accepted_spelling(
    models, expected, window, tmp_path: Path, spelling: str
) -> None:
    from safetensors.torch import save_file

    model = models["norm"]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if spelling == "model.":
        state = {"model." + k: v for k, v in state.items()}
    elif spelling == "no backbone.":
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    spec = spec_for(path, SPEC_NORM)
    check_weights(load_manifest(manifest_of(tmp_path, spec)), tmp_path, allow_random=False)  # header only
    loaded = fresh(spec)
    assert load_weights(loaded, path, spec)["n_tensors"] == 142
    torch.testing.assert_close(out(loaded, window), expected["norm"], rtol=0, atol=0)


# -- a checkpoint that only unpickles by running code ------------------------------------------------------------


class Exploit:
    """Unpickling this runs a shell command that writes the pid of the process that unpickled it to ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"echo $PPID > {self.marker}",))


@needs_tsf
def test_an_unsafe_checkpoint_is_unpickled_only_by_a_trusted_conversion(
    models, expected, window, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "pwned"
    root = tmp_path / "weights"
    root.mkdir()
    path = root / "timesformer_weights.ckpt"
    # the released GP file's shape: the weights, plus objects (its optimizer, its scheduler) only pickle can build
    torch.save({"state_dict": models["plain"].state_dict(), "hyper_parameters": GP_HPARAMS,
                "lr_schedulers": [{"after_scheduler": Exploit(marker)}]}, path)  # fmt: skip
    spec = spec_for(path)

    with pytest.raises(UserError) as info:  # a run's start check, then the load itself
        check_weights(load_manifest(manifest_of(root, spec)), root, allow_random=False)
    msg = one_line(info)
    assert str(path) in msg and "refused to unpickle" in msg and "python -m ink_infer.manifest convert" in msg
    with pytest.raises(UserError) as info:
        load_weights(fresh(spec), path, spec)
    assert "convert --trust" in one_line(info)
    assert not marker.exists()

    for extra in ([], ["--sha256", "0" * 64], ["--sha256", "not-hex"]):
        assert manifest_main(["convert", "--trust", str(path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(path) in err, err
        assert not marker.exists()
    assert not (root / "timesformer_weights.safetensors").exists()

    converted = tmp_path / "gp.safetensors"
    assert (
        manifest_main(["convert", "--trust", str(path), "--sha256", spec.sha256, "--out", str(converted)])
        == 0
    )
    assert int(marker.read_text()) != os.getpid()  # it ran, in another process
    assert f"sha256 {sha256_file(converted)}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gp.safetensors",
        "pwned",
        "weights",
    ]  # no temporary left
    spec2 = spec_for(converted)
    loaded = fresh(spec2)
    info = load_weights(loaded, converted, spec2)
    assert info["n_tensors"] == 137 and info["hyper_parameters"] == GP_HPARAMS
    torch.testing.assert_close(out(loaded, window), expected["plain"], rtol=0, atol=0)
