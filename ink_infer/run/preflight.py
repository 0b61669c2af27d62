"""Everything the user can fix, found before any compute: an ``--out`` that is unwritable or too full, a stride
wider than a model's square, weight files that are missing, fail their hash, or do not fit their model. Each is a
``UserError`` (one line per problem, exit 2).

Importing this module does not import torch: the CLI runs ``check_inputs`` (paths, manifest, stride, weight files
present, fragments found and planned, free space) before torch loads, so a typo costs milliseconds, not the 4-14 s
of importing torch and timm; ``check_weights`` (the checkpoints opened against their models) needs torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ink_infer.config import RunConfig
from ink_infer.errors import UserError, size_text
from ink_infer.geometry import BLOCK, N_SLICES
from ink_infer.manifest import Manifest, find_weights, load_manifest, verify_file
from ink_infer.models.gp_family import ARCH as GP_ARCH
from ink_infer.outputs.maps import gp_picture_path, probability_path
from ink_infer.run.plan import FragmentPlan, Weights, model_count
from ink_infer.volumes.remote import is_url

log = logging.getLogger(__name__)

# what a run writes besides partials, per fragment: its submission row, two previews, its share of report.json
OUTPUT_BYTES_PER_FRAGMENT = 16 * 2**20


def prepare_out(out: Path) -> None:
    """Create ``out`` and prove it is writable before any compute, so a run never dies at the last step."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".ink_infer_write_test_{id(out)}"
        probe.write_bytes(b"")
        probe.unlink()
        (out / "previews").mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: --out is not writable ({e.strerror or e})") from None


def check_free_space(
    out: Path, partials_dir: Path, plans: Sequence[FragmentPlan], manifest: Manifest, *, dry_run: bool,
    model_maps: bool = False,
) -> dict:  # fmt: skip
    """Free space under ``out`` against what the run will write, before any compute.

    Partials: the covered 32 x 32 blocks of every (model, fragment) as float32 (files already there are replaced,
    so their size counts as free); outputs: ``OUTPUT_BYTES_PER_FRAGMENT``; spilled maps: a large fragment's
    ensemble map as float32 (``raster.is_large``), beside the partials, and with ``model_maps`` one model's map
    more. Too little for the outputs or the spilled maps is refused; too little for the partials is a warning
    (they are what a rerun resumes from, not the result). Returns the figures for report.json."""
    from ink_infer.outputs.raster import is_large

    free = shutil.disk_usage(out).free
    # the partials may live elsewhere (--partials): their own file system's room is what bounds them
    partials_free = shutil.disk_usage(_existing(partials_dir)).free
    partials = 0
    large = [p.shape[0] * p.shape[1] * 4 for p in plans if is_large(p.shape)] if not dry_run else []
    spilled = sum(large) + (max(large, default=0) if model_maps else 0)
    if not dry_run:
        for spec in manifest.models:
            for p in plans:
                partials += int((model_count(p, spec) > 0).sum()) * BLOCK * BLOCK * 4
        from ink_infer.run.partials import owned_files

        partials -= sum(f.stat().st_size for f in owned_files(partials_dir))  # replaced: their room counts
    partials = max(partials, 0)
    outputs = OUTPUT_BYTES_PER_FRAGMENT * len(plans)
    mb = 2**20
    if free < outputs:
        raise UserError(
            f"{out}: {free / mb:.0f} MB free, the outputs need about {outputs / mb:.0f} MB "
            f"(and the partials {partials / mb:.0f} MB): free some space or choose another --out"
        )
    same_fs = _existing(partials_dir).stat().st_dev == out.stat().st_dev
    room = free - outputs if same_fs else partials_free
    if room < spilled:
        raise UserError(
            f"{_existing(partials_dir)}: {room / mb:.0f} MB free, the large fragments' maps kept there during the "
            f"run need {spilled / mb:.0f} MB (and the partials {partials / mb:.0f} MB): free some space or "
            "choose another --partials"
        )
    if room - spilled < partials:
        log.warning(
            "%s: %.0f MB free, the partials need about %.0f MB: results that cannot be saved are not kept for a "
            "rerun (the submission is unaffected)", partials_dir, (room - spilled) / mb, partials / mb,
        )  # fmt: skip
    return {
        "free_bytes": free,
        "partials_bytes": partials,
        "outputs_bytes": outputs,
        "spilled_maps_bytes": spilled,
    }


