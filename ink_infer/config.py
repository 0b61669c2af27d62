"""Small frozen values that travel through the pipeline: one model's spec, the threshold, the run's options.

Validation happens here, with messages a user can act on (raised as ``UserError``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ink_infer.errors import UserError
from ink_infer.geometry import WIDTH_DEFAULTS
from ink_infer.schema import CLI_NUMBERS, THRESHOLD_FIELDS, Invalid, check_field
from ink_infer.volumes.segments import LayerChoice

# The choices of the options with a fixed list (the CLI's ``choices=`` and ``RunConfig``'s checks)
TTA_MODES = ("none", "scheduled", "full")  # flip TTA: none, the reference's one flip per window, all four
COMPILE_MODES = ("none", "default", "max-autotune", "auto")  # --compile (engine.compiling)
ROTATIONS = (0, 90, 180, 270)  # --rotate, degrees counterclockwise
ON_MODEL_ERROR = ("skip", "fail")
LAYER_AXES = ("first", "last")  # --layer-axis: where a zarr store's layers are
MISSING_CHUNKS = ("warn", "refuse")  # --missing-chunks: a zarr store's chunks missing under the mask
CACHE_GB = 20.0  # --cache-gb: the remote chunk cache's default bound
PROB_FORMATS = {"tiff": ".tif", "ome-zarr": ".ome.zarr"}  # --prob-format: the probability maps' file suffixes
DIRECTIONS = ("forward", "reverse", "both")  # --direction: a segment's layers as read, reversed, or both ways


@dataclass(frozen=True)
class ModelSpec:
    """One manifest entry: how to build a model, which slices it sees, where its weights are.

    ``z_range`` is ``[start, stop)`` within the 65 slices. ``tile`` is the window side read from the fragment;
    ``crop`` (optional) is the centred square of the window fed to the model (192 for the irCSN models).
    The model's input is ``(B, z_stop - z_start, side, side)`` normalised float, its output ``(B, 1, side/32, side/32)``
    logits, with ``side = crop or tile`` (the timesformer arch: ``(B, 1, 26, 64, 64)`` in, ``(B, 1, 4, 4)`` out).
    """

    name: str
    arch: str
    in_chans: int
    z_range: tuple[int, int]
    tile: int = 256
    crop: int | None = None
    backbone: str | None = None  # timm name, 2.5d only
    num_3d_layer: int | None = None  # 2.5d only
    depth: int | None = None  # csn3d only: 50 | 152, or None with stage_blocks
    stage_blocks: tuple[int, ...] | None = (
        None  # csn3d only: blocks per stage, overrides depth (small demo models)
    )
    # Widths, for small models (the demo's); None means the reference width (WIDTH_DEFAULTS).
    dim: int | None = None  # 2.5d only: channels after the encoder's projection
    base_channels: int | None = None  # csn3d only: channels of the stem (stage i has base * 2**i planes)
    head_dim: int | None = None  # csn3d only: channels of the head's hidden 1x1 conv
    with_norm: bool | None = (
        None  # timesformer only: a BatchNorm3d on the input (the GP's option; False by default)
    )
    # timesformer only: villa's variants of the GP script by name (models.gp_family.GPSettings); None: the GP's
    stride: int | None = None  # window stride, px (GP 21; villa 32 or 16)
    divisor: float | None = None  # 8-bit values over this (GP 255, the training scale; villa 200)
    windows: str | None = None  # inside (GP): wholly inside the mask | any: touching it (villa V1)
    blend: str | None = None  # gp: gkern(64, 1) / max | hann (villa V2) | gaussian (sigma px)
    sigma: float | None = None  # blend gaussian: px (default 25.6, villa's 64 / 2.5)
    count: str | None = None  # ones (GP): the count adds 1 per window | weights: the blend weight (villa)
    file: str | None = None
    sha256: str | None = None
    size: int | None = None
    weight: float = 1.0

    def width(self, name: str) -> int:
        """The effective width ``name`` ('dim', 'base_channels' or 'head_dim'): the manifest's or the reference's."""
        value = getattr(self, name)
        return WIDTH_DEFAULTS[name] if value is None else value

    @property
    def n_slices(self) -> int:
        return self.z_range[1] - self.z_range[0]

    @property
    def side(self) -> int:
        """Side of the square the model sees (crop if any, else tile)."""
        return self.crop or self.tile

    @property
    def offset(self) -> int:
        """Offset of the model's square inside the window (0 without crop)."""
        return (self.tile - self.side) // 2

    @property
    def groups(self) -> int:
        """Number of slice groups of ``in_chans`` slices each (2.5d); the depth of the input (csn3d)."""
        return self.n_slices // self.in_chans


