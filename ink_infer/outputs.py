"""The tail of a run: ensemble mean -> percentile threshold -> RLE -> previews and submission.csv (and, for
researchers, the full-resolution probability TIFFs and ink PNGs of ``maps.py``).

A preview that cannot be written is a warning; a submission.csv that cannot be written is a ``UserError`` and
leaves the previous file (or none) in place: submission.csv is only ever replaced, atomically, by a complete one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import ThresholdSpec
from .ensemble import FragmentEnsemble
from .errors import UserError
from .maps import write_mask_png, write_probability_tiff
from .plan import FragmentPlan
from .previews import write_preview
from .results import FragmentOutput, SubmissionResult
from .rle import rle_encode, write_submission
from .rotation import turn_back
from .threshold import binarize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputOptions:
    out: Path
    threshold: ThresholdSpec
    previews: bool = True
    probabilities: bool = False  # OUT/probabilities/<id>.tif and OUT/masks/<id>.png


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
        # back in the fragment's own orientation when the run saw it turned (--rotate); the quantile is unchanged
        angle = plan.fragment.rotate
        prob, region = turn_back(ens.mean(), angle), turn_back(ens.region(options.threshold.region), angle)
        mask = turn_back(plan.mask, angle)
        ink, thr = binarize(prob, region, options.threshold.percentile)
        rows.append((plan.fragment.submission_id, rle_encode(ink)))
        summary[plan.id] = FragmentOutput(
            None if thr is None else float(thr), float(ink.mean()), int(region.sum())
        )
        if options.previews:
            path = options.out / "previews" / f"{plan.id}.png"
            try:
                threshold = summary[plan.id].threshold  # thr as a float (or None)
                write_preview(path, prob, ink, mask, fragment_id=plan.id, threshold=threshold)
            except OSError as e:
                log.warning("%s: preview not written (%s)", path, e.strerror or e)
        if options.probabilities:
            maps.extend(_write_maps(options.out, plan.id, prob, ink))
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
    return SubmissionResult(str(path), summary, maps)


def _write_maps(out: Path, frag_id: str, prob, ink) -> list[str]:
    """The fragment's probability TIFF and ink PNG; a file that cannot be written is a warning (the submission is
    what must not fail). Returns the paths written."""
    written = []
    for path, write in ((out / "probabilities" / f"{frag_id}.tif", lambda p: write_probability_tiff(p, prob)),
                        (out / "masks" / f"{frag_id}.png", lambda p: write_mask_png(p, ink))):  # fmt: skip
        try:
            write(path)
            written.append(str(path))
        except OSError as e:
            log.warning("%s: not written (%s)", path, e.strerror or e)
    return written
