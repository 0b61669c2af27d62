"""What a person sees while a run computes: progress lines where stderr is not a terminal (a notebook cell, a log
file, CI), bars with the run's model k/N and ETA on a terminal, nothing with --quiet; and the ETA's arithmetic."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import termios
from pathlib import Path

from ink_infer.outputs.progress import RunProgress
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[1]


def test_without_a_terminal_each_model_logs_its_start_progress_and_end(
    data, manifest, tmp_path, standins, capsys
):
    assert run_cli(data, tmp_path / "out", manifest, "--progress-every", "0") == 0  # run_cli passes --quiet
    assert "model 1/2" not in capsys.readouterr().err  # --quiet: no lines at all
    argv = ["--data", str(data), "--out", str(tmp_path / "loud"), "--manifest", str(manifest),
            "--allow-random-weights", "--stride", "64", "--progress-every", "0", "--no-previews"]  # fmt: skip
    from ink_infer.submit import main

    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    starts = [ln for ln in lines if ln.endswith("windows to compute") or "windows to compute;" in ln]
    assert [ln.split(":")[0] for ln in starts] == ["model 1/2 m25d", "model 2/2 m3d"]
    n = int(re.search(r"started, (\d+) windows", starts[0]).group(1))
    steps = [ln for ln in lines if re.match(r"model 1/2 m25d: \d+/\d+ windows, [\d.]+ win/s, model ETA ", ln)]
    assert steps and steps[-1].startswith(f"model 1/2 m25d: {n}/{n} windows")
    assert all("; run ETA " in ln for ln in steps)  # the whole run's ETA on every progress line
    ends = [ln for ln in lines if re.match(r"model \d/2 \w+: ok in ", ln)]
    assert len(ends) == 2 and f"{n} windows computed" in ends[0]
    # a rerun reuses every unit: the lines say so, and no progress line is printed for nothing
    assert main(argv) == 0
    again = capsys.readouterr().err.splitlines()
    ends = [ln for ln in again if ": ok in " in ln]
    assert len(ends) == 2 and all(ln.endswith(" in 0 s, 2 unit(s) reused") for ln in ends)
    assert not [ln for ln in again if " win/s" in ln or "windows to compute" in ln]


def test_lines_come_at_the_interval_not_per_batch():
    stream = io.StringIO()
    progress = RunProgress(1, 100, every=3600, stream=stream, tty=False)
    progress.start_model("m", 100)
    for done in range(10, 101, 10):
        progress.update(done, done / 50)
    progress.end_model("ok", 2.0)
    lines = stream.getvalue().splitlines()
    assert (
        len(lines) == 2
        and lines[0].startswith("model 1/1 m: started")
        and lines[1].startswith("model 1/1 m: ok")
    )


def test_run_eta_counts_the_models_to_come_at_the_rate_so_far():
    progress = RunProgress(3, 100, every=0, stream=io.StringIO(), tty=False)
    progress.start_model("a", 100)
    progress.update(100, 10.0)  # 10 windows/s
    progress.end_model("ok", 10.0)
    assert progress.run_eta() == 20.0  # two models of 100 windows at 10/s
    progress.start_model("b", 100)
    progress.update(50, 2.5)  # this one runs at 20/s: its rest at its own rate, the last at the mean
    assert progress.run_eta() == 50 / 20 + 100 / (150 / 12.5)


def test_on_a_terminal_the_bar_carries_the_runs_model_count_and_eta(data, manifest, tmp_path):
    """The CLI with stderr on a pseudo-terminal (stand-in models): tqdm bars titled ``model k/N name``, with the
    run's ETA, instead of progress lines."""
    driver = (
        "import sys; from tests.standins import Standin; from ink_infer.run import model_run\n"
        "model_run.build_model = lambda spec: Standin(sleep=0.05)\n"
        "from ink_infer.submit import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--manifest", str(manifest),
            "--allow-random-weights", "--stride", "32", "--batch-size", "2", "--no-previews"]  # fmt: skip
    master, slave = pty.openpty()
    termios.tcsetwinsize(slave, (40, 150))  # rows, columns: a terminal window's size
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", driver, *argv], cwd=REPO, stderr=slave,
                            stdout=subprocess.DEVNULL, env=env)  # fmt: skip
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=120) == 0, seen.decode(errors="replace")[-2000:]
    text = seen.decode(errors="replace")
    assert "model 1/2 m25d" in text and "model 2/2 m3d" in text
    assert re.search(r"model 1/2 m25d:\s+\d+%", text)  # a tqdm bar, not a line
    assert "run ETA" in text
    assert "windows to compute" not in text  # the start lines are for logs, not terminals
