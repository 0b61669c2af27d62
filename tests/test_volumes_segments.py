"""Scroll segments: the same pixels in the segment layout (``layers/*.tif``), in zarr volumes (layers first or last,
uint8 or uint16, chunks smaller than a window), as longer stacks (``--layers``, the centred default), reversed
(``--reverse-layers``) give the very sums of the Kaggle layout; bad segments exit 2 with one line."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from ink_infer.volumes.segments import LayerChoice
from tests.helpers import one_error_line, report_of, run_cli

zarr = pytest.importorskip("zarr")


def kaggle_fragment(data: Path, tmp_path: Path, *, uint8_levels: bool = False) -> tuple[Path, np.ndarray]:
    """Fragment ``a`` of the shared set in a folder of its own, and its ``(65, H, W)`` stack. ``uint8_levels``:
    its slices rewritten as multiples of 257 (the uint16 image of uint8 data)."""
    src = data / "test" / "a"
    stack = np.stack([tifffile.imread(src / "surface_volume" / f"{z:02d}.tif") for z in range(65)])
    frag = tmp_path / "kaggle" / "a"
    shutil.copytree(src, frag)
    if uint8_levels:
        stack = (stack >> 8).astype(np.uint16) * 257
        for z in range(65):
            tifffile.imwrite(frag / "surface_volume" / f"{z:02d}.tif", stack[z])
    return frag, stack


def write_layers(seg: Path, layers: np.ndarray, mask_from: Path) -> Path:
    (seg / "layers").mkdir(parents=True)
    for i, layer in enumerate(layers):
        tifffile.imwrite(seg / "layers" / f"{i:02d}.tif", layer)
    shutil.copy(mask_from / "mask.png", seg / f"{seg.name}_mask.png")
    return seg


def padded(stack: np.ndarray, before: int, after: int, seed: int = 1) -> np.ndarray:
    """The stack with layers of other data above and below (a longer scan)."""
    rng = np.random.default_rng(seed)
    extra = lambda n: rng.integers(0, 65535, size=(n, *stack.shape[1:]), dtype=np.uint16)  # noqa: E731
    return np.concatenate([extra(before), stack, extra(after)])


def sums(out: Path) -> dict[str, np.ndarray]:
    """Each (model, fragment) partial's stored sums, by file name."""
    found = {}
    for f in sorted((out / "partials").glob("*.npz")):
        with np.load(f, allow_pickle=False) as z:
            found[f.name] = z["values"]
    assert found
    return found


@pytest.fixture
def reference_sums(data, manifest, tmp_path, standins):
    frag, stack = kaggle_fragment(data, tmp_path)
    assert run_cli(frag, tmp_path / "kaggle_out", manifest) == 0
    return frag, stack, sums(tmp_path / "kaggle_out")


def run_segment(data_path: Path, tmp_path: Path, manifest: Path, *extra: str) -> dict[str, np.ndarray]:
    out = tmp_path / "seg_out"
    assert run_cli(data_path, out, manifest, *extra) == 0
    return sums(out)


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize(
    ("before", "after", "extra"),
    [(0, 0, ()), (7, 8, ()), (3, 12, ("--layers", "3:68"))],
    ids=["65_layers", "80_centred", "80_with_layers"],
)
def test_the_segment_layout_gives_the_kaggle_sums(reference_sums, manifest, tmp_path, before, after, extra):
    frag, stack, want = reference_sums
    seg = write_layers(tmp_path / "segs" / "a", padded(stack, before, after), frag)
    assert_same(run_segment(seg.parent, tmp_path, manifest, *extra), want)
    rep = report_of(tmp_path / "seg_out")
    assert rep["options"]["layers"] == ([3, 68] if extra else None)


def test_reversed_layers_read_back_in_the_models_order(reference_sums, manifest, tmp_path):
    frag, stack, want = reference_sums
    # depth runs the other way: files 8..72 hold slices 64..0 (--layers numbers the files, then the pick turns)
    seg = write_layers(tmp_path / "segs" / "a", padded(stack, 7, 8)[::-1], frag)
    got = run_segment(seg.parent, tmp_path, manifest, "--layers", "8:73", "--reverse-layers")
    # partials are per direction: the reversed segment's are named a.reverse (test_volumes_direction.py)
    by_model = lambda found: {name.split(".")[0]: v for name, v in found.items()}  # noqa: E731
    assert all(".a.reverse." in name for name in got)
    assert_same(by_model(got), by_model(want))
    assert report_of(tmp_path / "seg_out")["options"]["reverse_layers"] is True


