"""``--prob-format ome-zarr``: the probability map as an NGFF multiscale pyramid, read back with the ome-zarr
package's own reader: its levels and shapes, its axes, level 0 equal to the TIFF's values, each level the 2 x 2 mean
of the one above; written band by band and replaced whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from ink_infer.outputs.ome_zarr import halved, level_shapes, write_probability_ome_zarr
from ink_infer.synthetic.fragments import write_segment
from tests.helpers import report_of, run_cli

zarr = pytest.importorskip("zarr")
reader = pytest.importorskip("ome_zarr.reader", reason="the ome-zarr package (in the test extra)")


def read_back(path: Path) -> tuple[list[np.ndarray], dict]:
    from ome_zarr.io import parse_url

    (node,) = list(reader.Reader(parse_url(str(path)))())
    return [np.asarray(level) for level in node.data], node.metadata


def test_levels_are_halved_until_the_smaller_side_is_under_1024():
    assert level_shapes((2100, 1100)) == [(2100, 1100), (1050, 550)]
    assert level_shapes((4096, 5000)) == [(4096, 5000), (2048, 2500), (1024, 1250), (512, 625)]
    assert level_shapes((1023, 9000)) == [(1023, 9000)]
    assert halved(np.array([[0, 1, 255], [2, 3, 255], [9, 9, 9]], np.uint8)).tolist() == [[2, 255], [9, 9]]


def test_a_segment_run_writes_a_pyramid_whose_level_0_is_the_tiff(manifest, tmp_path, standins):
    segs = tmp_path / "segs"
    write_segment(segs, "s1", shape=(1100, 1040), seed=5)
    assert run_cli(segs, tmp_path / "tiff", manifest, "--stride", "128", "--save-model-maps") == 0
    out = tmp_path / "zarr"
    assert (
        run_cli(segs, out, manifest, "--stride", "128", "--save-model-maps", "--prob-format", "ome-zarr") == 0
    )
    written = report_of(out)["submission"]["maps"]
    assert str(out / "probabilities" / "s1.ome.zarr") in written and not list(out.rglob("*.tif"))
    for stem in ("s1", "s1.m25d", "s1.m3d"):
        levels, meta = read_back(out / "probabilities" / f"{stem}.ome.zarr")
        assert [lv.shape for lv in levels] == [(1100, 1040), (550, 520)]
        assert [a["name"] for a in meta["axes"]] == ["y", "x"]
        np.testing.assert_array_equal(
            levels[0], tifffile.imread(tmp_path / "tiff" / "probabilities" / f"{stem}.tif")
        )
        np.testing.assert_array_equal(levels[1], halved(levels[0]))


def test_an_image_is_replaced_whole_and_never_left_half_written(tmp_path, monkeypatch):
    path = tmp_path / "p" / "s.ome.zarr"
    ones = np.full((1030, 1030), 0.5, np.float32)
    write_probability_ome_zarr(path, ones.shape, (ones[i : i + 256] for i in range(0, 1030, 256)))

    def failing_bands():
        yield np.zeros((256, 1030), np.float32)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_probability_ome_zarr(path, ones.shape, failing_bands())
    levels, _ = read_back(path)  # the previous image, whole
    assert (levels[0] == 128).all() and levels[1].shape == (515, 515)
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.ome.zarr"]
