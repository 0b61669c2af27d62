"""Validation as inference scores a fragment: the EMA model's window probabilities stitched with ink_infer's own
accumulator (sigmoid, bilinear upsampling, sum / count) at ``1/scale``, then F0.5 at the best percentile threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ink_infer.config import ModelSpec
from ink_infer.engine.stitch import SumMap, expand_blocks, upsample_probs
from ink_infer.engine.tiling import cover_grid, coverage_blocks, reference_order
from ink_infer.engine.windows import normalize_windows
from ink_infer.geometry import BLOCK

from .data import BlockStore, Region, region_image, region_origins
from .objective import best_percentile
from .state import Trainer

STITCH_CHUNK = 1024  # windows upsampled at a time, which bounds the memory of the full-size probabilities


@dataclass
class ValidPart:
    """One validation region at ``1/scale`` resolution: its windows, the truth and the pixels that are scored."""

    region: Region
    origins: np.ndarray  # (n, 2) block (row, col) on the fragment grid, in the validation dataset's order
    count: np.ndarray  # (rows, gw) int32: windows covering each block (tiling.coverage_blocks)
    truth: np.ndarray  # (h, w) bool: ink where at least half of the pixels are ink
    keep: np.ndarray  # (h, w) bool: in the mask (half the pixels) and covered by some window


def area_down(image: np.ndarray, scale: int) -> np.ndarray:
    """The mean of every ``scale x scale`` cell of ``image`` (whose sides are multiples of ``scale``), float32."""
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
        covered = expand_blocks(count > 0, (grid[0] * px, grid[1] * px), block=px)
        truth = area_down(region_image(store, store.labels, rows), scale) >= 0.5
        keep = (area_down(region_image(store, store.mask, rows), scale) >= 0.5) & covered
        parts.append(ValidPart(region, origins, count, truth, keep))
    return [p for p in parts if len(p.origins)]


def stitch(logits: Tensor, part: ValidPart, spec: ModelSpec, *, scale: int) -> np.ndarray:
    """Mean window probability over the part at ``1/scale``, as inference stitches it (sigmoid, bilinear with
    align_corners=True, sum / count); ``logits`` ``(n, 1, g, g)`` float32 on the CPU."""
    h, w = part.keep.shape
    side, off, px = spec.side // scale, spec.offset // scale, BLOCK // scale
    # the SumMap is a canvas of whole 32-pixel blocks; at 1/scale it is made to cover the part's (h, w) pixels
    acc = SumMap(cover_grid((h, w)), pad=spec.tile, device=torch.device("cpu"))
    rows = (part.origins[:, 0] - part.region.rows[0]) * px + off
    cols = part.origins[:, 1] * px + off
    for i in range(0, len(logits), STITCH_CHUNK):
        chunk = slice(i, i + STITCH_CHUNK)
        acc.add(upsample_probs(logits[chunk], side), rows[chunk], cols[chunk])
    total = acc.to_numpy()[:h, :w]
    count = expand_blocks(part.count, (h, w), block=px).astype(np.float32)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


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
