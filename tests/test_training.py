"""train.py (the sibling training script) on a tiny synthetic Kaggle-layout set, on the CPU: the loss falls, the
checkpoints load strictly with ink_infer's loader, ``--resume`` continues exactly where the run stopped, the
augmentations keep volume and labels aligned, and every bad input is one line on stderr with exit code 2."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ink_infer.engine.stitch import SumMap, finalize, upsample_probs
from ink_infer.engine.windows import normalize_windows
from ink_infer.manifest import load_manifest, sha256_file
from ink_infer.models import build_model
from ink_infer.models.checkpoint import EMA_PREFIX, MODEL_PREFIX, load_weights, strip_prefix
from ink_infer.synthetic.fragments import write_dataset
from ink_infer.volumes.fragment import Fragment
from tests.helpers import TEST_THREADS

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # train.py sits beside the package, not in it
    sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from training import augment, objective, validate  # noqa: E402
from training import data as training_data  # noqa: E402
from training import state as training_state  # noqa: E402

torch.set_num_threads(TEST_THREADS)

# fragment 2 is cut into 2a/2b/2c as in the reference; 1 validates fold 0
TRAIN = [("1", 96, 128), ("2", 160, 128), ("3", 96, 96)]
MODELS = {
    "format": 1,
    "name": "tiny",
    "models": [
        {"name": "t25d", "arch": "2.5d", "backbone": "test_resnet", "in_chans": 2, "num_3d_layer": 1,
         "z_range": [28, 36], "tile": 64, "file": None, "sha256": None},
        {"name": "t3d", "arch": "csn3d", "stage_blocks": [1, 1, 1, 1], "in_chans": 1, "z_range": [28, 36],
         "tile": 128, "crop": 64, "file": None, "sha256": None},
    ],
}  # fmt: skip
FAST = ["--batch-size", "4", "--samples-per-epoch", "8", "--valid-scale", "1", "--workers", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("syn"), train=TRAIN, seed=3)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "tiny.json"
    path.write_text(json.dumps(MODELS))
    return path


def run_train(data: Path, manifest: Path, out: Path, config: str, *extra: str) -> int:
    argv = ["--data", str(data), "--manifest", str(manifest), "--config", config, "--out", str(out)]
    return train.main([*argv, *FAST, *extra])


def spec_of(manifest: Path, name: str, file: str) -> object:
    spec = next(m for m in load_manifest(manifest).models if m.name == name)
    return dataclasses.replace(spec, file=file)


def window_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The training criterion of ``model`` on raw windows ``x`` and labels ``y``, with batch statistics (as in
    training: the BN running averages of a few steps say little) and a fixed seed for stochastic depth."""
    torch.manual_seed(0)
    with torch.no_grad():
        logits = model.train()(normalize_windows(x))
    return float(objective.criterion(logits, objective.downsample_labels(y)))


