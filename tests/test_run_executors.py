"""Every executor gives the same bytes: one process, spawned workers (``--devices cpu,cpu``), torchrun ranks, and
``--num-parts`` + ``--merge-only``, on three small real models over two fragments, one of them split by rows.

Workers and ranks are fresh interpreters (no monkeypatching reaches them), so these runs use the small real models
of test_submit.py at stride 64; each takes seconds. On the CPU, oneDNN's convolutions round differently with a
different thread count, and each CPU worker computes with one thread: so every run here computes with one thread
per process, the single-process reference included (the ``one_thread`` fixture, ``OMP_NUM_THREADS=1``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ink_infer.manifest import load_manifest
from ink_infer.run.claims import Claims, claim_name
from ink_infer.run.partials import PartialStore
from ink_infer.run.plan import Weights, plan_run, split_rows
from ink_infer.run.shares import assign, claims_dir
from ink_infer.submit import main
from ink_infer.synthetic.fragments import write_dataset
from ink_infer.volumes.discovery import find_fragments
from tests.helpers import SMALL_MODELS, one_error_line, report_of

ROOT = Path(__file__).resolve().parents[1]
# windows per unit: fragment "b" (two 16-row stripes of windows) is split by rows, fragment "a" is not
UNIT_WINDOWS = "12"


@pytest.fixture(scope="module")
def three_models(tmp_path_factory) -> Path:
    m = json.loads(json.dumps(SMALL_MODELS))
    third = {**m["models"][0], "name": "m25d_b", "z_range": [28, 36], "in_chans": 2}
    m["models"].append(third)
    path = tmp_path_factory.mktemp("m3") / "m.json"
    path.write_text(json.dumps(m))
    return path


@pytest.fixture(scope="module")
def frags(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("frags"), test=[("b", 700, 160), ("a", 150, 160)], seed=9)


def argv(data: Path, out: Path, manifest: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--manifest", str(manifest), "--allow-random-weights",
            "--stride", "64", "--unit-windows", UNIT_WINDOWS, "--quiet", "--no-previews", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single(frags, three_models, tmp_path_factory, one_thread) -> Path:
    """OUT of the one-process run: the bytes every other executor must give."""
    out = tmp_path_factory.mktemp("single")
    assert main(argv(frags, out, three_models)) == 0
    report = json.loads((out / "report.json").read_text())
    units = list(report["models"][0]["fragments"])
    assert any(u.startswith("b@") for u in units) and "a" in units  # b is split by rows, a is not
    return out


def test_splitting_by_rows_changes_no_output_pixel(frags, three_models, single, tmp_path):
    out = tmp_path / "whole"
    assert (
        main([*argv(frags, out, three_models)[:-4], "--unit-windows", "100000", "--quiet", "--no-previews"])
        == 0
    )
    assert all("@" not in u for u in report_of(out)["models"][0]["fragments"])
    assert (out / "submission.csv").read_bytes() == (single / "submission.csv").read_bytes()


def test_row_ranges_hold_every_window_once_in_order_with_its_flip():
    from ink_infer.run.plan import FragmentPlan

    # origin rows in the reference's string order; 16-row stripes: [0, 16) holds rows 0, 1, 10, 2 (16 windows),
    # [16, 32) row 17 (4), [32, 48) rows 33, 40 (8)
    origins = np.array([[r, c] for r in (0, 1, 10, 33, 17, 2, 40) for c in range(4)])
    plan = FragmentPlan(None, (2048, 512), None, None, origins, np.arange(len(origins)) % 4)
    parts = split_rows(plan, 14)
    assert [p.rows for p in parts] == [(0, 16), (16, 48)]  # cut at multiples of 16 rows only
    assert [len(p.origins) for p in parts] == [16, 12]  # a stripe is never cut, even past max_windows
    assert [p.rows for p in split_rows(plan, 4)] == [(0, 16), (16, 32), (32, 48)]
    joined = np.concatenate([p.origins for p in parts])
    assert sorted(map(tuple, joined)) == sorted(map(tuple, origins))
    for p in parts:  # each window keeps its op, and the plan's order within the range
        idx = [int(np.flatnonzero((origins == o).all(1))[0]) for o in p.origins]
        assert idx == sorted(idx) and (p.ops == plan.ops[idx]).all()
    assert split_rows(plan, 100) == [plan]


def test_assignment_is_longest_first_onto_the_least_loaded_and_deterministic():
    costs = [5.0, 1.0, 4.0, 3.0, 3.0, 2.0]
    owner = assign(costs, 2)
    # 5 -> w0; 4 -> w1; 3 -> w1 (4 < 5); 3 -> w0 (5 < 7); 2 -> w1 (7 < 8); 1 -> w0 (8 < 9)
    assert owner == [0, 0, 1, 1, 0, 1]
    loads = [sum(c for c, o in zip(costs, owner, strict=True) if o == w) for w in (0, 1)]
    assert loads == [9.0, 9.0] and assign(costs, 2) == owner and assign(costs, 1) == [0] * 6


def test_two_cpu_workers_give_the_single_process_bytes(frags, three_models, single, tmp_path):
    out = tmp_path / "workers"
    assert main(argv(frags, out, three_models, "--devices", "cpu,cpu")) == 0
    assert (out / "submission.csv").read_bytes() == (single / "submission.csv").read_bytes()
    report = report_of(out)
    assert [p["label"] for p in report["parts"]] == ["worker 0 (cpu)", "worker 1 (cpu)"]
    assert all(p["status"] == "ok" and p["models"] for p in report["parts"])
    # worker 0 is this process (no exit code); worker 1 a spawned process that exited cleanly
    assert [p["exitcode"] for p in report["parts"]] == [None, 0]
    assert report["partials"]["reused"] == []  # computed in this run, by the workers
    assert {f["partial"] for m in report["models"] for f in m["fragments"].values()} == {"saved"}


class Queue:
    """Two workers' shares of the three models' units and their shared queue, run in this process one after the
    other (``run``), with the models each loads counted."""

    def __init__(self, frags: Path, manifest: Path, out: Path, monkeypatch) -> None:
        import ink_infer.run.model_run as model_run
        from ink_infer.run.plan import UnitSettings
        from ink_infer.run.runtime import start_runtime
        from ink_infer.run.shares import plan_shares
        from ink_infer.submit import build_parser, config_from_args

        self.out = out
        self.cfg = config_from_args(build_parser().parse_args(argv(frags, out, manifest)))
        self.runtime = start_runtime("cpu", gpu_mem_gb=self.cfg.budget.gpu_mem_gb)
        _, self.items = plan_run(
            find_fragments(frags)[0], stride=64, tta=self.cfg.tta, unit_windows=int(UNIT_WINDOWS)
        )
        self.models = [(spec, Weights(None, None)) for spec in load_manifest(manifest).models]
        self.shares = plan_shares(self.models, self.items, ["cpu", "cpu"], ["worker 0", "worker 1"])
        settings = UnitSettings(self.cfg.stride, self.cfg.tta, "cpu", self.runtime.dtype_name)
        self.store = PartialStore(self.cfg.partials_dir, settings)
        self.root = claims_dir(out)
        Claims.reset(self.root)
        self.loads: list[str] = []
        load = model_run.load_model
        monkeypatch.setattr(
            model_run, "load_model", lambda spec, *a, **k: self.loads.append(spec.name) or load(spec, *a, **k)
        )

    def run(self, i: int):
        from ink_infer.run.model_run import ModelRunContext, ModelRunOptions
        from ink_infer.run.shares import compute_share
        from ink_infer.run.stop import StopRequest

        share = self.shares[i]
        self.loads.clear()
        with StopRequest() as stop:
            claims = Claims(self.root, share.label, {tuple(u) for u in share.units})
            ctx = ModelRunContext(ModelRunOptions(tta=self.cfg.tta), self.runtime, stop, store=self.store,
                                  claims=claims)  # fmt: skip
            return compute_share(share, ctx, self.out)


def ran(part) -> list[tuple[str, list[str]]]:
    return [(m.name, list(m.fragments)) for m in part.models]


def groups(gs) -> list[tuple[str, list[str]]]:
    return [(spec.name, [item.id for item in its]) for spec, _, its in gs]


def test_a_worker_takes_the_rest_of_the_others_shares_from_their_end_and_the_bytes_stay(
    frags, three_models, single, tmp_path, monkeypatch, one_thread, capsys
):
    """The shared queue in one process: worker 0 has taken its first unit and is still on it when worker 1 comes
    to it. Worker 1 takes its own units, then all of worker 0's but that one, from the end; worker 0, done with
    its unit, finds nothing left and loads no model. The partials then give the single process's bytes."""
    from ink_infer.run.plan import Unit

    out = tmp_path / "queue"
    q = Queue(frags, three_models, out, monkeypatch)
    # the spare: the other share's units, the last model first; every model's units longest first
    names = [spec.name for spec, _ in q.models]
    spare = groups(q.shares[1].spare)
    assert [n for n, _ in spare] == sorted({n for n, _ in spare}, key=names.index, reverse=True)
    windows = {item.id: len(item.origins) for item in q.items}
    assert len(set(windows.values())) > 2  # units of different lengths, so that the order is tested
    for _, ids in spare + groups(q.shares[1].models):
        assert [windows[u] for u in ids] == sorted((windows[u] for u in ids), reverse=True)
    assert {(n, u) for n, ids in spare for u in ids} == {tuple(u) for u in q.shares[0].units}

    spec, weights, its = q.shares[0].models[
        0
    ]  # worker 0 started on its first unit before worker 1 came to it
    Claims(q.root, "worker 0").take(Unit(spec, weights, its[0]))
    one = q.run(1)
    expected = groups(q.shares[1].models) + [
        (n, [u for u in ids if (n, u) != (spec.name, its[0].id)]) for n, ids in spare
    ]
    assert ran(one) == [(n, ids) for n, ids in expected if ids]
    zero = q.run(0)
    assert ran(zero) == [] and q.loads == []  # nothing left for it: no model loaded
    # the unit worker 0 had taken (and, here, never finished) is the one the merge misses
    assert main(argv(frags, out, three_models, "--merge-only")) == 2
    assert f"model {spec.name}, unit {its[0].id}: no partial" in one_error_line(capsys)
    assert main(argv(frags, out, three_models)) == 0  # a rerun computes it, and reads every other unit back
    assert (out / "submission.csv").read_bytes() == (single / "submission.csv").read_bytes()
    computed = [(m["name"], u) for m in report_of(out)["models"] for u, f in m["fragments"].items()
                if f["partial"] == "saved"]  # fmt: skip
    assert computed == [(spec.name, its[0].id)]


