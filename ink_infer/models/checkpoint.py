"""Checkpoint files: verify, load safely, pick the EMA copy, check against the manifest, load strictly; and save.

Accepted layouts (``.ckpt`` / ``.pt`` / ``.pth`` alike, the suffix is not trusted):

* the team's PyTorch-Lightning file: ``{"state_dict": {"model.<key>": ..., "model_ema.module.<key>": ...},
  "hyper_parameters": {...}, ...}``; the EMA copy is what the reference predicts with, so it wins when present;
* a bare state dict ``{"<key>": tensor}``;
* a safetensors file (recognised by its content), read without pickle; for the timesformer arch its keys may be
  spelled as Hugging Face's release is assumed to (``gp_checkpoint.py``).

Files are size + sha256 checked against the manifest before anything is unpickled, and unpickled with
``weights_only=True`` only, so a file cannot run code. Every problem is a one-line ``UserError`` naming the file.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ink_infer.config import ModelSpec
from ink_infer.errors import UserError
from ink_infer.geometry import N_SLICES, WIDTH_ARCH, WIDTH_DEFAULTS
from ink_infer.manifest import verify_file
from ink_infer.models.gp_checkpoint import (
    check_gp_hyper_parameters,
    gp_keys,
    is_safetensors,
    read_safetensors,
)
from ink_infer.outputs.atomic import atomic_torch_save

EMA_PREFIX = "model_ema.module."
MODEL_PREFIX = "model."
MAX_LISTED = 4  # keys quoted in a mismatch message, so it stays one readable line
CONVERT = "python -m ink_infer.manifest convert --trust {path} --sha256 <its sha256>"


def load_weights(model: nn.Module, path: Path, spec: ModelSpec) -> dict[str, Any]:
    """Load ``path`` into ``model`` (in place, strict keys and shapes) after checking it against ``spec``.

    Returns ``{"path", "sha256", "prefix" ("model_ema.module." | "model." | ""), "n_tensors",
    "hyper_parameters" (dict or None)}`` for the run report. Raises ``UserError`` on any mismatch.
    """
    path = Path(path)
    try:
        digest = verify_file(spec, path)
    except OSError as e:
        raise UserError(f"{path}: cannot read weights ({e.strerror or e})") from None
    state, prefix, hparams = _read_state(path, spec, shapes_only=False)
    if hparams is not None:
        check_hyper_parameters(hparams, spec, path)
    _check_keys(state_shapes(model), state, path)
    model.load_state_dict(state, strict=True)
    return {
        "path": str(path),
        "sha256": digest,
        "prefix": prefix,
        "n_tensors": len(state),
        "hyper_parameters": _plain(hparams, strict=False),  # JSON-ready for the run report
    }


def check_checkpoint(path: Path, spec: ModelSpec, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Open ``path`` as ``load_weights`` will and check it fits the model, without reading its tensors' data.

    ``expected``: the model's ``{key: shape}`` (``state_shapes``). The file is unpickled with ``weights_only=True``
    and memory-mapped (zip-format files, what ``torch.save`` writes), so only the keys, shapes and
    ``hyper_parameters`` are read: seconds for 18 checkpoints, and a truncated or mismatched file is refused at the
    start of a run instead of on its model's turn. Raises ``UserError`` naming the file.
    """
    state, _, hparams = _read_state(path, spec, shapes_only=True)
    if hparams is not None:
        check_hyper_parameters(hparams, spec, path)
    _check_keys(expected, state, path)


def expected_state(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The model's ``{key: shape}``, built on the meta device (no memory, ~0.2 s for a reference config)."""
    from ink_infer.models import build_model

    with torch.device("meta"):
        return state_shapes(build_model(spec))


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a model's state dict (works on the meta device, where building costs no memory)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _read_state(
    path: Path, spec: ModelSpec, *, shapes_only: bool
) -> tuple[dict[str, Tensor], str, dict[str, Any] | None]:
    """(state dict, prefix it was taken from, hyper_parameters or None) of a torch or safetensors file.

    ``shapes_only``: enough to check keys and shapes (torch files memory-mapped, safetensors' header alone)."""
    if is_safetensors(path):
        state, prefix, hparams = _extract_state_dict(read_safetensors(path, shapes_only=shapes_only), path)
        return (gp_keys(state) if spec.arch == "timesformer" else state), prefix, hparams
    return _extract_state_dict(_safe_load(path, mmap=shapes_only), path)


