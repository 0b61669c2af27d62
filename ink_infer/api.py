"""The Python API, for notebooks: an ensemble loaded (checked) once, then run over a fragment or a segment, with
the probability map and the ink mask handed back as arrays.

    import ink_infer
    ensemble = ink_infer.load_ensemble("demo")                  # or manifest=..., weights=...
    result = ink_infer.predict(ensemble, "demo_out/demo_data/vesuvius-challenge-ink-detection/test/a")
    result.probability    # (H, W) float32 in [0, 1]
    result.ink            # (H, W) bool: the manifest's threshold, applied exactly as the CLI does

It runs the CLI's own story (``run.pipeline.run``: the same plan, engine, partials, executors and threshold), with
a tail that keeps the maps instead of writing submission.csv, so ``result.ink`` is the CLI's submission mask.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ink_infer.config import ModelSpec, RunConfig, ThresholdSpec
from ink_infer.errors import UserError
from ink_infer.manifest import DEMO_MANIFEST, Manifest, default_manifest
from ink_infer.outputs.report import RunReport
from ink_infer.volumes.remote import is_url

# RunConfig fields a caller of ``predict`` may set (the rest is the ensemble's, or makes no sense in memory)
RUN_OPTIONS = ("stride", "tta", "batch_size", "devices", "unit_windows", "layers", "direction", "reverse_layers",
               "layer_axis", "missing_chunks", "rotate", "mask", "storage_options", "cache", "cache_gb",
               "compile", "budget", "on_model_error", "max_nonfinite", "fresh", "require_hashes")  # fmt: skip


@dataclass(frozen=True)
class Ensemble:
    """A manifest with its weights checked (each file opened, its keys and shapes against its model, its sha256
    when the manifest has one), ready to run. The models themselves are loaded one at a time while a prediction
    runs, as the CLI does (one model's memory at a time)."""

    manifest: Manifest
    weights_dir: Path | None
    device: str
    allow_random_weights: bool
    checked: object  # run.prepare.Checked

    @property
    def models(self) -> list[ModelSpec]:
        return list(self.manifest.models)

    @property
    def threshold(self) -> ThresholdSpec:
        return self.manifest.threshold


@dataclass
class Prediction:
    """One fragment's or segment's result, in its own orientation.

    ``probability``: ``(H, W)`` float32, the ensemble's weighted mean probability (0 outside what the windows
    covered); ``ink``: ``(H, W)`` bool, ``probability > threshold`` inside the threshold's region; ``mask``:
    ``(H, W)`` bool, the papyrus mask the windows were placed on; ``threshold``: the probability the quantile
    gave (None: an empty region); ``report``: the run's report (per-model times, memory, warnings)."""

    id: str
    probability: np.ndarray
    ink: np.ndarray
    mask: np.ndarray
    threshold: float | None
    report: RunReport | None = None

    @property
    def ink_fraction(self) -> float:
        """The share of the mask marked ink."""
        return float(self.ink[self.mask].mean()) if self.mask.any() else 0.0


def load_ensemble(
    manifest: str | Path | None = None,
    weights: str | Path | None = None,
    device: str = "auto",
    allow_random_weights: bool = False,
) -> Ensemble:
    """The ensemble of ``manifest`` (a path; ``"demo"``: the packaged demo models with their shipped weights;
    None: ``weights``' own weights_manifest.json, else the packaged 18-model one) with its files in ``weights``,
    checked now: a bad file raises ``UserError`` naming it. ``device``: auto, cpu, cuda or cuda:N."""
    from ink_infer.run.preflight import check_manifest_files
    from ink_infer.run.prepare import check_manifest_weights

    if manifest == "demo":
        manifest, weights = DEMO_MANIFEST, weights or DEMO_MANIFEST.parent
    weights_dir = None if weights is None else Path(weights).absolute()
    path = Path(manifest).absolute() if manifest is not None else default_manifest(weights_dir)
    parsed = check_manifest_files(path, weights_dir, allow_random=allow_random_weights)
    probe = RunConfig(data=Path("."), out=Path("."), manifest=path, weights=weights_dir, device=device,
                      allow_random_weights=allow_random_weights)  # fmt: skip
    return Ensemble(parsed, weights_dir, device, allow_random_weights, check_manifest_weights(parsed, probe))


def predict(ensemble: Ensemble, path: str | Path, *, out: str | Path | None = None, threshold: float | None = None,
            **options) -> Prediction:  # fmt: skip
    """Run ``ensemble`` over the one fragment or segment at ``path`` (a Kaggle fragment folder, a segment folder
    with ``layers/``, a ``.zarr``): see ``predict_all``."""
    from ink_infer.volumes.discovery import find_fragments
    from ink_infer.volumes.segments import LayerChoice

    _check_options(options)
    if (
        not is_url(path) and Path(path).exists()
    ):  # counted before anything runs (a missing path is predict_all's one line)
        choice = LayerChoice(axis=options.get("layer_axis"), both=options.get("direction") == "both")
        n = len(find_fragments(Path(path), layers=choice)[0])
        if n != 1:
            raise UserError(f"{path}: {n} fragments or segments, expected one (predict_all runs several)")
    found = predict_all(ensemble, path, out=out, threshold=threshold, **options)
    if len(found) != 1:  # a URL is counted once found (a folder URL may hold several stores)
        raise UserError(
            f"{path}: {len(found)} fragments or segments, expected one (predict_all runs several)"
        )
    return next(iter(found.values()))


def predict_all(ensemble: Ensemble, data: str | Path, *, out: str | Path | None = None,
                threshold: float | None = None, **options) -> dict[str, Prediction]:  # fmt: skip
    """Run ``ensemble`` over every fragment or segment ``data`` holds (what ``--data`` accepts), by id.

    ``out``: where the run's partials and report.json go, so that a second call resumes (default: a temporary
    folder, removed afterwards). ``threshold``: the quantile (default: the manifest's). ``options``: the CLI's
    run options by their RunConfig names (``RUN_OPTIONS``: stride, tta, batch_size, devices, layers, direction,
    reverse_layers, layer_axis, rotate, ...); ``direction="both"`` gives each segment twice, by ``<id>.forward``
    and ``<id>.reverse``."""
    unknown = sorted(set(options) - set(RUN_OPTIONS))
    if unknown:
        raise UserError(
            f"predict: unknown option(s) {', '.join(unknown)}; expected some of {', '.join(RUN_OPTIONS)}"
        )
    data = data if is_url(data) else Path(data)
    if out is None:
        with tempfile.TemporaryDirectory(prefix="ink_infer_") as tmp:
            return _predict_into(ensemble, data, Path(tmp), threshold, options)
    return _predict_into(ensemble, data, Path(out), threshold, options)


def _check_options(options: dict) -> None:
    unknown = sorted(set(options) - set(RUN_OPTIONS))
    if unknown:
        raise UserError(
            f"predict: unknown option(s) {', '.join(unknown)}; expected some of {', '.join(RUN_OPTIONS)}"
        )


def _predict_into(ensemble: Ensemble, data: Path | str, out: Path, threshold: float | None, options: dict):
    from ink_infer.run import pipeline

    if not is_url(data) and not data.exists():
        raise UserError(f"{data}: not found (expected a fragment, a segment, or a folder of them)")
    if isinstance(options.get("layers"), str):
        from ink_infer.volumes.segments import parse_layers

        options["layers"] = parse_layers(options["layers"])
    options["devices"] = tuple(options.get("devices") or ())
    if isinstance(options.get("storage_options"), dict):  # {"anon": True}, as fsspec takes them
        options["storage_options"] = tuple(options["storage_options"].items())
    for name in ("mask", "cache"):
        if options.get(name) is not None:
            options[name] = Path(options[name]).absolute()
    cfg = RunConfig(
        data=data if is_url(data) else data.absolute(), out=out.absolute(), manifest=ensemble.manifest.path, weights=ensemble.weights_dir,
        device=ensemble.device, allow_random_weights=ensemble.allow_random_weights, quiet=True, previews=False,
        save_probabilities=False, threshold_percentile=None if threshold is None else float(threshold),
        **options,
    )  # fmt: skip
    found: dict[str, Prediction] = {}

    def keep(run, report, ensembles) -> None:
        pipeline.check_some_model_finished(run, ensembles)
        for plan, ens in zip(run.plans, ensembles, strict=True):
            found[plan.id] = _prediction(plan, ens, run.threshold)

    from ink_infer.run.preflight import check_inputs

    report = pipeline.run(cfg, check_inputs(cfg, ensemble.manifest), checked=ensemble.checked, tail=keep)
    for prediction in found.values():
        prediction.report = report
    return found


def _prediction(plan, ens, threshold: ThresholdSpec) -> Prediction:
    """The fragment's maps, whole and turned back to its own orientation, thresholded as ``outputs.write`` does."""
    from ink_infer.outputs.raster import array_piece, turned_band, turned_shape
    from ink_infer.outputs.write import fragment_threshold, ink_of

    thr = fragment_threshold(ens, threshold)
    angle = plan.fragment.rotate
    h = turned_shape(plan.shape, angle)[0]
    prob = turned_band(ens.mean_piece, plan.shape, angle, 0, h)
    region = turned_band(ens.region_piece(threshold.region), plan.shape, angle, 0, h)
    mask = turned_band(array_piece(plan.mask), plan.shape, angle, 0, h)
    return Prediction(plan.id, prob, ink_of(prob, region, thr), mask, thr)