def test_a_model_failing_in_one_worker_is_computed_by_no_other_and_is_not_lost(
    frags, three_models, tmp_path, monkeypatch, one_thread
):
    import ink_infer.run.model_run as model_run
    from ink_infer.outputs.report import PartReport
    from ink_infer.run.shares import lost_units

    q = Queue(frags, three_models, tmp_path / "failing", monkeypatch)
    counted = model_run.load_model

    def broken_m3d(spec, *a, **k):
        model, info = counted(spec, *a, **k)
        if spec.name == "m3d":
            model.forward = lambda x: (_ for _ in ()).throw(RuntimeError("broken on purpose"))
        return model, info

    monkeypatch.setattr(model_run, "load_model", broken_m3d)
    one = q.run(1)  # alone: its own units, then every unit of worker 0's share, as if worker 0 never started
    own, spare = ({n for n, _ in groups(gs)} for gs in (q.shares[1].models, q.shares[1].spare))
    assert "m3d" in own and "m3d" in spare
    # m3d failed in its own share, and its units in the spare were closed: not loaded again, not run again
    assert [m.status for m in one.models if m.name == "m3d"] == ["failed"] and q.loads.count("m3d") == 1
    assert {n for n, _ in ran(one) if n != "m3d"} == {"m25d", "m25d_b"}
    zero = q.run(0)
    assert zero.models == [] and q.loads == []
    # none of the units it took is lost: they are done, or of the model that joins the ensemble nowhere
    holders = Claims(q.root, "").holders()
    everyone = [u for share in q.shares for u in share.units]
    assert lost_units(one, q.shares[1].units, everyone, holders) == []
    # while a unit it took of a model that did not fail is lost when it is not finished
    unfinished = PartReport("worker 1", "cpu", models=[m for m in one.models if m.name != "m25d"])
    lost = lost_units(unfinished, q.shares[1].units, everyone, holders)
    assert lost and {m for m, _ in lost} == {"m25d"}


