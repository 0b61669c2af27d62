"""Train one manifest config (2.5D or irCSN) as the 2nd-place team did (PIPELINE.md §7), for ink_infer to load.

    python train.py --data /kaggle/input --manifest weights_manifest.json --config NAME --fold 0 --out runs/NAME/fold0
    python train.py ... --out runs/NAME/fold0 --resume runs/NAME/fold0/last.ckpt      # continue an interrupted run
    python train.py --data SYNTH --manifest ink_infer/demo/demo_manifest.json --config demo_25d_mbv3 \\
        --valid-ids 6 --labels area --out runs/demo25d --export ink_infer/demo/demo_25d_mbv3.pt --export-ema-only --export-fp16

Recipe: BCE + (1 - soft F0.5 over the batch) on 1/32 labels (bilinear, align_corners=True; ``--labels area`` for
short CPU runs) smoothed as ``t * 0.8 + 0.1``; AdamW (backbone / rest lr, no decay on biases and norms), cosine
schedule with 2% warm-up, EMA 0.99 (timm ``ModelEmaV2``), AMP on CUDA, gradient clip 2.0; flips, rot90,
shift-scale-rotate, blur / noise, brightness-contrast, 32-aligned cutout, z-shift +-2, channel shuffle in groups,
mixup (input or manifold) and cutmix. Validation: F0.5 of the EMA model at the best percentile threshold
(Nelder-Mead), on the windows' stitched probabilities, as inference stitches them.

Folds (Kaggle layout): train fragment ``2`` is cut into three parts of equal mask area, ``2a``/``2b``/``2c`` (top,
middle, bottom); fold 0 validates on ``1`` and trains on ``2a 2b 2c 3``, fold 1 validates on ``2a`` and trains on
``1 2b 2c 3``. ``--valid-ids`` names other validation fragments or parts (e.g. for the synthetic set).

Writes to ``--out``: ``best_fbeta.ckpt`` (the team's layout, via ``save_checkpoint``: ``model.*`` and
``model_ema.module.*`` plus ``hyper_parameters``; ink_infer loads it unchanged), ``last.ckpt`` (the same plus the
optimizer, scheduler, grad scaler, step and RNG state, for ``--resume``; written at the end of every epoch),
``train_log.jsonl`` (one record per epoch); ``--export`` writes a copy of the best weights for shipping (optionally
the EMA copy only, optionally float16). Prints the manifest entry (with size and sha256) to add.

Data never passes through whole volumes: each fragment is streamed once with ``Volume.read_band`` (row bands) into a
block store, the reference's 32 x 32 patch layout (one ``(nz, 32, 32)`` uint16 block per mask-touching block, only the
slices the model can see with its z-shift). Stores are kept in RAM up to ``--cache-gb`` in total; a fragment that
does not fit (fragment 2 at 35+4 slices is ~7 GB) goes to a block-major ``.npy`` memmap under ``--cache-dir``, read
block by block, so the OS page cache holds what memory allows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, NoReturn

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from timm.utils import ModelEmaV2
from torch import Tensor, nn
from tqdm import tqdm

from ink_infer.config import BLOCK, N_SLICES, ModelSpec
from ink_infer.errors import UserError
from ink_infer.fragments import Fragment, Volume, find_fragments, load_labels, load_mask
from ink_infer.manifest import load_manifest, sha256_file
from ink_infer.metrics import fbeta
from ink_infer.models import build_model, normalize_windows
from ink_infer.models.checkpoint import EMA_PREFIX, MODEL_PREFIX, hyper_parameters_for, save_checkpoint
from ink_infer.models.csn3d import InkDetCSN3D
from ink_infer.models.inkdet25d import InkDet25D
from ink_infer.runtime import keep_freed_memory
from ink_infer.stitch import upsample_probs
from ink_infer.tiling import coverage_blocks, reference_order, touched_blocks

log = logging.getLogger("train")

# --- reference hyper-parameters (PIPELINE.md §7) -------------------------------------------------------------------
SPLIT_ID = "2"  # the large fragment, cut into three parts of equal mask area
FOLD_VALID = {0: "1", 1: "2a"}
# label smoothing "0.1" as the reference wrote it: target * (1 - 0.2) + 0.1, so 0 -> 0.1 and 1 -> 0.9
LABEL_SMOOTH = 0.1
FBETA = 0.5
FBETA_SMOOTH = 1e-6
WARMUP_FRACTION = 0.02
BACKBONE_PREFIXES = ("encoder.", "backbone.")  # 2.5D timm encoder, irCSN backbone: trained at --backbone-lr
# no weight decay: the reference's name rule, and every 1-D tensor (norm weights) as well
NO_DECAY_NAMES = ("bias", "gamma", "beta")
FLIP_P, ROT90_P = 0.5, 0.9
SSR_SHIFT, SSR_SCALE, SSR_ROTATE, SSR_P = 0.0625, 0.2, 15.0, 0.9
BLUR_NOISE_P = 0.9  # one of blur / noise (the reference's OneOf also held elastic and grid distortions)
BLUR_KSIZES = (3, 5, 7)
# noise std relative to the window's: the volume is v / 65535, so albumentations' 8-bit levels do not apply
NOISE_STD = (0.05, 0.2)
BC_LIMIT, BC_P = 0.3, 0.3
CUTOUT_P, CUTOUT_BLOCKS = 0.5, (1, 2)
SHIFT_Z_P = 0.5
CHANNEL_SHUFFLE_P = 0.2
CUTMIX_P = 0.5  # when no mixup: cutmix with this probability
MANIFOLD_P = 0.5  # of the mixups, this share mixes the pooled features instead of the inputs
BAND_BYTES = 256 << 20  # one read_band while building a block store
POSITIVE_ARGS = (
    "epochs",
    "samples_per_epoch",
    "batch_size",
    "valid_windows",
    "valid_every",
    "epochs_this_run",
)
WORKER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(message)  # one line and exit 2, as every user error of the project


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python train.py", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--data", type=Path, required=True, help="/kaggle/input, the competition folder, or a train folder")
    a("--manifest", type=Path, default=Path("weights_manifest.json"))
    a("--config", required=True, help="name of the manifest entry to train")
    a("--out", type=Path, required=True, help="run folder: checkpoints, train_log.jsonl, cache")
    a("--fold", type=int, choices=sorted(FOLD_VALID), default=0)
    a("--valid-ids", default=None, help="fragment / part ids to validate on, comma-separated (not --fold)")
    a("--epochs", type=int, default=30)
    a("--samples-per-epoch", type=int, default=25000, help="random windows per epoch (reference: 25000)")
    a("--batch-size", type=int, default=16)
    a("--lr", type=float, default=1e-3)
    a("--backbone-lr", type=float, default=None, help="encoder/backbone lr (default: --lr)")
    a("--weight-decay", type=float, default=1e-4)
    a("--ema-decay", type=float, default=0.99)
    a("--clip", type=float, default=2.0, help="gradient norm clip")
    a("--mixup-p", type=float, default=0.5)
    a("--mixup-alpha", type=float, default=0.2)
    a("--shift-z", type=int, default=2, help="random z shift of the slice window, +-slices")
    a("--no-aug", action="store_true", help="no augmentation, z-shift or mixing (for checks)")
    a("--labels", choices=("bilinear", "area"), default="bilinear", help="1/32 targets (reference: bilinear)")
    a("--valid-windows", type=int, default=24000, help="first N windows (reference order) to validate on")
    a("--valid-every", type=int, default=1, help="validate every N epochs (and after the last)")
    a("--valid-scale", type=int, default=4, choices=(1, 2, 4, 8, 16, 32), help="validate at 1/N resolution")
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 2)))
    a("--cache-gb", type=float, default=8.0, help="block stores in RAM up to this size, then on disk")
    a("--cache-dir", type=Path, default=None, help="folder for the on-disk block stores (default OUT/cache)")
    a("--resume", type=Path, default=None, help="a last.ckpt of this run to continue from")
    a("--epochs-this-run", type=int, default=None, help="stop after this many epochs (resume later)")
    a("--export", type=Path, default=None, help="also write the best weights here (the file to ship)")
    a("--export-ema-only", action="store_true", help="export only model_ema.module.* (half the size)")
    a("--export-fp16", action="store_true", help="export float16 tensors (the reference ran in fp16)")
    return p


# --- fragments, folds and block stores -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """A training/validation unit: a fragment, or a part of it (block rows ``[r0, r1)``); data outside is zero."""

    id: str
    frag: int  # index into the fragment list
    rows: tuple[int, int]


@dataclass
class BlockStore:
    """One fragment on the 32-block grid, the reference's patch layout.

    ``index``: ``(gh, gw)`` int32, the row of each block in the arrays below, -1 for blocks that touch no mask
    (they read as zeros, as the reference's missing patch files). ``volume``: ``(n, nz, 32, 32)`` uint16, slices
    ``[z0, z0 + nz)`` (RAM or a memmap); ``labels`` / ``mask``: ``(n, 32, 32)`` uint8 0/1.
    """

    index: np.ndarray
    volume: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    z0: int

    def __getstate__(self) -> dict[str, Any]:
        # a memmap would be pickled as a full in-memory copy (spawned DataLoader workers): send its path instead
        state = dict(self.__dict__)
        if isinstance(self.volume, np.memmap):
            state["volume"] = Path(self.volume.filename)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["volume"], Path):
            state["volume"] = np.load(state["volume"], mmap_mode="r")
        self.__dict__.update(state)


@dataclass
class TrainData:
    fragments: list[Fragment]
    volumes: list[Volume]
    masks: list[np.ndarray]
    labels: list[np.ndarray]
    train: list[Region]
    valid: list[Region]
    warnings: list[str]

    def close(self) -> None:
        for volume in self.volumes:
            volume.close()


def split_rows(mask: np.ndarray, parts: int) -> list[int]:
    """Block-row edges ``[0, c1, .., gh]`` cutting ``mask`` into ``parts`` bands of about equal mask area.

    Cuts are on the 32-pixel grid so the parts share the fragment's block grid (the reference cut at pixel rows).
    """
    gh = mask.shape[0] // BLOCK
    per_row = mask[: gh * BLOCK].reshape(gh, -1).sum(axis=1, dtype=np.int64)
    cum = np.cumsum(per_row)
    cuts = [int(np.searchsorted(cum, cum[-1] * k / parts)) + 1 for k in range(1, parts)] if gh else []
    return [0, *np.clip(cuts, 0, gh).tolist(), gh]


def make_regions(fragments: Sequence[Fragment], masks: Sequence[np.ndarray]) -> list[Region]:
    regions = []
    for i, (frag, mask) in enumerate(zip(fragments, masks, strict=True)):
        if frag.id == SPLIT_ID:
            edges = split_rows(mask, 3)
            regions += [Region(f"{frag.id}{'abc'[k]}", i, (edges[k], edges[k + 1])) for k in range(3)]
        else:
            regions.append(Region(frag.id, i, (0, mask.shape[0] // BLOCK)))
    return regions


def choose_fold(regions: list[Region], fold: int, valid_ids: str | None) -> tuple[list[Region], list[Region]]:
    """(train, valid) regions; ``valid_ids`` names regions (``2a``) or whole fragments (``2``)."""
    wanted = [v.strip() for v in valid_ids.split(",") if v.strip()] if valid_ids else [FOLD_VALID[fold]]
    parent = {r.id: r.id[:-1] if r.id[:-1] == SPLIT_ID and r.id[-1] in "abc" else r.id for r in regions}
    known = sorted({*parent, *parent.values()})
    unknown = [w for w in wanted if w not in known]
    what = f"--valid-ids {valid_ids}" if valid_ids else f"fold {fold}"
    if unknown or not wanted:
        missing = ", ".join(unknown) or "(none given)"
        raise UserError(
            f"{what}: no validation fragment {missing} among the train fragments ({', '.join(known)})"
        )
    valid = [r for r in regions if r.id in wanted or parent[r.id] in wanted]
    train = [r for r in regions if r not in valid]
    if not train:
        raise UserError(f"{what}: every train fragment is used for validation, none is left to train on")
    return train, valid


def load_train_data(data: Path, *, fold: int, valid_ids: str | None) -> TrainData:
    """Find the train fragments and check everything a run needs before any work starts (UserError otherwise).

    The volumes stay open (closed by ``TrainData.close``), or are closed again when a check fails.
    """
    fragments, warnings = find_fragments(data, split="train")
    volumes, masks, labels = [], [], []
    with contextlib.ExitStack() as stack:
        for frag in fragments:
            vol = Volume(frag)
            stack.callback(vol.close)
            volumes.append(vol)
            warnings += vol.warnings
            mask, warning = load_mask(frag, vol.shape)
            warnings += [warning] if warning else []
            masks.append(mask)
            labels.append(
                load_labels(frag, vol.shape)
            )  # missing or of another shape: UserError naming the file
        train, valid = choose_fold(make_regions(fragments, masks), fold, valid_ids)
        for what, regions in (("validation", valid), ("training", train)):
            if not any(region_origins(r, masks[r.frag]).size for r in regions):
                names = ", ".join(r.id for r in regions)
                raise UserError(
                    f"{what} set {names}: no 32x32 block touches its mask.png, so it has no windows"
                )
        stack.pop_all()
    return TrainData(fragments, volumes, masks, labels, train, valid, warnings)


def region_origins(region: Region, mask: np.ndarray) -> np.ndarray:
    """``(n, 2)`` int64 block (row, col) of every window origin of ``region``: its mask-touching blocks."""
    touched = touched_blocks(mask)
    r0, r1 = region.rows
    rows, cols = np.nonzero(touched[r0:r1])
    return np.stack([rows + r0, cols], axis=1).astype(np.int64)


def build_store(
    volume: Volume, mask: np.ndarray, labels: np.ndarray, *, z: tuple[int, int], path: Path | None
) -> BlockStore:
    """Stream the fragment once, band by band, into a block store (in RAM, or a ``.npy`` memmap at ``path``)."""
    touched = touched_blocks(mask)
    gh, gw = touched.shape
    index = np.full((gh, gw), -1, np.int32)
    index[touched] = np.arange(int(touched.sum()), dtype=np.int32)
    n, nz = int(touched.sum()), z[1] - z[0]
    shape = (n, nz, BLOCK, BLOCK)
    if path is None:
        blocks = np.zeros(shape, np.uint16)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        blocks = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=shape)
    band = BLOCK * max(1, BAND_BYTES // (nz * BLOCK * volume.width * 2))
    for y0 in range(0, gh * BLOCK, band):
        y1 = min(y0 + band, gh * BLOCK)
        raw = volume.read_band(y0, y1, z[0], z[1])[:, :, : gw * BLOCK]
        rows = index[y0 // BLOCK : y1 // BLOCK]
        grid = raw.reshape(nz, -1, BLOCK, gw, BLOCK).transpose(1, 3, 0, 2, 4)  # (rows, gw, nz, 32, 32)
        blocks[rows[rows >= 0]] = grid[rows >= 0]
    if path is not None:
        blocks.flush()

    def per_block(image: np.ndarray) -> np.ndarray:
        cut = image[: gh * BLOCK, : gw * BLOCK].reshape(gh, BLOCK, gw, BLOCK).transpose(0, 2, 1, 3)
        return cut[touched].astype(np.uint8)

    return BlockStore(index, blocks, per_block(labels), per_block(mask), z[0])


def build_stores(
    data: TrainData, spec: ModelSpec, *, shift_z: int, cache_gb: float, cache_dir: Path
) -> list[BlockStore]:
    """A block store per fragment holding ``spec.z_range`` widened by the z-shift; RAM first, then disk."""
    z = (max(0, spec.z_range[0] - shift_z), min(N_SLICES, spec.z_range[1] + shift_z))
    budget = cache_gb * 2**30
    stores = []
    for frag, vol, mask, labels in zip(data.fragments, data.volumes, data.masks, data.labels, strict=True):
        nbytes = int(touched_blocks(mask).sum()) * (z[1] - z[0]) * BLOCK * BLOCK * 2
        path = None if nbytes <= budget else cache_dir / f"{frag.id}_z{z[0]}-{z[1]}.npy"
        budget -= 0 if path else nbytes
        t0 = time.perf_counter()
        stores.append(build_store(vol, mask, labels, z=z, path=path))
        where, took = f"on disk ({path})" if path else "in RAM", time.perf_counter() - t0
        log.info("fragment %s: %.2f GB of blocks %s, %.1fs", frag.id, nbytes / 1e9, where, took)
    return stores


def read_window(
    store: BlockStore, origin: tuple[int, int], rows: tuple[int, int], *, n: int, z: slice
) -> tuple[np.ndarray, np.ndarray]:
    """The window of ``n x n`` blocks at block ``origin``: ``(nz, n*32, n*32)`` uint16 and ``(n*32, n*32)`` uint8.

    Blocks outside the region's rows, the grid or the mask read as zeros, as in the reference's tiles.
    """
    r, c = origin
    gh, gw = store.index.shape
    idx = np.full((n, n), -1, np.int32)
    hr, wc = max(0, min(r + n, rows[1], gh) - r), max(0, min(c + n, gw) - c)
    idx[:hr, :wc] = store.index[r : r + hr, c : c + wc]
    ok = idx >= 0
    vol = np.zeros((n, n, z.stop - z.start, BLOCK, BLOCK), np.uint16)
    lab = np.zeros((n, n, BLOCK, BLOCK), np.uint8)
    vol[ok] = store.volume[idx[ok], z]
    lab[ok] = store.labels[idx[ok]]
    side = n * BLOCK
    return vol.transpose(2, 0, 3, 1, 4).reshape(-1, side, side), lab.transpose(0, 2, 1, 3).reshape(side, side)


# --- augmentation (numpy + cv2) ------------------------------------------------------------------------------------


def augment(vol: np.ndarray, lab: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Reference augmentations on ``(Z, T, T)`` float32 in [0, 1] and its ``(T, T)`` float32 0/1 label."""
    if rng.random() < FLIP_P:
        axes = [(1,), (2,), (1, 2)][rng.integers(3)]  # albumentations' Flip: vertical, horizontal or both
        vol, lab = np.flip(vol, axes), np.flip(lab, tuple(a - 1 for a in axes))
    if rng.random() < ROT90_P:
        k = int(rng.integers(4))
        vol, lab = np.rot90(vol, k, axes=(1, 2)), np.rot90(lab, k)
    hwc = np.ascontiguousarray(vol.transpose(1, 2, 0))  # cv2 wants (H, W, C); it takes any number of channels
    lab = np.ascontiguousarray(lab)
    if rng.random() < SSR_P:
        hwc, lab = shift_scale_rotate(hwc, lab, rng)
    if rng.random() < BLUR_NOISE_P:
        if rng.random() < 0.5:
            k = int(rng.choice(BLUR_KSIZES))
            hwc = cv2.GaussianBlur(hwc, (k, k), 0).reshape(hwc.shape)
        else:
            sigma = rng.uniform(*NOISE_STD) * float(hwc.std())
            hwc = hwc + rng.normal(0.0, sigma, hwc.shape).astype(np.float32)
    if rng.random() < BC_P:
        # after the per-window normalisation only the clipping to [0, 1] changes the model's input
        alpha, beta = 1.0 + rng.uniform(-BC_LIMIT, BC_LIMIT), rng.uniform(-BC_LIMIT, BC_LIMIT)
        hwc = np.clip(hwc * alpha + beta, 0.0, 1.0)
    vol = hwc.transpose(2, 0, 1)
    if rng.random() < CUTOUT_P:
        vol, lab = vol.copy(), lab.copy()
        g = lab.shape[0] // BLOCK
        for _ in range(int(rng.integers(CUTOUT_BLOCKS[0], CUTOUT_BLOCKS[1] + 1))):
            by, bx = rng.integers(g, size=2) * BLOCK  # on the 32 grid, so the 1/32 label loses whole cells
            vol[:, by : by + BLOCK, bx : bx + BLOCK] = 0.0
            lab[by : by + BLOCK, bx : bx + BLOCK] = 0.0
    return np.ascontiguousarray(vol, dtype=np.float32), np.ascontiguousarray(lab, dtype=np.float32)


def shift_scale_rotate(
    hwc: np.ndarray, lab: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """albumentations' ShiftScaleRotate(0.0625, 0.2, 15): linear for the volume, nearest for the label, reflect-101."""
    h, w = lab.shape
    angle = rng.uniform(-SSR_ROTATE, SSR_ROTATE)
    scale = rng.uniform(1 - SSR_SCALE, 1 + SSR_SCALE)
    m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, scale)
    m[:, 2] += rng.uniform(-SSR_SHIFT, SSR_SHIFT, 2) * (w, h)
    border = cv2.BORDER_REFLECT_101
    out = cv2.warpAffine(hwc, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=border).reshape(hwc.shape)
    return out, cv2.warpAffine(lab, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=border)


class WindowDataset(torch.utils.data.Dataset):
    """Windows as ``(n_slices, side, side)`` float32 in [0, 1] (v / 65535, as inference) and ``(side, side)`` labels.

    Every sample draws from its own generator seeded by (seed, epoch, index), so batches do not depend on the number
    of workers and a resumed run sees the same data as an uninterrupted one.
    """

    def __init__(
        self,
        stores: list[BlockStore],
        items: list[tuple[Region, np.ndarray]],
        spec: ModelSpec,
        *,
        augment: bool,
        shift_z: int,
        seed: int,
    ) -> None:
        self.stores, self.spec, self.aug, self.shift_z, self.seed = stores, spec, augment, shift_z, seed
        self.regions = [region for region, _ in items]
        self.pool = np.concatenate(
            [np.column_stack([np.full(len(o), i), o]) for i, (_, o) in enumerate(items)]
        )
        self.order = np.arange(len(self.pool))
        self.epoch = 0

    def set_epoch(self, epoch: int, n_samples: int) -> None:
        """Draw this epoch's windows uniformly from the pool of origins (as the reference drew its patches)."""
        self.epoch = epoch
        self.order = np.random.default_rng([self.seed, 2, epoch]).integers(len(self.pool), size=n_samples)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        spec = self.spec
        rng = np.random.default_rng([self.seed, 1, self.epoch, i])
        k, r, c = self.pool[self.order[i]]
        region = self.regions[k]
        store = self.stores[region.frag]
        z0 = spec.z_range[0] - store.z0
        if self.aug and self.shift_z and rng.random() < SHIFT_Z_P:
            lo, hi = max(-self.shift_z, -z0), min(self.shift_z, store.volume.shape[1] - spec.n_slices - z0)
            z0 += int(rng.integers(lo, hi + 1))
        n, zs = spec.tile // BLOCK, slice(z0, z0 + spec.n_slices)
        raw, lab = read_window(store, (int(r), int(c)), region.rows, n=n, z=zs)
        vol = raw.astype(np.float32) / np.float32(65535.0)  # ink_infer.predict.windows_to_float
        lab = lab.astype(np.float32)
        if self.aug:
            vol, lab = augment(vol, lab, rng)
        o, s = spec.offset, spec.side
        vol, lab = vol[:, o : o + s, o : o + s], lab[o : o + s, o : o + s]  # the irCSN's centre crop
        if self.aug and spec.in_chans > 1 and rng.random() < CHANNEL_SHUFFLE_P:
            # one permutation per sample, applied inside every group (the slices never leave their group)
            perm = rng.permutation(spec.in_chans)
            vol = vol.reshape(-1, spec.in_chans, s, s)[:, perm].reshape(-1, s, s)
        return torch.from_numpy(np.ascontiguousarray(vol)), torch.from_numpy(np.ascontiguousarray(lab))


# --- model plumbing: feature/head split, optimiser, schedule ------------------------------------------------------


def split_forward(model: nn.Module) -> tuple[Callable[[Tensor], Tensor], nn.Module]:
    """(features, head) with ``head(features(x)) == model(x)``: where manifold mixup mixes (after depth pooling)."""
    if isinstance(model, InkDet25D):

        def features(x: Tensor) -> Tensor:
            feat = model.conv3d(model.forward_features(x))
            return torch.cat([feat.mean(2), feat.amax(2)], dim=1)

        return features, model.head
    if isinstance(model, InkDetCSN3D):
        return (lambda x: torch.amax(model.backbone(x.unsqueeze(1)), dim=2)), model.head
    raise TypeError(f"no feature/head split for {type(model).__name__}")


def param_groups(
    model: nn.Module, *, lr: float, backbone_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """The reference's four AdamW groups: (backbone | rest) x (decay | no decay on biases and norms)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {k: [] for k in product((True, False), repeat=2)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            no_decay = p.ndim <= 1 or any(word in name for word in NO_DECAY_NAMES)
            groups[(name.startswith(BACKBONE_PREFIXES), not no_decay)].append(p)
    return [
        {"params": ps, "lr": backbone_lr if bb else lr, "weight_decay": weight_decay if decay else 0.0}
        for (bb, decay), ps in groups.items()
        if ps
    ]


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, *, total: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``transformers.get_cosine_schedule_with_warmup`` (half a cosine to 0), stepped once per optimiser step."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- loss and metric -----------------------------------------------------------------------------------------------


def downsample_labels(lab: Tensor, *, mode: str = "bilinear") -> Tensor:
    """``(B, S, S)`` -> ``(B, 1, S/32, S/32)``.

    ``bilinear``: align_corners=True, as the reference; it samples points, which is fine for the real fragments'
    broad ink. ``area``: the ink fraction of each 32 x 32 cell, which carries more signal per step for thin strokes
    and short runs (the demo models are trained with it, see the README).
    """
    if mode == "area":
        return F.avg_pool2d(lab[:, None], BLOCK)
    g = lab.shape[-1] // BLOCK
    return F.interpolate(lab[:, None], size=(g, g), mode="bilinear", align_corners=True)


def criterion(logits: Tensor, target: Tensor) -> Tensor:
    """BCE + (1 - soft F0.5 over the whole batch), on smoothed targets ``target * 0.8 + 0.1``; float32."""
    logits = logits.float()
    target = target * (1 - 2 * LABEL_SMOOTH) + LABEL_SMOOTH
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    tp, fp, fn = (p * target).sum(), (p * (1 - target)).sum(), ((1 - p) * target).sum()
    b2 = FBETA**2
    f = (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp + FBETA_SMOOTH)
    return bce + (1 - f)


def best_percentile(prob: np.ndarray, truth: np.ndarray, *, x0: float = 0.9) -> tuple[float, float, float]:
    """(F0.5, percentile, threshold) at the percentile threshold Nelder-Mead finds, as the reference's validation."""
    if prob.size == 0:
        return 0.0, x0, 0.0

    def neg_f(q: np.ndarray) -> float:
        thr = np.quantile(prob, float(np.clip(q[0], 0.0, 1.0)))
        return -fbeta(prob > thr, truth, beta=FBETA)

    res = minimize(neg_f, x0=[x0], method="Nelder-Mead")
    q = float(np.clip(res.x[0], 0.0, 1.0))
    return -float(res.fun), q, float(np.quantile(prob, q))


# --- validation ----------------------------------------------------------------------------------------------------


@dataclass
class ValidPart:
    """One validation region at ``1/scale`` resolution: its windows, the truth and the pixels that are scored."""

    region: Region
    origins: np.ndarray  # (n, 2) block (row, col) on the fragment grid, in the validation dataset's order
    count: np.ndarray  # (rows, gw) int32: windows covering each block (tiling.coverage_blocks)
    truth: np.ndarray  # (h, w) bool: ink where at least half of the pixels are ink
    keep: np.ndarray  # (h, w) bool: in the mask (half the pixels) and covered by some window


def block_image(store: BlockStore, blocks: np.ndarray, rows: tuple[int, int]) -> np.ndarray:
    """``(n, 32, 32)`` per-block data of ``store`` laid out as the ``(rows * 32, gw * 32)`` image of a region."""
    index = store.index[rows[0] : rows[1]]
    out = np.zeros((*index.shape, BLOCK, BLOCK), blocks.dtype)
    out[index >= 0] = blocks[index[index >= 0]]
    return out.transpose(0, 2, 1, 3).reshape(index.shape[0] * BLOCK, -1)


def area_down(image: np.ndarray, scale: int) -> np.ndarray:
    h, w = image.shape
    return image.reshape(h // scale, scale, w // scale, scale).mean(axis=(1, 3), dtype=np.float32)


def make_valid_parts(
    stores: list[BlockStore],
    masks: list[np.ndarray],
    regions: list[Region],
    spec: ModelSpec,
    *,
    scale: int,
    max_windows: int,
) -> list[ValidPart]:
    """Validation windows of each region in the reference's order (file-name sort), the first ``max_windows`` in all."""
    parts, left = [], max_windows
    for region in regions:
        origins = region_origins(region, masks[region.frag])
        store, rows = stores[region.frag], region.rows
        # each part was its own image in the reference, so its file names counted rows from its top
        rel = origins - (rows[0], 0)
        order = reference_order(rel)[:left]
        origins, rel = origins[order], rel[order]
        left -= len(origins)
        grid = (rows[1] - rows[0], store.index.shape[1])
        tiles = {"tile_blocks": spec.tile // BLOCK, "offset_blocks": spec.offset // BLOCK}
        count = coverage_blocks(rel, grid, **tiles, side_blocks=spec.side // BLOCK)
        px = BLOCK // scale
        covered = np.repeat(np.repeat(count > 0, px, axis=0), px, axis=1)
        truth = area_down(block_image(store, store.labels, rows), scale) >= 0.5
        keep = (area_down(block_image(store, store.mask, rows), scale) >= 0.5) & covered
        parts.append(ValidPart(region, origins, count, truth, keep))
    return [p for p in parts if len(p.origins)]


def stitch(logits: Tensor, part: ValidPart, spec: ModelSpec, *, scale: int) -> np.ndarray:
    """Mean window probability over the part at ``1/scale``, as inference stitches it (sigmoid, bilinear with
    align_corners=True, sum / count); ``logits`` ``(n, 1, g, g)`` float32 on the CPU."""
    h, w = part.keep.shape
    side, off, px = spec.side // scale, spec.offset // scale, BLOCK // scale
    acc = torch.zeros((h + spec.tile, w + spec.tile))
    rows = (part.origins[:, 0] - part.region.rows[0]) * px + off
    cols = part.origins[:, 1] * px + off
    for i in range(0, len(logits), 1024):  # bounded memory: 1024 upsampled windows at a time
        probs = upsample_probs(logits[i : i + 1024], side)
        for p, y, x in zip(probs, rows[i : i + 1024].tolist(), cols[i : i + 1024].tolist(), strict=True):
            acc[y : y + side, x : x + side] += p
    count = np.repeat(np.repeat(part.count, px, axis=0), px, axis=1).astype(np.float32)
    acc_np = acc[:h, :w].numpy()
    return np.divide(acc_np, count, out=np.zeros_like(acc_np), where=count > 0)


@torch.no_grad()
def validate(
    tr: Trainer, loader: torch.utils.data.DataLoader, parts: list[ValidPart], *, scale: int
) -> dict[str, float]:
    """F0.5 of the EMA model on the validation parts at the best percentile threshold (Nelder-Mead)."""
    model = tr.ema.module.eval()
    outs = []
    for x, _ in tqdm(loader, desc="valid", unit="batch", leave=False, disable=None):
        with torch.autocast(tr.device.type, dtype=torch.float16, enabled=tr.amp):
            outs.append(model(normalize_windows(x.to(tr.device, non_blocking=True))).float().cpu())
    logits = torch.cat(outs)
    probs, truths, start = [], [], 0
    for part in parts:
        prob = stitch(logits[start : start + len(part.origins)], part, tr.spec, scale=scale)
        start += len(part.origins)
        probs.append(prob[part.keep])
        truths.append(part.truth[part.keep])
    f05, q, thr = best_percentile(np.concatenate(probs), np.concatenate(truths))
    return {"f05": f05, "percentile": q, "threshold": thr}


# --- training state, step, checkpoints -----------------------------------------------------------------------------


@dataclass
class Trainer:
    """Everything that changes while training (and is saved in last.ckpt)."""

    spec: ModelSpec
    model: nn.Module
    ema: ModelEmaV2
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool  # float16 autocast + grad scaling, on CUDA only (the reference trained with precision=16)
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best: float = -1.0
    best_epoch: int = 0
    best_path: Path | None = None  # best_fbeta.ckpt of this run, or of the run it resumed (another --out)
    features: Callable[[Tensor], Tensor] = field(init=False)
    head: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.features, self.head = split_forward(self.model)


def make_trainer(
    model: nn.Module, spec: ModelSpec, args: argparse.Namespace, *, device: torch.device, total: int
) -> Trainer:
    model = model.to(device).train()
    ema = ModelEmaV2(model, decay=args.ema_decay)  # updated after every optimiser step; validated, exported
    backbone_lr = args.backbone_lr or args.lr
    groups = param_groups(model, lr=args.lr, backbone_lr=backbone_lr, weight_decay=args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    scheduler = cosine_with_warmup(optimizer, total=total, warmup=math.ceil(WARMUP_FRACTION * total))
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    return Trainer(spec, model, ema, optimizer, scheduler, scaler, device, amp)


def mix_batch(
    x: Tensor, y: Tensor, args: argparse.Namespace, rng: np.random.Generator
) -> tuple[Tensor, Tensor, float | None]:
    """Mixup (input or manifold) with ``--mixup-p``, else cutmix with p=0.5, against the batch reversed.

    ``x`` ``(B, Z, S, S)`` raw, ``y`` ``(B, S, S)``. Returns (x, y, lam for manifold mixup of the features or None).
    """
    if args.no_aug or len(x) < 2:
        return x, y, None
    if rng.random() < args.mixup_p:
        lam = float(rng.beta(args.mixup_alpha, args.mixup_alpha))
        y = lam * y + (1 - lam) * y.flip(0)
        if rng.random() < MANIFOLD_P:
            return x, y, lam
        return lam * x + (1 - lam) * x.flip(0), y, None
    if rng.random() < CUTMIX_P:
        g = x.shape[-1] // BLOCK
        cut = round(g * math.sqrt(1 - float(rng.beta(args.mixup_alpha, args.mixup_alpha))))
        cy, cx = rng.integers(g, size=2)
        y0, y1 = (int(np.clip(v, 0, g)) * BLOCK for v in (cy - cut // 2, cy + cut - cut // 2))
        x0, x1 = (int(np.clip(v, 0, g)) * BLOCK for v in (cx - cut // 2, cx + cut - cut // 2))
        x, y = x.clone(), y.clone()  # a box on the 32 grid, so whole label cells change hands
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        y[..., y0:y1, x0:x1] = y.flip(0)[..., y0:y1, x0:x1]
    return x, y, None


def train_step(tr: Trainer, x: Tensor, y: Tensor, args: argparse.Namespace) -> float:
    """One optimiser step on a batch of raw windows ``(B, Z, S, S)`` in [0, 1] and labels ``(B, S, S)``."""
    rng = np.random.default_rng([args.seed, 3, tr.step])  # a function of the step: resumed runs mix alike
    x, y = x.to(tr.device, non_blocking=True), y.to(tr.device, non_blocking=True)
    x, y, lam = mix_batch(x, y, args, rng)
    x = normalize_windows(x)  # the per-window standardisation of inference, after mixing (as the reference)
    target = downsample_labels(y, mode=args.labels)
    with torch.autocast(tr.device.type, dtype=torch.float16, enabled=tr.amp):
        if lam is None:
            logits = tr.model(x)
        else:
            feat = tr.features(x)
            logits = tr.head(lam * feat + (1 - lam) * feat.flip(0))
    loss = criterion(logits, target)
    tr.optimizer.zero_grad(set_to_none=True)
    tr.scaler.scale(loss).backward()
    tr.scaler.unscale_(tr.optimizer)  # clip the true gradients, not the scaled ones
    nn.utils.clip_grad_norm_(tr.model.parameters(), args.clip)
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.scheduler.step()
    tr.ema.update(tr.model)
    tr.step += 1
    return float(loss.detach())


def spec_key(spec: ModelSpec) -> dict[str, Any]:
    """What must not change between a run and its resume: the model and its inputs (not the weight file)."""
    kept = {
        k: v for k, v in dataclasses.asdict(spec).items() if k not in ("file", "sha256", "size", "weight")
    }
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kept.items()}


def atomic_save(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def save_last(tr: Trainer, path: Path) -> None:
    """The team's layout plus what ``--resume`` needs; readable with ``weights_only=True`` (plain values only)."""
    state = {MODEL_PREFIX + k: v.detach().cpu() for k, v in tr.model.state_dict().items()}
    state |= {EMA_PREFIX + k: v.detach().cpu() for k, v in tr.ema.module.state_dict().items()}
    train_state = {
        "model": spec_key(tr.spec),
        "best": tr.best,
        "best_epoch": tr.best_epoch,
        "best_path": str(tr.best_path) if tr.best_path else None,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if tr.device.type == "cuda" else [],
    }
    payload = {
        "state_dict": state,
        "hyper_parameters": hyper_parameters_for(tr.spec),
        "epoch": tr.epoch,
        "global_step": tr.step,
        "optimizer_states": [tr.optimizer.state_dict()],
        "lr_schedulers": [tr.scheduler.state_dict()],
        "grad_scaler": tr.scaler.state_dict(),
        "train_state": train_state,
    }
    atomic_save(payload, path)


def load_last(tr: Trainer, path: Path) -> None:
    """Restore model, EMA, optimiser, scheduler, scaler, counters and RNG from ``save_last``'s file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{path}: not a readable training checkpoint ({why})") from None
    ts = ckpt.get("train_state") if isinstance(ckpt, dict) else None
    if ts is None:
        raise UserError(f"{path}: no training state (--resume takes a last.ckpt, not exported weights)")
    if ts["model"] != spec_key(tr.spec):
        raise UserError(
            f"{path}: trained model {ts['model']['name']!r} differs from --config {tr.spec.name!r}"
        )
    tr.model.load_state_dict(strip_prefix(ckpt["state_dict"], MODEL_PREFIX))
    tr.ema.module.load_state_dict(strip_prefix(ckpt["state_dict"], EMA_PREFIX))
    tr.optimizer.load_state_dict(ckpt["optimizer_states"][0])
    tr.scheduler.load_state_dict(ckpt["lr_schedulers"][0])
    tr.scaler.load_state_dict(ckpt["grad_scaler"])
    tr.epoch, tr.step = ckpt["epoch"], ckpt["global_step"]
    tr.best, tr.best_epoch = ts["best"], ts["best_epoch"]
    tr.best_path = Path(ts["best_path"]) if ts.get("best_path") else None
    torch.set_rng_state(ts["rng_torch"])
    if ts["rng_cuda"] and tr.device.type == "cuda":
        torch.cuda.set_rng_state_all(ts["rng_cuda"])


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def export_weights(src: Path, dst: Path, *, ema_only: bool, fp16: bool) -> None:
    """Copy of a team-layout checkpoint for shipping: optionally only ``model_ema.module.*`` (inference prefers the
    EMA copy), optionally float16 (the reference predicted in float16; loading casts back to the model's dtype)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    state = {k: v for k, v in ckpt["state_dict"].items() if not ema_only or k.startswith(EMA_PREFIX)}
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    atomic_save({"state_dict": state, "hyper_parameters": ckpt["hyper_parameters"]}, dst)


def manifest_entry(spec: ModelSpec, path: Path) -> dict[str, Any]:
    """The manifest entry for ``spec`` with ``path`` as its file (relative to the folder given as ``--weights``)."""
    keys = (
        "name",
        "arch",
        "backbone",
        "in_chans",
        "num_3d_layer",
        "depth",
        "stage_blocks",
        "z_range",
        "tile",
    )
    entry = {k: getattr(spec, k) for k in (*keys, "crop") if getattr(spec, k) is not None}
    entry = {k: list(v) if isinstance(v, tuple) else v for k, v in entry.items()}
    entry |= {"file": path.name, "sha256": sha256_file(path), "size": path.stat().st_size}
    return entry | {"weight": spec.weight}


# --- the run -------------------------------------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> None:
    for name in POSITIVE_ARGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: expected a positive number")
    if args.samples_per_epoch < args.batch_size:
        raise UserError(f"--samples-per-epoch {args.samples_per_epoch}: under one batch of {args.batch_size}")
    if args.shift_z < 0 or args.workers < 0 or args.lr <= 0 or not 0 <= args.mixup_p <= 1:
        raise UserError("--shift-z and --workers must be >= 0, --lr > 0, --mixup-p in [0, 1]")
    if (args.export_ema_only or args.export_fp16) and args.export is None:
        raise UserError("--export-ema-only / --export-fp16 need --export FILE")
    if args.resume is not None and not args.resume.is_file():
        raise UserError(f"{args.resume}: --resume checkpoint not found")
    if args.resume is None and (args.out / "last.ckpt").exists():
        raise UserError(
            f"{args.out}: holds a run already (last.ckpt); --resume {args.out / 'last.ckpt'} or a new --out"
        )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu or cuda[:N]") from None


def prepare(args: argparse.Namespace) -> tuple[ModelSpec, TrainData, nn.Module, torch.device]:
    """Every check on the inputs, before anything is logged or computed: a bad input is one line and exit 2."""
    check_args(args)
    device = pick_device(args.device)
    models = load_manifest(args.manifest).models
    spec = next((m for m in models if m.name == args.config), None)
    if spec is None:
        names = ", ".join(m.name for m in models)
        raise UserError(f"{args.manifest}: no model named {args.config!r} (it has {names})")
    torch.manual_seed(args.seed)  # the initial weights depend on the seed only
    model = build_model(spec)
    data = load_train_data(args.data, fold=args.fold, valid_ids=args.valid_ids)
    return spec, data, model, device


def loader(
    ds: WindowDataset, args: argparse.Namespace, *, device: torch.device, train: bool
) -> torch.utils.data.DataLoader:
    # the dataset's own per-epoch order is the shuffle (drawn from (seed, epoch)), so the sampler stays sequential
    return torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch_size,
        drop_last=train,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init,
        # forked workers share the in-RAM block stores copy-on-write instead of each unpickling a copy
        multiprocessing_context=WORKER_START if args.workers else None,
    )


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)  # a worker is one process among many: no thread pool of its own
    torch.set_num_threads(1)


def train_epoch(tr: Trainer, ds: WindowDataset, args: argparse.Namespace, *, steps: int) -> float:
    ds.set_epoch(tr.epoch, steps * args.batch_size)
    tr.model.train()
    losses = []
    batches = loader(ds, args, device=tr.device, train=True)
    desc = f"epoch {tr.epoch + 1}/{args.epochs}"
    bar = tqdm(batches, total=steps, desc=desc, unit="step", leave=False, disable=None)
    for x, y in bar:
        losses.append(train_step(tr, x, y, args))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return float(np.mean(losses))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train (or continue) one config; returns the epoch records of this invocation."""
    spec, data, model, device = prepare(args)
    try:
        return train_run(spec, data, model, device, args)
    finally:
        data.close()


def train_run(
    spec: ModelSpec, data: TrainData, model: nn.Module, device: torch.device, args: argparse.Namespace
) -> list[dict[str, Any]]:
    for warning in data.warnings:
        log.warning("%s", warning)
    train_ids, valid_ids = (" ".join(r.id for r in rs) for rs in (data.train, data.valid))
    log.info("%s on %s: train %s, valid %s", spec.name, device, train_ids, valid_ids)
    cache_dir = args.cache_dir or args.out / "cache"
    stores = build_stores(data, spec, shift_z=args.shift_z, cache_gb=args.cache_gb, cache_dir=cache_dir)
    try:
        return train_stores(spec, data, stores, model, device, args)
    finally:
        # on-disk stores are rebuilt by every run (cheap next to training), so they are not left behind
        for path in {Path(s.volume.filename) for s in stores if isinstance(s.volume, np.memmap)}:
            path.unlink(missing_ok=True)


def train_stores(
    spec: ModelSpec,
    data: TrainData,
    stores: list[BlockStore],
    model: nn.Module,
    device: torch.device,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    items = [(r, region_origins(r, data.masks[r.frag])) for r in data.train]
    train_ds = WindowDataset(
        stores, items, spec, augment=not args.no_aug, shift_z=args.shift_z, seed=args.seed
    )
    valid = make_validation(stores, data, spec, args, device=device)
    steps = args.samples_per_epoch // args.batch_size
    tr = make_trainer(model, spec, args, device=device, total=steps * args.epochs)
    if args.resume is not None:
        load_last(tr, args.resume)
        log.info("resumed from %s: epoch %d, step %d", args.resume, tr.epoch, tr.step)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    stop = min(args.epochs, tr.epoch + (args.epochs_this_run or args.epochs))
    records = []
    while tr.epoch < stop:
        records.append(run_epoch(tr, train_ds, valid, args, steps=steps))
    if tr.epoch >= args.epochs:
        finish(tr, args)
    else:
        log.info(
            "stopped after epoch %d of %d: continue with --resume %s",
            tr.epoch,
            args.epochs,
            args.out / "last.ckpt",
        )
    return records


@dataclass(frozen=True)
class Validation:
    loader: torch.utils.data.DataLoader
    parts: list[ValidPart]
    scale: int


def make_validation(
    stores: list[BlockStore],
    data: TrainData,
    spec: ModelSpec,
    args: argparse.Namespace,
    *,
    device: torch.device,
) -> Validation:
    scale = args.valid_scale
    parts = make_valid_parts(
        stores, data.masks, data.valid, spec, scale=scale, max_windows=args.valid_windows
    )
    ds = WindowDataset(stores, [(p.region, p.origins) for p in parts], spec, augment=False, shift_z=0, seed=0)
    return Validation(loader(ds, args, device=device, train=False), parts, scale)


def run_epoch(
    tr: Trainer, train_ds: WindowDataset, valid: Validation, args: argparse.Namespace, *, steps: int
) -> dict[str, Any]:
    """Train one epoch, validate (every --valid-every and at the end), save best/last, log one line."""
    t0 = time.perf_counter()
    record: dict[str, Any] = {"epoch": tr.epoch + 1, "loss": train_epoch(tr, train_ds, args, steps=steps)}
    record |= {"step": tr.step, "lr": tr.optimizer.param_groups[-1]["lr"]}
    tr.epoch += 1
    if tr.epoch % args.valid_every == 0 or tr.epoch == args.epochs:
        record |= validate(tr, valid.loader, valid.parts, scale=valid.scale)
        if record["f05"] > tr.best:
            tr.best, tr.best_epoch, tr.best_path = (
                record["f05"],
                tr.epoch,
                (args.out / "best_fbeta.ckpt").resolve(),
            )
            save_checkpoint(tr.model, tr.best_path, hyper_parameters_for(tr.spec), tr.ema)
    save_last(tr, args.out / "last.ckpt")
    record["seconds"] = time.perf_counter() - t0
    with open(args.out / "train_log.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    scored = ""
    if "f05" in record:
        scored = f", valid F0.5 {record['f05']:.4f} at percentile {record['percentile']:.4f}"
        scored += f" (p > {record['threshold']:.4f})"
    log.info(
        "epoch %d/%d step %d: loss %.4f%s, lr %.2e, %.0fs",
        *(tr.epoch, args.epochs, tr.step, record["loss"], scored, record["lr"], record["seconds"]),
    )
    return record


def finish(tr: Trainer, args: argparse.Namespace) -> None:
    """Export the best epoch's weights if asked, and print the manifest entry of the file to ship."""
    path = tr.best_path
    if path is None or not path.is_file():
        raise UserError(f"{path or args.out / 'best_fbeta.ckpt'}: the best checkpoint of this run is missing")
    if args.export is not None:
        export_weights(path, args.export, ema_only=args.export_ema_only, fp16=args.export_fp16)
        path = args.export
    log.info("best valid F0.5 %.4f at epoch %d: %s", tr.best, tr.best_epoch, path)
    log.info("manifest entry (its file is relative to the folder given as --weights):")
    print(json.dumps(manifest_entry(tr.spec, path)))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 on a user error, as one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        log.setLevel(logging.INFO)
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    keep_freed_memory()  # process-wide, so only when run as a script (tests call main() in their own process)
    sys.exit(main())