@dataclass(frozen=True)
class ThresholdSpec:
    """Percentile threshold: ink where ``p > quantile(p[region], percentile)``.

    region ``covered``: pixels in the mask that at least one window covered (the reference's default);
    region ``mask``: every pixel in the mask (yukke's variant).
    """

    percentile: float = 0.93
    region: str = "covered"

    def __post_init__(self) -> None:
        try:
            for key, rule in THRESHOLD_FIELDS.items():
                check_field(rule, getattr(self, key), "threshold", key)
        except Invalid as e:
            raise UserError(str(e)) from None


@dataclass(frozen=True)
class Budget:
    """Kaggle's limits by default: 9 hours, ~13 GB of host memory, one 16 GB GPU."""

    hours: float = 9.0
    host_mem_gb: float = 13.0
    gpu_mem_gb: float = 16.0
    safety_margin: float = 0.1  # fraction of the budget kept back when deciding whether a model still fits


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``submit`` run needs, resolved from the command line."""

    data: Path | str  # a local folder, or the URL of a remote store (volumes.remote)
    out: Path
    manifest: Path
    weights: Path | None = None
    device: str = "auto"
    stride: int = 32
    tta: str = "scheduled"  # none | scheduled | full
    threshold_percentile: float | None = None  # --threshold; None: the manifest's
    threshold_region: str | None = None  # --threshold-region; None: the manifest's
    dry_run: bool = False
    max_windows: int = 64
    scale_to: tuple[tuple[int, int], ...] = ()
    allow_random_weights: bool = False
    batch_size: int | None = None  # None: chosen from the device
    budget: Budget = field(default_factory=Budget)
    quiet: bool = False
    previews: bool = True
    on_model_error: str = "skip"  # skip | fail
    max_nonfinite: float = (
        0.01  # fraction of a fragment's windows that may give NaN/inf (zeroed) before a model fails
    )
    devices: tuple[str, ...] = ()  # several: one worker process per device (--devices); empty: --device alone
    unit_windows: int = 16384  # a fragment with more windows is split into row ranges of at most this many
    num_parts: int = 1  # --num-parts / --part-id: compute one part of the units (array jobs), no outputs
    part_id: int = 0
    merge_only: bool = False  # build the outputs from the partials of every part; compute nothing
    partials: Path | None = None  # --partials DIR; None: OUT/partials
    keep_partials: bool = True  # False: delete the partials after a successful submission (Kaggle's default)
    require_hashes: bool = False  # refuse weight files the manifest gives no sha256 for
    fresh: bool = False  # --fresh: compute everything, ignoring partials of earlier runs (still written)
    progress_every: float = 60.0  # seconds between progress lines when stderr is not a terminal
    argv: tuple[str, ...] = ()  # the command line, for report.json
    layers: tuple[int, int] | None = None  # --layers START:STOP of a segment's stack; None: the middle 65
    # --direction forward | reverse | both (a segment's layers as read, reversed, or both ways); None: reverse with
    # reverse_layers, else forward. Once made, a RunConfig holds the resolved direction, and reverse_layers says
    # whether it is "reverse" (--reverse-layers, the API's reverse_layers=True: its older spelling)
    direction: str | None = None
    reverse_layers: bool = False
    layer_axis: str | None = (
        None  # --layer-axis first | last: a zarr store's; None: from the store, mask or shape
    )
    missing_chunks: str = (
        "warn"  # --missing-chunks warn | refuse: a zarr store's chunks missing under the mask
    )
    save_probabilities: bool | None = (
        None  # probability TIFFs and ink PNGs; None: for segments, not Kaggle runs
    )
    save_model_maps: bool = False  # also each model's probability TIFF
    gp_png: bool = False  # also the GP script's picture of each timesformer model's map (run.gp_picture)
    prob_format: str = "tiff"  # --prob-format tiff | ome-zarr (an NGFF multiscale pyramid)
    rotate: int = (
        0  # --rotate: degrees the input is turned counterclockwise before inference (outputs turned back)
    )
    compile: str = "none"  # --compile none | default | max-autotune | auto (compiling.py)
    mask: Path | None = None  # --mask: the one segment's mask
    storage_options: tuple[tuple[str, object], ...] = ()  # --storage-option KEY=VALUE, for remote stores
    cache: Path | None = None  # --cache DIR: remote stores' chunk cache; None: OUT/cache
    cache_gb: float = CACHE_GB  # --cache-gb; 0: no cache

    @property
    def remote(self):
        """How remote stores are reached (``volumes.remote.Remote``; its URL is ``data``'s, or a store's under it)."""
        from ink_infer.volumes.remote import Remote

        cache = self.cache if self.cache is not None else self.out / "cache"
        return Remote(str(self.data), self.storage_options, str(cache), int(self.cache_gb * 1e9))

    @property
    def layer_choice(self):
        return LayerChoice(
            self.layers, self.direction == "reverse", self.layer_axis, both=self.direction == "both"
        )

    def threshold_over(self, manifests: ThresholdSpec) -> ThresholdSpec:
        """The run's threshold: the manifest's, with what --threshold and --threshold-region say instead."""
        return ThresholdSpec(
            manifests.percentile if self.threshold_percentile is None else self.threshold_percentile,
            manifests.region if self.threshold_region is None else self.threshold_region,
        )

    @property
    def partials_dir(self) -> Path:
        """Where finished units are saved and resumed from."""
        return self.partials if self.partials is not None else self.out / "partials"

    def __post_init__(self) -> None:
        numbers = {"--stride": self.stride, "--max-windows": self.max_windows, "--batch-size": self.batch_size,
                   "--budget-hours": self.budget.hours, "--host-mem-gb": self.budget.host_mem_gb,
                   "--gpu-mem-gb": self.budget.gpu_mem_gb, "--max-nonfinite": self.max_nonfinite,
                   "--unit-windows": self.unit_windows, "--cache-gb": self.cache_gb, "--num-parts": self.num_parts,
                   "--part-id": self.part_id, "--progress-every": self.progress_every}  # fmt: skip
        try:
            for option, value in numbers.items():
                if value is not None or option != "--batch-size":  # None: chosen from the device
                    check_field(CLI_NUMBERS[option], value, "argument", option)
        except Invalid as e:
            raise UserError(str(e)) from None
        for option, value, choices in (("--rotate", self.rotate, ROTATIONS), ("--tta", self.tta, TTA_MODES),
                                       ("--compile", self.compile, COMPILE_MODES),
                                       ("--on-model-error", self.on_model_error, ON_MODEL_ERROR),
                                       ("--layer-axis", self.layer_axis, (None, *LAYER_AXES)),
                                       ("--missing-chunks", self.missing_chunks, MISSING_CHUNKS),
                                       ("--prob-format", self.prob_format, tuple(PROB_FORMATS))):  # fmt: skip
            if value not in choices:
                raise UserError(f"{option} {value!r}: expected one of {', '.join(map(str, choices))}")
        self._resolve_direction()
        check_device_names(self.devices)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device {self.device!r}: expected auto, cpu or cuda")
        if self.part_id >= self.num_parts:
            raise UserError(
                f"--part-id {self.part_id}: expected 0 .. {self.num_parts - 1} (--num-parts {self.num_parts})"
            )
        if self.num_parts > 1 and (self.devices or self.merge_only):
            raise UserError(
                "--num-parts: one part per process; use it without --devices and without --merge-only"
            )
        if self.num_parts > 1 and self.dry_run:
            raise UserError("--num-parts: a dry run projects the whole run; use it without --num-parts")

    def _resolve_direction(self) -> None:
        """``direction`` resolved, ``reverse_layers`` said by it (both fields, so report.json's options and the
        partials read the same whichever spelling was used)."""
        if self.direction not in (None, *DIRECTIONS):
            raise UserError(f"--direction {self.direction!r}: expected one of {', '.join(DIRECTIONS)}")
        if self.reverse_layers and self.direction not in (None, "reverse"):
            raise UserError(
                f"--reverse-layers is --direction reverse: it cannot go with --direction {self.direction}"
            )
        direction = self.direction or ("reverse" if self.reverse_layers else "forward")
        object.__setattr__(self, "direction", direction)  # frozen: set once, here, as it was made
        object.__setattr__(self, "reverse_layers", direction == "reverse")


def check_device_names(names: tuple[str, ...]) -> None:
    """``--devices`` spelled right, before torch is imported: ``all``, or ``cpu`` (may repeat) / ``cuda:N`` (once
    each), all of one type. Whether the GPUs exist is ``runtime.resolve_devices``'s to say."""
    if not names or names == ("all",):
        return
    listed = ",".join(names)
    for name in names:
        if name != "cpu" and re.fullmatch(r"cuda:\d+", name) is None:
            raise UserError(
                f"--devices {listed}: {name!r} is not a device: expected all, or cpu / cuda:N, comma-separated"
            )
    gpus = [n for n in names if n != "cpu"]
    if len(set(gpus)) < len(gpus):
        twice = next(n for n in gpus if gpus.count(n) > 1)
        raise UserError(f"--devices {listed}: {twice} is named twice (one worker per GPU)")
    if gpus and len(gpus) < len(names):
        raise UserError(f"--devices {listed}: all devices must be of one type (partials are keyed by it)")