def test_claims_are_taken_once_and_an_unwritable_folder_falls_back_to_the_planned_units(tmp_path, caplog):
    from types import SimpleNamespace

    def unit(model: str, uid: str):
        return SimpleNamespace(model=SimpleNamespace(name=model), fragment=SimpleNamespace(id=uid))

    mine, theirs = unit("m", "b@0-16"), unit("m", "b 0-16")  # one safe_name, two units
    Claims.reset(tmp_path / "q")
    one, two = Claims(tmp_path / "q", "one"), Claims(tmp_path / "q", "two")
    assert one.take(mine) and not two.take(mine) and not one.take(mine)
    assert two.free(theirs) and two.take(theirs) and not one.free(theirs)
    assert sorted(one.holders().values()) == ["one", "two"]
    (tmp_path / "file").write_text("")  # a folder that cannot hold claims (a full disk fails alike, ENOSPC)
    stuck = Claims(tmp_path / "file", "three", own={("m", "b@0-16")})
    assert stuck.take(mine) and not stuck.take(theirs) and stuck.free(mine) and not stuck.free(theirs)
    assert "computes its planned units only" in caplog.text


def test_parts_then_merge_give_the_single_process_bytes_and_a_missing_part_is_named(
    frags, three_models, single, tmp_path, capsys
):
    out = tmp_path / "parts"
    for i in (0, 2):
        assert main(argv(frags, out, three_models, "--num-parts", "3", "--part-id", str(i))) == 0
    assert not (out / "submission.csv").exists()
    assert main(argv(frags, out, three_models, "--merge-only")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: --merge-only: model ") for line in err), err
    assert not (out / "submission.csv").exists()
    assert main(argv(frags, out, three_models, "--num-parts", "3", "--part-id", "1")) == 0
    assert main(argv(frags, out, three_models, "--merge-only")) == 0
    assert (out / "submission.csv").read_bytes() == (single / "submission.csv").read_bytes()
    assert sorted(p["label"] for p in report_of(out)["parts"]) == [
        "part 0 of 3",
        "part 1 of 3",
        "part 2 of 3",
    ]


def test_torchrun_two_ranks_give_the_single_process_bytes(frags, three_models, single, tmp_path):
    out = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ink_infer.submit", *argv(frags, out, three_models)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "submission.csv").read_bytes() == (single / "submission.csv").read_bytes()
    assert sorted(p["label"] for p in report_of(out)["parts"]) == ["rank 0 of 2", "rank 1 of 2"]


def worker_pids(parent: int) -> list[int]:
    """The spawned workers among ``parent``'s children (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def computing(out: Path, single: Path, label: str) -> bool:
    """Whether the worker ``label`` has taken a unit from the queue whose partial is not saved yet."""
    store = PartialStore(out / "partials", None)
    for m in report_of(single)["models"]:
        for u in m["fragments"]:
            claim = claims_dir(out) / claim_name(m["name"], u)
            if claim.is_file() and claim.read_text() == label and not store.path(m["name"], u).exists():
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigterm_to_the_parent_stops_every_worker_and_the_rerun_resumes_identically(
    frags, three_models, single, tmp_path
):
    out = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "ink_infer.submit", *argv(frags, out, three_models, "--devices", "cpu,cpu")]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not computing(out, single, "worker 1 (cpu)"):
        assert proc.poll() is None and time.monotonic() < deadline, "the spawned worker never computed"
        time.sleep(0.02)
    workers = worker_pids(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted by SIGTERM"), err[-3000:]
    assert not (out / "submission.csv").exists() and report_of(out)["status"] == "interrupted"
    assert workers and not any(Path(f"/proc/{pid}").exists() for pid in workers)  # they ended with it
    spawned = json.loads((out / "parts" / "worker_1_cpu_.json").read_text())
    assert spawned["status"] == "interrupted"

    # the rerun, here in one process: the partials do not depend on who computed them
    assert main(argv(frags, out, three_models)) == 0
    assert (out / "submission.csv").read_bytes() == (single / "submission.csv").read_bytes()
    assert report_of(out)["partials"]["reused"]  # what was saved before the stop is not computed again


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_worker_killed_mid_run_is_reported_and_its_units_are_computed_by_the_parent(
    frags, three_models, single, tmp_path
):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "ink_infer.submit", *argv(frags, out, three_models)[:-4], "--unit-windows", "4",
           "--devices", "cpu,cpu", "--quiet", "--no-previews"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    victim = None
    while victim is None and proc.poll() is None and time.monotonic() < deadline:
        pids = worker_pids(proc.pid)
        # the parent computes the first device's share: the second device's is the one spawned worker
        if len(pids) == 1 and computing(out, single, "worker 1 (cpu)"):
            victim = pids[0]
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.02)
    assert victim is not None, "the workers never started"
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    report = report_of(out)
    dead = [p for p in report["parts"] if p["exitcode"] == -signal.SIGKILL]
    assert len(dead) == 1 and dead[0]["error"] == "the worker died (SIGKILL)"
    # it loses the one unit it was on: the rest of its share was left in the queue, for the parent to take
    assert len(dead[0]["lost"]) == 1 and "its 1 unfinished unit(s) are computed here" in err
    assert not claims_dir(out).exists()
    assert (out / "submission.csv").read_bytes() == (single / "submission.csv").read_bytes()


@pytest.mark.parametrize(
    ("devices", "needle"),
    [("cuda:7", "cuda:7 does not exist"), ("tpu", "'tpu' is not a device"), ("cpu,,cpu", "expected all")],
)
def test_a_bad_devices_list_is_one_line_and_exit_2(devices, needle, frags, three_models, tmp_path, capsys):
    if needle.startswith("cuda:7"):
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    assert main(argv(frags, tmp_path / "o", three_models, "--devices", devices)) == 2
    assert needle in one_error_line(capsys)


@pytest.mark.parametrize("how", ["devices", "torchrun"])
def test_a_dry_run_on_two_devices_or_ranks_projects_the_makespan(
    how, frags, three_models, tmp_path, one_thread, monkeypatch, capsys
):
    out = tmp_path / "dry"
    extra = ["--dry-run", "--max-windows", "4"]
    if how == "devices":
        extra += ["--devices", "cpu,cpu"]
    else:  # torchrun's variables, as two ranks see them: rank 1 leaves the dry run to rank 0
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        assert main(argv(frags, out, three_models, *extra)) == 0
        assert "rank 1 of 2: the dry run is rank 0's" in capsys.readouterr().out
        assert not (out / "report.json").exists()
        monkeypatch.setenv("RANK", "0")
    assert main(argv(frags, out, three_models, *extra)) == 0
    report = report_of(out)
    total = sum(m["projection"]["projected_hours"] for m in report["models"])
    # the longest of two shares: at least half the work, less than all of it (several units to share)
    assert 0.5 * total <= report["projection"]["hours"] < total


def _standin_argv(data: Path, out: Path, manifest: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--manifest", str(manifest), "--allow-random-weights",
            "--stride", "64", "--quiet", "--no-previews", *extra]  # fmt: skip


def test_merge_only_never_computes_even_with_devices(data, manifest, tmp_path, standins, capsys):
    """#27 item 9: ``--merge-only --devices cpu,cpu`` on an empty OUT names what is missing and computes nothing."""
    out = tmp_path / "out"
    assert main(_standin_argv(data, out, manifest, "--merge-only", "--devices", "cpu,cpu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: --merge-only: model ") for line in err), err
    assert not list(out.rglob("*.npz")) and not (out / "parts").exists()


def test_parts_and_their_merge_warn_of_nothing(data, manifest, tmp_path, standins, caplog):
    """#27 item 12: a part's own report beside the parts' records is not read as one ("unreadable part report")."""
    import logging

    out = tmp_path / "out"
    for part in ("0", "1"):
        assert main(_standin_argv(data, out, manifest, "--num-parts", "2", "--part-id", part)) == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(_standin_argv(data, out, manifest, "--merge-only")) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # the fragments' own notes only
    assert warned and all("smaller than one window" in w for w in warned), warned
    assert (out / "submission.csv").is_file()


@pytest.mark.parametrize("case", ["other_options", "corrupt"])
def test_merge_only_names_why_a_present_partial_cannot_be_used(
    case, data, manifest, tmp_path, standins, capsys
):
    """#27 item 11: a partial that is there but made with other options, or unreadable, is named as such, not as
    a part that has not finished."""
    out = tmp_path / "out"
    for part in ("0", "1"):
        assert main(_standin_argv(data, out, manifest, "--num-parts", "2", "--part-id", part)) == 0
    extra: tuple[str, ...] = ()
    if case == "other_options":
        extra = ("--tta", "none")
    else:
        next((out / "partials").glob("*.npz")).write_bytes(b"not a partial")
    capsys.readouterr()
    assert main(_standin_argv(data, out, manifest, "--merge-only", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: --merge-only: model ") for line in err)
    if case == "other_options":
        assert len(err) == 4 and all("made with other settings (tta differ" in line for line in err)
    else:
        assert len(err) == 1 and "unreadable" in err[0] and "has not finished" not in err[0]


def test_a_rank_that_ends_first_is_one_line_an_interrupted_report_and_a_rerun_resumes(
    data, manifest, tmp_path, standins, monkeypatch, capsys
):
    """#27 item 6: torchrun with one rank killed: rank 0's barrier meets a broken connection (gloo's RuntimeError);
    that is one line and the interrupted status, not a traceback; the same command without torchrun resumes."""
    from ink_infer.run import executors

    class BrokenGroup:
        def barrier(self):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:29500")

    monkeypatch.setattr(executors, "_join_group", lambda hours: BrokenGroup())
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    assert main(_standin_argv(data, out, manifest)) == 1
    line = one_error_line(capsys)
    assert line.startswith("error: interrupted by another torchrun rank ending") and "rerun" in line
    rep = report_of(out)
    assert rep["status"] == "interrupted" and rep["interrupted"]["signal"] == "another torchrun rank ending"
    assert list((out / "partials").glob("*.npz"))  # rank 0's share, saved before the barrier
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert main(_standin_argv(data, out, manifest)) == 0
    assert report_of(out)["partials"]["reused"]  # what rank 0 saved is not computed again
