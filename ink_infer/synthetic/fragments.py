"""Synthetic fragments in the Kaggle layout, for the demo, the tests and dry runs.

``write_dataset(OUT, train=[("1", 512, 512)], test=[("a", 384, 512)])`` writes::

    OUT/vesuvius-challenge-ink-detection/
        train/<id>/surface_volume/00.tif .. 64.tif, mask.png, inklabels.png, ir.png
        test/<id>/surface_volume/00.tif .. 64.tif, mask.png
        sample_submission.csv
    OUT/ground_truth/<id>.png          (ink labels of each test fragment, kept out of test/)

Slices are ``(H, W)`` uint16 TIFFs, one image per file, uncompressed in one strip by default (like the data
server's, so ``tifffile.memmap`` applies). A fragment is a papyrus sheet whose surface ``z_s(y, x)`` is a smooth
height field between slices 25 and 40; ink is a brighter, faintly textured band a few slices thick that follows
that surface, drawn as strokes and arcs. The volume is streamed: generated and written slice by slice in row chunks,
holding only a few ``(H, W)`` maps (surface float32, two fibre maps float16, mask and ink uint8, one uint16 slice).
Everything is deterministic given the seed.

Scroll segments (``write_segment``): the same kind of fragment as a researcher's segment, ``OUT/<id>/layers/00.tif
.. NN.tif`` with ``OUT/<id>/<id>_mask.png`` (``layout="segment"``), or ``OUT/<id>.zarr`` (an OME-Zarr group, level
0 of shape ``(layers, H, W)``) with ``OUT/<id>_mask.png`` (``layout="zarr"``, needs the zarr package); ``layers``
of them, the papyrus in the middle 65; uint16 or uint8.

CLI: ``python -m ink_infer.synthetic OUT --train 3 --test a:384x512,b:320x448 --seed 0``;
``python -m ink_infer.synthetic OUT --layout segment --layers 80`` (or ``--layout zarr``) writes one segment per
``--test`` entry under ``OUT/segments/`` (ground truth in ``OUT/ground_truth/``).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import cv2
import numpy as np
import tifffile

from ink_infer.errors import UserError
from ink_infer.geometry import N_SLICES
from ink_infer.outputs.atomic import atomic_write_bytes
from ink_infer.synthetic.maps import CHUNK_PIXELS, FragmentMaps, make_maps

log = logging.getLogger(__name__)

COMPETITION = "vesuvius-challenge-ink-detection"

# 16-bit levels, scaled by a per-fragment gain in 0.9..1.1. Papyrus reads ~20000-40000, the voxels above and below it
# less; ink adds a few thousand in a band of ~3 slices around the surface, about as much as the per-voxel noise, so
# it only shows when a model pools over space and looks at the right slices.
BACKGROUND = 12000.0  # inside the mask, away from the sheet
PAPYRUS = 17000.0  # added on the sheet
FIBRE_AMP = 3500.0  # fibre texture on the sheet
SHEET_HALF = 7.0  # half thickness of the sheet, in slices
INK_AMP = 3200.0  # ink's intensity change at the surface
INK_TEXTURE = 1500.0  # ink soaks into the fibres: faint texture
INK_BAND = 2.0  # e-folding half width of the ink band, in slices
NOISE = 1800.0


def write_dataset(
    out: Path,
    *,
    train: Sequence[tuple[str, int, int]] = (),
    test: Sequence[tuple[str, int, int]] = (),
    seed: int = 0,
    compression: str | None = None,
    tile: tuple[int, int] | None = None,
    test_labels: bool = False,
) -> Path:
    """Write a Kaggle-layout dataset under ``out`` and return the competition folder.

    ``train`` / ``test`` hold ``(id, height, width)`` per fragment; ``sample_submission.csv`` lists the test ids in
    the given order. Test ground truth always goes to ``out/ground_truth/<id>.png``; ``test_labels=True`` also
    writes it as ``test/<id>/inklabels.png`` (not Kaggle-like). Each fragment's seed comes from ``seed`` and its
    split/id, so adding a fragment does not change the others.
    """
    comp = Path(out) / COMPETITION
    _tiff_options(8, 8, compression, tile)  # bad options fail before anything is written
    for split, specs in (("train", train), ("test", test)):
        ids = [frag_id for frag_id, _, _ in specs]
        if len(set(ids)) != len(ids):
            raise UserError(f"{split} fragment ids {ids}: expected distinct ids")
        for frag_id, height, width in specs:
            _check_id(frag_id)
            _check_size(height, width)
    for split, specs in (("train", train), ("test", test)):
        for frag_id, height, width in specs:
            truth = Path(out) / "ground_truth" / f"{frag_id}.png" if split == "test" else None
            write_fragment(
                comp / split / frag_id,
                height=height,
                width=width,
                seed=fragment_seed(seed, split, frag_id),
                with_labels=split == "train" or test_labels,
                compression=compression,
                tile=tile,
                ground_truth=truth,
            )
    rows = "".join(f"{frag_id},1 1\n" for frag_id, _, _ in test)
    (comp / "sample_submission.csv").write_text("Id,Predicted\n" + rows)
    return comp


def fragment_seed(seed: int, split: str, frag_id: str) -> int:
    """The seed of one fragment: stable across runs (crc32, not Python's salted ``hash``)."""
    key = zlib.crc32(f"{split}/{frag_id}".encode())
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0])


