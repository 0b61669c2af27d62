"""GPU-efficiency features, tested for correctness on the CPU: ``--compile`` (inductor; gcc is present here),
SwinV2's frozen position bias and fused attention against timm's own forward, and the tuning's choice of memory
format and attention kernel. Their speed is measured on a GPU by ``benchmarks/gpu_ensemble.py``, not here."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ink_infer.config import ModelSpec
from ink_infer.engine import compiling, tuning
from ink_infer.models.swin_attention import freeze_window_bias
from ink_infer.outputs.rle import read_submission, rle_decode
from ink_infer.run import budget
from tests.helpers import SMALL_MODELS, report_of, run_cli


@pytest.fixture(scope="module")
def csn_only(tmp_path_factory) -> Path:
    """The small irCSN alone: the model that compiles fastest on the CPU (~10-20 s)."""
    m = {**SMALL_MODELS, "models": [SMALL_MODELS["models"][1]]}
    path = tmp_path_factory.mktemp("csn") / "m.json"
    path.write_text(json.dumps(m))
    return path


@pytest.fixture(scope="module")
def eager(data, csn_only, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eager")
    assert run_cli(data, out, csn_only) == 0
    return out


def probabilities(out: Path) -> dict[str, np.ndarray]:
    """Each partial's ``sum / count`` per covered block pixel (the values, not the bytes)."""
    found = {}
    for f in sorted((out / "partials").glob("*.npz")):
        with np.load(f, allow_pickle=False) as z:
            found[f.name] = z["values"].astype(np.float64) / 2**24
    return found


