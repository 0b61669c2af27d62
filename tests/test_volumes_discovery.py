"""Finding fragments, checking volumes at open, reading bands, masks and labels; one test per kind of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from ink_infer.errors import UserError
from ink_infer.synthetic.fragments import write_dataset
from ink_infer.volumes.discovery import find_fragments
from ink_infer.volumes.fragment import Fragment
from ink_infer.volumes.masks import load_labels, load_mask
from ink_infer.volumes.tiff_stack import Volume

H, W = 50, 56


@pytest.fixture
def comp(tmp_path: Path) -> Path:
    """A competition folder with test fragments b, a (in that csv order) and training fragment 1."""
    return write_dataset(tmp_path / "input", train=[("1", 40, 48)], test=[("b", H, W), ("a", H, W)], seed=1)


def frag(comp: Path, frag_id: str = "a") -> Fragment:
    return Fragment(frag_id, comp / "test" / frag_id)


def slice_path(comp: Path, z: int, frag_id: str = "a") -> Path:
    return comp / "test" / frag_id / "surface_volume" / f"{z:02d}.tif"


def stack(comp: Path, frag_id: str = "a") -> np.ndarray:
    return np.stack([tifffile.imread(slice_path(comp, z, frag_id)) for z in range(65)])


# --- find_fragments -------------------------------------------------------------------------------------------


def test_finds_test_fragments_in_csv_order_from_input_or_competition_folder(comp: Path) -> None:
    for data in (comp.parent, comp):
        fragments, warnings = find_fragments(data)
        assert [f.id for f in fragments] == ["b", "a"] and warnings == []
        assert fragments[1] == Fragment("a", comp / "test" / "a")


def test_competition_folder_one_level_deeper(tmp_path: Path) -> None:
    write_dataset(tmp_path / "input" / "competitions", test=[("a", 32, 32)], seed=0)
    (tmp_path / "input" / "datasets" / "weights").mkdir(parents=True)  # other inputs sit alongside
    fragments, _ = find_fragments(tmp_path / "input")
    assert [f.path for f in fragments] == [
        tmp_path / "input/competitions/vesuvius-challenge-ink-detection/test/a"
    ]


def test_train_split(comp: Path) -> None:
    fragments, warnings = find_fragments(comp.parent, split="train")
    assert fragments == [Fragment("1", comp / "train" / "1")] and warnings == []


def test_folder_of_fragments_sorted_with_warning(comp: Path) -> None:
    fragments, warnings = find_fragments(comp / "test")
    assert [f.id for f in fragments] == ["a", "b"]
    assert len(warnings) == 1 and "sample_submission.csv" in warnings[0]


def test_single_fragment_folder(comp: Path) -> None:
    assert find_fragments(comp / "test" / "a") == ([frag(comp)], [])


def test_missing_sample_submission_sorted_with_warning(comp: Path) -> None:
    (comp / "sample_submission.csv").unlink()
    fragments, warnings = find_fragments(comp.parent)
    assert [f.id for f in fragments] == ["a", "b"]
    assert any("sample_submission.csv" in w and "sorted" in w for w in warnings)


def test_sample_submission_naming_a_missing_fragment(comp: Path) -> None:
    (comp / "sample_submission.csv").write_text("Id,Predicted\nb,1 1\nc,1 1\na,1 1\n")
    with pytest.raises(UserError, match=r"sample_submission\.csv: row 'c'"):
        find_fragments(comp)


def test_no_fragments(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no test fragments"):
        find_fragments(tmp_path / "empty")


# --- Volume: reading --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "mapped"),
    [({}, True), ({"compression": "zlib"}, False), ({"tile": (16, 32)}, False), ({"tile": (32, 16), "compression": "zlib"}, False)],
)  # fmt: skip
def test_read_band_matches_tifffile(tmp_path: Path, options: dict, mapped: bool) -> None:
    comp = write_dataset(tmp_path, test=[("a", H, W)], seed=2, **options)
    expected = stack(comp)
    with Volume(frag(comp)) as vol:
        assert vol.memmapped is mapped
        assert vol.shape == (65, H, W) and (vol.height, vol.width) == (H, W) and vol.dtype == np.uint16
        assert np.array_equal(vol.read_band(0, H, 0, 65), expected)
        assert np.array_equal(vol.read_band(7, 31, 20, 45), expected[20:45, 7:31])
        # past the bottom: the rows that exist, then zeros
        band = vol.read_band(H - 9, H + 23, 30, 33)
        assert band.shape == (3, 32, W)
        assert np.array_equal(band[:, :9], expected[30:33, H - 9 :]) and not band[:, 9:].any()
        assert not vol.read_band(H + 5, H + 10, 0, 2).any()


def test_read_band_fills_the_given_buffer(comp: Path) -> None:
    out = np.full((4, 20, W), 7, np.uint16)
    with Volume(frag(comp)) as vol:
        result = vol.read_band(40, 60, 10, 14, out=out)
        assert result is out
        assert np.array_equal(out[:, :10], stack(comp)[10:14, 40:]) and not out[:, 10:].any()
        with pytest.raises(ValueError):
            vol.read_band(0, 10, 0, 4, out=out)


def test_corrupt_data_found_during_read_band(tmp_path: Path) -> None:
    comp = write_dataset(tmp_path, test=[("a", H, W)], seed=2, compression="zlib")
    path = slice_path(comp, 20)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\xff" * count  # the first strip, checked at open, stays intact
    path.write_bytes(bytes(data))
    with Volume(frag(comp)) as vol:
        vol.read_band(0, 5, 0, 65)
        with pytest.raises(UserError, match=r"test/a/surface_volume/20\.tif: cannot decode"):
            vol.read_band(H - 5, H, 0, 65)


# --- Volume: bad inputs, all found at open ---------------------------------------------------------------------


def open_error(comp: Path, **kwargs: object) -> str:
    with pytest.raises(UserError) as info:
        Volume(frag(comp), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_slice(comp: Path) -> None:
    slice_path(comp, 17).unlink()
    assert "missing 17.tif" in open_error(comp)


def test_extra_slice(comp: Path) -> None:
    shutil.copy(slice_path(comp, 3), slice_path(comp, 65))
    shutil.copy(slice_path(comp, 3), slice_path(comp, 3).with_suffix(".tiff"))  # 03.tif and 03.tiff
    message = open_error(comp)
    assert all(part in message for part in ("test/a/surface_volume", "extra", "65.tif", "03.tiff"))


def test_hidden_and_unrelated_files_are_ignored(comp: Path) -> None:
    (comp / "test/a/surface_volume/.DS_Store").write_bytes(b"junk")
    (comp / "test/a/surface_volume/notes.txt").write_text("scan notes")
    with Volume(frag(comp)) as vol:
        assert vol.warnings == ["test/a/surface_volume/notes.txt: not a slice, ignored"]


def test_slice_of_another_shape(comp: Path) -> None:
    tifffile.imwrite(slice_path(comp, 37), np.zeros((H, W - 4), np.uint16))
    assert open_error(comp) == f"test/a/surface_volume/37.tif: {H}x{W - 4}, other slices {H}x{W}"


def test_slice_of_another_dtype(comp: Path) -> None:
    tifffile.imwrite(
        slice_path(comp, 12), np.zeros((H, W), np.uint8)
    )  # uint8 is fine, but not mixed with uint16
    assert open_error(comp) == "test/a/surface_volume/12.tif: dtype uint8, other slices uint16"
    tifffile.imwrite(slice_path(comp, 12), np.zeros((H, W), np.float32))
    assert open_error(comp) == "test/a/surface_volume/12.tif: dtype float32, expected uint16 or uint8"


def test_truncated_tiff(comp: Path) -> None:
    path = slice_path(comp, 40)
    path.write_bytes(path.read_bytes()[: H * W])  # half the pixel data
    message = open_error(comp)
    assert message.startswith("test/a/surface_volume/40.tif: truncated")


def test_corrupt_tiff(comp: Path) -> None:
    slice_path(comp, 8).write_bytes(np.random.default_rng(0).bytes(4000))
    assert open_error(comp).startswith("test/a/surface_volume/08.tif: not a readable TIFF")


def test_non_tiff_named_as_slice(comp: Path) -> None:
    ok, png = cv2.imencode(".png", np.zeros((H, W), np.uint16))
    slice_path(comp, 50).write_bytes(png.tobytes())
    assert open_error(comp).startswith("test/a/surface_volume/50.tif: not a readable TIFF")


def test_symlinked_slice_outside_the_data_folder_is_followed_and_a_broken_one_refused(
    comp: Path, tmp_path: Path
):
    """#27 item 20 reverses the old refusal: the data folder is the user's, links to other disks are read."""
    outside = tmp_path / "elsewhere" / "05.tif"
    outside.parent.mkdir()
    shutil.move(slice_path(comp, 5), outside)
    slice_path(comp, 5).symlink_to(outside)
    with Volume(frag(comp)) as vol:
        assert np.array_equal(vol.read_band(0, H, 5, 6)[0], tifffile.imread(outside))
    outside.unlink()
    message = open_error(comp)
    assert "test/a/surface_volume/05.tif" in message and "broken symlink" in message