def write_fragment(
    frag_dir: Path,
    *,
    height: int,
    width: int,
    seed: int,
    with_labels: bool,
    compression: str | None = None,
    tile: tuple[int, int] | None = None,
    ground_truth: Path | None = None,
) -> None:
    """Write one fragment: ``surface_volume/00.tif..64.tif`` ((H, W) uint16 each), ``mask.png`` (0/255 uint8).

    ``with_labels`` adds ``inklabels.png`` (0/255) and ``ir.png`` (uint8, ink darker); ``ground_truth`` is a
    further path for the ink labels. ``compression="zlib"`` writes strips of ~8 KiB; ``tile=(th, tw)`` (multiples
    of 16) writes tiles. Slices are written one at a time: memory stays at a few ``(H, W)`` maps.
    """
    _check_size(height, width)
    write_kw = _tiff_options(height, width, compression, tile)
    frag_dir = Path(frag_dir)
    volume_dir = frag_dir / "surface_volume"
    volume_dir.mkdir(parents=True, exist_ok=True)
    maps = make_maps(np.random.default_rng(seed), height, width)
    _write_png(frag_dir / "mask.png", maps.mask)
    if with_labels:
        _write_png(frag_dir / "inklabels.png", maps.ink)
        _write_png(frag_dir / "ir.png", _ir_image(maps), binary=False)
    if ground_truth is not None:
        ground_truth.parent.mkdir(parents=True, exist_ok=True)
        _write_png(ground_truth, maps.ink)
    gain = float(np.random.default_rng([seed, 1]).uniform(0.9, 1.1))
    slice_buf = np.empty((height, width), np.uint16)
    for z in range(N_SLICES):
        _render_slice(maps, z, gain, np.random.default_rng([seed, 2, z]), out=slice_buf)
        tifffile.imwrite(volume_dir / f"{z:02d}.tif", slice_buf, **write_kw)
    log.info("wrote %s: %d x %d x %d", frag_dir, N_SLICES, height, width)