def check_cache_space(cfg: RunConfig, plans: Sequence[FragmentPlan], *, taken: int) -> int:
    """The room the remote stores' chunk cache may take: ``--cache-gb``, or less when the papyrus of the remote
    segments holds less (their touched blocks of 65 layers, uncompressed: what is fetched at most). Refused when
    its folder's disk has not that much free beside ``taken`` (what the outputs need, when on the same disk)."""
    remote = [p for p in plans if p.fragment.remote is not None]
    if not remote or cfg.cache_gb == 0 or cfg.dry_run:
        return 0
    raw = sum(int(p.touched.sum()) * BLOCK * BLOCK * N_SLICES * 2 for p in remote)
    need = min(raw, int(cfg.cache_gb * 1e9))
    folder = _existing(Path(cfg.remote.cache))
    free = shutil.disk_usage(folder).free - (
        taken if folder.stat().st_dev == _existing(cfg.out).stat().st_dev else 0
    )
    if free < need:
        raise UserError(
            f"{folder}: {size_text(max(free, 0))} free, the chunk cache of the remote segments may take "
            f"{size_text(need)}: choose a smaller --cache-gb (0: no cache, every model fetches again) or another --cache"
        )
    return need


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (the partials folder is made when the first one is saved)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_stride(stride: int, manifest: Manifest) -> None:
    """A stride wider than a model's square leaves pixels between its windows without a prediction: refused. The GP
    family's windows have their own stride (its manifest fields), so ``--stride`` is not theirs."""
    squares = [m for m in manifest.models if m.arch != GP_ARCH]
    if not squares:
        return
    narrowest = min(squares, key=lambda m: m.side)
    if stride > narrowest.side:
        raise UserError(
            f"--stride {stride}: wider than the {narrowest.side}-px square of model {narrowest.name!r}, so pixels "
            f"between its windows would get no prediction; use at most {narrowest.side} (reference: 32)"
        )


@dataclass(frozen=True)
class Inputs:
    """What the torch-free checks found: the parsed manifest, every fragment's plan, the items the units run over
    (fragments or their row ranges), the free-space figures and the warnings for the user."""

    manifest: Manifest
    plans: tuple[FragmentPlan, ...]
    items: tuple[FragmentPlan, ...]
    disk: dict
    warnings: list[str]
    fetched: dict | None = None  # remote stores: what finding and planning them fetched (volumes.remote.WIRE)


def check_inputs(cfg: RunConfig, manifest: Manifest | None = None) -> Inputs:
    """Everything that needs no torch, before it is imported (a typo costs milliseconds, not the seconds of
    importing torch and timm): the paths, the manifest (``manifest``: parsed already), the stride, the weight files
    present, the fragments found and opened (every slice, layer or chunk layout checked), their windows planned,
    and the free space for what the run will write. Done once per run; the rest of the run reads its result."""
    from ink_infer.run.plan import plan_run
    from ink_infer.volumes.discovery import find_fragments
    from ink_infer.volumes.remote import WIRE
    from ink_infer.volumes.rotation import with_rotation
    from ink_infer.volumes.zarr_open import forget_remote_stores

    forget_remote_stores()
    before = WIRE.as_dict()

    if not is_url(cfg.data) and not Path(cfg.data).exists():
        raise UserError(f"{cfg.data}: --data not found (expected /kaggle/input, the competition folder, a fragment "
                        "folder, a scroll segment, or a folder of them)")  # fmt: skip
    for option, path in (("--partials", cfg.partials), ("--out", cfg.out)):
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise UserError(f"{path}: {option} is a file, expected a folder")
    manifest = manifest if manifest is not None else load_manifest(cfg.manifest)
    check_stride(cfg.stride, manifest)
    if cfg.gp_png and not any(s.arch == GP_ARCH for s in manifest.models):
        raise UserError(f"{cfg.manifest}: --gp-png draws a {GP_ARCH} model's map, and this manifest has none")
    check_weight_files(manifest, cfg.weights, allow_random=cfg.allow_random_weights)
    prepare_out(cfg.out)
    fragments, warnings = find_fragments(cfg.data, layers=cfg.layer_choice, remote=cfg.remote, mask=cfg.mask)
    fragments = with_rotation(fragments, cfg.rotate, cfg.out)
    plans, items = plan_run(fragments, stride=cfg.stride, tta=cfg.tta, unit_windows=cfg.unit_windows)
    holed = [p for p in plans if p.missing_chunks]
    if holed and cfg.missing_chunks == "refuse":
        raise UserError("\n".join(
            f"{p.fragment.where}: {len(p.missing_chunks)} chunk(s) under the mask missing from the store (first: "
            f"{', '.join(p.missing_chunks[:3])}); refused (--missing-chunks refuse)" for p in holed))  # fmt: skip
    check_output_targets(cfg, plans, manifest)
    rotated = _turn(plans, cfg)  # the largest thing a --rotate run writes: counted first, then built
    disk = check_free_space(
        cfg.out, cfg.partials_dir, plans, manifest, dry_run=cfg.dry_run, model_maps=cfg.save_model_maps
    )
    disk["rotated_bytes"] = rotated
    disk["cache_bytes"] = check_cache_space(
        cfg, plans, taken=disk["outputs_bytes"] + disk["spilled_maps_bytes"]
    )
    for p in plans:
        warnings.extend(p.notes)
    fetched = WIRE.since(before) if any(p.fragment.remote for p in plans) else None
    return Inputs(manifest, tuple(plans), tuple(items), disk, warnings, fetched)


