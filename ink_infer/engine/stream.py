"""Streaming a fragment from disk in row slabs: the read plan and the reader thread.

Windows are processed in bands of ``rows_per_band`` origin rows. Consecutive bands overlap by ``tile - 32`` rows,
so the predictor keeps the overlap on the device and only the new rows are read: each pixel of the model's slices
crosses from disk to the device exactly once per model (the reference re-assembled and copied each pixel once per
covering window, 64 times at stride 32).

A single reader thread reads the next slab while the device computes, into a small pool of reused (pinned, on
CUDA) host buffers, handed over through a bounded queue. An exception in the reader is re-raised in the consumer;
a consumer that stops early stops the reader; nothing can hang on a full or empty queue.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ink_infer.engine.tiling import Band
from ink_infer.geometry import BLOCK, MAX_ROWS_PER_BAND

_POLL_S = 0.1


@dataclass(frozen=True)
class SlabRead:
    """Rows ``[y0, y1)`` to read before band ``band`` can be cut; ``fresh`` drops what the device holds first."""

    band: Band
    y0: int
    y1: int
    fresh: bool


def slab_plan(bands: list[Band], *, tile: int) -> list[SlabRead]:
    """For each band (in row order), the rows not already held from the previous band."""
    reads, held_end = [], None
    for band in bands:
        y0, y1 = band.pixel_rows(tile)
        fresh = held_end is None or y0 >= held_end
        start = y0 if fresh else held_end
        reads.append(SlabRead(band=band, y0=start, y1=y1, fresh=fresh))
        held_end = y1
    return reads


class SlabReader:
    """Iterate ``(SlabRead, host int16 tensor (nz, y1 - y0, W))`` (uint16 bits) read in a background thread.

    ``read(y0, y1, z0, z1, out=...)`` is the volume's band reader. The arrays handed out are views of reused buffers:
    the consumer must call ``release()`` once its copy to the device is complete (or the next iteration does).
    """

    def __init__(
        self,
        read: Callable[..., np.ndarray],
        plan: list[SlabRead],
        *,
        z_range: tuple[int, int],
        width: int,
        pin: bool,
        n_buffers: int = 2,
    ) -> None:
        self._read, self._plan, self._z = read, plan, z_range
        rows = max((r.y1 - r.y0 for r in plan), default=1)
        shape = (z_range[1] - z_range[0], rows, width)
        # int16 because older torch has no uint16; the bits are reinterpreted on the device (see predict.py)
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(n_buffers):
            self._free.put(torch.empty(shape, dtype=torch.int16, pin_memory=pin))
        self._ready: queue.Queue[tuple] = queue.Queue(maxsize=n_buffers)
        self._stop = threading.Event()
        self._held: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._work, name="ink_infer-reader", daemon=True)
        self._thread.start()

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for r in self._plan:
                buf = None
                while buf is None:
                    if self._stop.is_set():
                        return
                    try:
                        buf = self._free.get(timeout=_POLL_S)
                    except queue.Empty:
                        continue
                view = buf[:, : r.y1 - r.y0]
                self._read(r.y0, r.y1, self._z[0], self._z[1], out=view.numpy().view(np.uint16))
                if not self._put(("slab", r, view, buf)):
                    return
            self._put(("done", None, None, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            self._put(("error", e, None, None))

    def __iter__(self) -> Iterator[tuple[SlabRead, torch.Tensor]]:
        try:
            while True:
                try:
                    kind, r, view, buf = self._ready.get(timeout=_POLL_S)
                except queue.Empty:
                    if not self._thread.is_alive() and self._ready.empty():
                        raise RuntimeError("reader thread ended without a result") from None
                    continue
                if kind == "error":
                    raise r
                if kind == "done":
                    return
                self._held = buf
                yield r, view
                self.release()
        finally:
            self.close()

    def release(self) -> None:
        """Give the current buffer back to the reader (its contents are on the device now)."""
        if self._held is not None:
            self._free.put(self._held)
            self._held = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def rows_per_band_for(n_slices: int, width: int, *, tile: int, budget_bytes: int) -> int:
    """Origin rows per band so that one band of uint16 rows (``tile + (k - 1) * 32`` of them) fits the budget.

    Bigger bands mean fewer, larger batches; smaller ones less host and device memory. A power of two from 1 to
    ``MAX_ROWS_PER_BAND``, so bands (multiples of it from row 0) never straddle a multiple of ``MAX_ROWS_PER_BAND``,
    where ``plan.split_rows`` cuts: a fragment's row ranges hold exactly the bands, so exactly the batches, of its
    single pass, whatever each model's band size.
    """
    row_bytes = n_slices * width * 2
    k = (budget_bytes // max(row_bytes, 1) - tile) // BLOCK + 1
    k = int(min(MAX_ROWS_PER_BAND, max(1, k)))
    return 1 << (k.bit_length() - 1)


def keep_pixels(touched: np.ndarray, rows: tuple[int, int], width: int, *, block: int = BLOCK) -> np.ndarray:
    """``(y1 - y0, width)`` bool: pixels of rows ``[y0, y1)`` whose block is read (touches the mask, on the grid).

    Blocks past the grid (the last ``H % 32`` rows / ``W % 32`` columns, and beyond the image) read as zeros, as
    in the reference, which only saved blocks on the grid that touched the mask.
    """
    y0, y1 = rows
    gh, gw = touched.shape
    out = np.zeros((y1 - y0, width), dtype=bool)
    b0, b1 = y0 // block, min(gh, -(-y1 // block))
    if b1 <= b0:
        return out
    px = np.repeat(np.repeat(touched[b0:b1], block, axis=0), block, axis=1)
    px = px[y0 - b0 * block :][: y1 - y0]
    out[: px.shape[0], : min(width, gw * block)] = px[:, :width]
    return out
