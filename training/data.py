"""What training reads: the train fragments cut into regions, the fold's split of them, each fragment streamed once
into a block store (the reference's 32 x 32 patch layout), and the windows drawn from those stores."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ink_infer.config import ModelSpec
from ink_infer.engine.tiling import blocks_of, image_of, touched_blocks
from ink_infer.errors import UserError
from ink_infer.geometry import BLOCK, N_SLICES
from ink_infer.volumes.discovery import find_fragments
from ink_infer.volumes.fragment import Fragment
from ink_infer.volumes.masks import load_labels, load_mask
from ink_infer.volumes.tiff_stack import Volume

from .augment import CHANNEL_SHUFFLE_P, SHIFT_Z_P, augment

log = logging.getLogger("train")

SPLIT_ID = "2"  # the large fragment, cut into three parts of equal mask area
FOLD_VALID = {0: "1", 1: "2a"}
BAND_BYTES = 256 << 20  # one read_band while building a block store


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
            # missing or of another shape: UserError naming the file
            labels.append(load_labels(frag, vol.shape))
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
    n, nz = int(touched.sum()), z[1] - z[0]
    # blocks are numbered row-major, the order tiling.blocks_of returns them in
    index = np.full((gh, gw), -1, np.int32)
    index[touched] = np.arange(n, dtype=np.int32)
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
        # tiling.blocks_of with the slices leading: blocks_of wants them trailing, and transposing the band to
        # (H, W, nz) for it and back measured 15-35% slower than this one reshape of the band as it is read
        grid = raw.reshape(nz, -1, BLOCK, gw, BLOCK).transpose(1, 3, 0, 2, 4)  # (rows, gw, nz, 32, 32)
        blocks[rows[rows >= 0]] = grid[rows >= 0]
    if path is not None:
        blocks.flush()

    def per_block(image: np.ndarray) -> np.ndarray:
        return blocks_of(image[: gh * BLOCK, : gw * BLOCK], touched).astype(np.uint8)

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


def region_image(store: BlockStore, blocks: np.ndarray, rows: tuple[int, int]) -> np.ndarray:
    """``(n, 32, 32)`` per-block data of ``store`` laid out as the ``(rows * 32, gw * 32)`` image of a region."""
    index = store.index[rows[0] : rows[1]]
    keep = index >= 0
    return image_of(blocks[index[keep]], keep)


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
    # tiling.image_of with the slices leading, as the store keeps them and the model takes them: image_of wants
    # them trailing, and transposing each window there and back measured 30-70% slower than this
    vol = np.zeros((n, n, z.stop - z.start, BLOCK, BLOCK), np.uint16)
    vol[ok] = store.volume[idx[ok], z]
    side = n * BLOCK
    return vol.transpose(2, 0, 3, 1, 4).reshape(-1, side, side), image_of(store.labels[idx[ok]], ok)


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
        # the pixel values of inference (ink_infer.engine.predict: raw / 65535 in float32, there then cast to float16)
        vol = raw.astype(np.float32) / np.float32(65535.0)
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
