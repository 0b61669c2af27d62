"""Finding fragments, and streaming their slices band by band.

``find_fragments(data)`` accepts ``/kaggle/input`` (or any folder holding the competition folder), the competition
folder itself, a folder of fragment folders, or one fragment folder; a fragment is in the Kaggle layout
(``surface_volume/00.tif .. 64.tif``), or a scroll segment (``layers/*.tif``, or a ``.zarr`` store: ``segments.py``).
``Volume(fragment)`` checks all 65 slice files at open (names, TIFF headers, shapes, dtypes, truncation) and then
serves ``read_band(y0, y1, z0, z1)``: rows [y0, y1) of slices [z0, z1) as ``(z1 - z0, y1 - y0, W)`` uint16 (uint8
data scaled by 257), never the whole volume.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .config import N_SLICES
from .errors import UserError
from .segments import (
    LAYERS_DIR,
    LayerChoice,
    ZarrVolume,
    is_segment,
    is_zarr,
    layer_files,
    open_zarr_array,
    segment_id,
    segment_mask,
)
from .slices import DecodedSlice, MappedSlice, band_buffer, file_stats, open_slice

log = logging.getLogger(__name__)

COMPETITION = "vesuvius-challenge-ink-detection"
SAMPLE_SUBMISSION = "sample_submission.csv"
_SLICE_NAME = re.compile(r"(\d+)\.tiff?", re.IGNORECASE)


@dataclass(frozen=True)
class Fragment:
    """One fragment: ``path`` is the folder holding ``surface_volume/`` and ``mask.png`` (layout ``kaggle``), a
    segment's folder holding ``layers/`` (``segment``), or a ``.zarr`` store (``zarr``); ``layers``: for segments,
    the stack indices the models' 65 layers read, in their order (``segments.LayerChoice``)."""

    id: str
    path: Path
    row_id: str | None = (
        None  # the Id exactly as sample_submission.csv spells it (spaces kept), when it has one
    )
    layout: str = "kaggle"
    layers: tuple[int, ...] | None = None
    rotate: int = 0  # --rotate: degrees the models see it turned counterclockwise (rotation.py)
    rotate_cache: Path | None = None  # where the turned slices are kept

    @property
    def submission_id(self) -> str:
        """What submission.csv's Id column says for this fragment: the sample's own spelling."""
        return self.id if self.row_id is None else self.row_id


def find_fragments(
    data: Path, *, split: str = "test", layers: LayerChoice | None = None
) -> tuple[list[Fragment], list[str]]:
    """Fragments of ``split`` under ``data`` in submission row order, plus warnings for the user.

    Rows follow ``sample_submission.csv`` when the competition folder has one (test split only); otherwise ids are
    sorted (numbers numerically) and, for the test split, a warning says so. ``layers``: which 65 layers of a
    segment's stack the models read (default: the middle ones).
    """
    data = Path(data)
    choice = layers or LayerChoice()
    if not data.is_dir():
        raise UserError(f"{data}: not a folder; expected the Kaggle input or competition folder")
    if (data / "surface_volume").is_dir():
        return [Fragment(data.name, data)], []
    if is_segment(data) or is_zarr(data):
        return [_segment(data, choice)], []
    comp = _competition_dir(data, split)
    root = data if comp is None else (comp / split if (comp / split).is_dir() else comp)
    found, warnings = _fragment_dirs(root)
    csv_path = None if comp is None or split != "test" else comp / SAMPLE_SUBMISSION
    spelled: dict[str, str] = {}
    if csv_path is not None and csv_path.is_file():
        spelled = _submission_ids(csv_path)
        ids = list(spelled)
        if not ids:
            raise UserError(f"{csv_path}: no rows after the header: it names no fragment to predict")
        escaping = [i for i in ids if i in (".", "..") or "/" in i or "\\" in i]
        if escaping:
            raise UserError(
                f"{csv_path}: row {escaping[0]!r} escapes {root}: expected a fragment folder's name"
            )
        absent = [frag_id for frag_id in ids if frag_id not in found]
        if absent and (root / absent[0]).is_dir():
            raise UserError(
                f"{root / absent[0]}: no surface_volume/ folder (row {absent[0]!r} of {csv_path})"
            )
        if absent:
            raise UserError(f"{csv_path}: row {absent[0]!r} names a fragment that is not in {root}")
        unlisted = sorted(set(found) - set(ids))
        if unlisted:
            warnings.append(f"{root}: {', '.join(unlisted)} not in {SAMPLE_SUBMISSION}: not predicted")
    else:
        ids = sorted(found, key=_natural_key)
        if split == "test" and any((found[i] / "surface_volume").is_dir() for i in ids):  # Kaggle-layout ones
            warnings.append(
                f"no {SAMPLE_SUBMISSION} found for {root}: fragments in sorted order {', '.join(ids)}"
            )
    if not ids:
        raise UserError(f"{data}: no {split} fragments found (expected folders holding surface_volume/)")
    # row_id only where the sample spells the Id otherwise (surrounding spaces): it is written back as spelled
    fragments = []
    for frag_id in ids:
        row_id = spelled[frag_id] if spelled.get(frag_id, frag_id) != frag_id else None
        path = found[frag_id]
        if (path / "surface_volume").is_dir():
            fragments.append(Fragment(frag_id, path, row_id))
        else:
            fragments.append(dataclasses.replace(_segment(path, choice), row_id=row_id))
    return fragments, warnings


