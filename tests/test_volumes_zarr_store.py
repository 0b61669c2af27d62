"""Zarr stores met the way a hostile or careless user would (#27): rewritten in place, with their layers on an axis
that is hard to tell, with chunks missing under the mask, with a chunk that cannot be decoded; and the ``--rotate``
cache built from them."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from ink_infer.synthetic.fragments import write_segment
from tests.helpers import one_error_line, report_of, run_cli

zarr = pytest.importorskip("zarr")


@pytest.fixture
def segment(tmp_path: Path) -> Path:
    """A folder holding one zarr segment ``s1.zarr`` (65 x 256 x 320, chunks 8 x 128 x 128) and its mask."""
    write_segment(tmp_path / "segs", "s1", shape=(256, 320), seed=4, layout="zarr")
    return tmp_path / "segs"


def level0(segment: Path):
    return zarr.open_group(str(segment / "s1.zarr"), mode="r+")["0"]


def probabilities(out: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(out / "probabilities" / "s1.tif")


def rewrite_in_place(segment: Path) -> None:
    """New values in the chunks under the mask; the store's metadata files stay as they were, mtimes included."""
    meta = [p for p in (segment / "s1.zarr").rglob("*.json")]
    stamps = {p: p.stat().st_mtime_ns for p in meta}
    array = level0(segment)
    array[:, 64:192, 64:256] = np.asarray(array[:, 64:192, 64:256])[:, ::-1]  # the rows upside down
    assert all(p.stat().st_mtime_ns == stamps[p] for p in meta)


def test_a_store_rewritten_in_place_is_recomputed_not_reused(segment, manifest, tmp_path, standins):
    """#27 item 1: the partials of a zarr store are keyed by its chunks (names, sizes, mtimes), not only by its
    metadata: a rewrite in place is never mistaken for the old store."""
    out = tmp_path / "out"
    assert run_cli(segment, out, manifest) == 0
    before = probabilities(out)
    rewrite_in_place(segment)
    assert run_cli(segment, out, manifest) == 0
    rep = report_of(out)
    assert rep["partials"]["reused"] == [] and {tuple(i[:2]) for i in rep["partials"]["ignored"]}
    assert run_cli(segment, tmp_path / "fresh", manifest) == 0
    np.testing.assert_array_equal(probabilities(out), probabilities(tmp_path / "fresh"))
    assert not np.array_equal(probabilities(out), before)


def test_the_rotate_cache_follows_the_store_and_fresh_rebuilds_it(segment, manifest, tmp_path, standins):
    """#27 item 1: the turned slices of a zarr store are rebuilt when its chunks change, and ``--fresh`` bypasses
    every cache, the turned slices' included."""
    out = tmp_path / "out"
    assert run_cli(segment, out, manifest, "--rotate", "90") == 0
    cached = out / "rotated" / "s1" / "00.npy"
    stamp = cached.stat().st_mtime_ns
    assert run_cli(segment, out, manifest, "--rotate", "90") == 0
    assert cached.stat().st_mtime_ns == stamp  # unchanged store: the cache is reused
    rewrite_in_place(segment)
    assert run_cli(segment, out, manifest, "--rotate", "90") == 0
    assert cached.stat().st_mtime_ns != stamp
    assert run_cli(segment, tmp_path / "fresh", manifest, "--rotate", "90") == 0
    np.testing.assert_array_equal(probabilities(out), probabilities(tmp_path / "fresh"))
    stamp = cached.stat().st_mtime_ns
    assert run_cli(segment, out, manifest, "--rotate", "90", "--fresh") == 0
    assert cached.stat().st_mtime_ns != stamp


def test_rotate_counts_its_cache_before_writing_it_in_units_that_show(segment, manifest, tmp_path, standins,
                                                                       monkeypatch, capsys):  # fmt: skip
    """#27 item 15: the turned slices are counted before anything is written, and the figures are readable."""
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=300_000))
    out = tmp_path / "out"
    assert run_cli(segment, out, manifest, "--rotate", "90") == 2
    line = one_error_line(capsys)
    assert "293.0 KiB free, --rotate needs 10.2 MiB" in line and "0.0 GiB" not in line
    assert not (out / "rotated").exists() or not list((out / "rotated").rglob("*.npy"))


def relayout(
    segment: Path, shape_hw: tuple[int, int], layers: int, *, last: bool, axes=None, mask: bool
) -> Path:
    """A store of ``layers`` x H x W (random data) with its layers first or last, with OME ``axes`` or without,
    with a mask or without."""
    root = segment.parent / "relaid"
    root.mkdir()
    h, w = shape_hw
    stack = np.random.default_rng(0).integers(0, 65535, (layers, h, w), dtype=np.uint16)
    array = np.moveaxis(stack, 0, 2) if last else stack
    group = zarr.open_group(str(root / "t.zarr"), mode="w")
    scale = {"datasets": [{"path": "0"}], "version": "0.4"}
    if axes is not None:
        scale["axes"] = [{"name": n, "type": "space"} for n in axes]
    group.attrs["multiscales"] = [scale]
    group.create_array("0", shape=array.shape, chunks=array.shape, dtype="uint16")[...] = array
    if mask:
        cv2.imwrite(str(root / "t_mask.png"), np.full((h, w), 255, np.uint8))
    return root


