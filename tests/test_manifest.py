"""weights_manifest.json: the 18 entries, and ``python -m ink_infer.manifest hash``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ink_infer.manifest import load_manifest, main

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