def _segment(path: Path, choice: LayerChoice) -> Fragment:
    """A scroll segment (``layers/`` or ``.zarr``), with the 65 layers of its stack that ``choice`` picks."""
    if is_zarr(path):
        array, axis, _ = open_zarr_array(path)
        return Fragment(
            segment_id(path), path, layout="zarr", layers=choice.pick(array.shape[axis], str(path))
        )
    files = layer_files(path / LAYERS_DIR, str(path / LAYERS_DIR))
    return Fragment(path.name, path, layout="segment", layers=choice.pick(len(files), str(path / LAYERS_DIR)))


def _competition_dir(data: Path, split: str) -> Path | None:
    """``data`` itself, or the one child folder that looks like the competition folder, or None."""

    def looks_like(folder: Path) -> bool:
        return (folder / SAMPLE_SUBMISSION).is_file() or (folder / split).is_dir()

    if looks_like(data):
        return data
    children = [
        c for c in sorted(data.iterdir()) if c.is_dir() and not c.name.startswith(".") and looks_like(c)
    ]
    # Newer Kaggle images mount inputs one level deeper (/kaggle/input/competitions/<slug>).
    named = [c for c in children if c.name == COMPETITION] or [
        c for c in sorted(data.glob(f"*/{COMPETITION}")) if looks_like(c)
    ]
    if named or len(children) == 1:
        return (named or children)[0]
    if len(children) > 1:
        names = ", ".join(c.name for c in children)
        raise UserError(f"{data}: several competition-like folders ({names}); pass one of them")
    return None


def _fragment_dirs(root: Path) -> tuple[dict[str, Path], list[str]]:
    found, warnings = {}, []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        if (child / "surface_volume").is_dir() or is_segment(child) or is_zarr(child):
            found[segment_id(child)] = child
        elif child.name not in ("train", "test"):
            warnings.append(f"{child}: no surface_volume/ or layers/ folder, not a .zarr store: skipped")
    return found, warnings


