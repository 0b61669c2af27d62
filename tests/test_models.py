"""Model registry: every reference config builds with the reference state-dict layout and runs; golden parity.

Reference layouts: ../shared/reference/state_dicts/<logdir>.json (key -> shape of the bare team model) and
_io_shapes.json; the tests skip those checks where the shared reference folder is absent (e.g. a wheel install).
Golden tensors: tests/golden/*.pt, made by tests/make_golden.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ink_infer.config import ModelSpec
from ink_infer.engine.windows import normalize_windows
from ink_infer.errors import UserError
from ink_infer.manifest import load_manifest
from ink_infer.models import BUILDERS, build_model
from ink_infer.models.csn3d import InkDetCSN3D
from ink_infer.models.inkdet25d import InkDet25D
from tests.helpers import TEST_THREADS

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "state_dicts"  # ../shared beside the checkout
GOLDEN = Path(__file__).resolve().parent / "golden"
FOLD0 = [s for s in load_manifest(ROOT / "weights_manifest.json").models if s.name.endswith("_fold0")]

torch.set_num_threads(TEST_THREADS)


def logdir_of(spec: ModelSpec) -> str:
    return spec.name.rsplit("_fold", 1)[0]


def reference_json(name: str) -> dict:
    path = REFERENCE / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return json.loads(path.read_text())


def window_for(spec: ModelSpec, gen: torch.Generator) -> torch.Tensor:
    """A random raw (1, 65, tile, tile) window sliced to the model's z range and cropped, as the pipeline does."""
    x = torch.rand(1, 65, spec.tile, spec.tile, generator=gen)
    o = spec.offset
    return x[:, spec.z_range[0] : spec.z_range[1], o : o + spec.side, o : o + spec.side]


def test_manifest_lists_nine_configs_twice() -> None:
    specs = load_manifest(ROOT / "weights_manifest.json").models
    assert len(specs) == 18 and len(FOLD0) == 9
    assert [logdir_of(s) for s in specs[:9]] == [logdir_of(s) for s in specs[9:]]
    assert all(s.name.endswith("_fold1") for s in specs[9:])