def test_uint8_layers_give_the_probabilities_of_the_same_data_times_257(data, manifest, tmp_path, standins):
    frag, stack = kaggle_fragment(data, tmp_path, uint8_levels=True)
    assert run_cli(frag, tmp_path / "kaggle_out", manifest) == 0
    seg = write_layers(tmp_path / "segs" / "a", (stack // 257).astype(np.uint8), frag)
    assert_same(run_segment(seg.parent, tmp_path, manifest), sums(tmp_path / "kaggle_out"))


@pytest.mark.parametrize(
    ("axis", "dtype"), [("first", "uint16"), ("last", "uint16"), ("first", "uint8"), ("last", "uint8")]
)
def test_zarr_volumes_give_the_kaggle_sums(data, manifest, tmp_path, standins, axis, dtype):
    frag, stack = kaggle_fragment(data, tmp_path, uint8_levels=dtype == "uint8")
    assert run_cli(frag, tmp_path / "kaggle_out", manifest) == 0
    layers = padded(stack, 7, 8) if dtype == "uint16" else stack // 257
    layers = layers.astype(dtype)
    arr = layers if axis == "first" else np.moveaxis(layers, 0, 2)
    root = tmp_path / "segs"
    root.mkdir()
    chunks = (5, 40, 40) if axis == "first" else (40, 40, 5)  # smaller than a window, across the layers too
    group = zarr.open_group(str(root / "a.zarr"), mode="w")
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}]}]
    group.create_array("0", shape=arr.shape, chunks=chunks, dtype=dtype)[...] = arr
    shutil.copy(frag / "mask.png", root / "a_mask.png")
    assert_same(run_segment(root, tmp_path, manifest), sums(tmp_path / "kaggle_out"))


def test_a_plain_zarr_array_reads_too(reference_sums, manifest, tmp_path):
    frag, stack, want = reference_sums
    root = tmp_path / "segs"
    root.mkdir()
    zarr.create_array(str(root / "a.zarr"), shape=stack.shape, chunks=(65, 64, 64), dtype="uint16")[...] = (
        stack
    )
    shutil.copy(frag / "mask.png", root / "a.zarr" / "mask.png")
    assert_same(run_segment(root, tmp_path, manifest), want)


def test_layer_choice_centres_reverses_and_refuses():
    assert LayerChoice().pick(80, "s") == tuple(range(7, 72))
    assert LayerChoice((0, 65), reverse=True).pick(65, "s") == tuple(range(64, -1, -1))
    with pytest.raises(Exception, match="60 layers, the models need 65"):
        LayerChoice().pick(60, "s")


@pytest.mark.parametrize("case", ["2d_zarr", "few_layers", "layers_out_of_range", "no_zarr_package"])
def test_bad_segments_exit_2_with_one_line_and_no_outputs(
    case, data, manifest, tmp_path, standins, monkeypatch, capsys
):
    frag, stack = kaggle_fragment(data, tmp_path)
    root = tmp_path / "segs"
    extra: tuple[str, ...] = ()
    if case == "2d_zarr":
        root.mkdir()
        zarr.create_array(str(root / "a.zarr"), shape=stack.shape[1:], dtype="uint16")[...] = stack[0]
        needle = "a 2-D array"
    elif case == "few_layers":
        write_layers(root / "a", stack[:60], frag)
        needle = "60 layers, the models need 65"
    elif case == "layers_out_of_range":
        write_layers(root / "a", padded(stack, 7, 8), frag)
        extra, needle = ("--layers", "30:95"), "--layers 30:95, expected 65 layers within 0:80"
    else:
        root.mkdir()
        zarr.create_array(str(root / "a.zarr"), shape=stack.shape, dtype="uint16")[...] = stack
        monkeypatch.setitem(sys.modules, "zarr", None)  # as if the extra were not installed
        needle = "pip install 'ink_infer[zarr]'"
    out = tmp_path / "out"
    assert run_cli(root, out, manifest, *extra) == 2
    assert needle in one_error_line(capsys)
    assert not (out / "submission.csv").exists() and not (out / "partials").exists()


