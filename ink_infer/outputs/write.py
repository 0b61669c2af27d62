"""The tail of a run: ensemble mean -> percentile threshold -> RLE -> previews and submission.csv (and, for
researchers, the full-resolution probability TIFFs and ink PNGs of ``maps.py``), each fragment's map read by bands.

A preview that cannot be written is a warning; a submission.csv that cannot be written is a ``UserError`` and
leaves the previous file (or none) in place: submission.csv is only ever replaced, atomically, by a complete one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ink_infer.config import ThresholdSpec
from ink_infer.errors import UserError
from ink_infer.outputs.atomic import note_unwritten
from ink_infer.outputs.directions import compare_directions
from ink_infer.outputs.ensemble import FragmentEnsemble
from ink_infer.outputs.maps import TILE, probability_path, write_mask_png, write_probability_tiff
from ink_infer.outputs.ome_zarr import write_probability_ome_zarr
from ink_infer.outputs.previews import PreviewAccumulator, write_accumulated_preview
from ink_infer.outputs.raster import array_piece, bands, turned_band, turned_shape
from ink_infer.outputs.report import FragmentOutput, SubmissionResult
from ink_infer.outputs.rle import RleEncoder, write_submission
from ink_infer.outputs.threshold import banded_quantile, ink_of
from ink_infer.run.plan import FragmentPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputOptions:
    out: Path
    threshold: ThresholdSpec
    previews: bool = True
    probabilities: bool = False  # OUT/probabilities/<id>.tif (or .ome.zarr) and OUT/masks/<id>.png
    prob_format: str = "tiff"  # --prob-format tiff | ome-zarr


def write_probability(path: Path, shape: tuple[int, int], bands, fmt: str) -> None:
    """The ``(H, W)`` float32 map, given as consecutive bands of rows, written as ``--prob-format fmt`` asks."""
    if fmt == "ome-zarr":
        write_probability_ome_zarr(path, shape, bands)
    else:
        write_probability_tiff(path, shape, bands)


def write_outputs(
    plans: Sequence[FragmentPlan],
    ensembles: Sequence[FragmentEnsemble],
    options: OutputOptions,
    *,
    partials_kept: int,
    partials_dir: Path | None = None,
) -> SubmissionResult:
    """Threshold each fragment's ensemble, encode it, write previews and submission.csv (``partials_kept``: what
    the error message can promise a rerun when submission.csv cannot be written)."""
    rows, summary, maps = [], {}, []
    for plan, ens in zip(plans, ensembles, strict=True):
        row, summary[plan.id], written = _fragment_outputs(plan, ens, options)
        rows.append(row)
        maps.extend(written)
    previews = options.out / "previews" if options.previews else None
    directions = compare_directions(
        plans, ensembles, summary, region=options.threshold.region, previews=previews
    )
    path = options.out / "submission.csv"
    try:
        write_submission(rows, path)
    except OSError as e:
        kept = (
            f"{partials_kept} finished (model, fragment) result(s) are kept in {partials_dir or options.out / 'partials'}, rerun "
            "the same command once there is room"
            if partials_kept
            else "no finished result could be saved either"
        )
        raise UserError(
            f"{path}: cannot write ({e.strerror or e}): no new submission written; {kept}"
        ) from None
    return SubmissionResult(str(path), summary, maps, directions)


def fragment_threshold(ens: FragmentEnsemble, threshold: ThresholdSpec) -> float | None:
    """The probability above which a fragment's pixel is ink: the ``threshold.percentile`` quantile of the
    ensemble's map over ``threshold.region``, exact, from two passes over the map by bands. None: an empty region."""
    h, w = ens.shape
    region = ens.region_piece(threshold.region)

    def region_values():
        for lo, hi in bands(h):
            yield ens.mean_piece(lo, hi, 0, w)[region(lo, hi, 0, w)]

    return banded_quantile(region_values, threshold.percentile)


def _fragment_outputs(plan: FragmentPlan, ens: FragmentEnsemble, options: OutputOptions):
    """One fragment's submission row, its summary and the pictures written, in passes over its ensemble map by
    bands (never the whole map in memory): the threshold's two, then one that encodes the RLE, draws the preview
    and writes the probability TIFF, and one more for the ink PNG.

    Outputs are in the fragment's own orientation when the run saw it turned (``--rotate``): the quantile does not
    depend on it, the rest is read turned back (``raster.turned_band``)."""
    h, w = plan.shape
    region = ens.region_piece(options.threshold.region)
    thr = fragment_threshold(ens, options.threshold)
    angle = plan.fragment.rotate
    shape = turned_shape(plan.shape, angle)

    def output_bands():
        """``(probability, ink, mask, region)`` rows of the turned-back fragment, in bands of ``maps.TILE`` rows."""
        for lo, hi in bands(shape[0], TILE):
            prob = turned_band(ens.mean_piece, plan.shape, angle, lo, hi)
            in_region = turned_band(region, plan.shape, angle, lo, hi)
            ink = ink_of(prob, in_region, thr)
            yield prob, ink, turned_band(array_piece(plan.mask), plan.shape, angle, lo, hi), in_region

    def tallied(tally: _Tally):
        """The probability rows, each band tallied (RLE, counts, preview) as it passes."""
        for prob, ink, mask, in_region in output_bands():
            tally.add(prob, ink, mask, in_region)
            yield prob

    written, tally = [], _Tally(shape, options.previews)
    if options.probabilities:
        path = probability_path(options.out, plan.id, options.prob_format)
        written += _written(path, lambda p: write_probability(p, shape, tallied(tally), options.prob_format))
    if not written:  # not asked for, or it failed part way: the pass the submission needs, without the TIFF
        tally = _Tally(shape, options.previews)
        for _ in tallied(tally):
            pass
    if options.probabilities:
        png = options.out / "masks" / f"{plan.id}.png"
        written += _written(png, lambda p: write_mask_png(p, shape, (ink for _, ink, _, _ in output_bands())))
    output = FragmentOutput(None if thr is None else float(thr), tally.ink / max(h * w, 1), tally.region)
    if tally.preview is not None:
        path = options.out / "previews" / f"{plan.id}.png"
        try:
            write_accumulated_preview(path, tally.preview, fragment_id=plan.id, threshold=output.threshold)
        except OSError as e:
            note_unwritten(log, path, e, "preview not written")
    return (plan.fragment.submission_id, tally.rle.text()), output, written


class _Tally:
    """What one pass over a fragment's output bands adds up: its RLE, ink and region pixels, its preview."""

    def __init__(self, shape: tuple[int, int], previews: bool) -> None:
        self.rle = RleEncoder()
        self.preview = PreviewAccumulator(shape) if previews else None
        self.ink = self.region = 0

    def add(self, prob: np.ndarray, ink: np.ndarray, mask: np.ndarray, in_region: np.ndarray) -> None:
        self.rle.add(ink)
        self.ink += int(np.count_nonzero(ink))
        self.region += int(np.count_nonzero(in_region))
        if self.preview is not None:
            self.preview.add(prob, ink, mask)


def _written(path: Path, write) -> list[str]:
    """``[path]`` once ``write(path)`` wrote it: a map the run was asked for (``--save-probabilities``, or a
    segment's by default) that cannot be written ends the run (a ``UserError``; the partials stay for a rerun)."""
    try:
        write(path)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e}); the finished results are kept in the "
                        "partials: rerun the same command once it can be written") from None  # fmt: skip
    return [str(path)]
