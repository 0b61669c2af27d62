"""The report's schema: what each unit of a run produced, as typed values that flow one way, up to ``run/pipeline.py``.

``predict_fragment`` measures a ``(model, fragment)`` unit (``FragmentResult``); ``model_run.run_model`` gathers
one model's units (``ModelResult``); ``pipeline.run`` assembles the ``RunReport`` from them and writes report.json
from it with ``dataclasses.asdict``. Nothing below the pipeline writes into a report. The CLI's table and the
dry run's verdicts are read from these values, and ``report.json`` holds exactly their fields: this file is its
schema.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ink_infer.errors import ErrorKind, UserError
from ink_infer.outputs.atomic import atomic_write_text, note_unwritten

log = logging.getLogger(__name__)

# the stages of a unit's partial: saved now, read back from an earlier run, or why it could not be saved
PARTIAL_SAVED, PARTIAL_REUSED = "saved", "reused"


@dataclass
class FragmentResult:
    """One ``(model, fragment)`` unit: what it ran and what it cost."""

    windows: int = 0
    seconds: float = 0.0
    ms_per_window: float | None = None
    wait_read_s: float = 0.0  # time the device waited for the reader
    nonfinite_windows: int = 0  # windows whose outputs held NaN or inf (zeroed, still counted)
    batch_size: int = 0
    first_batch_s: float = 0.0  # wall time of the first batch (warm-up), left out of the dry run's rate
    batch_ms_per_window: list[float] | None = (
        None  # dry runs: each batch's ms per window (the projection's sample)
    )
    oom_retries: int = 0
    partial: str | None = None  # PARTIAL_SAVED | PARTIAL_REUSED | "not saved (...)"; None in a dry run
    device: str | None = None  # where it was computed (a worker's device, or this process's)
    wire: dict | None = None  # remote stores: what the unit fetched (volumes.remote.WireStats.since)

    @classmethod
    def of_pass(cls, stats, device: str) -> FragmentResult:
        """The result of one pass of the engine (``engine.predict.PredictStats``) on ``device``."""
        per_window = stats.seconds / stats.windows if stats.windows else None
        return cls(
            windows=stats.windows, seconds=stats.seconds, ms_per_window=per_window * 1000 if per_window else None,
            wait_read_s=stats.wait_read_s, nonfinite_windows=stats.nonfinite_windows, batch_size=stats.batch_size,
            first_batch_s=stats.first_batch_s, oom_retries=stats.oom_retries, device=device,
            batch_ms_per_window=stats.batch_ms_per_window,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> FragmentResult:
        """From the stats saved with a partial (unknown keys, from another version, are dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Projection:
    """A dry run's projection of one model's full run."""

    s_per_window: float  # the median over the timed batches after each fragment's first (warm-up)
    projected_hours: float  # these fragments
    projected_hours_scaled: dict[str, float]  # "HxW" -> hours for one fragment of that size (--scale-to)
    batches: int = 0  # timed batches the median is over
    s_per_window_p10_p90: list[float] | None = None  # their spread


@dataclass
class ModelResult:
    """One model over every fragment. ``status``: ok | skipped (budget) | failed | interrupted."""

    name: str
    arch: str
    status: str
    reason: str | None = None
    random_weights: bool = False
    sha256: str | None = None
    load: dict | None = None  # what load_weights found: prefix, tensors, hyper-parameters
    tuning: dict | None = None
    fragments: dict[str, FragmentResult] = field(default_factory=dict)  # in the plan's fragment order
    warnings: list[str] = field(default_factory=list)
    ignored_partials: list[list[str]] = field(default_factory=list)  # [fragment id, why]
    projection: Projection | None = None
    seconds: float = 0.0
    gpu_peak_gib: dict[str, float] | None = None  # allocated / reserved, CUDA only
    host_peak_gib: float = 0.0

    @property
    def windows(self) -> int:
        return sum(f.windows for f in self.fragments.values())

    @classmethod
    def from_dict(cls, d: dict) -> ModelResult:
        """From its report.json form (a worker's or a part's file)."""
        d = dict(d)
        d["fragments"] = {k: FragmentResult.from_dict(v) for k, v in d.get("fragments", {}).items()}
        if d.get("projection") is not None:
            d["projection"] = Projection(**d["projection"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class PartReport:
    """What one worker process, one ``--part-id`` or one torchrun rank computed: ``OUT/parts/<label>.json``.

    ``status``: running | ok | failed | interrupted; ``error_kind`` (when failed): ``errors.ErrorKind``.
    ``lost``: [model, unit] pairs it was given (or took from a shared queue) and did not finish, and no other
    worker took (filled in by whoever saw it end)."""

    label: str
    device: str
    status: str = "running"
    error: str | None = None
    error_kind: ErrorKind | None = None
    models: list[ModelResult] = field(default_factory=list)
    seconds: float = 0.0
    host_peak_gib: float = 0.0
    exitcode: int | None = None  # a spawned worker's; None for a share computed by the run's own process
    lost: list[list[str]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> PartReport:
        d = {**d, "models": [ModelResult.from_dict(m) for m in d.get("models", [])]}
        if d.get("error_kind") is not None:
            d["error_kind"] = ErrorKind(d["error_kind"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class SizeVerdict:
    hours: float
    verdict: str


@dataclass
class Verdicts:
    """The dry run's answer: does the full run fit the time, GPU and host budgets (for each projected size)?"""

    hours: float
    hours_verdict: str
    hours_scaled: dict[str, SizeVerdict]
    budget_hours: float
    budget_hours_after_margin: float
    gpu_peak_gib: float | None
    gpu_verdict: str
    host_peak_gib: float
    host_verdict: str
    models_not_ok: list[str]


@dataclass
class FragmentOutput:
    threshold: float | None  # None: an empty region, an empty prediction
    ink_fraction: float
    region_pixels: int


@dataclass
class DirectionFigures:
    """One direction of a segment read both ways (``--direction both``), over its mask."""

    ink_fraction: float  # of the mask's pixels, those above the direction's threshold (its ink PNG)
    mean_probability: float  # the ensemble's mean probability over the mask


@dataclass
class DirectionsCompared:
    """A segment read both ways (``--direction both``): each direction's figures, the share of the mask where
    their two ink maps agree, and, as a hint only, the direction with the higher mean probability and the one with
    more ink (None: a tie). With a quantile threshold the ink fractions are alike by construction; the mean
    probability is the telling figure."""

    forward: DirectionFigures
    reverse: DirectionFigures
    agreement: float  # of the mask's pixels, those ink in both maps or in neither
    higher_mean_probability: str | None
    more_ink: str | None


@dataclass
class SubmissionResult:
    path: str
    fragments: dict[str, FragmentOutput]
    maps: list[str] = field(
        default_factory=list
    )  # probability TIFFs and ink PNGs written (--save-probabilities)
    directions: dict[str, DirectionsCompared] = field(default_factory=dict)  # --direction both: by segment id


@dataclass
class PartialsSummary:
    dir: str | None  # None in a dry run: sampled windows are no result to keep
    fresh: bool  # --fresh: partials are written but never read
    reused: list[list[str]] = field(default_factory=list)  # [model, fragment]
    ignored: list[list[str]] = field(default_factory=list)  # [model, fragment, why]
    keep: bool = True  # False: deleted after a successful submission (--no-keep-partials; Kaggle's default)
    deleted: int = 0  # files deleted after the submission was written


@dataclass
class Interruption:
    signal: str
    model: str | None  # the model that was running (None between models)


@dataclass
class FragmentPlanned:
    shape: list[int]
    windows: int
    missing_chunks: list[str] = field(default_factory=list)  # a zarr store's chunks missing under the mask


@dataclass
class RunReport:
    """report.json. ``status``: running | ok | failed | interrupted."""

    status: str
    mode: str  # submit | dry-run
    started: str  # ISO 8601, UTC
    command: list[str]  # the command line (sys.argv)
    manifest: str
    manifest_sha256: str
    data: str
    options: dict  # the run's resolved options (provenance: the command can be rebuilt from them)
    stride: int
    tta: str
    threshold: dict
    environment: dict
    gpu_memory_fraction: float | None
    disk: dict
    warnings: list[str]
    fragments: dict[str, FragmentPlanned]
    partials: PartialsSummary
    unverified_weights: list[str] = field(
        default_factory=list
    )  # models whose file has no sha256 in the manifest
    models: list[ModelResult] = field(default_factory=list)
    parts: list[PartReport] = field(default_factory=list)  # the workers, parts or ranks that computed units
    projection: Verdicts | None = None
    submission: SubmissionResult | None = None
    interrupted: Interruption | None = None
    error: str | None = None
    demo_scores: dict[str, float] | None = (
        None  # --demo: F0.5 per fragment against the synthetic ground truth
    )
    seconds: float = 0.0
    host_peak_gib: float = 0.0
    remote: dict | None = (
        None  # remote stores: what the start fetched; as_dict adds what each unit computed did
    )

    def add_model(self, result: ModelResult) -> None:
        """A model's result joins the report: its warnings and its partials' fate too."""
        self.models.append(result)
        self.warnings.extend(result.warnings)
        for frag_id, f in result.fragments.items():
            if f.partial == PARTIAL_REUSED:
                self.partials.reused.append([result.name, frag_id])
        self.partials.ignored.extend([result.name, *why] for why in result.ignored_partials)

    @property
    def partials_kept(self) -> int:
        """(model, unit) results of this run that are in OUT/partials (saved now, here or by its workers, parts or
        ranks, or reused from before)."""
        kept = {
            (m.name, unit)
            for m in [*self.models, *(m for p in self.parts for m in p.models)]
            for unit, f in m.fragments.items()
            if f.partial in (PARTIAL_SAVED, PARTIAL_REUSED)
        }
        return len(kept)

    def as_dict(self) -> dict:
        found = dataclasses.asdict(self)
        found["remote"] = self.wire_totals()
        return found

    def wire_totals(self) -> dict | None:
        """Requests, bytes, cache hits, retries and missing chunks of the whole run: the start's and each unit's
        computed in this run (here or by a worker, part or rank: each once; a reused partial fetched nothing now)."""
        from ink_infer.volumes.remote import add_wire

        units = {
            (m.name, unit): f.wire
            for m in [*self.models, *(m for p in self.parts for m in p.models)]
            for unit, f in m.fragments.items()
            if f.partial != PARTIAL_REUSED
        }
        return add_wire(self.remote, *units.values())


def json_text(data: dict) -> str:
    """``data`` as the indented JSON every report file holds."""
    return json.dumps(data, indent=1, default=_jsonable) + "\n"


def _jsonable(o: object) -> object:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_report(path: Path, report: RunReport, t0: float | None, *, final: bool) -> None:
    """``path`` (OUT/report.json, or a part's own report) from ``report``, with the run's seconds (since ``t0``, a
    ``perf_counter``; None: as recorded, for a report amended after the run) and host peak.

    Only the final report is a must (a ``UserError`` if it cannot be written); the others (after each model, on
    a failure or an interruption) are progress notes that a full disk must not turn into a failed run."""
    from ink_infer.run.runtime import host_peak_gib

    if t0 is not None:
        report.seconds = time.perf_counter() - t0
    report.host_peak_gib = host_peak_gib()
    text = json_text(report.as_dict())
    try:
        atomic_write_text(path, text)
    except OSError as e:
        why = e.strerror or str(e)
        if _replace_in_place(path, text):
            return
        if final:
            done = "submission.csv was written" if report.submission else "no submission in a dry run"
            raise UserError(f"{path}: cannot write ({why}); {done}") from None
        note_unwritten(log, path, e, "cannot write")


def _replace_in_place(path: Path, text: str) -> bool:
    """Fallback when the atomic write failed (a full disk has no room for a second copy): truncate the old file,
    which frees its blocks, and write the new one there. If even that fails the file is removed, so no stale
    status is ever left behind, and False is returned."""
    try:
        with open(path, "r+" if path.exists() else "w", encoding="utf-8") as f:
            f.truncate(0)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        path.unlink(missing_ok=True)
        return False
