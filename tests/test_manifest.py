"""weights_manifest.json: the 18 entries, and ``python -m ink_infer.manifest hash``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ink_infer.errors import UserError
from ink_infer.manifest import DEMO_MANIFEST, PACKAGED_MANIFEST, default_manifest, load_manifest, main

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


def test_the_package_ships_the_18_entry_manifest_and_the_repo_links_to_it():
    assert PACKAGED_MANIFEST.is_file() and PACKAGED_MANIFEST.parent.name == "ink_infer"
    assert (ROOT / "weights_manifest.json").resolve() == PACKAGED_MANIFEST.resolve()


def test_a_run_without_manifest_uses_the_weights_folders_own_else_the_packaged_one(tmp_path):
    assert default_manifest(None) == PACKAGED_MANIFEST
    assert default_manifest(tmp_path) == PACKAGED_MANIFEST
    (tmp_path / "weights_manifest.json").write_text("{}")
    assert default_manifest(tmp_path) == tmp_path / "weights_manifest.json"


def _one_checkpoint(weights: Path) -> None:
    first = load_manifest(PACKAGED_MANIFEST).models[0]
    (weights / first.file).parent.mkdir(parents=True)
    (weights / first.file).write_bytes(b"checkpoint bytes")


def test_hash_writes_the_weights_folders_manifest_and_exits_1_naming_the_missing(tmp_path, capsys):
    weights = tmp_path / "w"
    _one_checkpoint(weights)
    before = PACKAGED_MANIFEST.read_bytes()
    assert main(["hash", "--weights", str(weights)]) == 1  # 17 of the packaged 18 are not there
    captured = capsys.readouterr()
    assert "hashed 1 file(s)" in captured.out and "17 missing" in captured.out and "missing: " in captured.out
    assert captured.err.startswith("error: 17 weight file(s) missing") and len(captured.err.splitlines()) == 1
    assert PACKAGED_MANIFEST.read_bytes() == before  # the package's own file is never written
    written = weights / "weights_manifest.json"
    entry = json.loads(written.read_text())["models"][0]
    assert entry["size"] == 16 and entry["sha256"] == hashlib.sha256(b"checkpoint bytes").hexdigest()
    assert load_manifest(written).models[0].sha256 == entry["sha256"]  # still a valid manifest
    assert default_manifest(weights) == written  # which runs with --weights w now use


def test_hash_exits_0_when_every_file_is_there(tmp_path, capsys):
    weights = tmp_path / "w"
    _one_checkpoint(weights)
    one = json.loads(PACKAGED_MANIFEST.read_text())
    one["models"] = one["models"][:1]
    manifest = tmp_path / "one.json"
    manifest.write_text(json.dumps(one))
    assert main(["hash", "--weights", str(weights), "--manifest", str(manifest)]) == 0  # in place
    assert "hashed 1 file(s)" in capsys.readouterr().out
    assert load_manifest(manifest).models[0].size == 16


def test_hash_says_a_link_leading_outside_the_weights_folder_is_refused_not_missing(tmp_path, capsys):
    """#27 item 16: a weight that is a symlink to a file outside --weights is refused, and the line says why."""
    weights, elsewhere = tmp_path / "w", tmp_path / "elsewhere.ckpt"
    elsewhere.write_bytes(b"checkpoint bytes")
    one = json.loads(PACKAGED_MANIFEST.read_text())
    one["models"] = one["models"][:1]
    manifest = tmp_path / "one.json"
    manifest.write_text(json.dumps(one))
    link = weights / one["models"][0]["file"]
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere)
    assert main(["hash", "--weights", str(weights), "--manifest", str(manifest)]) == 1
    captured = capsys.readouterr()
    assert "0 missing" in captured.out and "1 refused" in captured.out
    assert f"resolves to {elsewhere}, outside --weights" in captured.out and "missing: " not in captured.out
    assert captured.err.startswith("error: 1 refused") and len(captured.err.splitlines()) == 1


def test_hash_with_a_missing_weights_dir_exits_2(tmp_path, capsys):
    assert main(["hash", "--weights", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_hash_help_has_every_option_explained_and_no_markup(capsys):
    with pytest.raises(SystemExit) as info:
        main(["hash", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "::" not in text  # no raw reST
    for option in ("--weights DIR", "--manifest FILE", "--out FILE"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(option))
        assert len(line.strip()) > len(option) + 5, line  # a help text follows the option
    assert "exit status" in text


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