@pytest.mark.parametrize(
    ("case", "extra", "outcome"),
    [
        ("ambiguous", (), "--layer-axis first|last"),
        ("asked", ("--layer-axis", "last"), "ok"),
        ("by_the_mask", (), "ok"),
        ("by_ome_axes", (), "ok"),
        ("short_height", (), "ok"),  # a height under 65 cannot be the layers: no guess needed
    ],
)
def test_the_layer_axis_is_never_guessed(segment, manifest, tmp_path, standins, capsys, case, extra, outcome):
    """#27 item 3: layers on the last axis of an array whose height is shorter than its layer count: read the
    right way by OME-Zarr axes, ``--layer-axis`` or the mask; refused in one line naming the option otherwise."""
    h = 40 if case == "short_height" else 80
    root = relayout(segment, (h, 300), 109, last=True, axes=("y", "x", "z") if case == "by_ome_axes" else None,
                    mask=case == "by_the_mask")  # fmt: skip
    out = tmp_path / "out"
    code = run_cli(root, out, manifest, *extra)
    if outcome == "ok":
        assert code == 0
        assert report_of(out)["fragments"]["t"]["shape"] == [h, 300]
    else:
        assert code == 2 and outcome in one_error_line(capsys)


def test_a_mask_that_fits_neither_reading_blames_neither_alone(segment, manifest, tmp_path, capsys, standins):
    root = relayout(segment, (80, 300), 109, last=True, mask=True)
    cv2.imwrite(str(root / "t_mask.png"), np.full((70, 70), 255, np.uint8))
    assert run_cli(root, tmp_path / "out", manifest) == 2
    line = one_error_line(capsys)
    assert "layers first is 300x109, last 80x300" in line and "neither fits" in line


def test_chunks_missing_under_the_mask_are_named_and_can_be_refused(segment, manifest, tmp_path, standins,
                                                                    capsys, caplog):  # fmt: skip
    """#27 item 4: a chunk missing under the mask is never silent (stderr and report.json), and
    ``--missing-chunks refuse`` stops the run before compute; a missing chunk outside the mask says nothing."""
    mask = cv2.imread(str(segment / "s1_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    inside = next(
        (y, x)
        for y in range(2)
        for x in range(3)
        if mask[y * 128 : y * 128 + 128, x * 128 : x * 128 + 128].any()
    )
    chunk = segment / "s1.zarr" / "0" / "c" / "3" / str(inside[0]) / str(inside[1])
    assert chunk.is_file()
    chunk.unlink()
    out = tmp_path / "out"
    assert run_cli(segment, out, manifest) == 0
    name = f"c/3/{inside[0]}/{inside[1]}"
    assert report_of(out)["fragments"]["s1"]["missing_chunks"] == [name]
    assert any(name in r.getMessage() for r in caplog.records if r.levelname == "WARNING")  # on stderr
    assert run_cli(segment, tmp_path / "strict", manifest, "--missing-chunks", "refuse") == 2
    line = one_error_line(capsys)
    assert "1 chunk(s) under the mask missing" in line and name in line
    assert not (tmp_path / "strict" / "partials").exists()


def test_a_chunk_that_cannot_be_decoded_is_one_line_naming_it(segment, manifest, tmp_path, standins, capsys):
    """#27 item 5: garbage in a chunk met mid-compute: one line naming the store and the chunk, exit 2, the report
    ending in its status (no traceback)."""
    mask = cv2.imread(str(segment / "s1_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    y, x = next(
        (y, x)
        for y in range(2)
        for x in range(3)
        if mask[y * 128 : y * 128 + 128, x * 128 : x * 128 + 128].any()
    )
    chunk = segment / "s1.zarr" / "0" / "c" / "4" / str(y) / str(x)
    chunk.write_bytes(np.random.default_rng(1).bytes(chunk.stat().st_size))
    out = tmp_path / "out"
    assert run_cli(segment, out, manifest) == 2
    line = one_error_line(capsys)
    assert str(segment / "s1.zarr") in line and f"chunk c/4/{y}/{x} cannot be read" in line
    assert report_of(out)["status"] == "failed"


def test_the_chunk_listing_follows_the_store_format(tmp_path: Path) -> None:
    """Chunk names of zarr v2 (``.`` separated) and v3 (``c/`` and ``/``) are read as indices."""
    from ink_infer.volumes.zarr_open import open_zarr_array
    from ink_infer.volumes.zarr_store import chunk_files

    for fmt in (2, 3):
        path = tmp_path / f"v{fmt}.zarr"
        a = zarr.create_array(
            str(path), shape=(70, 64, 96), chunks=(35, 32, 32), dtype="uint16", zarr_format=fmt
        )
        a[...] = 1
        _, layout = open_zarr_array(path, layer_axis="first")
        assert sorted(chunk_files(layout)) == [
            (z, y, x) for z in range(2) for y in range(2) for x in range(3)
        ]
    assert json.loads((tmp_path / "v3.zarr" / "zarr.json").read_text())["zarr_format"] == 3
