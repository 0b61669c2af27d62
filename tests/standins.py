"""Analytic stand-in models and an in-memory volume: they drive the real predictor with exactly checkable output."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

from tests.naive_loop import reference_patch


class ConstantModel(nn.Module):
    """Logit ``c`` everywhere: the stitched map must be ``sigmoid(c)`` over the covered mask, 0 elsewhere."""

    def __init__(self, c: float = 0.5) -> None:
        super().__init__()
        self.c = c
        self.calls = 0
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen += len(x)
        return torch.full(
            (len(x), 1, x.shape[-2] // 32, x.shape[-1] // 32), self.c, dtype=x.dtype, device=x.device
        )


class PooledInputModel(nn.Module):
    """Mean over slices, average-pooled to 1/32, plus a position ramp: depends on the input AND is not
    flip-symmetric, so a wrong window, normalisation, flip or un-flip changes its output."""

    def __init__(self, ramp: float = 0.0) -> None:
        super().__init__()
        self.ramp = ramp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.avg_pool2d(x.float().mean(1, keepdim=True), 32)
        s = pooled.shape[-1]
        pos = torch.arange(s, dtype=torch.float32, device=x.device)
        ramp = pos.view(1, 1, 1, s) - pos.view(1, 1, s, 1) * 0.5
        return (pooled + self.ramp * ramp).to(x.dtype)


class ArrayVolume:
    """A ``(65, H, W)`` uint16 array with the Volume interface the predictor uses."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.height, self.width = data.shape[1:]

    def read_band(self, y0: int, y1: int, z0: int, z1: int, *, out: np.ndarray | None = None) -> np.ndarray:
        band = np.zeros((z1 - z0, y1 - y0, self.width), dtype=np.uint16) if out is None else out
        band[...] = 0
        rows = self.data[z0:z1, y0 : min(y1, self.height)]
        band[:, : rows.shape[1]] = rows
        return band

    def patch_at(self, i: int, j: int) -> np.ndarray:
        """The reference's saved patch ``(i, j)``: ``float16(raw / 65535)`` as float32 (PIPELINE.md §4)."""
        return reference_patch(self.data[:, i * 32 : (i + 1) * 32, j * 32 : (j + 1) * 32])


def random_volume(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(10000, 50000, size=(1, h, w))
    return (base + rng.integers(0, 8000, size=(65, h, w))).astype(np.uint16)


def blob_mask(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An irregular mask touching some borders, with a hole."""
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(seed)
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    r = np.hypot((yy - cy) / h, (xx - cx) / w)
    mask = r < 0.45 + 0.05 * np.sin(np.arctan2(yy - cy, xx - cx) * 5)
    mask &= np.hypot(yy - cy, xx - cx) > min(h, w) * 0.08
    return mask


class SampledInputModel(nn.Module):
    """Near-zero cost: the centre pixel of each 32 x 32 cell, averaged over slices, plus a position ramp.
    Input-dependent and flip-sensitive, like PooledInputModel, but ~1000x cheaper (for the overhead benchmark)."""

    def __init__(self, ramp: float = 0.3) -> None:
        super().__init__()
        self.ramp = ramp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cells = x[:, :, 16::32, 16::32].float().mean(1, keepdim=True)
        s = cells.shape[-1]
        ar = torch.arange(s, dtype=torch.float32)
        return (cells + self.ramp * (ar.view(1, 1, 1, s) - 0.5 * ar.view(1, 1, s, 1))).to(x.dtype)


class Standin(nn.Module):
    """Slice mean pooled to 1/32 plus a position ramp (input-dependent, not flip-symmetric), times one parameter
    ``gain`` (so a checkpoint has a tensor to load), with faults to inject:

    ``raise_after``: RuntimeError from that forward call on; ``nan``: NaN in the first window of every batch and inf
    in the second (``"all"``: every window); ``oom_above``: CUDA out-of-memory for batches larger than that;
    ``sleep``: seconds per call; ``signal_at``: send this process ``(signum, call)`` during that forward call.
    """

    def __init__(
        self,
        *,
        raise_after: int | None = None,
        nan: bool | str = False,
        oom_above: int | None = None,
        sleep: float = 0.0,
        signal_at: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))
        self.inner = PooledInputModel(ramp=0.3)
        self.raise_after, self.nan, self.oom_above, self.sleep, self.signal_at = (
            raise_after, nan, oom_above, sleep, signal_at,
        )  # fmt: skip
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.oom_above is not None and len(x) > self.oom_above:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (stand-in, batch {len(x)})")
        if self.raise_after is not None and self.calls > self.raise_after:
            raise RuntimeError("stand-in exploded")
        if self.signal_at is not None and self.calls == self.signal_at[1]:
            os.kill(os.getpid(), self.signal_at[0])
        time.sleep(self.sleep)
        out = self.inner(x) * self.gain
        if self.nan == "all":
            out[:] = float("nan")
        elif self.nan:
            out[0] = float("nan")
            out[1:2] = float("inf")
        return out


class GPStandin(nn.Module):
    """The GP TimeSformer's shapes, at no cost: ``(B, 1, 26, 64, 64)`` -> frames weighted by their index (so the
    layer order shows), 16 x 16 pooled -> ``(B, 1, 4, 4)`` logits, times one parameter ``gain``."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = torch.linspace(-1.0, 1.0, x.shape[2], device=x.device, dtype=x.dtype).view(1, 1, -1, 1, 1)
        pooled = torch.nn.functional.avg_pool2d((x * frames).mean(dim=2), 16)
        return (pooled * 20.0 + x.mean(dim=(2, 3, 4), keepdim=True)[:, :, 0, :4, :4] - 0.2) * self.gain
