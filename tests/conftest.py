"""Fixtures shared by the CLI tests (test_submit*, test_run_*): data written once per session, the
small manifest, stand-in models with injectable faults, one reference run; and the ``gpu`` marker's skip."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

# Under pytest-xdist (the README's test command: two workers on two cores) each worker runs torch on one thread:
# two workers of two threads each would oversubscribe the cores. Set before torch is imported, so that subprocesses
# the tests start inherit it too.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ink_infer import models
from ink_infer.config import ModelSpec  # noqa: E402
from ink_infer.models.checkpoint import hyper_parameters_for, save_checkpoint
from ink_infer.run import model_run
from ink_infer.synthetic.fragments import write_dataset
from tests.helpers import SHAPES, SMALL_MODELS, run_cli
from tests.standins import GPStandin, Standin


def pytest_collection_modifyitems(config, items) -> None:
    """``@pytest.mark.gpu`` tests run only where CUDA is (on the lent GPU machine); elsewhere they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def standins(monkeypatch) -> dict[str, dict]:
    """Stand-in models for this test; set ``standins[name] = {...}`` to inject faults into one model. They replace
    the models the run computes with (``model_run.build_model``) and those the start checks checkpoints against
    (the registry, ``models.build_model``: a stand-in's checkpoint holds its ``gain``)."""
    faults: dict[str, dict] = {}
    build = lambda spec: GPStandin() if spec.arch == "timesformer" else Standin(**faults.get(spec.name, {}))  # noqa: E731
    monkeypatch.setattr(model_run, "build_model", build)
    monkeypatch.setattr(models, "build_model", build)
    return faults


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """The fault tests' competition folder: two small fragments (``SHAPES``), in an unsorted sample order."""
    return write_dataset(tmp_path_factory.mktemp("data"), test=[(k, *v) for k, v in SHAPES.items()], seed=5)


@pytest.fixture(scope="session")
def manifest(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "m.json"
    path.write_text(json.dumps(SMALL_MODELS))
    return path


@pytest.fixture(scope="session")
def reference(data, manifest, tmp_path_factory) -> Path:
    """OUT of an uninterrupted run (partials included), with every socket connection refused: none is made."""

    def no_network(*args, **kwargs):
        raise AssertionError("ink_infer opened a network connection")

    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_run, "build_model", lambda spec: Standin())
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        assert run_cli(data, out, manifest) == 0
    return out


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """test_cli's competition folder: odd sizes, and a sample order that is not sorted."""
    return write_dataset(tmp_path_factory.mktemp("dataset"), test=[("b", 215, 343), ("a", 161, 290)], seed=5)


@pytest.fixture
def weights_dir(tmp_path) -> tuple[Path, Path, ModelSpec]:
    """``tmp/weights/m25d.ckpt``: a Lightning-layout checkpoint of the stand-in (gain 2), and its spec."""
    raw = SMALL_MODELS["models"][0]
    spec = ModelSpec(name=raw["name"], arch=raw["arch"], in_chans=raw["in_chans"], z_range=tuple(raw["z_range"]),
                     tile=raw["tile"], backbone=raw["backbone"], num_3d_layer=raw["num_3d_layer"])  # fmt: skip
    standin = Standin()
    standin.gain.data.fill_(2.0)
    path = tmp_path / "weights" / "m25d.ckpt"
    save_checkpoint(standin, path, hyper_parameters_for(spec))
    return tmp_path / "weights", path, spec


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """One ``--demo`` run of the session (with every probability map saved), shared by the demo, golden-bytes
    and API tests (``xdist_group("demo")`` keeps them on one pytest-xdist worker)."""
    from ink_infer.submit import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["--demo", "--out", str(out), "--quiet", "--save-probabilities", "--save-model-maps"]) == 0
    return out
