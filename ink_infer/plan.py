"""The plan of a run: each fragment's windows (``FragmentPlan``), each model's checked weights (``Weights``), and
the unit of work, one model over one fragment (``Unit``), with the key its result is saved under.

A unit's result depends only on the unit (its model's output fields, weights and fragment) and on the run's
settings that change bytes (``UnitSettings``), so any executor that runs the units, in any order, on any device of
the same type, produces the same sums; ``partials.py`` stores them under ``Unit.key``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import BLOCK, ModelSpec
from .fragments import Fragment, load_mask, open_volume
from .tiling import cover_grid, coverage_blocks, touched_blocks, tta_ops, window_origins

RANDOM_SEED = 0  # random-init rehearsals are reproducible, and their partials can be keyed by it
# 2: maps on the cover grid (remainder rows/columns covered) from float16-rounded inputs; format-1 files are
# results of the earlier rule and are never reused
PARTIAL_FORMAT = 2


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
    """The run's settings that change a unit's bytes: window stride and TTA, device type and model dtype."""

    stride: int
    tta: str
    device: str
    dtype: str


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

    @property
    def id(self) -> str:
        return self.fragment.id


def plan_fragment(fragment: Fragment, *, stride: int, tta: str) -> FragmentPlan:
    """Validate the volume (all slices, before any compute), read the mask, plan the windows."""
    with open_volume(fragment) as vol:
        shape = (vol.height, vol.width)
        notes = list(vol.warnings)  # files in surface_volume/ that are not slices, ignored
    mask, warning = load_mask(fragment, shape)
    if warning:
        notes.append(warning)
    touched = touched_blocks(mask)
    origins = window_origins(touched, stride_blocks=stride // BLOCK)
    if min(shape) < 256:
        notes.append(
            f"fragment {fragment.id} ({shape[0]}x{shape[1]}) is smaller than one window: zero-padded"
        )
    if len(origins) == 0:
        notes.append(f"fragment {fragment.id}: no mask pixel on the 32-pixel grid, empty prediction")
    return FragmentPlan(
        fragment, shape, mask, touched, origins, tta_ops(len(origins), mode=tta), notes=notes,
        fingerprint=fragment_fingerprint(fragment.id, fragment.path, shape, mask),
    )  # fmt: skip


def fragment_fingerprint(frag_id: str, path: Path, shape: tuple[int, int], mask: np.ndarray) -> dict:
    """A cheap identity of a fragment's data: id, shape, the mask's hash, and each slice file's size and mtime.

    Sizes and mtimes rather than content hashes: hashing 65 slices of GBs would cost minutes per run, while any
    rewrite of a slice changes its mtime.
    """
    slices = []
    for entry in sorted((path / "surface_volume").iterdir()):
        if not entry.name.startswith("."):
            st = entry.stat()
            slices.append([entry.name, st.st_size, st.st_mtime_ns])
    mask_sha = hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()
    return {"id": frag_id, "shape": list(shape), "mask_sha256": mask_sha, "slices": slices}


def model_count(plan: FragmentPlan, spec: ModelSpec) -> np.ndarray:
    """``(ch, cw)`` int32: how many of the model's squares cover each block of the fragment's cover grid (the
    partial blocks of the remainder rows and columns included, as the reference counted them)."""
    return coverage_blocks(
        plan.origins,
        cover_grid(plan.shape),
        tile_blocks=spec.tile // BLOCK,
        offset_blocks=spec.offset // BLOCK,
        side_blocks=spec.side // BLOCK,
    )


# ModelSpec fields that do not change a model's output: where its file is, its checksum and size (the weights'
# identity is keyed by their sha256 instead), and its weight in the ensemble (applied after the unit)
NOT_OUTPUT_FIELDS = ("file", "sha256", "size", "weight")


def output_fields(spec: ModelSpec) -> dict:
    """The spec's fields that decide its output bytes, JSON-ready."""
    return {k: v for k, v in dataclasses.asdict(spec).items() if k not in NOT_OUTPUT_FIELDS}


@dataclass(frozen=True)
class Unit:
    """One model over one fragment: the unit a run is planned, executed, saved and resumed in."""

    model: ModelSpec
    weights: Weights
    fragment: FragmentPlan

    @property
    def windows(self) -> int:
        return len(self.fragment.origins)

    def count(self) -> np.ndarray:
        return model_count(self.fragment, self.model)

    def key(self, settings: UnitSettings) -> tuple[str, dict]:
        """(sha256 hex digest, the key it hashes): everything that decides the unit's bytes, and nothing else.

        The model's output fields, its weights' identity (sha256, or the random-init seed), the fragment's
        fingerprint, the run's ``settings`` and the ink_infer / torch / timm versions."""
        import timm
        import torch

        from . import __version__

        key = {
            "format": PARTIAL_FORMAT,
            "model": output_fields(self.model),
            "weights": self.weights.identity,
            "fragment": self.fragment.fingerprint,
            **dataclasses.asdict(settings),
            "versions": {"ink_infer": __version__, "torch": torch.__version__, "timm": timm.__version__},
        }
        text = json.dumps(key, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest(), json.loads(text)
