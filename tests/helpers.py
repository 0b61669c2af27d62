"""What the CLI tests share: the small real models' manifest, the fault tests' fragment shapes, and the helpers
that drive ``submit.main`` in-process and read what it left (fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ink_infer.outputs.rle import read_submission, rle_decode
from ink_infer.submit import main

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
# torch threads of the tests that set them: 2 (the machine's cores), 1 under pytest-xdist (a core per worker)
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
SHAPES = {"b": (150, 220), "a": (120, 170)}  # sample_submission order b, a: not sorted


def run_cli(data: Path, out: Path, manifest: Path, *extra: str) -> int:
    argv = ["--data", str(data), "--out", str(out), "--manifest", str(manifest), "--allow-random-weights"]
    return main([*argv, "--stride", "64", "--quiet", *extra])


def one_error_line(capsys) -> str:
    """The run's stderr, which must be exactly one ``error: ...`` line (logging goes to pytest, not stderr)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def model(report: dict, name: str) -> dict:
    return next(m for m in report["models"] if m["name"] == name)


def assert_valid_submission(out: Path) -> dict[str, str]:
    rows = dict(read_submission(out / "submission.csv"))
    assert list(rows) == list(SHAPES)
    for frag_id, rle in rows.items():
        rle_decode(rle, SHAPES[frag_id])  # raises on a malformed or out-of-range run
    return rows


def leftovers(out: Path) -> list[str]:
    """Temporary files an atomic write left behind (there must be none)."""
    return [p.name for p in out.rglob(".*") if ".tmp" in p.name]


def write_manifest(path: Path, change) -> Path:
    m = json.loads(json.dumps(SMALL_MODELS))
    change(m)
    path.write_text(json.dumps(m))
    return path


def predict_pass(model, spec, volume, touched, origins, ops, *, on_batch=None, **how):
    """``engine.predict.predict_fragment`` with its windows and settings given loose, as the engine tests vary
    them one at a time."""
    from ink_infer.engine.predict import PassSettings, predict_fragment
    from ink_infer.engine.tiling import Windows

    return predict_fragment(
        model, spec, volume, Windows(touched, origins, ops), PassSettings(**how), on_batch=on_batch
    )


def recorded_demo_maps() -> dict[str, list]:
    """The demo's probability maps as recorded before the house move (``golden/demo_probabilities.json``):
    ``{file name: [shape, dtype, sha256 of the pixels]}`` for this process's torch thread count (oneDNN rounds
    differently with another count); skips the calling test when that count was not recorded."""
    import pytest
    import torch

    recorded = json.loads((Path(__file__).parent / "golden" / "demo_probabilities.json").read_text())[
        "threads"
    ]
    threads = str(torch.get_num_threads())
    if threads not in recorded:
        pytest.skip(
            f"the demo's maps were recorded with {' and '.join(recorded)} torch thread(s), not {threads}"
        )
    return recorded[threads]