def test_loss_falls_and_checkpoints_load(data: Path, manifest: Path, tmp_path: Path, capsys) -> None:
    export = tmp_path / "ship" / "t25d.pt"
    argv = [
        "--data",
        str(data),
        "--manifest",
        str(manifest),
        "--config",
        "t25d",
        "--out",
        str(tmp_path),
        *FAST,
    ]
    argv += ["--epochs", "3", "--samples-per-epoch", "24", "--valid-every", "3", "--no-aug", "--lr", "3e-3"]
    assert train.main([*argv, "--export", str(export), "--export-ema-only", "--export-fp16"]) == 0
    log = [json.loads(r) for r in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [6, 12, 18] and "f05" in log[-1]
    # the loss on the training windows, before (the same seeded initial weights) and after training
    probe = train.build_parser().parse_args([*argv, "--out", str(tmp_path / "probe")])
    spec, train_data, initial, _ = train.prepare(probe)
    stores = training_data.build_stores(train_data, spec, shift_z=0, cache_gb=1.0, cache_dir=tmp_path)
    items = [(r, training_data.region_origins(r, train_data.masks[r.frag])) for r in train_data.train]
    windows = training_data.WindowDataset(stores, items, spec, augment=False, shift_z=0, seed=0)
    x, y = (torch.stack(v) for v in zip(*(windows[i] for i in range(len(windows))), strict=True))
    train_data.close()
    trained = build_model(spec)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    trained.load_state_dict(strip_prefix(state, MODEL_PREFIX))
    assert window_loss(trained, x, y) < window_loss(initial, x, y) - 0.05
    # the team's layout, loaded by ink_infer unchanged (strict keys and shapes, EMA copy preferred)
    best = tmp_path / "best_fbeta.ckpt"
    state = torch.load(best, weights_only=True)["state_dict"]
    assert any(k.startswith(MODEL_PREFIX) for k in state) and any(k.startswith(EMA_PREFIX) for k in state)
    spec = dataclasses.replace(spec, file=best.name)
    ema_model = build_model(spec)
    assert load_weights(ema_model, best, spec)["prefix"] == EMA_PREFIX
    # the shipped file: EMA only, float16, a quarter of the size, the same predictions to fp16 precision
    shipped = build_model(spec)
    assert load_weights(shipped, export, dataclasses.replace(spec, file=export.name))["prefix"] == EMA_PREFIX
    assert export.stat().st_size < best.stat().st_size / 3
    with torch.inference_mode():
        torch.testing.assert_close(shipped(x[:2]), ema_model(x[:2]), atol=2e-2, rtol=2e-2)
    entry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert entry["file"] == export.name and entry["size"] == export.stat().st_size
    assert entry["sha256"] == sha256_file(export) and entry["z_range"] == [28, 36]


def test_csn3d_checkpoint_loads(data: Path, manifest: Path, tmp_path: Path) -> None:
    assert run_train(data, manifest, tmp_path, "t3d", "--epochs", "1", "--samples-per-epoch", "4") == 0
    spec = spec_of(manifest, "t3d", "best_fbeta.ckpt")
    info = load_weights(build_model(spec), tmp_path / "best_fbeta.ckpt", spec)
    assert info["prefix"] == EMA_PREFIX and info["hyper_parameters"]["stage_blocks"] == [1, 1, 1, 1]


def trainer_state(path: Path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    return {k: ckpt[k] for k in ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch")}


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            assert_same(u, v)
    else:
        assert a == b


def test_resume_restores_state_and_continues_exactly(data: Path, manifest: Path, tmp_path: Path) -> None:
    whole, first, rest = tmp_path / "whole", tmp_path / "first", tmp_path / "rest"
    two = ["--epochs", "2", "--valid-every", "2"]
    assert run_train(data, manifest, whole, "t25d", *two) == 0
    assert run_train(data, manifest, first, "t25d", *two, "--epochs-this-run", "1") == 0
    saved = first / "last.ckpt"
    assert len((first / "train_log.jsonl").read_text().splitlines()) == 1
    # what --resume restores is what was saved: model, EMA, optimiser, scheduler, step, RNG
    args = train.build_parser().parse_args(
        ["--data", str(data), "--manifest", str(manifest), "--config", "t25d", "--out", str(rest), *FAST]
    )
    spec, resume_data, model, device = train.prepare(args)
    resume_data.close()
    tr = training_state.make_trainer(model, spec, args, device=device, total=4)
    training_state.load_last(tr, saved)
    ckpt = torch.load(saved, weights_only=True)
    assert (tr.epoch, tr.step) == (1, 2)
    assert_same(strip_prefix(ckpt["state_dict"], EMA_PREFIX), tr.ema.module.state_dict())
    assert_same(strip_prefix(ckpt["state_dict"], MODEL_PREFIX), tr.model.state_dict())
    assert_same(ckpt["optimizer_states"][0], tr.optimizer.state_dict())
    assert_same(ckpt["lr_schedulers"][0], tr.scheduler.state_dict())
    assert torch.equal(ckpt["train_state"]["rng_torch"], torch.get_rng_state())
    # and the continued run ends where the uninterrupted one did
    assert run_train(data, manifest, rest, "t25d", *two, "--resume", str(saved)) == 0
    assert_same(trainer_state(rest / "last.ckpt"), trainer_state(whole / "last.ckpt"))
    best = [torch.load(d / "best_fbeta.ckpt", weights_only=True)["state_dict"] for d in (rest, whole)]
    assert_same(*best)


def test_validation_stitches_as_inference(data: Path, manifest: Path, tmp_path: Path) -> None:
    argv = ["--data", str(data), "--manifest", str(manifest), "--config", "t3d", "--out", str(tmp_path)]
    spec, train_data, _, _ = train.prepare(train.build_parser().parse_args(argv))
    stores = training_data.build_stores(train_data, spec, shift_z=0, cache_gb=1.0, cache_dir=tmp_path)
    (part,) = validate.make_valid_parts(
        stores, train_data.masks, train_data.valid, spec, scale=1, max_windows=999
    )
    logits = torch.randn(len(part.origins), 1, spec.side // 32, spec.side // 32)
    # ink_infer's own accumulator and finalisation over the same windows (crop offset included)
    acc = SumMap(part.count.shape, pad=spec.tile, device=torch.device("cpu"))
    acc.add(
        upsample_probs(logits, spec.side),
        part.origins[:, 0] * 32 + spec.offset,
        part.origins[:, 1] * 32 + spec.offset,
    )
    expected = finalize(acc.to_numpy(), part.count, np.ones(acc.shape, bool))
    np.testing.assert_allclose(validate.stitch(logits, part, spec, scale=1), expected, atol=1e-6)
    # the default 1/4 map: nearly the mean of the full-resolution one over 4 x 4 pixels
    (part4,) = validate.make_valid_parts(
        stores, train_data.masks, train_data.valid, spec, scale=4, max_windows=999
    )
    coarse = validate.stitch(logits, part4, spec, scale=4)
    pooled = expected.reshape(coarse.shape[0], 4, coarse.shape[1], 4).mean(axis=(1, 3))
    np.testing.assert_allclose(coarse, pooled, atol=0.05)
    train_data.close()


def test_augment_keeps_volume_and_labels_aligned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(augment, "BLUR_NOISE_P", 0.0)  # intensity changes would blur the comparison
    monkeypatch.setattr(augment, "BC_P", 0.0)
    rng = np.random.default_rng(0)
    label = (cv2.GaussianBlur(rng.random((128, 128)).astype(np.float32), (0, 0), 6) > 0.5).astype(np.float32)
    for seed in range(12):
        vol, lab = augment.augment(np.stack([label] * 3), label.copy(), np.random.default_rng(seed))
        assert vol.shape == (3, 128, 128) and lab.shape == (128, 128) and vol.dtype == np.float32
        agree = np.mean((vol > 0.5) == (lab > 0.5), axis=(1, 2))
        assert (agree > 0.97).all(), (seed, agree)


def test_label_targets_at_one_32nd() -> None:
    lab = torch.zeros(1, 64, 64)
    lab[0, 30:34] = 1.0  # a thin stroke between the sample points of align_corners=True (rows 0 and 63)
    assert torch.equal(objective.downsample_labels(lab), torch.zeros(1, 1, 2, 2))
    torch.testing.assert_close(
        objective.downsample_labels(lab, mode="area"), torch.full((1, 1, 2, 2), 2 / 32)
    )
    lab[0, 60:] = 1.0
    assert objective.downsample_labels(lab)[0, 0, 1].tolist() == [1.0, 1.0]


def test_features_and_head_compose_to_the_model(manifest: Path) -> None:
    for name in ("t25d", "t3d"):
        spec = spec_of(manifest, name, "x.pt")
        model = build_model(spec)
        features, head = training_state.split_forward(model)
        x = torch.randn(2, spec.n_slices, spec.side, spec.side)
        with torch.inference_mode():
            torch.testing.assert_close(head(features(x)), model(x))


def test_folds_follow_the_reference() -> None:
    mask = np.zeros((320, 64), bool)
    mask[:64] = True  # dense top, sparse bottom: equal-area parts are not equal-height parts
    mask[64:, :16] = True
    edges = training_data.split_rows(mask, 3)
    areas = [mask[a * 32 : b * 32].sum() for a, b in zip(edges, edges[1:], strict=False)]
    assert edges[0] == 0 and edges[-1] == 10 and max(areas) - min(areas) <= 2 * 32 * 64
    frags = [Fragment(i, Path(i)) for i in ("1", "2", "3")]
    regions = training_data.make_regions(frags, [np.ones((96, 64), bool), mask, np.ones((64, 64), bool)])
    ids = lambda rs: [r.id for r in rs]  # noqa: E731
    t0, v0 = training_data.choose_fold(regions, 0, None)
    t1, v1 = training_data.choose_fold(regions, 1, None)
    assert (ids(t0), ids(v0)) == (["2a", "2b", "2c", "3"], ["1"])
    assert (ids(t1), ids(v1)) == (["1", "2b", "2c", "3"], ["2a"])
    assert ids(training_data.choose_fold(regions, 0, "2,3")[1]) == ["2a", "2b", "2c", "3"]


def corrupt(comp: Path, out: Path, case: str) -> None:
    labels = comp / "train" / "1" / "inklabels.png"
    if case == "no labels":
        labels.unlink()
    elif case == "labels shape":
        cv2.imwrite(str(labels), np.zeros((32, 48), np.uint8))
    elif case == "run exists":
        out.mkdir()
        (out / "last.ckpt").write_bytes(b"an earlier run")


BAD = {
    "no labels": ([], "inklabels.png: missing"),
    "labels shape": ([], "inklabels.png: 32x48, slices 96x128"),
    "unknown config": (["--config", "nope"], "no model named 'nope'"),
    "empty fold": (["--fold", "1"], "fold 1: no validation fragment 2a"),
    "unknown valid id": (["--valid-ids", "9"], "--valid-ids 9: no validation fragment 9"),
    "bad argument": (["--epochs", "0"], "--epochs 0: expected a positive number"),
    "run exists": ([], "holds a run already (last.ckpt)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2(case: str, manifest: Path, tmp_path: Path, capsys) -> None:
    comp = write_dataset(tmp_path / "d", train=[("1", 96, 128), ("3", 64, 64)], seed=1)
    out = tmp_path / "o"
    corrupt(comp, out, case)
    extra, expected = BAD[case]
    argv = ["--data", str(comp), "--manifest", str(manifest), "--config", "t25d", "--out", str(out), *FAST]
    assert train.main([*argv, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err
    # nothing was written before the input was checked
    if case == "run exists":
        assert [p.name for p in out.iterdir()] == ["last.ckpt"]
    else:
        assert not out.exists()


def test_keep_freed_memory_stops_the_page_faults_of_big_step_allocations(tmp_path: Path) -> None:
    """In a fresh process: 64 MB buffers freed and re-allocated (as every training step does) fault on every page
    by default; after keep_freed_memory() glibc reuses the freed memory."""
    import subprocess

    code = (
        f"import resource, sys, torch; sys.path.insert(0, {str(ROOT)!r})\n"
        "from ink_infer.run.runtime import keep_freed_memory\n"
        "ok = keep_freed_memory() if sys.argv[1] == 'keep' else True\n"
        "for _ in range(3): torch.empty(64 << 20, dtype=torch.uint8).fill_(1)\n"  # first touches fault either way
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20): torch.empty(64 << 20, dtype=torch.uint8).fill_(1)\n"
        "print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n"
    )
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        ok, n = out.stdout.split()
        assert ok == "True"
        faults[mode] = int(n)
    assert faults["default"] > 20 * (64 << 20) // 4096 // 2  # about one fault per 4 KiB page, every time
    # measured: 0-8 of the 20 still fault with it (where glibc's heap top moves), all 20 without
    assert faults["keep"] < faults["default"] // 2, faults