def test_probability_tiffs_read_back_as_the_partials_quantised(reference_sums, manifest, tmp_path, capsys):
    """A segment run writes OUT/probabilities/<id>.tif (by default, for segments) and OUT/masks/<id>.png; each
    model's TIFF (--save-model-maps) is its partial's ``sum / count`` quantised to uint8, the ensemble's their
    weighted mean, and the mask PNG the submission's."""
    from ink_infer.engine.stitch import finalize
    from ink_infer.engine.tiling import image_of
    from ink_infer.manifest import load_manifest
    from ink_infer.outputs.maps import quantised
    from ink_infer.outputs.rle import read_submission, rle_decode
    from ink_infer.run.plan import model_count, plan_fragment
    from ink_infer.volumes.discovery import find_fragments

    frag, stack, _ = reference_sums
    seg = write_layers(tmp_path / "segs" / "a", stack, frag)
    out = tmp_path / "seg_out"
    assert run_cli(seg.parent, out, manifest, "--save-model-maps") == 0
    plan = plan_fragment(find_fragments(seg.parent)[0][0], stride=64, tta="scheduled")
    probs = []
    for spec in load_manifest(manifest).models:
        (partial,) = (out / "partials").glob(f"{spec.name}.a.*.npz")
        with np.load(partial, allow_pickle=False) as z:
            sum_map = image_of(z["values"].astype(np.int64), z["covered"])
        probs.append(finalize(sum_map, model_count(plan, spec), plan.mask))
        tif = tifffile.TiffFile(out / "probabilities" / f"a.{spec.name}.tif")
        assert tif.pages[0].is_tiled and tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        np.testing.assert_array_equal(tif.asarray(), quantised(probs[-1]))
    ensemble = tifffile.imread(out / "probabilities" / "a.tif")
    np.testing.assert_array_equal(ensemble, quantised(np.float32(sum(probs)) / np.float32(len(probs))))
    ink = rle_decode(dict(read_submission(out / "submission.csv"))["a"], stack.shape[1:])
    import cv2

    np.testing.assert_array_equal(cv2.imread(str(out / "masks" / "a.png"), cv2.IMREAD_GRAYSCALE) > 0, ink)
    assert sorted(report_of(out)["submission"]["maps"]) == [
        str(out / "masks" / "a.png"),
        str(out / "probabilities" / "a.tif"),
    ]


def test_kaggle_runs_write_no_probability_maps_unless_asked(reference_sums, manifest, tmp_path):
    frag, _, _ = reference_sums
    assert not (tmp_path / "kaggle_out" / "probabilities").exists()
    assert run_cli(frag, tmp_path / "asked", manifest, "--save-probabilities") == 0
    assert tifffile.imread(tmp_path / "asked" / "probabilities" / "a.tif").dtype == np.uint8