def _tiff_options(height: int, width: int, compression: str | None, tile: tuple[int, int] | None) -> dict:
    if compression not in (None, "zlib"):
        raise UserError(f"compression {compression!r}: expected none or zlib")
    if tile is not None and (len(tile) != 2 or any(t <= 0 or t % 16 for t in tile)):
        raise UserError(f"tile {tile}: expected two positive multiples of 16")
    # metadata=None: a plain TIFF, no tifffile JSON description, like the scanner's files.
    kw: dict = {"photometric": "minisblack", "metadata": None, "compression": compression}
    if tile is not None:
        kw["tile"] = tuple(tile)
    elif compression is not None:
        # Strips of ~8 KiB like libtiff's, and at least four even on tiny test fragments, so readers must pick the
        # strips they need (tifffile alone would write one strip).
        kw["rowsperstrip"] = max(1, min(4096 // width, -(-height // 4)))
    return kw


def _render_slice(
    maps: FragmentMaps, z: int, gain: float, rng: np.random.Generator, *, out: np.ndarray
) -> None:
    """Fill ``out`` ((H, W) uint16) with slice ``z``; row chunks keep the float32 temporaries small."""
    out[:] = 0
    step = max(1, CHUNK_PIXELS // out.shape[1])
    for r0 in range(maps.rows[0], maps.rows[1], step):
        r1 = min(r0 + step, maps.rows[1])
        d = z - maps.surface[r0:r1]  # slices above (+) / below (-) the papyrus surface
        sheet = 1.0 / (1.0 + np.exp((np.abs(d) - SHEET_HALF) / 1.5))
        top = 1.0 / (1.0 + np.exp(-d))  # horizontal fibres on the written side, vertical ones behind
        fh = maps.fibre_h[r0:r1].astype(np.float32)
        fv = maps.fibre_v[r0:r1].astype(np.float32)
        val = BACKGROUND + sheet * (PAPYRUS + FIBRE_AMP * (top * fh + (1.0 - top) * fv))
        ink = maps.ink[r0:r1] > 0
        band = np.exp(-np.square(d[ink] / INK_BAND))
        val[ink] += band * (INK_AMP + INK_TEXTURE * fv[ink])
        val += NOISE * rng.standard_normal(val.shape, dtype=np.float32)
        val *= gain
        val *= maps.mask[r0:r1]  # zero outside the fragment, like the real scans
        np.clip(val, 0, 65535, out=val)
        out[r0:r1] = val


def _ir_image(maps: FragmentMaps) -> np.ndarray:
    """(H, W) uint8 infrared photo: fibres visible, ink dark (carbon ink absorbs IR), black outside the mask."""
    ir = np.zeros(maps.mask.shape, np.uint8)
    step = max(1, CHUNK_PIXELS // maps.mask.shape[1])
    for r0 in range(0, maps.mask.shape[0], step):
        r1 = r0 + step
        val = 150.0 + 20.0 * maps.fibre_h[r0:r1].astype(np.float32) - 80.0 * (maps.ink[r0:r1] > 0)
        ir[r0:r1] = np.clip(val, 0, 255).astype(np.uint8) * (maps.mask[r0:r1] > 0)
    return ir


def _write_png(path: Path, image: np.ndarray, *, binary: bool = True) -> None:
    """Write an (H, W) uint8 image as a greyscale PNG; a ``binary`` 0/1 map is written as 0/255."""
    if binary:
        image = (image > 0).view(np.uint8) * np.uint8(255)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise UserError(f"{path}: could not encode PNG")
    atomic_write_bytes(path, data.tobytes())


def _check_size(height: int, width: int) -> None:
    if height < 8 or width < 8:
        raise UserError(f"fragment size {height}x{width}: expected at least 8x8")


def _check_id(frag_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", frag_id):
        raise UserError(f"fragment id {frag_id!r}: expected letters, digits, '_' or '-'")


def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match:
        raise UserError(f"size {text!r}: expected HxW, e.g. 512x512")
    _check_size(int(match[1]), int(match[2]))
    return int(match[1]), int(match[2])


def _parse_test(text: str) -> list[tuple[str, int, int]]:
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        frag_id, sep, size = item.partition(":")
        if not sep:
            raise UserError(f"--test {item!r}: expected id:HxW, e.g. a:384x512")
        _check_id(frag_id)
        specs.append((frag_id, *_parse_size(size)))
    return specs


def write_segment(
    out: Path,
    seg_id: str,
    *,
    shape: tuple[int, int],
    seed: int,
    layers: int = N_SLICES,
    layout: str = "segment",
    dtype: str = "uint16",
    ground_truth: Path | None = None,
) -> Path:
    """Write one scroll segment of ``shape`` (height, width) under ``out`` (see the module's docstring) and return
    its path.

    The stack holds ``layers`` layers, the fragment's 65 slices in the middle (the default ``--layers`` of a run) and
    the scan above and below them; uint8 keeps the top 8 bits."""
    height, width = shape
    if layout not in ("segment", "zarr"):
        raise UserError(f"--layout {layout!r}: expected kaggle, segment or zarr")
    if layers < N_SLICES:
        raise UserError(f"--layers {layers}: a segment needs at least {N_SLICES} layers")
    _check_id(seg_id)
    _check_size(height, width)
    maps = make_maps(np.random.default_rng(seed), height, width)
    gain = float(np.random.default_rng([seed, 1]).uniform(0.9, 1.1))
    offset = (layers - N_SLICES) // 2
    out = Path(out)
    out.mkdir(
        parents=True, exist_ok=True
    )  # a zarr segment's mask lies beside its store, in a folder maybe new
    if ground_truth is not None:
        ground_truth.parent.mkdir(parents=True, exist_ok=True)
        _write_png(ground_truth, maps.ink)
    buf = np.empty((height, width), np.uint16)

    def layer(i: int) -> np.ndarray:
        _render_slice(maps, i - offset, gain, np.random.default_rng([seed, 2, i]), out=buf)
        return (buf >> 8).astype(np.uint8) if dtype == "uint8" else buf

    if layout == "segment":
        seg = out / seg_id
        (seg / "layers").mkdir(parents=True, exist_ok=True)
        _write_png(seg / f"{seg_id}_mask.png", maps.mask)
        digits = max(2, len(str(layers - 1)))
        for i in range(layers):
            tifffile.imwrite(seg / "layers" / f"{i:0{digits}d}.tif", layer(i))
    else:
        try:
            import zarr
        except ImportError:
            raise UserError("--layout zarr needs the zarr package: pip install 'ink_infer[zarr]'") from None
        seg = out / f"{seg_id}.zarr"
        _write_png(out / f"{seg_id}_mask.png", maps.mask)
        group = zarr.open_group(str(seg), mode="w")
        array = group.create_array("0", shape=(layers, height, width), chunks=(8, 128, 128), dtype=dtype)
        group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}]}]
        for i in range(layers):
            array[i] = layer(i)
    log.info("wrote %s: %d x %d x %d (%s)", seg, layers, height, width, dtype)
    return seg


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage block: the project's CLIs all report user errors this way.
        raise UserError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 on a user error)."""
    parser = _Parser(
        prog="python -m ink_infer.synthetic", description="Write a synthetic Kaggle-layout dataset."
    )
    parser.add_argument("out", type=Path, help="output folder (the competition folder is made inside it)")
    parser.add_argument("--train", type=int, default=3, help="number of training fragments (ids 1, 2, ...)")
    parser.add_argument("--train-size", default="512x512", help="HxW of each training fragment")
    parser.add_argument("--test", default="a:384x512,b:320x448", help="test fragments as id:HxW,id:HxW")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression", choices=["none", "zlib"], default="none")
    parser.add_argument("--tile", type=int, default=None, help="write tiled TIFFs with this tile side")
    parser.add_argument("--layout", choices=["kaggle", "segment", "zarr"], default="kaggle",
                        help="kaggle: the competition layout; segment: <id>/layers/*.tif; zarr: <id>.zarr (one "
                             "segment per --test entry, no training fragments)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=N_SLICES, help="layers of a segment's stack")
    parser.add_argument(
        "--dtype", choices=["uint16", "uint8"], default="uint16", help="a segment's layer dtype"
    )
    try:
        args = parser.parse_args(argv)
        if args.layout != "kaggle":
            for seg_id, height, width in _parse_test(args.test):  # OUT/segments/<id>, the truth beside
                print(write_segment(Path(args.out) / "segments", seg_id, shape=(height, width), layers=args.layers,
                                    layout=args.layout, dtype=args.dtype, seed=fragment_seed(args.seed, "test", seg_id),
                                    ground_truth=Path(args.out) / "ground_truth" / f"{seg_id}.png"))  # fmt: skip
            return 0
        if args.train < 0:
            raise UserError(f"--train {args.train}: expected a count >= 0")
        height, width = _parse_size(args.train_size)
        comp = write_dataset(
            args.out,
            train=[(str(i), height, width) for i in range(1, args.train + 1)],
            test=_parse_test(args.test),
            seed=args.seed,
            compression=None if args.compression == "none" else args.compression,
            tile=None if args.tile is None else (args.tile, args.tile),
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(comp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
