"""The demo: a small synthetic Kaggle-layout test set with known ink, and the F0.5 of a submission against it.

``python -m ink_infer.submit --demo`` writes the set under OUT/demo_data, runs the packaged demo models over it
(``ink_infer/demo/``, trained by train.py on other synthetic fragments) and scores the result here.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_TEST = (("a", 576, 768), ("b", 512, 704))  # a few lines of letters each: scores vary less
DEMO_SEED = 20230614  # not a training seed: the demo scores held-out fragments


def make_demo_data(out: Path) -> Path:
    """A small synthetic Kaggle-layout test set under OUT/demo_data (kept if already there)."""
    from ink_infer.synthetic.fragments import write_dataset

    root = out / "demo_data"
    comp = root / "vesuvius-challenge-ink-detection"
    if not (comp / "sample_submission.csv").exists():
        log.info("writing the synthetic demo test set to %s", root)
        comp = write_dataset(root, test=DEMO_TEST, seed=DEMO_SEED)
    return comp


def demo_scores(data: Path, out: Path, *, previews: bool = False) -> dict[str, float]:
    """F0.5 of the submission against the synthetic ground truth (OUT/demo_data/ground_truth/<id>.png).

    ``previews`` also writes OUT/previews/<id>_truth.png (colours: ``previews.TRUTH_LEGEND``)."""
    import cv2

    from ink_infer.outputs.metrics import fbeta
    from ink_infer.outputs.previews import write_truth_preview
    from ink_infer.outputs.rle import read_submission, rle_decode

    scores = {}
    for frag_id, rle in read_submission(out / "submission.csv"):
        truth = cv2.imread(str(data.parent / "ground_truth" / f"{frag_id}.png"), cv2.IMREAD_GRAYSCALE)
        if truth is None:
            continue
        ink, truth = rle_decode(rle, truth.shape), truth > 0
        scores[frag_id] = fbeta(ink, truth)
        if previews and (out / "previews").is_dir():
            mask = cv2.imread(str(data / "test" / frag_id / "mask.png"), cv2.IMREAD_GRAYSCALE)
            if mask is not None:
                write_truth_preview(out / "previews" / f"{frag_id}_truth.png", ink, truth, mask > 0,
                                    fragment_id=frag_id, f05=scores[frag_id])  # fmt: skip
    return scores