@pytest.mark.parametrize("angle", [90, 180, 270])
def test_rotate_turns_the_input_and_the_outputs_back(data, manifest, tmp_path, standins, angle):
    """--rotate N on a fragment turned by -N gives the probabilities of the upright fragment, turned back: the
    submission and the probability map are the upright run's."""
    from ink_infer.volumes.rotation import turn

    frag, stack = kaggle_fragment(data, tmp_path)
    assert run_cli(frag, tmp_path / "upright", manifest, "--save-probabilities") == 0
    import cv2

    sideways = tmp_path / "sideways" / "a"
    (sideways / "surface_volume").mkdir(parents=True)
    for z in range(65):  # the fragment as stored turned back by N: --rotate N makes it upright for the models
        tifffile.imwrite(
            sideways / "surface_volume" / f"{z:02d}.tif", np.ascontiguousarray(turn(stack[z], -angle))
        )
    mask = cv2.imread(str(frag / "mask.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(sideways / "mask.png"), np.ascontiguousarray(turn(mask, -angle)))
    out = tmp_path / "turned"
    assert run_cli(sideways, out, manifest, "--rotate", str(angle), "--save-probabilities") == 0
    assert_same(sums(out), sums(tmp_path / "upright"))  # the models saw the upright fragment
    want = tifffile.imread(tmp_path / "upright" / "probabilities" / "a.tif")
    np.testing.assert_array_equal(tifffile.imread(out / "probabilities" / "a.tif"), turn(want, -angle))
    assert (out / "rotated" / "a" / "source.json").is_file()
    assert report_of(out)["options"]["rotate"] == angle


def test_rotate_without_room_for_the_turned_slices_is_one_line(
    data, manifest, tmp_path, standins, monkeypatch, capsys
):
    import shutil as sh

    from ink_infer.volumes import rotation

    frag, _ = kaggle_fragment(data, tmp_path)
    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(rotation.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    out = tmp_path / "out"
    assert run_cli(frag, out, manifest, "--rotate", "90") == 2
    assert "--rotate needs" in one_error_line(capsys) and not (out / "submission.csv").exists()


@pytest.fixture(scope="module")
def tall(tmp_path_factory) -> Path:
    """Fragment ``t`` (700 rows: two stripes of windows, so two row ranges once it counts as large) and ``s``."""
    from ink_infer.synthetic.fragments import write_dataset

    return write_dataset(tmp_path_factory.mktemp("tall"), test=[("t", 700, 160), ("s", 150, 160)], seed=9)


@pytest.mark.parametrize("angle", [0, 90])
def test_a_large_fragment_spills_to_disk_and_gives_the_bytes_of_memory(
    tall, manifest, tmp_path, standins, monkeypatch, angle
):
    """A fragment past ``geometry.LARGE_PIXELS`` runs as row ranges bounded in area, its units' sums go through
    the partials and its ensemble map lives in a file read by bands: submission, probability TIFFs (ensemble and
    per model), ink PNG and preview are those of the same run held in memory, turned back or not, and the
    spilled maps are gone afterwards."""
    import cv2

    from ink_infer import geometry
    from ink_infer.outputs.raster import Raster
    from ink_infer.run import partials

    extra = ("--save-probabilities", "--save-model-maps", "--rotate", str(angle), "--unit-windows", "100000")
    assert run_cli(tall, tmp_path / "memory", manifest, *extra) == 0
    spilled, loads = [], []
    real_add, real_load = Raster.add, partials.PartialStore.load

    def add(self, y0, values):
        spilled.append(self.on_disk)
        real_add(self, y0, values)

    def load(self, unit):
        loads.append(unit.fragment.id)
        return real_load(self, unit)

    monkeypatch.setattr(Raster, "add", add)
    monkeypatch.setattr(partials.PartialStore, "load", load)
    monkeypatch.setattr(geometry, "LARGE_PIXELS", 50_000)  # t (112,000 px) is large, s (24,000 px) is not
    out = tmp_path / "disk"
    assert run_cli(tall, out, manifest, *extra, "--fresh") == 0
    report = report_of(out)
    units = list(report["models"][0]["fragments"])
    # split by area alone (--unit-windows is far off): t's two stripes of window rows, or turned, its one
    ranges = ["t@0-16", "t@16-32"] if angle == 0 else ["t@0-16"]
    assert units == [*ranges, "s"], units
    assert any(spilled) and not all(spilled)  # t's map on disk, s's in memory
    assert sorted(set(loads)) == ranges  # t's sums read back from its partials to be merged
    assert report["disk"]["spilled_maps_bytes"] == 2 * 700 * 160 * 4  # the ensemble's and one model's map
    assert not list((out / "partials").glob("maps.*"))
    assert (out / "submission.csv").read_bytes() == (tmp_path / "memory" / "submission.csv").read_bytes()
    tiffs = sorted(p.name for p in (out / "probabilities").iterdir())
    assert len(tiffs) == 2 * 3  # per fragment: the ensemble's and two models'
    for name in tiffs:
        np.testing.assert_array_equal(
            tifffile.imread(out / "probabilities" / name),
            tifffile.imread(tmp_path / "memory" / "probabilities" / name),
        )
    for name in ("masks/t.png", "previews/t.png"):
        np.testing.assert_array_equal(
            cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED),
            cv2.imread(str(tmp_path / "memory" / name), cv2.IMREAD_UNCHANGED),
        )
    assert cv2.imread(str(out / "masks" / "t.png"), cv2.IMREAD_UNCHANGED).shape == (700, 160)  # as stored