def _submission_ids(csv_path: Path) -> dict[str, str]:
    """Ids of ``sample_submission.csv`` in row order (header ``Id,Predicted``; a BOM is tolerated): each stripped
    of surrounding spaces (the folder it names) -> as spelled in the file (what submission.csv writes back)."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [row for row in csv.reader(fh) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{csv_path}: unreadable ({err})") from err
    header = [cell.strip() for cell in rows[0]] if rows else []
    if "Id" not in header:
        raise UserError(f"{csv_path}: header {','.join(header) or '(empty)'}, expected Id,Predicted")
    col = header.index("Id")
    spelled = [row[col] for row in rows[1:] if len(row) > col]
    ids = [i.strip() for i in spelled]
    dupes = sorted(frag_id for frag_id, n in Counter(ids).items() if n > 1)
    if dupes:
        raise UserError(f"{csv_path}: id {dupes[0]!r} appears more than once")
    return dict(zip(ids, spelled, strict=True))


def _natural_key(frag_id: str) -> tuple[int, int | str]:
    return (0, int(frag_id)) if frag_id.isdigit() else (1, frag_id)


def _display(path: Path, base: Path) -> str:
    """``path`` as shown in messages: relative to ``base`` (the folder above the split) when it lies inside."""
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


class Volume:
    """The 65 slices of one fragment, checked at open and read by bands of rows.

    ``root``: when given, slice files (after following symlinks) must lie inside it. ``memmapped`` is True when
    every slice is uncompressed and memory-mapped (the fast path). ``warnings`` lists files that were ignored.
    """

    def __init__(self, fragment: Fragment, *, root: Path | None = None) -> None:
        self.fragment = fragment
        self._base = Path(root) if root is not None else fragment.path.parent.parent
        if fragment.layout == "segment":
            paths, self.warnings = _layer_paths(fragment, self._base, root), []
        else:
            paths, self.warnings = _slice_paths(fragment.path / "surface_volume", self._base, root)
        self.paths = paths
        with contextlib.ExitStack() as stack:
            self._slices: list[MappedSlice | DecodedSlice] = []
            for path in paths:
                source = open_slice(path, _display(path, self._base))
                stack.callback(source.close)
                self._slices.append(source)
            shapes = [src.shape for src in self._slices]
            _check_shapes(shapes, paths, self._base)
            _check_dtypes([src.dtype for src in self._slices], paths, self._base)
            single = sum(getattr(src, "single_segment", False) for src in self._slices)
            if single:
                self.warnings.append(
                    f"{_display(fragment.path / 'surface_volume', self._base)}: {single} of {len(paths)} slices are "
                    "compressed as a single segment: every band decodes the whole slice (slow)"
                )
            self._closer = stack.pop_all()  # all good: keep the files open until close()
        self.height, self.width = shapes[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(65, H, W)``."""
        return (N_SLICES, self.height, self.width)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    @property
    def memmapped(self) -> bool:
        return all(src.memmapped for src in self._slices)

    def describe(self) -> dict:
        """What the fragment's fingerprint holds of the data: each slice file's size and mtime, in layer order."""
        return {"slices": file_stats(self.paths)}

    def read_band(self, y0: int, y1: int, z0: int, z1: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [y0, y1) of slices [z0, z1) as ``(z1 - z0, y1 - y0, W)`` uint16 on the CPU.

        Rows at or beyond H are zero-filled, so a full window height can be read at the bottom. ``out`` (same shape
        and dtype, e.g. a pinned buffer) is filled and returned instead of a new array.
        """
        out = band_buffer(y0, y1, z0, z1, self.width, out)
        rows = max(0, min(y1, self.height) - y0)
        for k, z in enumerate(range(z0, z1)):
            if rows:
                self._slices[z].read_rows(y0, y0 + rows, out[k, :rows])
        out[:, rows:] = 0
        return out

    def close(self) -> None:
        self._closer.close()
        self._slices = []

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _slice_paths(volume_dir: Path, base: Path, root: Path | None) -> tuple[list[Path], list[str]]:
    """The 65 slice files ``00.tif .. 64.tif`` (``.tiff`` accepted), in order; UserError listing any gap or extra."""
    shown = _display(volume_dir, base)
    if not volume_dir.is_dir():
        raise UserError(f"{shown}: missing; expected a folder of slices 00.tif..64.tif")
    by_index: dict[int, list[Path]] = {}
    extra, warnings = [], []
    for entry in sorted(volume_dir.iterdir()):
        if entry.name.startswith("."):
            continue  # .DS_Store and friends
        match = _SLICE_NAME.fullmatch(entry.name)
        if match is None:
            warnings.append(f"{_display(entry, base)}: not a slice, ignored")
        elif len(match[1]) != 2 or int(match[1]) >= N_SLICES:
            extra.append(entry.name)
        else:
            by_index.setdefault(int(match[1]), []).append(entry)
    missing = [f"{z:02d}.tif" for z in range(N_SLICES) if z not in by_index]
    extra += [p.name for paths in by_index.values() if len(paths) > 1 for p in paths]
    if missing or extra:
        parts = [
            f"missing {', '.join(missing)}" if missing else "",
            f"extra {', '.join(extra)}" if extra else "",
        ]
        raise UserError(f"{shown}: expected slices 00.tif..64.tif; {'; '.join(p for p in parts if p)}")
    paths = [by_index[z][0] for z in range(N_SLICES)]
    for path in paths:
        _check_slice_file(path, base, root)
    return paths, warnings


def _layer_paths(fragment: Fragment, base: Path, root: Path | None) -> list[Path]:
    """A segment's 65 layer files, in the models' order (``Fragment.layers``)."""
    layers_dir = fragment.path / LAYERS_DIR
    files = layer_files(layers_dir, _display(layers_dir, base))
    paths = [files[i] for i in fragment.layers]
    for path in paths:
        _check_slice_file(path, base, root)
    return paths


def _check_slice_file(path: Path, base: Path, root: Path | None) -> None:
    shown = _display(path, base)
    if not path.exists():
        raise UserError(f"{shown}: broken symlink to {path.readlink()}")
    if not path.is_file():
        raise UserError(f"{shown}: not a file")
    if root is not None and not path.resolve().is_relative_to(Path(root).resolve()):
        raise UserError(f"{shown}: resolves to {path.resolve()}, outside the data folder {root}")


def _check_dtypes(dtypes: list[np.dtype], paths: list[Path], base: Path) -> None:
    common = Counter(dtypes).most_common(1)[0][0]
    odd = [(p, d) for p, d in zip(paths, dtypes, strict=True) if d != common]
    if odd:
        raise UserError(f"{_display(odd[0][0], base)}: dtype {odd[0][1]}, other slices {common}")


def _check_shapes(shapes: list[tuple[int, int]], paths: list[Path], base: Path) -> None:
    common = Counter(shapes).most_common(1)[0][0]
    odd = [(p, s) for p, s in zip(paths, shapes, strict=True) if s != common]
    if odd:
        (path, (h, w)), more = odd[0], f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise UserError(f"{_display(path, base)}: {h}x{w}, other slices {common[0]}x{common[1]}{more}")


def load_mask(fragment: Fragment, shape: tuple[int, ...]) -> tuple[np.ndarray, str | None]:
    """The fragment's mask as ``(H, W)`` bool (pixel > 0), ``shape`` being ``(H, W)`` or ``(65, H, W)``.

    A missing ``mask.png`` (a segment's ``<seg>_mask.png``) gives all True and a warning; the reference binarises
    with PIL ``convert("1")``, which agrees with ``> 0`` on the 0/255 masks Kaggle ships.
    """
    path = fragment.path / "mask.png" if fragment.layout == "kaggle" else segment_mask(fragment.path)
    if not path.exists():
        return np.ones(
            shape[-2:], bool
        ), f"{_display(path, fragment.path.parent.parent)}: missing, using every pixel"
    if fragment.rotate:  # the file is in the fragment's own orientation; the run sees it turned
        from .rotation import turn, turns

        h, w = shape[-2:]
        own = (w, h) if turns(fragment.rotate) % 2 else (h, w)
        return np.ascontiguousarray(
            turn(_read_binary_png(path, own, fragment.path.parent.parent), fragment.rotate)
        ), None
    return _read_binary_png(path, shape[-2:], fragment.path.parent.parent), None


def load_labels(source: Fragment | Path, shape: tuple[int, ...]) -> np.ndarray:
    """Ink labels as ``(H, W)`` bool from a fragment's ``inklabels.png`` or a PNG path (0/1 or 0/255)."""
    if isinstance(source, Fragment):
        path, base = source.path / "inklabels.png", source.path.parent.parent
    else:
        path, base = Path(source), Path(source).parent.parent
    if not path.exists():
        raise UserError(f"{_display(path, base)}: missing; expected an ink label PNG")
    return _read_binary_png(path, shape[-2:], base)


def _read_binary_png(path: Path, shape: tuple[int, ...], base: Path) -> np.ndarray:
    # ANYDEPTH keeps 16-bit PNGs at full depth, so a 0/1 16-bit mask is not shifted down to all zeros.
    with (
        native_stderr_silenced()
    ):  # OpenCV and libpng print their own WARN/ERROR lines; ours is the one that counts
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise UserError(f"{_display(path, base)}: not a readable image")
    if image.shape != tuple(shape):
        h, w = image.shape
        raise UserError(f"{_display(path, base)}: {h}x{w}, slices {shape[0]}x{shape[1]}")
    return image > 0


@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 points at /dev/null inside the block: C libraries (libpng, OpenCV's loader) write there
    directly, past Python's ``sys.stderr``. Used only around a single image read, before any thread is started."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to save: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def open_volume(fragment: Fragment) -> Volume | ZarrVolume:
    """The fragment's slices, refusing any (symlinked) slice that resolves outside the folder of fragments.

    The folder is taken after resolving, so a data mount that is itself a symlink (as Kaggle's may be) is fine.
    """
    volume = (ZarrVolume(fragment.path, fragment.layers) if fragment.layout == "zarr"
              else Volume(fragment, root=fragment.path.resolve().parent))  # fmt: skip
    if not fragment.rotate:
        return volume
    from .rotation import RotatedVolume

    with volume:
        return RotatedVolume(volume, fragment.rotate, fragment.rotate_cache)
