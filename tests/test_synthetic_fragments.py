"""The synthetic Kaggle-layout dataset: layout, determinism, where the ink signal lives, the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from ink_infer.synthetic.fragments import main, write_dataset, write_fragment
from ink_infer.synthetic.maps import SURFACE_RANGE, make_maps

TRAIN = [("1", 96, 80), ("2", 64, 72)]
TEST = [("b", 72, 64), ("a", 64, 96)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("syn"), train=TRAIN, test=TEST, seed=5)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_layout_is_kaggle_like(dataset: Path) -> None:
    assert dataset.name == "vesuvius-challenge-ink-detection"
    for split, specs, extra in (("train", TRAIN, {"inklabels.png", "ir.png"}), ("test", TEST, set())):
        assert sorted(p.name for p in (dataset / split).iterdir()) == sorted(i for i, _, _ in specs)
        for frag_id, h, w in specs:
            frag = dataset / split / frag_id
            assert {p.name for p in frag.iterdir()} == {"surface_volume", "mask.png"} | extra
            names = sorted(p.name for p in (frag / "surface_volume").iterdir())
            assert names == [f"{z:02d}.tif" for z in range(65)]
            with tifffile.TiffFile(frag / "surface_volume" / "33.tif") as tif:
                page = tif.pages[0]
                assert len(tif.pages) == 1 and page.shape == (h, w) and page.dtype == np.uint16
                assert page.is_memmappable and len(page.dataoffsets) == 1  # one uncompressed strip
            for png in {"mask.png"} | extra:
                image = cv2.imread(str(frag / png), cv2.IMREAD_UNCHANGED)
                assert image.shape == (h, w) and image.dtype == np.uint8
            assert set(np.unique(cv2.imread(str(frag / "mask.png"), 0))) <= {0, 255}
    with open(dataset / "sample_submission.csv", newline="") as fh:
        assert list(csv.reader(fh)) == [["Id", "Predicted"], ["b", "1 1"], ["a", "1 1"]]
    truth = dataset.parent / "ground_truth"
    assert sorted(p.name for p in truth.iterdir()) == ["a.png", "b.png"]


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, dataset: Path) -> None:
    again = write_dataset(tmp_path / "again", train=TRAIN, test=TEST, seed=5)
    assert tree_bytes(again.parent) == tree_bytes(dataset.parent)
    other = write_dataset(tmp_path / "other", train=TRAIN, test=TEST, seed=6)
    a, b = tree_bytes(other.parent), tree_bytes(dataset.parent)
    assert a.keys() == b.keys()
    assert (
        a["vesuvius-challenge-ink-detection/train/1/surface_volume/30.tif"]
        != b["vesuvius-challenge-ink-detection/train/1/surface_volume/30.tif"]
    )
    assert a["ground_truth/a.png"] != b["ground_truth/a.png"]


def test_labels_inside_an_irregular_mask(dataset: Path) -> None:
    frag = dataset / "train" / "1"
    mask = cv2.imread(str(frag / "mask.png"), 0) > 0
    ink = cv2.imread(str(frag / "inklabels.png"), 0) > 0
    assert ink.any() and not (ink & ~mask).any()
    assert 0.2 < mask.mean() < 0.95  # a blob, not the whole image
    rows = np.flatnonzero(mask.any(axis=1))
    box = mask[rows[0] : rows[-1] + 1]
    assert box.mean() < 0.95  # not a rectangle either
    volume = tifffile.imread(frag / "surface_volume" / "30.tif")
    assert (volume[~mask] == 0).all() and (volume[mask] > 0).all()
    assert 20000 < np.median(volume[mask]) < 40000  # papyrus levels near the surface


def test_ink_signal_lives_in_the_middle_slices(tmp_path: Path) -> None:
    frag = tmp_path / "f"
    write_fragment(frag, height=160, width=160, seed=11, with_labels=True)
    mask = cv2.imread(str(frag / "mask.png"), 0) > 0
    ink = cv2.imread(str(frag / "inklabels.png"), 0) > 0
    assert ink.sum() > 200

    def contrast(z: int) -> float:
        image = tifffile.imread(frag / "surface_volume" / f"{z:02d}.tif").astype(np.float64)
        return abs(image[ink].mean() - image[mask & ~ink].mean())

    band = max(contrast(z) for z in range(25, 41))
    outer = max(contrast(z) for z in [*range(0, 6), *range(60, 65)])
    assert band > 1000 and band > 10 * outer


def test_surface_is_not_flat() -> None:
    maps = make_maps(np.random.default_rng(0), 128, 96)
    lo, hi = SURFACE_RANGE
    assert maps.surface.dtype == np.float32
    assert maps.surface.min() >= lo - 1e-3 and maps.surface.max() <= hi + 1e-3
    assert np.ptp(maps.surface) > 0.8 * (hi - lo)


def test_compressed_and_tiled_variants(tmp_path: Path) -> None:
    write_fragment(tmp_path / "z", height=70, width=50, seed=1, with_labels=False, compression="zlib")
    write_fragment(tmp_path / "t", height=70, width=50, seed=1, with_labels=False, tile=(32, 16))
    plain = tmp_path / "p"
    write_fragment(plain, height=70, width=50, seed=1, with_labels=False)
    with tifffile.TiffFile(tmp_path / "z/surface_volume/40.tif") as tif:
        assert tif.pages[0].compression == 8 and len(tif.pages[0].dataoffsets) > 1
    with tifffile.TiffFile(tmp_path / "t/surface_volume/40.tif") as tif:
        assert tif.pages[0].is_tiled
    expected = tifffile.imread(plain / "surface_volume/40.tif")
    for variant in ("z", "t"):
        assert np.array_equal(tifffile.imread(tmp_path / variant / "surface_volume/40.tif"), expected)


def test_test_labels_flag_puts_labels_in_test(tmp_path: Path) -> None:
    comp = write_dataset(tmp_path, test=[("a", 48, 48)], seed=0, test_labels=True)
    truth = cv2.imread(str(tmp_path / "ground_truth" / "a.png"), 0)
    assert np.array_equal(cv2.imread(str(comp / "test/a/inklabels.png"), 0), truth)


def test_cli_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([str(tmp_path), "--train", "1", "--train-size", "40x48", "--test", "q:32x40", "--seed", "2"])
    assert code == 0
    comp = Path(capsys.readouterr().out.strip())
    assert tifffile.imread(comp / "train/1/surface_volume/00.tif").shape == (40, 48)
    assert tifffile.imread(comp / "test/q/surface_volume/64.tif").shape == (32, 40)


@pytest.mark.parametrize(
    "args",
    [
        ["--test", "a:12by40"],
        ["--test", "a"],
        ["--train-size", "0x40"],
        ["--train", "-1"],
        ["--tile", "20"],
        ["--compression", "lzma"],
        ["--seed", "x"],
        ["--test", "a/b:32x32"],
    ],
)
def test_cli_bad_args_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    assert main([str(tmp_path), "--train", "0", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("layout", ["segment", "zarr"])
def test_segments_are_written_into_a_folder_that_does_not_exist_yet(
    tmp_path: Path, layout: str, capsys
) -> None:
    """The README's own example (``--layout zarr`` into a new folder): the segments' folder is made first."""
    pytest.importorskip("zarr")
    out = tmp_path / "new" / "seg_demo"
    assert main([str(out), "--layout", layout, "--test", "s1:96x128"]) == 0
    seg = out / "segments" / ("s1.zarr" if layout == "zarr" else "s1")
    assert seg.is_dir() and (out / "ground_truth" / "s1.png").is_file()
    assert (out / "segments" / "s1_mask.png").is_file() or (seg / "s1_mask.png").is_file()
