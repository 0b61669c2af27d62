"""What a person watching a run sees while it computes: which model of how many, windows done, the rate, and
when the model and the whole run should end.

Two renderings of the same figures, chosen by where stderr goes:
- not a terminal (a Kaggle ``%%bash`` cell, a log file, CI): a line when each model starts and ends, and a
  progress line every ``every`` seconds (``--progress-every``, 60 by default), so a three-hour run is never silent;
- a terminal: one tqdm bar per model, titled ``model k/N name``, with the run's ETA beside it.

``--quiet`` silences both. The run's ETA counts the models still to come at the mean rate of the windows computed
so far (models differ, so it firms up as the run goes); units reused from partials cost nothing.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from tqdm import tqdm


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _columns(stream: TextIO) -> int:
    """The terminal's width (a terminal that reports none, as a fresh pseudo-terminal may: 100)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 100
    except (OSError, ValueError, AttributeError):
        return 100


class RunProgress:
    """The run's progress over ``n_models`` models of ``windows_per_model`` windows each (the units to compute).

    ``label`` prefixes every line (a worker's name); ``tty`` overrides the terminal test (tests)."""

    def __init__(
        self,
        n_models: int,
        windows_per_model: int,
        *,
        every: float = 60.0,
        quiet: bool = False,
        label: str = "",
        stream: TextIO | None = None,
        tty: bool | None = None,
    ) -> None:
        self.n_models, self.windows_per_model = n_models, windows_per_model
        self.every, self.quiet, self.label = every, quiet, f"{label}: " if label else ""
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.models_done = 0  # models finished (or skipped) so far
        self.computed_windows, self.computed_seconds = 0, 0.0  # over the finished models: the run's rate
        self._model: tuple[int, str, int] | None = None  # (k, name, windows to compute)
        self._done, self._seconds, self._last_line = 0, 0.0, 0.0
        self._bar: tqdm | None = None

    # -- the model's life ---------------------------------------------------------------------------------------
    def start_model(self, name: str, windows: int) -> None:
        """The next model starts, with ``windows`` windows to compute (reused units left out)."""
        self._model, self._done, self._seconds = (self.models_done + 1, name, windows), 0, 0.0
        self._last_line = time.monotonic()
        if self.quiet or windows == 0:  # every unit read back from partials: its end line says so
            return
        if self.tty:
            self._bar = tqdm(total=windows, desc=self.label + self._title(), unit="win", leave=False, file=self.stream,
                             ncols=_columns(self.stream))  # fmt: skip
        else:
            self._line(f"{self._title()}: started, {windows} windows to compute{self._run_eta_text()}")

    def update(self, done: int, seconds: float) -> None:
        """``done`` windows of the model computed in ``seconds``: a bar step, or a line every ``every`` seconds."""
        step, self._done, self._seconds = done - self._done, done, seconds
        if self.quiet or self._model is None:
            return
        if self._bar is not None:
            self._bar.update(step)
            self._bar.set_postfix_str(f"run ETA {_duration(self.run_eta())}", refresh=False)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every:
            self._last_line = now
            total = self._model[2]
            rate = done / seconds if seconds > 0 else None
            left = (total - done) / rate if rate else None
            rate_text = "-" if rate is None else f"{rate:.1f}"
            self._line(f"{self._title()}: {done}/{total} windows, {rate_text} win/s, model ETA {_duration(left)}"
                       f"{self._run_eta_text()}")  # fmt: skip

    def pass_model(self) -> None:
        """A model that does not run here (it failed in another process): counted as done."""
        self.models_done += 1

    def end_model(self, status: str, seconds: float, *, reused: int = 0) -> None:
        """The model ended (``status`` ok / skipped / failed / ...) after ``seconds``; ``reused`` units came from
        partials."""
        if self._model is None:
            return
        self.models_done += 1
        computed = self._done
        self.computed_windows += self._done
        self.computed_seconds += self._seconds
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        (k, name, _), self._model = self._model, None  # ended: the run's ETA counts only the models to come
        self._done, self._seconds = 0, 0.0
        if not self.quiet:
            extra = f", {reused} unit(s) reused" if reused else ""
            done = (
                f"{computed} windows computed{extra}"
                if computed or not reused
                else f"{reused} unit(s) reused"
            )
            self._line(f"model {k}/{self.n_models} {name}: {status} in {_duration(seconds)}, {done}"
                       f"{self._run_eta_text()}")  # fmt: skip

    # -- figures --------------------------------------------------------------------------------------------------
    def run_eta(self) -> float | None:
        """Seconds until the run ends: this model's rest at its rate, the models after it at the run's mean rate."""
        windows = self.computed_windows + self._done
        seconds = self.computed_seconds + self._seconds
        if windows == 0 or seconds <= 0:
            return None
        rate = windows / seconds
        current_left = (self._model[2] - self._done) if self._model else 0
        current = self._done / self._seconds if self._done and self._seconds > 0 else rate
        later = max(self.n_models - self.models_done - (1 if self._model else 0), 0)
        return current_left / current + later * self.windows_per_model / rate

    def _title(self) -> str:
        k, name, _ = self._model
        return f"model {k}/{self.n_models} {name}"

    def _run_eta_text(self) -> str:
        eta = self.run_eta()
        return "" if eta is None or eta <= 0 else f"; run ETA {_duration(eta)}"

    def _line(self, text: str) -> None:
        print(f"{self.label}{text}", file=self.stream, flush=True)
