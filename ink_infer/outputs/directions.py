"""``--direction both``: a segment read both ways, its two maps compared.

Each direction is a fragment of its own (``<seg>.forward``, ``<seg>.reverse``) whose outputs ``write.py`` writes as
any fragment's. This pass then reads the two ensembles together, by bands, in the segment's own orientation, and
counts over its mask: each direction's ink (above its own threshold, as its ink PNG) and summed probability, and
the pixels where the two ink maps agree; and it draws the two previews beside each other,
``OUT/previews/<seg>.both.png``. One band of each map is in memory at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ink_infer.outputs.atomic import note_unwritten
from ink_infer.outputs.ensemble import FragmentEnsemble
from ink_infer.outputs.maps import TILE
from ink_infer.outputs.previews import PreviewAccumulator, preview_image, write_side_by_side
from ink_infer.outputs.raster import array_piece, bands, turned_band, turned_shape
from ink_infer.outputs.report import DirectionFigures, DirectionsCompared, FragmentOutput
from ink_infer.outputs.threshold import ink_of

log = logging.getLogger(__name__)

WAYS = ("forward", "reverse")


def compare_directions(
    plans: Sequence, ensembles: Sequence[FragmentEnsemble], outputs: dict[str, FragmentOutput], *, region: str,
    previews: Path | None,
) -> dict[str, DirectionsCompared]:  # fmt: skip
    """Each segment of ``plans`` (``run.plan.FragmentPlan``) read both ways (``Fragment.pair``), compared; by
    segment id, empty when none was. ``outputs``: each fragment's threshold, by id (``write_outputs``');
    ``region``: the threshold's; ``previews``: the folder the side-by-side preview goes to (None: none)."""
    pairs: dict[str, dict] = {}
    for plan, ens in zip(plans, ensembles, strict=True):
        if plan.fragment.pair is not None:
            pairs.setdefault(plan.fragment.pair, {})[plan.fragment.direction] = (plan, ens)
    return {seg: _compare(seg, two, outputs, region, previews) for seg, two in pairs.items()}


def _compare(seg: str, two: dict, outputs: dict[str, FragmentOutput], region: str, previews: Path | None):
    """One segment's ``DirectionsCompared`` from ``two``: direction -> (plan, ensemble)."""
    plan = two["forward"][0]  # both directions share the segment's shape, mask and turn
    angle = plan.fragment.rotate
    shape = turned_shape(plan.shape, angle)
    thresholds = {way: outputs[two[way][0].id].threshold for way in WAYS}
    accs = {way: PreviewAccumulator(shape) for way in WAYS} if previews is not None else {}
    ink, prob_sum, mask_px, agree = dict.fromkeys(WAYS, 0), dict.fromkeys(WAYS, 0.0), 0, 0
    for lo, hi in bands(shape[0], TILE):  # the bands write.py reads: the previews come out the same
        mask = turned_band(array_piece(plan.mask), plan.shape, angle, lo, hi)
        inks = {}
        for way in WAYS:
            ens = two[way][1]
            prob = turned_band(ens.mean_piece, plan.shape, angle, lo, hi)
            in_region = turned_band(ens.region_piece(region), plan.shape, angle, lo, hi)
            inks[way] = ink_of(prob, in_region, thresholds[way])
            ink[way] += int(np.count_nonzero(inks[way] & mask))
            prob_sum[way] += float(prob[mask].sum(dtype=np.float64))
            if accs:
                accs[way].add(prob, inks[way], mask)
        mask_px += int(np.count_nonzero(mask))
        agree += int(np.count_nonzero((inks["forward"] == inks["reverse"]) & mask))
    share = (lambda n: n / mask_px) if mask_px else (lambda n: 0.0)
    figures = {way: DirectionFigures(share(ink[way]), share(prob_sum[way])) for way in WAYS}
    compared = DirectionsCompared(
        figures["forward"], figures["reverse"], share(agree),
        higher_mean_probability=_higher({w: f.mean_probability for w, f in figures.items()}),
        more_ink=_higher({w: f.ink_fraction for w, f in figures.items()}),
    )  # fmt: skip
    if accs:
        images = [preview_image(accs[w], fragment_id=two[w][0].id, threshold=thresholds[w]) for w in WAYS]
        path = previews / f"{seg}.both.png"
        try:
            write_side_by_side(path, images, _header_lines(seg, compared))
        except OSError as e:
            note_unwritten(log, path, e, "preview not written")
    return compared


def _higher(values: dict[str, float]) -> str | None:
    """The direction with the larger value; None when they are equal."""
    forward, reverse = (values[w] for w in WAYS)
    return None if forward == reverse else ("forward" if forward > reverse else "reverse")


def _header_lines(seg: str, c: DirectionsCompared) -> list[str]:
    return [
        f"segment {seg}   left: forward (layers as read)   right: reverse (layers reversed)",
        f"mean probability in the mask {c.forward.mean_probability:.3f} | {c.reverse.mean_probability:.3f}   "
        f"ink {100 * c.forward.ink_fraction:.2f} % | {100 * c.reverse.ink_fraction:.2f} %   "
        f"the maps agree on {100 * c.agreement:.2f} % of the mask",
    ]