def test_a_compiled_run_gives_the_eager_probabilities_and_masks(data, csn_only, eager, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    out = tmp_path / "compiled"
    assert run_cli(data, out, csn_only, "--compile", "default") == 0
    report = report_of(out)
    assert report["environment"]["compile"] == {"asked": "default", "mode": "default", "why": None}
    tuned = report["models"][0]["tuning"]
    assert tuned["compile"] == "default" and tuned["compile_s"] > 0 and tuned["compile_note"] is None
    assert any((out / "inductor_cache").rglob("*"))  # the cache under OUT, for a rerun
    got, want = probabilities(out), probabilities(eager)
    assert sorted(got) == sorted(want)
    for name in want:  # sums of up to 36 windows: within 36 x 2e-3 / 36 per window's mean
        assert np.abs(got[name] - want[name]).max() < 2e-3 * 36, name
    for (fid, rle), (_, rle_eager) in zip(read_submission(out / "submission.csv"),
                                          read_submission(eager / "submission.csv"), strict=True):  # fmt: skip
        shape = tuple(report["fragments"][fid]["shape"])
        assert (rle_decode(rle, shape) == rle_decode(rle_eager, shape)).mean() >= 0.999
    # a compiled unit is keyed apart from an eager one: never reused by the other mode
    digests = {
        json.loads(str(np.load(f)["meta"][()]))["digest"]
        for d in (out, eager)
        for f in (d / "partials").glob("*.npz")
    }
    assert len(digests) == 2 * len(got)


def test_a_model_that_fails_to_compile_runs_eager(data, csn_only, eager, tmp_path, monkeypatch, caplog):
    def broken(model, **kwargs):
        def run(x):
            raise RuntimeError("inductor: no working C compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    out = tmp_path / "fallback"
    assert run_cli(data, out, csn_only, "--compile", "max-autotune") == 0
    tuned = report_of(out)["models"][0]["tuning"]
    assert tuned["compile"] == "none" and "compile failed" in tuned["compile_note"]
    assert "no working C compiler" in caplog.text
    assert (out / "submission.csv").read_bytes() == (eager / "submission.csv").read_bytes()


def test_auto_compiles_on_cuda_only_with_triton_and_a_c_compiler(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compiling.resolve_mode("auto", cpu)[0] == "none"
    assert compiling.resolve_mode("max-autotune", cpu) == ("max-autotune", None)
    monkeypatch.setattr(compiling.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(compiling.shutil, "which", lambda name: "/usr/bin/gcc")
    assert compiling.resolve_mode("auto", cuda)[0] == "default"
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    mode, why = compiling.resolve_mode("auto", cuda)
    assert mode == "none" and "C compiler" in why
    monkeypatch.setattr(compiling.importlib.util, "find_spec", lambda name: None)
    assert "Triton" in compiling.resolve_mode("auto", cuda)[1]


def test_the_dry_run_projection_adds_each_models_compile_time_once():
    from ink_infer.outputs.report import FragmentResult, ModelResult

    frag = FragmentResult(windows=10, seconds=1.0, batch_ms_per_window=[100.0, 100.0, 100.0])
    result = ModelResult("m", "2.5d", "ok", fragments={"a": frag}, tuning={"compile_s": 36.0})
    p = budget.project(
        result, total_windows=3600, grid_blocks=1, touched_blocks=1, stride=32, scale_to=((32, 32),)
    )
    assert p.projected_hours == pytest.approx(0.1 + 0.01)  # 3600 windows x 0.1 s, plus 36 s
    assert p.projected_hours_scaled["32x32"] == pytest.approx(0.1 / 3600 + 0.01)


def swinv2(seed: int = 0):
    """A SwinV2 2.5D model whose attention matters: timm initialises the post-norms that scale the attention
    branch to zero, and the logit scales all alike, so both are randomised here."""
    from ink_infer.models.inkdet25d import InkDet25D

    torch.manual_seed(seed)
    model = InkDet25D("swinv2_tiny_window8_256.ms_in1k", 5, 1, 10, dim=32).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.5)
        if hasattr(module, "logit_scale"):
            torch.nn.init.uniform_(module.logit_scale, 0.0, 4.0)
        if hasattr(module, "cpb_mlp"):
            for p in module.cpb_mlp.parameters():
                torch.nn.init.normal_(p, 0.0, 0.5)
    return model


@pytest.mark.parametrize("fused", [False, True])
def test_swinv2_with_a_frozen_bias_is_timms_forward(fused):
    model = swinv2()
    x = torch.randn(2, 10, 256, 256)
    with torch.inference_mode():
        want = model.forward_features(x)
        frozen = copy.deepcopy(model)
        assert freeze_window_bias(frozen, fused=fused) == 12  # every block of the four stages
        got = frozen.forward_features(x)
    assert want.abs().max() > 0.1 and (got - want).abs().max() < 1e-4 * want.abs().max()
    if not fused:
        assert torch.equal(got, want)  # the same operations in the same order: the same bits


def test_a_frozen_bias_is_computed_once(monkeypatch):
    model = swinv2()
    freeze_window_bias(model, fused=True)
    calls = []
    for module in model.modules():
        if hasattr(module, "cpb_mlp"):
            module.cpb_mlp.register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        model(torch.randn(1, 10, 256, 256))
    assert calls == []


def test_tuning_keeps_channels_last_3d_for_an_ircsn_only_when_faster(monkeypatch):
    from ink_infer.models import build_model

    spec = ModelSpec(name="c", arch="csn3d", in_chans=1, z_range=(24, 40), tile=192, crop=128,
                     stage_blocks=(1, 1, 1, 1))  # fmt: skip
    model = build_model(spec)
    current = {"format": torch.contiguous_format}
    real = tuning.set_memory_format

    def set_format(module, fmt):
        assert module is model  # the whole irCSN, not an encoder
        current["format"] = fmt
        real(module, fmt)

    monkeypatch.setattr(tuning, "set_memory_format", set_format)
    in_3d = lambda: current["format"] == torch.channels_last_3d  # noqa: E731
    cpu = torch.device("cpu")
    monkeypatch.setattr(tuning, "_time_forward", lambda m, x: 1.0 if in_3d() else 2.0)
    assert tuning._pick_memory_format(model, spec, 2, device=cpu, dtype=torch.float32) == (True, 1.0)
    assert in_3d()
    five_d = [p for p in model.parameters() if p.dim() == 5 and p.shape[1] > 1]
    assert five_d and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in five_d)
    current["format"] = torch.contiguous_format
    real(model, torch.contiguous_format)
    monkeypatch.setattr(tuning, "_time_forward", lambda m, x: 2.0 if in_3d() else 1.97)  # not 5 % faster
    assert tuning._pick_memory_format(model, spec, 2, device=cpu, dtype=torch.float32) == (False, 1.97)
    assert not in_3d() and all(p.is_contiguous() for p in model.parameters())


def test_tuning_routes_swinv2_attention_through_sdpa_only_when_faster(monkeypatch):
    from ink_infer.models.swin_attention import _fused_forward

    spec = ModelSpec(name="s", arch="2.5d", in_chans=5, z_range=(0, 10), backbone="swinv2_tiny_window8_256")
    model = swinv2()
    attn = next(m for m in model.modules() if hasattr(m, "cpb_mlp"))
    fused = lambda: attn.forward.__func__ is _fused_forward  # noqa: E731
    monkeypatch.setattr(tuning, "_time_forward", lambda m, x: 1.0 if fused() else 2.0)
    assert tuning._pick_attention(model, spec, 1, 2.0, device=torch.device("cpu"), dtype=torch.float32) == (
        True,
        1.0,
    )
    monkeypatch.setattr(tuning, "_time_forward", lambda m, x: 2.0 if fused() else 1.0)
    assert tuning._pick_attention(model, spec, 1, 1.0, device=torch.device("cpu"), dtype=torch.float32) == (
        False,
        1.0,
    )
    assert not fused()
    plain = ModelSpec(name="r", arch="2.5d", in_chans=5, z_range=(0, 10), backbone="resnet10t")
    assert tuning._pick_attention(torch.nn.Linear(1, 1), plain, 1, 3.0, device=torch.device("cpu"),
                                  dtype=torch.float32) == (None, 3.0)  # fmt: skip


def test_a_compiled_run_under_quiet_prints_only_its_own_lines(tmp_path):
    """#27 item 19: inductor's compile on the CPU makes torch warn (``No CUDA runtime is found, using CUDA_HOME``);
    under ``--quiet`` a run prints its own warnings only. A fresh interpreter and inductor cache: the warning is
    torch's first compile's."""
    import os
    import subprocess
    import sys

    from ink_infer.synthetic.fragments import write_dataset

    data = write_dataset(tmp_path / "data", test=[("a", 160, 192)], seed=2)
    m = json.loads(json.dumps(SMALL_MODELS))
    m["models"] = m["models"][:1]
    (tmp_path / "m.json").write_text(json.dumps(m))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ink_infer.submit", "--data", str(data), "--out", str(tmp_path / "out"), "--manifest",
         str(tmp_path / "m.json"), "--allow-random-weights", "--stride", "64", "--compile", "default", "--quiet",
         "--no-previews"],
        capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report_of(tmp_path / "out")["models"][0]["tuning"]["compile"] == "default"  # it did compile
    theirs = [line for line in proc.stderr.splitlines() if line and not line.startswith("WARNING ")]
    assert theirs == [], theirs