def output_targets(
    cfg: RunConfig, plans: Sequence[FragmentPlan], manifest: Manifest
) -> list[tuple[Path, str]]:
    """Every file the run's outputs will be written to, with what it is: what ``outputs.write`` writes."""
    if cfg.dry_run or cfg.num_parts > 1:
        return [(cfg.out / "report.json", "report")]
    maps = cfg.save_probabilities
    if maps is None:  # the pipeline's default: segments get their maps, Kaggle fragments their submission
        maps = any(p.fragment.layout != "kaggle" for p in plans)
    found = [(cfg.out / "submission.csv", "submission"), (cfg.out / "report.json", "report")]
    for p in plans:
        if cfg.previews:
            found.append((cfg.out / "previews" / f"{p.id}.png", "preview"))
        if maps:
            found += [(probability_path(cfg.out, p.id, cfg.prob_format), "probability map"),
                      (cfg.out / "masks" / f"{p.id}.png", "ink mask")]  # fmt: skip
        if cfg.save_model_maps:
            found += [
                (probability_path(cfg.out, f"{p.id}.{s.name}", cfg.prob_format), "model map")
                for s in manifest.models
            ]
        if cfg.gp_png:
            found += [(gp_picture_path(cfg.out, s.name, p.id, s.z_range[0]), "GP picture")
                      for s in manifest.models if s.arch == GP_ARCH]  # fmt: skip
    return found


def check_output_targets(cfg: RunConfig, plans: Sequence[FragmentPlan], manifest: Manifest) -> None:
    """Each output's file can be written, before any compute: not a folder, not a read-only file, in a folder
    that is (or can be made) writable. One line per file that cannot."""
    bad = []
    for path, what in output_targets(cfg, plans, manifest):
        folder = _existing(path.parent)
        if path.is_dir() and not path.name.endswith(
            ".ome.zarr"
        ):  # an OME-Zarr image is a folder, replaced whole
            bad.append(f"{path}: a folder, where the run writes its {what}")
        elif path.exists() and not os.access(path, os.W_OK):
            bad.append(f"{path}: read-only, where the run writes its {what}")
        elif not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            bad.append(f"{folder}: not a writable folder, where the run writes its {what} {path.name}")
    if bad:
        raise UserError("\n".join(dict.fromkeys(bad)))


def _turn(plans: Sequence[FragmentPlan], cfg: RunConfig) -> int:
    """``--rotate``: the turned slices' cache of every fragment, counted against the room under OUT first, then
    built (once, here: workers and ranks find it made; ``--fresh`` rebuilds it, as it recomputes everything).
    Returns the bytes it needed."""
    from ink_infer.errors import size_text
    from ink_infer.volumes.reader import open_volume

    with contextlib.ExitStack() as stack:  # each opened once: counted, then built
        turned = [stack.enter_context(open_volume(p.fragment)) for p in plans if p.fragment.rotate]
        need = sum(volume.cache_bytes(rebuild=cfg.fresh) for volume in turned)
        free = shutil.disk_usage(cfg.out).free
        if need > free:
            raise UserError(f"{cfg.out / 'rotated'}: {size_text(free)} free, --rotate needs {size_text(need)} "
                            "for the turned slices: free some space or choose another --out")  # fmt: skip
        for volume in turned:
            volume.ensure(rebuild=cfg.fresh)
    return need