def _safe_load(path: Path, *, mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain containers; anything else is refused, never executed.

    ``mmap``: map the file instead of reading it (zip-format files only; older files are read)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise UserError(f"{path}: cannot read weights ({e.strerror or e})") from None
    if (
        magic[:2] != b"PK" and magic[:1] != b"\x80"
    ):  # torch.save writes a zip archive (or, before 1.6, a pickle)
        raise UserError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
    if mmap and not zipfile.is_zipfile(path):
        mmap = False  # the legacy format cannot be mapped; torch.load reads it (and reports it if it is no torch file)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # weights_only refuses globals (classes, functions) before calling them: the file would have run code.
        # torch's own message advises weights_only=False; we name the offending globals instead.
        unsafe = _unsafe_globals(path)
        why = f"it references {', '.join(unsafe)}" if unsafe else _one_line(e)
        raise UserError(
            f"{path}: refused to unpickle, not plain tensors (weights_only=True): {why}; if you trust the file, "
            f"convert it once to safetensors: {CONVERT.format(path=path)}"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, IndexError, KeyError) as e:
        # torch reports truncated zips and non-torch files as RuntimeError / EOFError / ValueError, and a text
        # file as KeyError(<its first byte>), which says nothing: name the format instead
        why = "neither a zip archive nor a pickle" if isinstance(e, KeyError) else _one_line(e)
        raise UserError(
            f"{path}: not a readable torch checkpoint (truncated or wrong file?): {why}"
        ) from None


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a zip checkpoint would import, as torch lists them without unpickling (none for a legacy
    pickle, which torch cannot list)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, OSError, zipfile.BadZipFile, pickle.UnpicklingError):
        return []


def _one_line(e: BaseException) -> str:
    """The first sentence of a (possibly many-line) exception message, shortened."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    return lines[0].split(". ")[0][:200]


def strip_prefix(state: Mapping[Any, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``state`` whose keys start with ``prefix``, the prefix cut off (``model.x`` -> ``x``)."""
    return {k[len(prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}


def _extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, Tensor], str, dict[str, Any] | None]:
    """(bare state dict, prefix it was taken from, hyper_parameters or None)."""
    if not isinstance(obj, Mapping):
        raise UserError(
            f"{path}: holds a {type(obj).__name__}, expected a state dict or a Lightning checkpoint"
        )
    hparams = obj.get("hyper_parameters")
    if hparams is not None and not isinstance(hparams, Mapping):
        raise UserError(f"{path}: hyper_parameters is a {type(hparams).__name__}, expected a dict")
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: 'state_dict' is a {type(state).__name__}, expected a dict of tensors")
    for prefix in (EMA_PREFIX, MODEL_PREFIX):
        picked = strip_prefix(state, prefix)
        if picked:
            break
    else:
        prefix, picked = "", dict(state)
    not_tensors = [k for k, v in picked.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise UserError(f"{path}: entries that are not tensors: {_listed(not_tensors)}")
    return picked, prefix, dict(hparams) if hparams is not None else None


def _check_keys(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Tensor], path: Path) -> None:
    """Strict key + shape comparison, reported as one line (torch's own message is many lines)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(v)} {label}: {_listed(v)}"
            for label, v in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
            if v
        ]
        raise UserError(f"{path}: does not fit the model: " + "; ".join(parts))


def _listed(items: list[str]) -> str:
    more = f", … (+{len(items) - MAX_LISTED})" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def z_range_of(start_z: int | None, end_z: int | None) -> tuple[int, int]:
    """``[start, stop)`` of ``volume[start_z:end_z]`` over the 65 slices (``end_z`` -15 means stop 50)."""
    r = range(N_SLICES)[slice(start_z, end_z)]
    return r.start, r.stop


def check_hyper_parameters(hp: Mapping[str, Any], spec: ModelSpec, path: Path) -> None:
    """The checkpoint's saved hyper-parameters must describe the model the manifest asks for."""
    if spec.arch == "timesformer":
        check_gp_hyper_parameters(hp, spec, path)
        return
    expected: dict[str, Any] = {"in_chans": spec.in_chans}
    if spec.arch == "2.5d":
        expected |= {"model_name": spec.backbone, "num_3d_layer": spec.num_3d_layer}
    else:
        expected["bottleneck_mode"] = "ir"
        if spec.stage_blocks is None:
            expected["depth"] = spec.depth
    for field, want in expected.items():
        if field not in hp:
            continue
        got = hp[field]
        # the team's scripts pass depth as the string "50"
        if (_as_int(got, field, path) if field == "depth" else got) != want:
            raise UserError(
                f"{path}: hyper_parameters {field}={got!r}, manifest model {spec.name!r} says {want!r}"
            )
    if (
        "stage_blocks" in hp
        and spec.stage_blocks is not None
        and tuple(hp["stage_blocks"]) != spec.stage_blocks
    ):
        raise UserError(
            f"{path}: hyper_parameters stage_blocks={hp['stage_blocks']!r}, manifest says {spec.stage_blocks}"
        )
    for key, key_arch in WIDTH_ARCH.items():
        # reference checkpoints carry no widths: absent means the reference width, as in the manifest
        if key_arch == spec.arch and _as_int(hp.get(key, WIDTH_DEFAULTS[key]), key, path) != spec.width(key):
            raise UserError(
                f"{path}: hyper_parameters {key}={hp.get(key, WIDTH_DEFAULTS[key])!r}, "
                f"manifest model {spec.name!r} says {spec.width(key)}"
            )
    if "start_z" in hp or "end_z" in hp:
        start, end = hp.get("start_z"), hp.get("end_z")
        try:
            got_z = z_range_of(start, end)
        except TypeError:
            raise UserError(
                f"{path}: hyper_parameters start_z={start!r}, end_z={end!r}: expected integers"
            ) from None
        if got_z != tuple(spec.z_range):
            raise UserError(
                f"{path}: hyper_parameters start_z={start!r}, end_z={end!r} (slices {list(got_z)}), "
                f"manifest model {spec.name!r} says z_range {list(spec.z_range)}"
            )