# --- masks and labels -------------------------------------------------------------------------------------------


def test_load_mask(comp: Path) -> None:
    mask, warning = load_mask(frag(comp), (65, H, W))
    assert warning is None and mask.dtype == bool and mask.shape == (H, W)
    assert np.array_equal(mask, cv2.imread(str(comp / "test/a/mask.png"), 0) > 0)


def test_missing_mask_uses_every_pixel_with_warning(comp: Path) -> None:
    (comp / "test/a/mask.png").unlink()
    mask, warning = load_mask(frag(comp), (H, W))
    assert mask.all() and mask.shape == (H, W)
    assert warning is not None and "test/a/mask.png" in warning


def test_mask_of_another_shape(comp: Path) -> None:
    cv2.imwrite(str(comp / "test/a/mask.png"), np.full((H, W - 6), 255, np.uint8))
    with pytest.raises(UserError) as info:
        load_mask(frag(comp), (65, H, W))
    assert str(info.value) == f"test/a/mask.png: {H}x{W - 6}, slices {H}x{W}"


def test_unreadable_mask(comp: Path) -> None:
    (comp / "test/a/mask.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"test/a/mask\.png: not a readable image"):
        load_mask(frag(comp), (H, W))


def test_load_labels(comp: Path) -> None:
    train = Fragment("1", comp / "train" / "1")
    labels = load_labels(train, (40, 48))
    assert labels.dtype == bool and labels.any()
    truth = load_labels(comp.parent / "ground_truth" / "a.png", (H, W))
    assert truth.shape == (H, W) and truth.any()
    with pytest.raises(UserError, match=r"test/a/inklabels\.png: missing"):
        load_labels(frag(comp), (H, W))
    with pytest.raises(UserError, match=r"train/1/inklabels\.png: 40x48, slices 40x50"):
        load_labels(train, (40, 50))


def test_our_own_output_folders_in_the_data_folder_are_skipped_quietly(
    tmp_path: Path, manifest, standins, caplog
):
    """#27 item 13: a rerun with --out equal to --data finds the segments again, and no warning about the folders
    the first run wrote there (partials/, previews/, probabilities/, masks/)."""
    import logging

    from ink_infer.synthetic.fragments import write_segment
    from tests.helpers import run_cli

    segs = tmp_path / "segs"
    write_segment(segs, "s1", shape=(96, 128), seed=3)
    assert run_cli(segs, segs, manifest) == 0
    assert {"partials", "previews", "probabilities", "masks"} <= {p.name for p in segs.iterdir()}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run_cli(segs, segs, manifest) == 0
    assert not [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    fragments, warnings = find_fragments(segs)
    assert [f.id for f in fragments] == ["s1"] and warnings == []


def test_no_fragment_found_names_the_three_layouts(tmp_path: Path) -> None:
    """#27 item 17: the message names every layout --data accepts, not the Kaggle one alone."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        find_fragments(tmp_path / "empty")
    assert "surface_volume/" in str(e.value) and "layers/" in str(e.value) and ".zarr" in str(e.value)


def test_two_different_masks_of_a_segment_say_which_is_used(tmp_path: Path) -> None:
    """#27 item 17: ``<seg>_mask.png`` and ``mask.png`` both there and different: the one used is named."""
    from ink_infer.synthetic.fragments import write_segment

    seg = write_segment(tmp_path / "segs", "s1", shape=(64, 96), seed=3)
    ours = seg / "s1_mask.png"
    other = np.zeros((64, 96), np.uint8)
    other[:32] = 255
    cv2.imwrite(str(seg / "mask.png"), other)
    (fragment,), _ = find_fragments(seg)
    mask, note = load_mask(fragment, (64, 96))
    assert (mask == (cv2.imread(str(ours), cv2.IMREAD_GRAYSCALE) > 0)).all()
    assert note is not None and "s1/s1_mask.png is used as the mask" in note and "mask.png differs" in note
    shutil.copy(ours, seg / "mask.png")  # the same picture twice: nothing to say
    assert load_mask(fragment, (64, 96))[1] is None
