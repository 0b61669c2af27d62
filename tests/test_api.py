"""The Python API (``ink_infer.load_ensemble`` / ``predict``): the CLI's own engine, so its ``.ink`` is the CLI's
submission mask and its ``.probability`` the CLI's probability map, on the demo fragments."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import ink_infer
from ink_infer.errors import UserError
from ink_infer.outputs.maps import quantised
from ink_infer.outputs.rle import read_submission, rle_decode
from tests.helpers import recorded_demo_maps

pytestmark = pytest.mark.xdist_group("demo")  # shares the session's demo run (conftest.demo_run)


@pytest.fixture(scope="module")
def ensemble() -> ink_infer.Ensemble:
    return ink_infer.load_ensemble("demo")


def test_the_ink_is_the_clis_submission_mask_and_the_probability_its_map(ensemble, demo_run: Path) -> None:
    data = demo_run / "demo_data" / "vesuvius-challenge-ink-detection"
    found = ink_infer.predict_all(ensemble, data)
    rows = dict(read_submission(demo_run / "submission.csv"))
    recorded = recorded_demo_maps()
    assert sorted(found) == sorted(rows) == ["a", "b"]
    for frag_id, result in found.items():
        assert result.probability.dtype == np.float32 and result.ink.dtype == bool
        assert result.ink.shape == result.probability.shape == result.mask.shape
        np.testing.assert_array_equal(result.ink, rle_decode(rows[frag_id], result.ink.shape))
        pixels = quantised(result.probability)
        assert hashlib.sha256(pixels.tobytes()).hexdigest() == recorded[f"{frag_id}.tif"][2]
        assert 0.05 < result.ink_fraction < 0.1  # the 0.93 quantile of the covered mask
        assert [m.name for m in result.report.models] == [m.name for m in ensemble.models]


def test_one_fragment_gives_the_same_mask_and_an_out_folder_resumes(
    ensemble, demo_run: Path, tmp_path
) -> None:
    fragment = demo_run / "demo_data" / "vesuvius-challenge-ink-detection" / "test" / "b"
    first = ink_infer.predict(ensemble, fragment, out=tmp_path)
    rows = dict(read_submission(demo_run / "submission.csv"))
    np.testing.assert_array_equal(first.ink, rle_decode(rows["b"], first.ink.shape))
    again = ink_infer.predict(ensemble, fragment, out=tmp_path)  # every unit from the partials of the first
    assert again.report.partials.reused and not again.report.partials.fresh
    np.testing.assert_array_equal(again.probability, first.probability)
    lower = ink_infer.predict(
        ensemble, fragment, out=tmp_path, threshold=0.5
    )  # re-thresholded, not recomputed
    assert lower.threshold < first.threshold and lower.ink.sum() > first.ink.sum()


def test_a_folder_of_several_is_refused_by_predict_and_bad_options_are_named(
    ensemble, demo_run: Path
) -> None:
    data = demo_run / "demo_data" / "vesuvius-challenge-ink-detection"
    with pytest.raises(UserError, match="unknown option.*strides"):
        ink_infer.predict(ensemble, data, strides=64)
    with pytest.raises(UserError, match="not found"):
        ink_infer.predict(ensemble, data / "nowhere")
    with pytest.raises(UserError, match="2 fragments or segments, expected one"):
        ink_infer.predict(ensemble, data, tta="none", stride=128)


def test_a_bad_weight_file_is_refused_when_the_ensemble_is_loaded(tmp_path: Path) -> None:
    from ink_infer.manifest import DEMO_MANIFEST

    manifest = json.loads(DEMO_MANIFEST.read_text())
    (tmp_path / manifest["models"][0]["file"]).write_bytes(b"not a checkpoint")
    for entry in manifest["models"][1:]:
        (tmp_path / entry["file"]).write_bytes((DEMO_MANIFEST.parent / entry["file"]).read_bytes())
    path = tmp_path / "m.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=manifest["models"][0]["file"]):
        ink_infer.load_ensemble(path, tmp_path)
