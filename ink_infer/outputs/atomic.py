"""The one way ink_infer writes a file that a reader must see whole or not at all.

A temporary file beside the target (``.<name>.tmp<pid>``: hidden, unique per process, on the same filesystem so the
rename is atomic), written, flushed and fsynced, then ``os.replace``d over the target. On any failure the temporary
file is removed and the target is untouched: the previous file, or none. submission.csv, report.json, partials,
previews, checkpoints and the hashed manifest all go through here.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a binary temporary file, then put it in place of ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(payload: object, path: Path) -> None:
    """``torch.save(payload)`` to ``path`` atomically, creating its folder."""
    import torch

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(payload, f))


def note_unwritten(log: logging.Logger, path: Path, error: OSError, what: str = "not written") -> None:
    """A write the run goes on without (a partial, a preview, a progress report) failed. A full disk is not said
    here, once per file: the run says it once, at its end (the file it could not do without, or a count of what
    was not saved); any other cause is warned about as it happens."""
    line = f"{path}: {what} ({error.strerror or error})"
    if error.errno == errno.ENOSPC:
        log.debug(line)
    else:
        log.warning(line)
