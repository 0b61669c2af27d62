"""weights_manifest.json: the 18 entries, and ``python -m ink_infer.manifest hash``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ink_infer.errors import UserError
from ink_infer.manifest import DEMO_MANIFEST, load_manifest, main

ROOT = Path(__file__).resolve().parents[1]


def test_reference_manifest_has_the_18_entries_in_priority_order():
    m = load_manifest(ROOT / "weights_manifest.json")
    assert len(m.models) == 18 and m.threshold.percentile == 0.93 and m.threshold.region == "covered"
    names = [s.name for s in m.models]
    assert all(n.endswith("_fold0") for n in names[:9]) and all(n.endswith("_fold1") for n in names[9:])
    assert [n[: -len("_fold0")] for n in names[:9]] == [n[: -len("_fold1")] for n in names[9:]]
    for s in m.models:
        logdir, fold = s.name.rsplit("_", 1)
        assert s.file == f"{logdir}/{fold}/best_fbeta.ckpt" and s.sha256 is None
        assert (s.crop == 192) == (s.arch == "csn3d")


def test_hash_fills_in_size_and_sha256_and_names_the_missing(tmp_path, capsys):
    manifest = tmp_path / "weights_manifest.json"
    shutil.copy(ROOT / "weights_manifest.json", manifest)
    weights = tmp_path / "w"
    first = load_manifest(manifest).models[0]
    (weights / first.file).parent.mkdir(parents=True)
    (weights / first.file).write_bytes(b"checkpoint bytes")
    assert main(["hash", "--weights", str(weights), "--manifest", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "hashed 1 file(s), 17 missing" in out and "missing: " in out
    entry = json.loads(manifest.read_text())["models"][0]
    assert entry["size"] == 16 and entry["sha256"] == hashlib.sha256(b"checkpoint bytes").hexdigest()
    assert load_manifest(manifest).models[0].sha256 == entry["sha256"]  # still a valid manifest


def test_hash_with_a_missing_weights_dir_exits_2(tmp_path, capsys):
    assert (
        main(["hash", "--weights", str(tmp_path / "nope"), "--manifest", str(ROOT / "weights_manifest.json")])
        == 2
    )
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"dim": 0}, "dim 0, expected a positive integer"),
        ({"dim": "64"}, "dim '64', expected a positive integer"),
        ({"head_dim": 64}, "'head_dim' applies to csn3d models only"),
        ({"base_channels": True}, "expected a positive integer"),
    ],
    ids=["zero", "string", "wrong_arch", "bool"],
)
def test_bad_width_keys_name_the_entry(tmp_path, change, needle):
    demo = json.loads(DEMO_MANIFEST.read_text())
    entry = demo["models"][0] if "dim" in change or "head_dim" in change else demo["models"][1]
    entry.update(change)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(demo))
    with pytest.raises(UserError, match=needle) as info:
        load_manifest(path)
    assert "\n" not in str(info.value) and entry["name"] in str(info.value)


def test_demo_manifest_carries_the_small_widths():
    small = {m.name: m for m in load_manifest(DEMO_MANIFEST).models}
    assert small["demo_25d_mbv3"].width("dim") == 64
    assert (small["demo_csn3d_tiny"].width("base_channels"), small["demo_csn3d_tiny"].width("head_dim")) == (
        16,
        64,
    )
    assert small["demo_csn3d_tiny"].width("dim") == 512  # not set: the reference width


def test_an_unchanged_weights_file_is_hashed_once_a_changed_one_again(tmp_path, monkeypatch):
    import os

    import ink_infer.manifest as manifest_mod
    from ink_infer.config import ModelSpec
    from ink_infer.manifest import sha256_file, verify_file

    path = tmp_path / "w.pt"
    path.write_bytes(b"a" * 1000)
    spec = ModelSpec(name="m", arch="2.5d", in_chans=1, z_range=(0, 1), sha256=sha256_file(path))
    reads = []
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: reads.append(p) or sha256_file(p))
    assert verify_file(spec, path) == spec.sha256 and verify_file(spec, path) == spec.sha256
    assert reads == [path]  # the preflight's digest serves the load
    path.write_bytes(b"b" * 1000)  # same size, new content
    os.utime(path, ns=(1, 1))  # a distinct mtime even where the clock is coarse
    with pytest.raises(UserError, match="sha256"):
        verify_file(spec, path)
    assert reads == [path, path]