def _as_int(value: Any, field: str, path: Path) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{path}: hyper_parameters {field}={value!r}, expected an integer") from None


def hyper_parameters_for(spec: ModelSpec) -> dict[str, Any]:
    """Reference-style ``hyper_parameters`` for ``spec`` (plain Python types, ``end_z`` negative like the team's)."""
    if (
        spec.arch == "timesformer"
    ):  # the GP's own (its pred_shape, a validation fragment's shape, says nothing)
        return {"size": 64, "with_norm": bool(spec.with_norm)}
    start, stop = spec.z_range
    end_z = stop - N_SLICES if stop < N_SLICES else N_SLICES  # -0 would select nothing
    hp: dict[str, Any] = {"in_chans": spec.in_chans, "start_z": start, "end_z": end_z, "drop_path_rate": 0.2}
    if spec.arch == "2.5d":
        hp |= {"model_name": spec.backbone, "num_3d_layer": spec.num_3d_layer, "drop_rate": 0.4}
    else:
        hp |= {"depth": spec.depth, "bottleneck_mode": "ir"}
        if spec.stage_blocks is not None:
            hp["stage_blocks"] = list(spec.stage_blocks)
    hp |= {
        key: getattr(spec, key)
        for key, key_arch in WIDTH_ARCH.items()
        if key_arch == spec.arch and getattr(spec, key)
    }
    return hp


def save_checkpoint(
    model: nn.Module, path: Path, hyper_parameters: Mapping[str, Any], ema_model: nn.Module | None = None
) -> None:
    """Write the team's layout: ``state_dict`` with ``model.*`` and ``model_ema.module.*``, plus ``hyper_parameters``.

    ``ema_model`` may be a timm ``ModelEmaV2`` (its ``.module`` is used) or a plain module; without it the model's
    own weights are stored under both prefixes, so inference (which prefers the EMA copy) reads them. Tensors are
    detached CPU copies; the file is written atomically (temporary file + rename).
    """
    ema = getattr(ema_model, "module", ema_model) if ema_model is not None else model
    state: dict[str, Tensor] = {}
    for prefix, source in ((MODEL_PREFIX, model), (EMA_PREFIX, ema)):
        for k, v in source.state_dict().items():
            state[prefix + k] = v.detach().to("cpu", copy=True)
    payload = {"state_dict": state, "hyper_parameters": _plain(dict(hyper_parameters))}
    atomic_torch_save(payload, Path(path))


def _plain(value: Any, *, strict: bool = True) -> Any:
    """Plain Python containers and scalars only, so ``weights_only=True`` (and JSON) can read it back.

    Non-plain values raise ``TypeError`` when ``strict``, else become their ``repr``."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v, strict=strict) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, strict=strict) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if not strict:
        return repr(value)
    raise TypeError(f"hyper_parameters value {value!r} ({type(value).__name__}) is not a plain Python value")
