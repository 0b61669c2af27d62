"""The ensemble over one fragment, model by model, and the end of a run: mean, threshold, RLE, submission.csv.

Each model's stitched sum is divided by its own window count (``sum / count``, 0 where uncovered) and added with
its manifest weight; the mean over models is thresholded at the percentile of the covered (or whole) mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .config import BLOCK, ModelSpec, RunConfig, ThresholdSpec
from .errors import ModelRunError, UserError
from .fragments import Fragment
from .report import write_preview
from .rle import rle_encode, write_submission
from .stitch import covered_mask, finalize
from .threshold import binarize
from .tiling import cover_grid, coverage_blocks

log = logging.getLogger(__name__)


@dataclass
class FragmentState:
    """One fragment's windows and the ensemble built over it, model by model."""

    fragment: Fragment
    shape: tuple[int, int]
    mask: np.ndarray  # (H, W) bool
    touched: np.ndarray  # (gh, gw) bool
    origins: np.ndarray  # (N, 2) block coords, reference order
    ops: np.ndarray  # (N,) flip op
    ensemble: np.ndarray | None = None  # (H, W) float32, weighted sum of model probability maps
    covered_blocks: np.ndarray | None = None  # (ch, cw) bool on the cover grid: covered by some model
    weight_sum: float = 0.0
    notes: list[str] = field(default_factory=list)
    fingerprint: dict | None = (
        None  # partials.fragment_fingerprint: what a partial of this fragment is keyed by
    )


def model_count(state: FragmentState, spec: ModelSpec) -> np.ndarray:
    """``(ch, cw)`` int32: how many of the model's squares cover each block of the fragment's cover grid (the
    partial blocks of the remainder rows and columns included, as the reference counted them)."""
    return coverage_blocks(
        state.origins,
        cover_grid(state.shape),
        tile_blocks=spec.tile // BLOCK,
        offset_blocks=spec.offset // BLOCK,
        side_blocks=spec.side // BLOCK,
    )


def add_to_ensemble(state: FragmentState, spec: ModelSpec, sum_map: np.ndarray) -> None:
    """Add ``weight * (sum / count)`` of one model to the fragment's ensemble (each model normalised by its count)."""
    count = model_count(state, spec)
    prob = finalize(sum_map, count, state.mask)
    if state.ensemble is None:
        state.ensemble = np.zeros(state.shape, dtype=np.float32)
        state.covered_blocks = np.zeros(cover_grid(state.shape), dtype=bool)
    state.ensemble += np.float32(spec.weight) * prob
    state.covered_blocks |= count > 0
    state.weight_sum += spec.weight


def finish(
    states: list[FragmentState], cfg: RunConfig, threshold: ThresholdSpec, *, partials_kept: int
) -> dict:
    """Ensemble mean, percentile threshold, RLE; submission.csv written atomically, previews beside it.

    A preview that cannot be written is a warning; submission.csv that cannot be written is a ``UserError`` and
    leaves the previous file (or none) in place."""
    if not any(s.weight_sum for s in states) and any(len(s.origins) for s in states):
        raise ModelRunError("no model finished: no submission written")
    rows, summary = [], {}
    for s in states:
        prob = s.ensemble / s.weight_sum if s.weight_sum else np.zeros(s.shape, dtype=np.float32)
        if threshold.region == "mask" or s.covered_blocks is None:
            region = s.mask
        else:
            region = covered_mask(s.covered_blocks, s.mask)
        ink, thr = binarize(prob, region, threshold.percentile)
        rows.append((s.fragment.submission_id, rle_encode(ink)))
        summary[s.fragment.id] = {
            "threshold": thr,
            "ink_fraction": float(ink.mean()),
            "region_pixels": int(region.sum()),
        }
        if cfg.previews:
            path = cfg.out / "previews" / f"{s.fragment.id}.png"
            try:
                write_preview(path, prob, ink, s.mask)
            except OSError as e:
                log.warning("%s: preview not written (%s)", path, e.strerror or e)
    path = cfg.out / "submission.csv"
    try:
        write_submission(rows, path)
    except OSError as e:
        kept = (
            f"{partials_kept} finished (model, fragment) result(s) are kept in {cfg.out / 'partials'}, rerun the "
            "same command once there is room"
            if partials_kept
            else "no finished result could be saved either"
        )
        raise UserError(
            f"{path}: cannot write ({e.strerror or e}): no new submission written; {kept}"
        ) from None
    return {"path": str(path), "fragments": summary}
