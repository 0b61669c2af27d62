"""The plan of a run: each fragment's windows (``FragmentPlan``), each model's checked weights (``Weights``), and
the unit of work, one model over one fragment or a row range of it (``Unit``).

A unit's result depends only on the unit (its model's output fields, weights and fragment) and on the run's
settings that change bytes (``UnitSettings``), so any executor that runs the units, in any order, on any device of
the same type, produces the same sums; ``partials.py`` stores them under ``partials.unit_key``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ink_infer import geometry
from ink_infer.config import ModelSpec
from ink_infer.engine.tiling import cover_grid, spec_coverage, windows_of
from ink_infer.geometry import BLOCK, MAX_ROWS_PER_BAND
from ink_infer.models import gp_family
from ink_infer.volumes.fragment import Fragment
from ink_infer.volumes.masks import NO_MASK_FILE, load_mask
from ink_infer.volumes.reader import open_volume

RANDOM_SEED = 0  # random-init rehearsals are reproducible, and their partials can be keyed by it


@dataclass(frozen=True)
class Weights:
    """A model's weight file, checked against the manifest at the start (None: random init, when allowed)."""

    path: Path | None
    sha256: str | None

    @property
    def identity(self) -> str:
        return f"sha256:{self.sha256}" if self.path is not None else f"random:seed={RANDOM_SEED}"


@dataclass(frozen=True)
class UnitSettings:
    """The run's settings that change a unit's bytes: window stride and TTA, device type, model dtype and the
    resolved ``--compile`` mode."""

    stride: int
    tta: str
    device: str
    dtype: str
    compile: str = "none"


