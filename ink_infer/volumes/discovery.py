"""Finding fragments: ``find_fragments(data)`` accepts ``/kaggle/input`` (or any folder holding the competition
folder), the competition folder itself, a folder of fragment folders, or one fragment folder; a fragment is in the
Kaggle layout (``surface_volume/00.tif .. 64.tif``), or a scroll segment (``layers/*.tif``, or a ``.zarr`` store:
``segments.py``). Opening one is ``reader.open_volume``'s."""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
from collections import Counter
from pathlib import Path

from ink_infer.errors import UserError
from ink_infer.volumes.fragment import Fragment
from ink_infer.volumes.remote import Remote, is_url, url_name
from ink_infer.volumes.segments import (
    LAYERS_DIR,
    LayerChoice,
    is_segment,
    is_zarr,
    layer_files,
    segment_id,
    segment_masks,
)
from ink_infer.volumes.zarr_open import open_zarr_array

log = logging.getLogger(__name__)


COMPETITION = "vesuvius-challenge-ink-detection"


SAMPLE_SUBMISSION = "sample_submission.csv"
# What ink_infer writes into OUT (which may be the data folder itself): never a fragment, skipped without a word
OUR_FOLDERS = frozenset({"partials", "parts", "previews", "probabilities", "masks", "rotated", "inductor_cache",
                         "demo_data", "cache"})  # fmt: skip
LAYOUTS = "fragment folders holding surface_volume/, scroll segments holding layers/, or .zarr stores"


def find_fragments(
    data: Path | str, *, split: str = "test", layers: LayerChoice | None = None, remote: Remote | None = None,
    mask: Path | None = None,
) -> tuple[list[Fragment], list[str]]:  # fmt: skip
    """Fragments of ``split`` under ``data`` in submission row order, plus warnings for the user.

    Rows follow ``sample_submission.csv`` when the competition folder has one (test split only); otherwise ids are
    sorted (numbers numerically) and, for the test split, a warning says so. ``layers``: which 65 layers of a
    segment's stack the models read (default: the middle ones). ``data`` may be an ``s3://``, ``http(s)://`` URL
    of a zarr store or a folder of them (``remote``: how to reach them; its URL is replaced). ``mask``: ``--mask``,
    the mask of the one segment found.
    """
    choice = layers or LayerChoice()
    if mask is not None and not Path(mask).is_file():
        raise UserError(f"--mask {mask}: not found (expected the segment's mask, a PNG)")
    if is_url(data):
        fragments = _remote_segments((remote or Remote(str(data))).at(str(data)), choice, mask)
        return fragments, []
    data = Path(data)
    fragments, warnings = _local_fragments(data, split, choice)
    if mask is not None:
        segments = {f.pair or f.id for f in fragments}  # under --direction both, one segment is two fragments
        if len(segments) != 1 or fragments[0].layout == "kaggle":
            raise UserError(
                f"--mask {mask}: for one scroll segment; {data} holds {len(segments)} fragment(s)"
            )
        fragments = [dataclasses.replace(f, mask=mask) for f in fragments]
    return fragments, warnings


def _remote_segments(remote: Remote, choice: LayerChoice, mask: Path | None) -> list[Fragment]:
    """The zarr stores at a URL, each opened (its metadata read, its mask fetched), their layers picked."""
    from ink_infer.volumes.remote_zarr import fetch_mask, remote_segments

    stores = remote_segments(remote)
    if mask is not None and len(stores) != 1:
        raise UserError(f"--mask {mask}: for one scroll segment; {remote.url} holds {len(stores)}")
    found = []
    for store in stores:
        found.extend(_directions(functools.partial(_remote_segment, store, fetch_mask(store, mask)), choice))
    return found


def _remote_segment(store: Remote, mask: Path | None, choice: LayerChoice) -> Fragment:
    """One remote store as ``choice`` reads it (opened once per run: ``zarr_open`` keeps it)."""
    array, layout = open_zarr_array(store, layer_axis=choice.axis, mask=mask)
    name = Path(url_name(store.url))
    return Fragment(segment_id(name), name, layout="zarr", layers=choice.pick(array.shape[layout.layer_axis], store.url),
                    layer_axis=layout.layer_axis, mask=mask, remote=store,
                    direction="reverse" if choice.reverse else "forward")  # fmt: skip


def _local_fragments(data: Path, split: str, choice: LayerChoice) -> tuple[list[Fragment], list[str]]:
    """``find_fragments`` for a local ``data`` folder."""
    if not data.is_dir():
        raise UserError(f"{data}: not a folder; expected the Kaggle input or competition folder")
    if (data / "surface_volume").is_dir():
        return [Fragment(data.name, data)], []
    if is_segment(data) or is_zarr(data):
        return _segments(data, choice), []
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
        raise UserError(f"{data}: no {split} fragments found (expected {LAYOUTS})")
    # row_id only where the sample spells the Id otherwise (surrounding spaces): it is written back as spelled
    fragments = []
    for frag_id in ids:
        row_id = spelled[frag_id] if spelled.get(frag_id, frag_id) != frag_id else None
        path = found[frag_id]
        if (path / "surface_volume").is_dir():
            fragments.append(Fragment(frag_id, path, row_id))
        else:  # a segment read both ways is two rows, each named by its own id
            fragments.extend(
                dataclasses.replace(s, row_id=None if s.pair else row_id) for s in _segments(path, choice)
            )
    return fragments, warnings


def _segments(path: Path, choice: LayerChoice) -> list[Fragment]:
    """A scroll segment as ``choice`` reads it; under ``--direction both`` twice, ``<id>.forward`` (as read) and
    ``<id>.reverse`` (its picked layers reversed)."""
    return _directions(lambda c: _segment(path, c), choice)


def _directions(segment, choice: LayerChoice) -> list[Fragment]:
    """``[segment(choice)]``, or under ``--direction both`` the forward fragment and its reversed twin."""
    if not choice.both:
        return [segment(choice)]
    one = segment(dataclasses.replace(choice, reverse=False))
    return [
        dataclasses.replace(one, id=f"{one.id}.{way}", pair=one.id, direction=way, layers=layers)
        for way, layers in (("forward", one.layers), ("reverse", one.layers[::-1]))
    ]


def _segment(path: Path, choice: LayerChoice) -> Fragment:
    """A scroll segment (``layers/`` or ``.zarr``), with the 65 layers of its stack that ``choice`` picks."""
    way = "reverse" if choice.reverse else "forward"
    if is_zarr(path):
        mask = next(iter(segment_masks(path)), None)
        array, layout = open_zarr_array(path, layer_axis=choice.axis, mask=mask)
        layers = choice.pick(array.shape[layout.layer_axis], str(path))
        return Fragment(segment_id(path), path, layout="zarr", layers=layers, layer_axis=layout.layer_axis,
                        direction=way)  # fmt: skip
    files = layer_files(path / LAYERS_DIR, str(path / LAYERS_DIR))
    layers = choice.pick(len(files), str(path / LAYERS_DIR))
    return Fragment(path.name, path, layout="segment", layers=layers, direction=way)


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
        elif child.name not in ("train", "test") and child.name not in OUR_FOLDERS:
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
