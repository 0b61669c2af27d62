"""Fault injection over the whole submit CLI: failing models, NaN, OOM, a full disk, signals, resume (bad and
tolerated inputs: test_run_inputs.py).

Policy under test: a user error exits 2 with one line; a failing model is skipped (or ends the run with
``--on-model-error fail``) and is recorded in report.json; submission.csv is absent or valid, never partial; every
finished (model, fragment) result is kept in OUT/partials, and a rerun resumes to a byte-identical submission.

The CLI runs in-process (``submit.main``) except where a real signal must reach a real process. Models are the
analytic stand-ins of tests/standins.py, swapped in for ``model_run.build_model`` (the real small models run in test_submit.py), so
each run takes about a second and faults can be injected exactly where wanted.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ink_infer import models
from ink_infer.outputs.rle import read_submission
from ink_infer.run import model_run
from ink_infer.run.stop import Interrupted, StopRequest
from tests.helpers import (
    SHAPES,
    assert_valid_submission,
    leftovers,
    model,
    one_error_line,
    report_of,
    run_cli,
    write_manifest,
)
from tests.standins import Standin

ROOT = Path(__file__).resolve().parents[1]


def install_standins(faults: dict[str, dict]) -> None:
    """Make the pipeline build stand-ins (with ``faults[model name]``); for the subprocess driver."""
    model_run.build_model = models.build_model = lambda spec: Standin(**faults.get(spec.name, {}))


# --- models that fail while running ---------------------------------------------------------------------------


def test_model_raising_mid_run_is_skipped_and_recorded(data, manifest, reference, tmp_path, standins, caplog):
    standins["m3d"] = {"raise_after": 1}
    out = tmp_path / "out"
    assert run_cli(data, out, manifest) == 0
    rep = report_of(out)
    assert rep["status"] == "ok"
    assert model(rep, "m3d")["status"] == "failed"
    assert model(rep, "m3d")["reason"] == "RuntimeError: stand-in exploded"
    assert model(rep, "m25d")["status"] == "ok"
    assert "m3d failed and is skipped" in caplog.text
    # the ensemble is m25d alone: not the reference's two-model submission
    assert assert_valid_submission(out) != dict(read_submission(reference / "submission.csv"))


def test_model_raising_mid_run_is_fatal_with_on_model_error_fail(data, manifest, tmp_path, standins, capsys):
    standins["m3d"] = {"raise_after": 1}
    out = tmp_path / "out"
    assert run_cli(data, out, manifest, "--on-model-error", "fail") == 1
    assert "model m3d failed: RuntimeError: stand-in exploded" in one_error_line(capsys)
    assert not (out / "submission.csv").exists()
    rep = report_of(out)
    assert rep["status"] == "failed" and model(rep, "m3d")["status"] == "failed"
    assert len(list((out / "partials").glob("m25d.*.npz"))) == 2  # a rerun would resume from m25d


def test_no_model_finishing_exits_1_without_a_submission(data, manifest, tmp_path, standins, capsys):
    standins["m25d"] = standins["m3d"] = {"raise_after": 0}
    out = tmp_path / "out"
    assert run_cli(data, out, manifest) == 1
    assert "no model finished" in one_error_line(capsys)
    assert not (out / "submission.csv").exists() and report_of(out)["status"] == "failed"


def test_nan_and_inf_windows_are_counted_zeroed_and_reported(data, manifest, tmp_path, standins, caplog):
    standins["m3d"] = {"nan": True}
    out = tmp_path / "out"
    assert run_cli(data, out, manifest, "--max-nonfinite", "0.9") == 0  # a third to two thirds of the windows
    rep = report_of(out)
    for frag_id in SHAPES:
        stats = model(rep, "m3d")["fragments"][frag_id]
        batches = -(-stats["windows"] // stats["batch_size"])
        # NaN in the first window of every batch, inf in the second (the last batch may hold only one)
        assert batches <= stats["nonfinite_windows"] <= 2 * batches
        assert model(rep, "m25d")["fragments"][frag_id]["nonfinite_windows"] == 0
    assert any("gave NaN or inf: zeroed" in w for w in rep["warnings"])
    assert "gave NaN or inf" in caplog.text
    assert_valid_submission(out)


def test_nan_windows_beyond_the_limit_skip_the_model(data, manifest, tmp_path, standins):
    standins["m3d"] = {"nan": True}
    out = tmp_path / "out"
    assert run_cli(data, out, manifest) == 0  # default --max-nonfinite 0.01
    m3d = model(report_of(out), "m3d")
    assert m3d["status"] == "failed" and "more than --max-nonfinite 0.01" in m3d["reason"]
    assert not list((out / "partials").glob("m3d.*"))
    assert_valid_submission(out)


def test_a_model_with_only_nan_outputs_is_skipped(data, manifest, tmp_path, standins):
    standins["m3d"] = {"nan": "all"}
    out = tmp_path / "out"
    assert run_cli(data, out, manifest) == 0
    m3d = model(report_of(out), "m3d")
    assert m3d["status"] == "failed" and "gave NaN or inf" in m3d["reason"]
    assert not list((out / "partials").glob("m3d.*"))  # a failed result is never kept
    assert_valid_submission(out)


@pytest.mark.parametrize("oom_above", [2, 0], ids=["recovers", "persists"])
def test_gpu_out_of_memory_halves_the_batch_once_then_skips_the_model(
    oom_above, data, manifest, tmp_path, standins
):
    standins["m25d"] = {"oom_above": oom_above}
    out = tmp_path / "out"
    assert run_cli(data, out, manifest, "--batch-size", "4") == 0
    rep = report_of(out)
    m25d = model(rep, "m25d")
    if oom_above:
        assert m25d["status"] == "ok"
        assert all(f["oom_retries"] == 1 for f in m25d["fragments"].values())
        assert any("out of memory, batch size halved" in w for w in rep["warnings"])
    else:
        assert m25d["status"] == "failed" and m25d["reason"].startswith("OutOfMemoryError")
    assert model(rep, "m3d")["status"] == "ok"
    assert_valid_submission(out)


# --- a full disk while results are written --------------------------------------------------------------------


def fill_disk(monkeypatch, out: Path, hit) -> None:
    """``os.replace`` into ``out`` raises ENOSPC for the files ``hit(path)`` selects: the temporary file is
    complete, the rename that would publish it fails (as a full disk's last write or fsync would)."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        dst = Path(dst)
        if out in dst.parents and hit(dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("previous", [False, True], ids=["no-previous", "previous-kept"])
def test_disk_full_leaves_no_partial_submission(previous, data, manifest, reference, tmp_path, monkeypatch, standins, capsys):  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    if previous:
        shutil.copy(reference / "submission.csv", out / "submission.csv")
    before = (out / "submission.csv").read_bytes() if previous else None
    fill_disk(monkeypatch, out, lambda p: p.name != "report.json")  # partials, previews, submission.csv
    assert run_cli(data, out, manifest) == 2
    err = one_error_line(capsys)
    assert "submission.csv: cannot write (No space left on device)" in err
    assert "no finished result could be saved either" in err  # never claims partials that were not saved
    if previous:
        assert (out / "submission.csv").read_bytes() == before
    else:
        assert not (out / "submission.csv").exists()
    assert leftovers(out) == []
    rep = report_of(out)
    assert rep["status"] == "failed" and "No space left" in rep["error"]
    assert all(f["partial"].startswith("not saved") for m in rep["models"] for f in m["fragments"].values())


def test_a_disk_that_fills_while_results_are_written_says_so_once(data, manifest, tmp_path, monkeypatch, standins,
                                                                    capsys, caplog):  # fmt: skip
    """#27 item 14: partials, previews and progress reports that find no room are not a line each; the run says it
    once (here: the submission that cannot be written, the one line the README promises)."""
    import logging

    out = tmp_path / "out"
    out.mkdir()
    fill_disk(monkeypatch, out, lambda p: True)  # every file, report.json included
    with caplog.at_level(logging.WARNING):
        assert run_cli(data, out, manifest) == 2
    assert "submission.csv: cannot write (No space left on device)" in one_error_line(capsys)
    assert [r.getMessage() for r in caplog.records if "No space" in r.getMessage()] == []


def test_results_not_saved_for_want_of_room_are_counted_once_when_the_run_succeeds(data, manifest, tmp_path,
                                                                                    monkeypatch, standins, caplog):  # fmt: skip
    import logging

    out = tmp_path / "out"
    fill_disk(monkeypatch, out, lambda p: p.suffix == ".npz")
    with caplog.at_level(logging.WARNING):
        assert run_cli(data, out, manifest) == 0
    said = [r.getMessage() for r in caplog.records if "no space" in r.getMessage().lower()]
    assert len(said) == 1 and "4 finished result(s) not saved" in said[0]


def test_disk_full_on_the_final_report_rewrites_it_in_place_and_keeps_the_submission(data, manifest, tmp_path, monkeypatch, standins, capsys):  # fmt: skip
    """No room for a second copy of report.json: the old one is truncated and rewritten, so it ends in its final
    status, never in a stale "running"."""
    out = tmp_path / "out"
    fill_disk(monkeypatch, out, lambda p: p.name == "report.json" and (out / "submission.csv").exists())
    assert run_cli(data, out, manifest) == 0
    assert report_of(out)["status"] == "ok"
    assert_valid_submission(out)
    assert leftovers(out) == []


def test_disk_full_on_the_final_report_with_no_room_at_all_removes_the_stale_one(data, manifest, tmp_path, monkeypatch, standins, capsys):  # fmt: skip
    from ink_infer.outputs import report as report_mod

    out = tmp_path / "out"
    fill_disk(monkeypatch, out, lambda p: p.name == "report.json" and (out / "submission.csv").exists())

    def no_room(path, *args, **kwargs):  # the in-place rewrite finds no room either
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(
        report_mod, "open", no_room, raising=False
    )  # shadows the builtin inside outputs/report.py only
    assert run_cli(data, out, manifest) == 2
    assert (
        "report.json: cannot write (No space left on device); submission.csv was written"
        in one_error_line(capsys)
    )
    assert not (out / "report.json").exists()  # no stale "running" report left behind
    assert_valid_submission(out)


# --- interruption and resume ----------------------------------------------------------------------------------


def test_stop_request_sets_a_flag_then_interrupts_at_once_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        stop.check()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted):
            stop.check()
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not wait for the next check
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_model_stops_cleanly_and_the_rerun_resumes_identically(
    signum, data, manifest, reference, tmp_path, standins, capsys
):
    out = tmp_path / "out"
    standins["m3d"] = {"signal_at": (signum, 1)}  # m25d has finished, m3d is in its first batch
    assert run_cli(data, out, manifest) == 128 + signum
    err = one_error_line(capsys)
    assert f"interrupted by {signal.Signals(signum).name} during model m3d" in err
    assert "2 finished (model, fragment) result(s) kept" in err
    assert not (out / "submission.csv").exists()
    rep = report_of(out)
    assert rep["status"] == "interrupted" and rep["interrupted"]["model"] == "m3d"
    assert model(rep, "m3d")["status"] == "interrupted"
    assert sorted(p.name.split(".")[0] for p in (out / "partials").glob("*.npz")) == ["m25d", "m25d"]

    standins.clear()
    assert run_cli(data, out, manifest) == 0
    assert report_of(out)["partials"]["reused"] == [["m25d", "b"], ["m25d", "a"]]
    assert (out / "submission.csv").read_bytes() == (reference / "submission.csv").read_bytes()


DRIVER = """
import sys
sys.path.insert(0, {root!r})
from tests.test_run_faults import install_standins
install_standins({{"m3d": {{"sleep": 0.5}}}})  # m3d slow: SIGTERM lands while it runs
from ink_infer.submit import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_after_the_first_model_then_rerun_gives_the_same_bytes(
    data, manifest, reference, tmp_path, standins
):
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    argv = ["--data", str(data), "--out", str(out), "--manifest", str(manifest), "--allow-random-weights",
            "--stride", "64", "--quiet"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(driver), *argv], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while len(list((out / "partials").glob("m25d.*.npz"))) < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the first model's partials never appeared"
        time.sleep(0.05)
    time.sleep(
        1.0
    )  # into m3d's first fragment (0.5 s a batch); if the machine is slow, between the two models
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(
        r"error: interrupted by SIGTERM( during model m3d)?: no submission written; 2 finished", last
    ), err
    assert not (out / "submission.csv").exists()
    assert report_of(out)["status"] == "interrupted"

    assert run_cli(data, out, manifest) == 0
    rep = report_of(out)
    assert rep["partials"]["reused"] == [["m25d", "b"], ["m25d", "a"]]
    assert [m["status"] for m in rep["models"]] == ["ok", "ok"]
    assert (out / "submission.csv").read_bytes() == (reference / "submission.csv").read_bytes()


def test_rerun_reuses_everything_without_building_a_model_and_fresh_recomputes(
    data, manifest, reference, tmp_path, monkeypatch
):
    out = shutil.copytree(reference, tmp_path / "out")
    built = []
    monkeypatch.setattr(model_run, "build_model", lambda spec: built.append(spec.name) or Standin())
    assert run_cli(data, out, manifest) == 0
    assert built == [] and len(report_of(out)["partials"]["reused"]) == 4
    assert (out / "submission.csv").read_bytes() == (reference / "submission.csv").read_bytes()
    assert run_cli(data, out, manifest, "--fresh") == 0
    assert built == ["m25d", "m3d"] and report_of(out)["partials"]["reused"] == []
    assert (out / "submission.csv").read_bytes() == (reference / "submission.csv").read_bytes()


def test_changing_only_ensemble_weights_or_file_names_reuses_every_partial(
    data, reference, tmp_path, monkeypatch
):
    """A partial is keyed by what changes its bytes: an entry's ensemble ``weight`` and ``file`` name do not."""

    def reweigh(m: dict) -> None:
        m["models"][0]["file"] = (
            "renamed.ckpt"  # no such file: random weights, as before (--allow-random-weights)
        )
        m["models"][1]["weight"] = 3.0

    manifest = write_manifest(tmp_path / "m.json", reweigh)
    out = shutil.copytree(reference, tmp_path / "out")
    built = []
    monkeypatch.setattr(model_run, "build_model", lambda spec: built.append(spec.name) or Standin())
    assert run_cli(data, out, manifest) == 0
    assert built == [] and len(report_of(out)["partials"]["reused"]) == 4
    fresh = tmp_path / "fresh"
    assert run_cli(data, fresh, manifest) == 0 and built == ["m25d", "m3d"]
    # the reused maps, weighed anew, give the submission a fresh run gives (and not the reference's)
    assert (out / "submission.csv").read_bytes() == (fresh / "submission.csv").read_bytes()
    assert (out / "submission.csv").read_bytes() != (reference / "submission.csv").read_bytes()


def change_slice_mtime(comp: Path) -> None:
    st = (comp / "test" / "a" / "surface_volume" / "30.tif").stat()
    os.utime(comp / "test" / "a" / "surface_volume" / "30.tif", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize(
    ("change", "kept"),
    [
        ({"argv": ["--stride", "96"]}, []),
        ({"argv": ["--tta", "none"]}, []),
        ({"manifest": lambda m: m["models"][1].update(z_range=[20, 36])}, [["m25d", "b"], ["m25d", "a"]]),
        ({"data": change_slice_mtime}, [["m25d", "b"], ["m3d", "b"]]),
    ],
    ids=["stride", "tta", "manifest-entry", "slice-rewritten"],
)
def test_a_partial_from_another_configuration_is_never_reused(
    change, kept, data, manifest, reference, tmp_path, standins
):
    out = shutil.copytree(reference, tmp_path / "out")
    if "data" in change:
        data = shutil.copytree(data, tmp_path / "comp", copy_function=shutil.copy2)  # copy2 keeps mtimes
        change["data"](data)
    if "manifest" in change:
        manifest = write_manifest(tmp_path / "m.json", change["manifest"])
    assert run_cli(data, out, manifest, *change.get("argv", [])) == 0
    partials = report_of(out)["partials"]
    assert partials["reused"] == kept
    assert all(why == "written by a different configuration" for *_, why in partials["ignored"])
    assert len(partials["ignored"]) == 4 - len(kept)
    assert len(list((out / "partials").glob("*.npz"))) == 4  # replaced, not added: one file per pair


def test_an_unreadable_partial_is_recomputed(data, manifest, reference, tmp_path, standins):
    out = shutil.copytree(reference, tmp_path / "out")
    victim = next((out / "partials").glob("m3d.a.*.npz"))
    victim.write_bytes(victim.read_bytes()[:100])
    assert run_cli(data, out, manifest) == 0
    partials = report_of(out)["partials"]
    assert len(partials["reused"]) == 3 and partials["ignored"][0][:2] == ["m3d", "a"]
    assert (out / "submission.csv").read_bytes() == (reference / "submission.csv").read_bytes()