@dataclass
class FragmentPlan:
    """One fragment's mask and windows: what every model runs over it."""

    fragment: Fragment
    shape: tuple[int, int]
    mask: np.ndarray  # (H, W) bool
    touched: np.ndarray  # (gh, gw) bool
    origins: np.ndarray  # (N, 2) block coords, reference order
    ops: np.ndarray  # (N,) flip op
    notes: list[str] = field(default_factory=list)
    fingerprint: dict | None = None  # fragment_fingerprint: what a partial of this fragment is keyed by
    missing_chunks: list[str] = field(default_factory=list)  # a zarr store's chunks missing under the mask
    rows: tuple[int, int] | None = (
        None  # a row range [r0, r1) of window-origin block rows; None: every window
    )
    mask_file: bool = (
        True  # False: no mask file, every pixel used (the GP family then covers its padding too)
    )

    @property
    def id(self) -> str:
        """The fragment's id, with the row range of a part (``2@0-120``): a unit's name in partials and reports."""
        return self.fragment.id if self.rows is None else f"{self.fragment.id}@{self.rows[0]}-{self.rows[1]}"

    @property
    def key_id(self) -> str:
        """``id`` as partials are named and keyed: by ``Fragment.key_id``, the same in every ``--direction``."""
        key = self.fragment.key_id
        return key if self.rows is None else f"{key}@{self.rows[0]}-{self.rows[1]}"

    def block_rows(self, tile: int) -> tuple[int, int]:
        """The cover grid's block rows ``[lo, hi)`` this item's windows of side ``tile`` reach: every row for a
        whole fragment; for a row range, its first origin row to where its last windows end. A unit's sums are
        kept on these rows only, so a fragment split into ranges never holds a fragment-sized map per range."""
        ch = cover_grid(self.shape)[0]
        if self.rows is None:
            return 0, ch
        return min(self.rows[0], ch), min(self.rows[1] - 1 + tile // BLOCK, ch)


def split_rows(plan: FragmentPlan, max_windows: int, *, max_pixels: int | None = None) -> list[FragmentPlan]:
    """The fragment as row ranges of about ``max_windows`` windows and at most about ``max_pixels`` pixels each
    (``geometry.LARGE_PIXELS`` by default; one range when it has no more), cut only at multiples of ``geometry.MAX_ROWS_PER_BAND`` origin rows (so a
    range may hold more, when one stripe of that many rows does): a range holds the windows whose origin row
    falls in it, in the plan's order, each with its own flip op. Since the cuts fall between bands, a range runs
    the very batches of the single pass, and the fixed-point sums of the ranges (``stitch.SumMap``) add up to
    the single pass's to the last bit. The pixel bound keeps a unit's sum map (8 bytes a pixel) small on a wide
    segment read at a coarse stride, where few windows cover a large area.

    Depends on the fragment and the bounds only, never on how many devices run it."""
    n = len(plan.origins)
    h, w = plan.shape
    max_pixels = geometry.LARGE_PIXELS if max_pixels is None else max_pixels
    if n <= max_windows and h * w <= max_pixels:
        return [plan]
    stripe_px = MAX_ROWS_PER_BAND * BLOCK * w  # pixels of one stripe of origin rows
    max_rows = max(1, max_pixels // stripe_px) * MAX_ROWS_PER_BAND
    rows, per_row = np.unique(plan.origins[:, 0] // MAX_ROWS_PER_BAND, return_counts=True)  # stripes
    rows = rows * MAX_ROWS_PER_BAND
    if len(rows) == 0:
        return [plan]
    cuts, load = [int(rows[0])], 0
    for r, k in zip(rows.tolist(), per_row.tolist(), strict=True):
        if load and (load + k > max_windows or r + MAX_ROWS_PER_BAND - cuts[-1] > max_rows):
            cuts.append(r)
            load = 0
        load += k
    cuts.append(int(rows[-1]) + MAX_ROWS_PER_BAND)
    parts = []
    for r0, r1 in zip(cuts[:-1], cuts[1:], strict=True):
        keep = (plan.origins[:, 0] >= r0) & (plan.origins[:, 0] < r1)
        parts.append(dataclasses.replace(plan, origins=plan.origins[keep], ops=plan.ops[keep], rows=(r0, r1)))
    return parts


def plan_fragment(fragment: Fragment, *, stride: int, tta: str) -> FragmentPlan:
    """Validate the volume (all slices, before any compute), read the mask, plan the windows."""
    with open_volume(fragment) as vol:
        shape = (vol.height, vol.width)
        notes = list(vol.warnings)  # files in surface_volume/ that are not slices, ignored
        data = vol.describe()
        mask, warning = load_mask(fragment, shape, vol.pyramid_mask)
        # a zarr store may lack chunks (read as zeros): normal outside the papyrus, never silent under the mask
        missing = vol.missing_under(mask)
    if warning:
        notes.append(warning)
    if missing:
        notes.append(f"{fragment.where}: {len(missing)} chunk(s) under the mask are missing from the store and read "
                     f"as zeros (first: {', '.join(missing[:3])}); --missing-chunks refuse stops such a run")  # fmt: skip
    windows = windows_of(mask, stride_blocks=stride // BLOCK, tta=tta)
    touched, origins = windows.touched, windows.origins
    if min(shape) < 256:
        notes.append(
            f"fragment {fragment.id} ({shape[0]}x{shape[1]}) is smaller than one window: zero-padded"
        )
    if len(origins) == 0:
        notes.append(f"fragment {fragment.id}: no mask pixel on the 32-pixel grid, empty prediction")
    mask_file = not (warning or "").endswith(NO_MASK_FILE)
    data = data if mask_file else {**data, "mask_file": False}  # the GP family's windows differ without one
    return FragmentPlan(
        fragment, shape, mask, touched, origins, windows.ops, notes=notes,
        fingerprint=fragment_fingerprint(fragment, shape, mask, data), missing_chunks=missing, mask_file=mask_file,
    )  # fmt: skip


def fragment_fingerprint(fragment: Fragment, shape: tuple[int, int], mask: np.ndarray, data: dict) -> dict:
    """A cheap identity of a fragment's data: id (``key_id``: the same in every ``--direction``), layout, shape, the mask's hash, and ``data``: the size and mtime
    of each slice file the models read, in their order (a segment's chosen and maybe reversed layers), or a zarr
    array's metadata.

    Sizes and mtimes rather than content hashes: hashing 65 slices of GBs would cost minutes per run, while any
    rewrite of a slice changes its mtime.
    """
    mask_sha = hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()
    layers = {"layers": list(fragment.layers)} if fragment.layers is not None else {}
    if fragment.rotate:
        layers["rotate"] = fragment.rotate
    return {"id": fragment.key_id, "layout": fragment.layout, "shape": list(shape), "mask_sha256": mask_sha, **layers,
            **data}  # fmt: skip


def model_count(plan: FragmentPlan, spec: ModelSpec) -> np.ndarray:
    """``(ch, cw)`` int32: how many of the model's squares cover each block of the fragment's cover grid (the
    partial blocks of the remainder rows and columns included, as the reference counted them); a family whose
    map is final where the mask is (the GP TimeSformer's): 1 on every block holding mask pixels."""
    if spec.arch == gp_family.ARCH:
        return gp_family.gp_coverage(plan.mask, plan.rows)
    return spec_coverage(plan.origins, plan.shape, spec)


@dataclass(frozen=True)
class Unit:
    """One model over one fragment: the unit a run is planned, executed, saved and resumed in."""

    model: ModelSpec
    weights: Weights
    fragment: FragmentPlan

    @property
    def windows(self) -> int:
        if self.model.arch == gp_family.ARCH:
            return gp_windows(self.fragment, self.model)
        return len(self.fragment.origins)

    def count(self) -> np.ndarray:
        return model_count(self.fragment, self.model)

    def block_rows(self) -> tuple[int, int]:
        """The block rows the unit's sums are kept on (``FragmentPlan.block_rows``)."""
        return self.fragment.block_rows(self.model.tile)


_GP_WINDOWS: dict[tuple, int] = {}  # gp_windows' answers: counting walks the unit's mask rows


def gp_windows(item: FragmentPlan, spec: ModelSpec) -> int:
    """The windows of a GP-family unit (``gp_family.window_count``), counted once per item and window rule."""
    settings = gp_family.settings_for(spec)
    mask_id = (item.fingerprint or {}).get("mask_sha256", id(item.mask))
    key = (mask_id, item.shape, item.rows, item.mask_file, settings.stride, settings.windows)
    if key not in _GP_WINDOWS:
        _GP_WINDOWS[key] = gp_family.window_count(item, settings)
    return _GP_WINDOWS[key]


def plan_run(
    fragments, *, stride: int, tta: str, unit_windows: int
) -> tuple[list[FragmentPlan], list[FragmentPlan]]:
    """Every fragment's plan, and the items the units run over (fragments, or their row ranges: ``split_rows``)."""
    plans = [plan_fragment(f, stride=stride, tta=tta) for f in fragments]
    return plans, [part for p in plans for part in split_rows(p, unit_windows)]
