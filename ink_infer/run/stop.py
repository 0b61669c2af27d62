"""Stop requests: SIGTERM and SIGINT set a flag that ``StopRequest.check()`` turns into ``Interrupted`` at the next
safe point (between batches, fragments and models); a second signal interrupts at once. Kaggle and Slurm send
SIGTERM before they kill a job, so a run that stops this way leaves only complete files (see ``partials.py``).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """The run was asked to stop (SIGTERM / SIGINT); ``signum`` gives the exit code ``128 + signum``."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        self.signum = signum
        super().__init__(message or f"interrupted by {self.cause}")

    @property
    def cause(self) -> str:
        return signal_name(self.signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class RankLost(Interrupted):
    """A torchrun rank ended before the others met it at the barrier (killed, or its node gone): this rank stops
    too, its saved results kept for a rerun (which resumes from them). Exit code 1: no signal reached this one."""

    def __init__(self, message: str | None = None) -> None:
        self.signum = 0
        Exception.__init__(self, message or f"interrupted: {self.cause}")

    @property
    def cause(self) -> str:
        return "another torchrun rank ending"

    @property
    def exit_code(self) -> int:
        return 1


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequest:
    """A context manager holding the SIGTERM / SIGINT handlers for the length of a run.

    The handlers only set a flag: the run stops where ``check()`` is called, so no file is half-written by the
    signal itself. Outside the main thread (where Python cannot install handlers) it only offers ``check()``.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the closest we can restore
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise Interrupted(signum)  # asked twice: the user does not want to wait for the batch
        self.signum = signum
        log.warning(
            "%s: stopping after the current batch (send it again to stop at once)", signal_name(signum)
        )

    def check(self) -> None:
        """Raise ``Interrupted`` if a stop was requested."""
        if self.signum is not None:
            raise Interrupted(self.signum)
