"""Windows cut from a band held on the device, normalised as the reference did, and flipped.

Pixels are ``float16(raw / 65535)`` (``unit_fp16``), the reference's test preprocessing. Each window is normalised
``(v - mean) / (std + NORM_EPS)`` over its slices and square (unbiased std): ``normalize_windows`` computes it
directly on a batch (training, tests), ``window_affine`` from per-block sums of the held band (inference: 64 block
sums per window instead of a pass over its 2.3 M values), the same formula.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch

from ink_infer.geometry import BLOCK

NORM_EPS = 1e-6  # the reference's epsilon on the std

# flip dims per op of the reference schedule on (B, C, H, W): 0 none, 1 H, 2 W, 3 H+W
_FLIP_DIMS = {1: (-2,), 2: (-1,), 3: (-2, -1)}
_CV2_FLIP = {1: 0, 2: 1, 3: -1}  # the same ops as cv2.flip codes on one (H, W) slice


def apply_flips(x: torch.Tensor, ops: np.ndarray) -> torch.Tensor:
    """Flip each sample of ``(B, C, H, W)`` by its op; the same call undoes it (flips are involutions)."""
    if not ops.any():
        return x
    x = x.clone()
    for op, dims in _FLIP_DIMS.items():
        sel = torch.from_numpy(np.nonzero(ops == op)[0]).to(x.device)
        if len(sel):
            x[sel] = x[sel].flip(dims)
    return x


# float16(raw / 65535) for every uint16 raw value, computed as the reference did (float32 division, then a cast
# with round-to-nearest-even), so the look-up is the reference's own arithmetic on every device
UNIT_FP16 = (np.arange(65536, dtype=np.float32) / np.float32(65535.0)).astype(np.float16)


@functools.lru_cache(maxsize=4)
def _unit_table(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(UNIT_FP16).to(device)


def unit_fp16(raw_bits: torch.Tensor, width: int | None = None, *, z_chunk: int = 8) -> torch.Tensor:
    """``(nz, r, w)`` int16 holding uint16 bits -> ``(nz, r, width)`` float16 ``float16(raw / 65535)`` on the same
    device, zero-padded on the right to ``width`` (default ``w``)."""
    nz, r, w = raw_bits.shape
    out = torch.zeros((nz, r, width or w), dtype=torch.float16, device=raw_bits.device)
    if raw_bits.device.type == "cpu":
        bits, dst = raw_bits.numpy().view(np.uint16), out.numpy()
        for z in range(nz):  # one slice at a time: numpy indexes through an int64 copy of the indices
            dst[z, :, :w] = UNIT_FP16[bits[z]]
        return out
    table = _unit_table(raw_bits.device)
    for z0 in range(0, nz, z_chunk):  # int32 indices a few slices at a time: bounded temporaries
        out[z0 : z0 + z_chunk, :, :w] = table[raw_bits[z0 : z0 + z_chunk].to(torch.int32) & 0xFFFF]
    return out


def block_sums(slab: torch.Tensor, *, z_chunk: int = 8) -> torch.Tensor:
    """``(nz, r, Wp)`` float16 slab -> ``(2, r/32, Wp/32)`` float64 per-block sums of ``v`` and ``v**2``.

    ``v = float16(raw / 65535)`` is the reference's pixel value. Summing each block once per band lets every
    window's mean and std come from 64 block sums instead of a pass over its 2.3 M values (the window's own
    normalisation in the reference, which dominated the CPU cost). ``v`` and ``v**2`` are exact in float32 (11-bit
    mantissas) and are summed in float64, so the window statistics are those of the rounded values to float64
    rounding.
    """
    nz, r, wp = slab.shape
    out = torch.zeros((2, r // BLOCK, wp // BLOCK), dtype=torch.float64, device=slab.device)
    for z0 in range(0, nz, z_chunk):
        v = slab[z0 : z0 + z_chunk].float()
        v = v.view(v.shape[0], r // BLOCK, BLOCK, wp // BLOCK, BLOCK)
        out[0] += v.sum(dim=(0, 2, 4), dtype=torch.float64)
        out[1] += (v * v).sum(dim=(0, 2, 4), dtype=torch.float64)
    return out


def normalize_windows(x: torch.Tensor) -> torch.Tensor:
    """Per-sample standardisation as in the reference: ``(x - mean) / (std + 1e-6)`` over all slices and pixels.

    ``x``: ``(B, Z, H, W)`` any float dtype, any device. Returns float32 of the same shape and device; the mean and
    the unbiased (n - 1) std are taken over dims 1-3 in float32, so fp16 inputs do not lose precision in the sums.
    """
    x = x.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True) + NORM_EPS
    return (x - mean) / std


def window_affine(sums: torch.Tensor, rb: torch.Tensor, cb: torch.Tensor, *, side_blocks: int, n: int):
    """Per-window ``scale, shift`` so that ``v * scale + shift`` is the reference's normalised window.

    sums: ``(2, R, C)`` block sums of the held band; rb, cb: ``(B,)`` top-left block of each model square;
    n: values per window (slices x side x side). Normalisation: ``(v - mean) / (std + 1e-6)``, unbiased std,
    over the model's slices and square, zero blocks included (as the reference).
    """
    integral = torch.nn.functional.pad(sums.cumsum(1).cumsum(2), (1, 0, 1, 0))
    r1, c1 = rb + side_blocks, cb + side_blocks
    tot = integral[:, r1, c1] - integral[:, rb, c1] - integral[:, r1, cb] + integral[:, rb, cb]  # (2, B)
    mean = tot[0] / n
    var = ((tot[1] - tot[0] * mean) / (n - 1)).clamp_min(0.0)
    std = var.sqrt() + NORM_EPS
    scale = 1.0 / std
    shift = -mean / std
    return scale.float().view(-1, 1, 1, 1), shift.float().view(-1, 1, 1, 1)


class WindowBuffer:
    """One ``(B, nz, side, side)`` float32 batch buffer, reused for every batch of a (model, fragment) pass.

    On the CPU a batch of windows is tens of MB: above glibc's largest mmap threshold (32 MB), so a fresh tensor per
    batch is a fresh mapping whose every page faults on first touch; one buffer reused is faulted in once (the
    figures: benchmarks/RESULTS.md, "Figures behind choices in the code").
    """

    def __init__(self) -> None:
        self._storage: torch.Tensor | None = None

    def get(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        n = int(np.prod(shape))
        if self._storage is None or self._storage.numel() < n or self._storage.device != device:
            self._storage = None  # drop the old one before allocating its successor
            self._storage = torch.empty(n, dtype=torch.float32, device=device)
        return self._storage[:n].view(shape)


def cut_windows(
    held: torch.Tensor,
    rows: np.ndarray,
    cols: np.ndarray,
    ops: np.ndarray,
    *,
    side: int,
    scale: torch.Tensor,
    shift: torch.Tensor,
    buffer: WindowBuffer | None = None,
) -> torch.Tensor:
    """``(B, nz, side, side)`` float32 normalised windows ``v * scale + shift`` cut from the held float16 band,
    each flipped by its op, written into ``buffer`` (a fresh one if None).

    On the CPU this is OpenCV, slice by slice: ``addWeighted`` converts the strided float16 view and applies the
    affine in one pass (flipped windows are flipped while still float16, half the bytes), where numpy needs two
    passes and torch's strided ``copy_`` is slower still (benchmarks/RESULTS.md). On CUDA, one ``copy_`` per window
    and one fused affine per batch.
    """
    shape = (len(rows), held.shape[0], side, side)
    out = (buffer or WindowBuffer()).get(shape, held.device)
    windows = zip(rows.tolist(), cols.tolist(), ops.tolist(), strict=True)
    if held.device.type == "cpu":
        src, dst = held.numpy(), out.numpy()
        sc, sh = scale.view(-1).tolist(), shift.view(-1).tolist()
        for i, (r, c, op) in enumerate(windows):
            for z in range(src.shape[0]):
                view = src[z, r : r + side, c : c + side]
                if op:
                    view = cv2.flip(view, _CV2_FLIP[op])
                cv2.addWeighted(view, sc[i], view, 0.0, sh[i], dst=dst[i, z], dtype=cv2.CV_32F)
        return out
    for i, (r, c, op) in enumerate(windows):
        view = held[:, r : r + side, c : c + side]
        out[i].copy_(view.flip(_FLIP_DIMS[op]) if op else view)
    return out.mul_(scale).add_(shift)
