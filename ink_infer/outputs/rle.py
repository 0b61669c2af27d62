"""Run-length encoding of the submission, and writing submission.csv atomically.

Pixels are numbered row-major (left to right, then top to bottom) from 1; runs are ``start length`` pairs. Runs
touching the first or the last pixel are kept (the host's tutorial encoder dropped them). ``RleEncoder`` takes the
mask band by band (a scroll segment's mask is built by bands, ``outputs/write.py``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ink_infer.outputs.atomic import atomic_write_text


class RleEncoder:
    """``rle_encode`` fed band by band (rows in order): a run crossing bands (or rows) is one run."""

    def __init__(self) -> None:
        self._starts: list[np.ndarray] = []
        self._ends: list[np.ndarray] = []
        self._offset = 0  # pixels before the next band
        self._last = 0  # the last pixel fed (0 before the first)

    def add(self, band: np.ndarray) -> None:
        """The next rows of the mask, ``(rows, W)`` bool/0-1."""
        flat = np.asarray(band, dtype=np.uint8).ravel()
        if not flat.size:
            return
        edges = np.diff(flat, prepend=np.uint8(self._last)).view(np.int8)  # +1 a run starts, -1 one ends
        where = np.nonzero(edges)[0]
        kind = edges[where]
        self._starts.append(where[kind == 1] + self._offset + 1)  # 1-indexed
        self._ends.append(where[kind == -1] + self._offset + 1)  # one past the run, 1-indexed
        self._offset += flat.size
        self._last = int(flat[-1])

    def text(self) -> str:
        """``"start length ..."`` of everything fed (a run still open ends at the last pixel)."""
        starts = np.concatenate([np.zeros(0, np.int64), *self._starts])
        ends = np.concatenate([np.zeros(0, np.int64), *self._ends, [self._offset + 1] if self._last else []])
        ends = ends.astype(np.int64)
        return " ".join(f"{s} {n}" for s, n in zip(starts.tolist(), (ends - starts).tolist(), strict=True))


def rle_encode(mask: np.ndarray) -> str:
    """``(H, W)`` bool/0-1 mask -> ``"start length start length ..."`` (1-indexed, row-major); ``""`` if empty."""
    encoder = RleEncoder()
    encoder.add(mask)
    return encoder.text()


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of ``rle_encode``: ``(H, W)`` bool. Raises ValueError on malformed, overlapping or out-of-range runs."""
    h, w = shape
    flat = np.zeros(h * w, dtype=bool)
    tokens = rle.split()
    if len(tokens) % 2:
        raise ValueError("odd number of values in RLE")
    nums = np.array(tokens, dtype=np.int64).reshape(-1, 2)
    last_end = 0
    for start, length in nums.tolist():
        if start < 1 or length < 1 or start <= last_end or start - 1 + length > h * w:
            raise ValueError(f"run {start} {length} is not ascending, positive and inside {h}x{w}")
        flat[start - 1 : start - 1 + length] = True
        last_end = start - 1 + length
    return flat.reshape(h, w)


def write_submission(rows: Sequence[tuple[str, str]], path: Path) -> None:
    """Write ``Id,Predicted`` rows to ``path`` atomically (``atomic.py``).

    A reader never sees a half-written file: either the old one (or none) or the complete new one.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Id", "Predicted"])
    writer.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())


def read_submission(path: Path) -> list[tuple[str, str]]:
    """Rows of a submission.csv (header checked)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["Id", "Predicted"]:
        raise ValueError(f"{path}: header is not Id,Predicted")
    return [(r[0], r[1] if len(r) > 1 else "") for r in rows[1:]]
