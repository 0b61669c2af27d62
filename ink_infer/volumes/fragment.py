"""What a fragment is before it is opened: its id, where it lies, its layout (Kaggle, segment, zarr), the layers
its models read and how it is turned; and how paths are shown in messages."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ink_infer.volumes.remote import Remote

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fragment:
    """One fragment: ``path`` is the folder holding ``surface_volume/`` and ``mask.png`` (layout ``kaggle``), a
    segment's folder holding ``layers/`` (``segment``), or a ``.zarr`` store (``zarr``: local, or ``remote``);
    ``layers``: for segments,
    the stack indices the models' 65 layers read, in their order (``segments.LayerChoice``). Under ``--direction
    both`` a segment is two fragments, ``<seg>.forward`` and ``<seg>.reverse`` (``pair`` is ``<seg>``), named so in
    every output."""

    id: str
    path: Path
    row_id: str | None = (
        None  # the Id exactly as sample_submission.csv spells it (spaces kept), when it has one
    )
    layout: str = "kaggle"
    layers: tuple[int, ...] | None = None
    layer_axis: int | None = None  # a zarr store's layer axis (0 or 2), decided when it was found
    rotate: int = 0  # --rotate: degrees the models see it turned counterclockwise (rotation.py)
    rotate_cache: Path | None = None  # where the turned slices are kept
    mask: Path | None = None  # --mask, or a remote store's mask fetched to local disk; None: found by layout
    remote: Remote | None = None  # a store read over the wire (``path`` is then only its name)

    @property
    def where(self) -> str:
        """Where its data is, for messages: the URL of a remote store, else the local path."""
        return str(self.remote) if self.remote is not None else str(self.path)

    # --direction: a segment's layers as read ("forward") or reversed ("reverse"); None: a Kaggle fragment, which
    # --direction (like --reverse-layers before it) leaves as it is
    direction: str | None = None
    pair: str | None = None  # --direction both: the segment's own id, ``id`` being ``<pair>.<direction>``

    @property
    def key_id(self) -> str:
        """The id its partials are saved and keyed under: the segment's own, plus ``.reverse`` for its layers
        reversed, whatever ``--direction`` the run asked for, so that ``--direction both`` reuses what a
        one-direction run computed, and a one-direction run what ``both`` computed."""
        own = self.pair or self.id
        return f"{own}.reverse" if self.direction == "reverse" else own

    @property
    def submission_id(self) -> str:
        """What submission.csv's Id column says for this fragment: the sample's own spelling."""
        return self.id if self.row_id is None else self.row_id


def shown_path(path: Path, base: Path) -> str:
    """``path`` as shown in messages: relative to ``base`` (the folder above the split) when it lies inside."""
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)