def check_manifest_files(manifest_path: Path, weights_dir: Path | None, *, allow_random: bool) -> Manifest:
    """The manifest parsed and its weight files present under ``weights_dir`` (the Python API's ensemble)."""
    manifest = load_manifest(manifest_path)
    check_weight_files(manifest, weights_dir, allow_random=allow_random)
    return manifest


def check_weight_files(manifest: Manifest, weights_dir: Path | None, *, allow_random: bool) -> None:
    """``weights_dir`` is a folder and holds every file the manifest names (unless ``allow_random``): one line
    that counts what is missing, names the first, and says the ways out."""
    if weights_dir is not None and Path(weights_dir).exists() and not Path(weights_dir).is_dir():
        raise UserError(
            f"{weights_dir}: --weights is a file, expected a folder holding the manifest's weight files"
        )
    if allow_random:
        for spec in manifest.models:
            find_weights(spec, weights_dir)  # a path escaping --weights is refused even when absent
        return
    missing = [spec for spec in manifest.models if find_weights(spec, weights_dir) is None]
    if not missing:
        return
    first = missing[0]
    where = f"under {weights_dir}" if weights_dir is not None else "(no --weights DIR given)"
    named = f"{first.file} for model {first.name!r}" if first.file else f"model {first.name!r} names no file"
    raise UserError(
        f"{len(missing)} of {len(manifest.models)} weight files of {manifest.path} missing {where} (first: {named}): "
        "put the checkpoints there (kaggle/README.md), or pass --allow-random-weights for a rehearsal; "
        "`python -m ink_infer.manifest hash --weights DIR` then records their sizes and hashes"
    )


def check_hashes(manifest: Manifest, weights: dict[str, Weights], *, require: bool) -> list[str]:
    """The models whose weight file the manifest gives no sha256 for (loaded unverified): a warning, or with
    ``require`` (``--require-hashes``) a ``UserError``. Returns their names, for report.json."""
    unverified = [s.name for s in manifest.models if weights[s.name].path is not None and s.sha256 is None]
    if not unverified:
        return []
    what = (f"{len(unverified)} of {len(manifest.models)} weight file(s) have no sha256 in {manifest.path} "
            f"(first: {unverified[0]})")  # fmt: skip
    how = "`python -m ink_infer.manifest hash --weights DIR` records them"
    if require:
        raise UserError(f"{what}: refused (--require-hashes); {how}")
    log.warning("%s: loaded unverified (corruption or a wrong file would go unnoticed); %s, and "
                "--require-hashes refuses such files", what, how)  # fmt: skip
    return unverified


def check_weights(manifest: Manifest, weights_dir: Path | None, *, allow_random: bool) -> dict[str, Weights]:
    """Every model's weight file resolved inside ``weights_dir`` and checked (size, sha256), then opened (keys,
    shapes, hyper-parameters; not loaded: seconds for 18 files), before any compute.

    Hashing here costs a read of every file at the start (load_weights reuses the digest while the file's stat is
    unchanged), and buys two things: a corrupt file fails the run in seconds, not at hour 8, and partials can be
    keyed by the weights they came from without loading the model. ``allow_random``: entries without a file run
    with random init (an explicit opt-in for rehearsals; the report marks each such model)."""
    import timm

    from ink_infer.models.checkpoint import check_checkpoint, expected_state

    check_weight_files(manifest, weights_dir, allow_random=allow_random)
    weights: dict[str, Weights] = {}
    for spec in manifest.models:
        if spec.arch == "2.5d" and not timm.is_model(spec.backbone):
            raise UserError(f"{manifest.path}: model {spec.name!r}: unknown timm backbone {spec.backbone!r}")
        path = find_weights(spec, weights_dir)
        try:
            digest = verify_file(spec, path) if path is not None else None
        except OSError as e:
            raise UserError(f"{path}: cannot read weights ({e.strerror or e})") from None
        weights[spec.name] = Weights(path, digest)
    bad = []
    for spec in manifest.models:
        path = weights[spec.name].path
        if path is None:
            continue
        try:
            expected = expected_state(spec)
        except (RuntimeError, ValueError) as e:  # timm or our builders refusing the entry's configuration
            raise UserError(
                f"{manifest.path}: model {spec.name!r} cannot be built: {e}".splitlines()[0]
            ) from None
        try:
            check_checkpoint(path, spec, expected)
        except UserError as e:  # unreadable files come here too: _safe_load names them
            bad.append(str(e))
    if bad:
        raise UserError("\n".join(bad))  # one line per bad file
    return weights