@pytest.mark.parametrize("spec", FOLD0, ids=logdir_of)
def test_reference_config(spec: ModelSpec) -> None:
    """Same keys and shapes as the team's model; the encoder/backbone and output shapes of _io_shapes.json."""
    ref = reference_json(logdir_of(spec))
    io = reference_json("_io_shapes")[logdir_of(spec)]
    model = build_model(spec)
    assert not model.training
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ref) - set(got)) == [] and sorted(set(got) - set(ref)) == []
    assert {k: v for k, v in got.items() if ref[k] != v} == {}
    assert sum(p.numel() for p in model.parameters()) == io["n_params"]
    assert spec.z_range == tuple(io["slice_range_of_65"]) and spec.side == io["tile"]

    feats: list[tuple[int, ...]] = []
    inner = model.encoder if spec.arch == "2.5d" else model.backbone
    inner.register_forward_hook(
        lambda _m, _i, out: feats.append(tuple((out[-1] if spec.arch == "2.5d" else out).shape))
    )
    x = normalize_windows(window_for(spec, torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        y = model(x)
    assert tuple(y.shape) == tuple(io["output_shape"]) == (1, 1, spec.side // 32, spec.side // 32)
    assert torch.isfinite(y).all()
    info = io["feature_info"]
    expected_feat = (
        info["last_feature_shape_per_group_input"][1] if spec.arch == "2.5d" else info["backbone_outputs"][-1]
    )
    assert feats == [tuple(expected_feat)]


def numpy_normalize(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    mean = a.mean(axis=(1, 2, 3), keepdims=True)
    std = a.std(axis=(1, 2, 3), keepdims=True, ddof=1) + 1e-6
    return (a - mean) / std


def test_normalize_windows_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    # few elements per sample, so a biased (ddof=0) std would differ by ~1%, far beyond the tolerance
    x = rng.random((3, 3, 4, 5), dtype=np.float32) * rng.random((3, 1, 1, 1), dtype=np.float32) * 4
    for dtype in (torch.float32, torch.float16):
        src = torch.from_numpy(x).to(dtype)
        got = normalize_windows(src)
        assert got.dtype == torch.float32 and got.shape == src.shape
        np.testing.assert_allclose(got.numpy(), numpy_normalize(src.float().numpy()), rtol=1e-5, atol=1e-5)


def test_normalize_windows_constant_window_stays_finite() -> None:
    """An all-zero window (outside the mask) has std 0: the 1e-6 keeps it finite (zeros out)."""
    out = normalize_windows(torch.zeros(2, 4, 8, 8, dtype=torch.float16))
    assert torch.equal(out, torch.zeros(2, 4, 8, 8))


def test_groups_are_contiguous_slices() -> None:
    """Group g sees slices [g*in_chans, (g+1)*in_chans): changing only group 1's slices changes only its feature."""
    torch.manual_seed(0)
    model = InkDet25D("resnet18", 2, 1, 6, dim=8).eval()
    x = torch.randn(2, 6, 64, 64)
    x2 = x.clone()
    x2[1, 2:4] += 1.0
    with torch.inference_mode():
        f, f2 = model.forward_features(x), model.forward_features(x2)
    changed = (f - f2).abs().amax(dim=(1, 3, 4))  # (B, G)
    assert changed[0].max() == 0 and changed[1, 0] == 0 and changed[1, 2] == 0 and changed[1, 1] > 0


def test_build_model_rejects_bad_specs() -> None:
    bad_backbone = ModelSpec("m", "2.5d", 3, (19, 46), backbone="no_such_net", num_3d_layer=1)
    with pytest.raises(UserError, match="no_such_net"):
        build_model(bad_backbone)
    with pytest.raises(UserError, match="arch"):
        build_model(ModelSpec("m", "vit", 1, (0, 8)))
    assert set(BUILDERS) == {"2.5d", "csn3d", "timesformer"}


def test_csn3d_stage_blocks_keep_key_layout() -> None:
    spec = ModelSpec("demo", "csn3d", 1, (20, 36), crop=192, stage_blocks=(1, 1, 1, 1))
    model = build_model(spec)
    keys = set(model.state_dict())
    ref = set(reference_json("resnet3d50csnir1x32_mixup_ep30"))
    assert keys <= ref  # a subset: the same names, fewer blocks
    assert (
        "backbone.layer4.0.downsample.conv.weight" in keys
        and "backbone.layer4.1.conv1.conv.weight" not in keys
    )
    with torch.inference_mode():
        y = model(normalize_windows(torch.rand(1, 16, 64, 64)))
    assert y.shape == (1, 1, 2, 2)


GOLDEN_FILES = sorted(GOLDEN.glob("*.pt"))


def test_golden_files_present_and_small() -> None:
    names = {p.stem for p in GOLDEN_FILES}
    assert {"inkdet25d_resnetrs", "inkdet25d_convnext", "inkdet25d_swinv2", "csn3d_tiny"} <= names
    assert all(p.stat().st_size < 1_000_000 for p in GOLDEN_FILES)


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_golden_parity(path: Path) -> None:
    """Stored weights + input reproduce the stored output: any change to the forward maths shows up here."""
    golden = torch.load(path, map_location="cpu", weights_only=True)
    cls: type[nn.Module] = InkDet25D if golden["arch"] == "2.5d" else InkDetCSN3D
    model = cls(**golden["kwargs"]).eval()
    model.load_state_dict(golden["state_dict"], strict=True)
    expected = golden["output"]
    assert expected.std() > 100 * 1e-5  # the golden output varies enough for the tolerance to mean something
    with torch.inference_mode():
        got = model(normalize_windows(golden["input"]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
