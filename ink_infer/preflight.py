"""Everything the user can fix, found before any compute: an ``--out`` that is unwritable or too full, a stride
wider than a model's square, weight files that are missing, fail their hash, or do not fit their model. Each is a
``UserError`` (one line per problem, exit 2).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from .config import BLOCK
from .errors import UserError
from .manifest import Manifest, find_weights, resolve_weights, verify_file
from .model_run import expected_state
from .models.checkpoint import check_checkpoint
from .plan import FragmentPlan, Weights, model_count

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


def check_free_space(out: Path, plans: Sequence[FragmentPlan], manifest: Manifest, *, dry_run: bool) -> dict:
    """Free space under ``out`` against what the run will write, before any compute.

    Partials: the covered 32 x 32 blocks of every (model, fragment) as float32 (files already there are replaced,
    so their size counts as free); outputs: ``OUTPUT_BYTES_PER_FRAGMENT``. Too little for the outputs is refused;
    too little for the partials is a warning (they are what a rerun resumes from, not the result). Returns the
    figures for report.json."""
    free = shutil.disk_usage(out).free
    partials = 0
    if not dry_run:
        for spec in manifest.models:
            for p in plans:
                partials += int((model_count(p, spec) > 0).sum()) * BLOCK * BLOCK * 4
        if (out / "partials").is_dir():
            partials -= sum(f.stat().st_size for f in (out / "partials").glob("*.npz"))
    partials = max(partials, 0)
    outputs = OUTPUT_BYTES_PER_FRAGMENT * len(plans)
    mb = 2**20
    if free < outputs:
        raise UserError(
            f"{out}: {free / mb:.0f} MB free, the outputs need about {outputs / mb:.0f} MB "
            f"(and the partials {partials / mb:.0f} MB): free some space or choose another --out"
        )
    if free < outputs + partials:
        log.warning(
            "%s: %.0f MB free, the partials need about %.0f MB: results that cannot be saved are not kept for a "
            "rerun (the submission is unaffected)", out, free / mb, partials / mb,
        )  # fmt: skip
    return {"free_bytes": free, "partials_bytes": partials, "outputs_bytes": outputs}


def check_stride(stride: int, manifest: Manifest) -> None:
    """A stride wider than a model's square leaves pixels between its windows without a prediction: refused."""
    narrowest = min(manifest.models, key=lambda m: m.side)
    if stride > narrowest.side:
        raise UserError(
            f"--stride {stride}: wider than the {narrowest.side}-px square of model {narrowest.name!r}, so pixels "
            f"between its windows would get no prediction; use at most {narrowest.side} (reference: 32)"
        )


def check_weights(manifest: Manifest, weights_dir: Path | None, *, allow_random: bool) -> dict[str, Weights]:
    """Every model's weight file resolved inside ``weights_dir`` and checked (size, sha256), then opened (keys,
    shapes, hyper-parameters; not loaded: seconds for 18 files), before any compute.

    Hashing here costs a read of every file at the start (load_weights reuses the digest while the file's stat is
    unchanged), and buys two things: a corrupt file fails the run in seconds, not at hour 8, and partials can be
    keyed by the weights they came from without loading the model. ``allow_random``: entries without a file run
    with random init (an explicit opt-in for rehearsals; the report marks each such model)."""
    import timm

    weights: dict[str, Weights] = {}
    for spec in manifest.models:
        if spec.arch == "2.5d" and not timm.is_model(spec.backbone):
            raise UserError(f"{manifest.path}: model {spec.name!r}: unknown timm backbone {spec.backbone!r}")
        path = find_weights(spec, weights_dir) if allow_random else resolve_weights(spec, weights_dir)
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
