"""The Grand Prize TimeSformer's weight files: safetensors reading, the key spellings accepted, its
hyper-parameters. ``checkpoint.py`` calls these; nothing here unpickles.

Two sources of GP weights:

* the GP repository's PyTorch-Lightning ``.ckpt`` (``state_dict`` with ``backbone.*`` and, with the norm,
  ``normalization.*``). The released file also pickles its optimizer and LR scheduler, which
  ``torch.load(weights_only=True)`` refuses: ``python -m ink_infer.manifest convert`` turns it into safetensors
  once (``models/convert.py``, in a child process);
* Hugging Face ``scrollprize/timesformer_GP_scroll1``, ``model.safetensors``. Its tensor names have not been
  seen (its loader is custom code). ASSUMED, unverified until a real file is read: the names are ours
  (``backbone.*``), or ours under a ``model.`` prefix, or ours without the ``backbone.`` prefix
  (``to_patch_embedding.weight``). ``gp_keys`` maps each of these to ours; anything else is refused by the strict
  key check as usual.

A safetensors file is recognised by its content (8-byte little-endian header length, then a JSON object), not its
name. A ``hyper_parameters`` entry in its metadata (JSON; what ``convert`` copies from the checkpoint) is checked
like a checkpoint's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ink_infer.config import ModelSpec
from ink_infer.errors import UserError

BACKBONE = "backbone."
NORM = "normalization."
GP_WINDOW = 64  # the GP's ``size`` hyper-parameter: its windows' side
_HEADER_MAX = 100 * 2**20  # safetensors' own bound on the JSON header
EXTRA = "pip install 'ink_infer[timesformer]'"


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file (a plausible header length, then ``{``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = Path(path).stat().st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= min(_HEADER_MAX, size - 8)


def read_safetensors(path: Path, *, shapes_only: bool) -> dict[str, Any]:
    """A safetensors file as ``{"state_dict": {key: tensor}, "hyper_parameters": dict | None}`` on the CPU.

    ``shapes_only``: the tensors are empty ones on the meta device, of the file's shapes and dtypes (nothing but
    the header is read). Raises ``UserError`` naming the file when it is truncated or not safetensors."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise UserError(f"{path}: a safetensors file needs the safetensors package: {EXTRA}") from None
    state: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                if shapes_only:
                    sl = f.get_slice(key)
                    state[key] = torch.empty(sl.get_shape(), dtype=_dtype(sl.get_dtype()), device="meta")
                else:
                    state[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(
            f"{path}: not a readable safetensors file (truncated or wrong file?): {why}"
        ) from None
    return {"state_dict": state, "hyper_parameters": _hyper_parameters(meta, path)}


def _dtype(name: str) -> torch.dtype:
    """torch's dtype for a safetensors dtype name (``F32``, ``BF16``, ``I64``, ...); float32 when unknown
    (only the shape is compared)."""
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}  # fmt: skip
    return names.get(name, torch.float32)


def _hyper_parameters(meta: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    text = meta.get("hyper_parameters")
    if text is None:
        return None
    try:
        hp = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{path}: metadata hyper_parameters is not JSON") from None
    if not isinstance(hp, dict):
        raise UserError(f"{path}: metadata hyper_parameters is a {type(hp).__name__}, expected a dict")
    return hp


def gp_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A safetensors file's keys as ours (ASSUMED spellings, see the module's docstring): a ``model.`` prefix
    (already cut by the caller) or a missing ``backbone.`` prefix. Keys already ours are kept as they are."""
    if any(k.startswith(BACKBONE) for k in state):
        return dict(state)
    return {k if k.startswith(NORM) else BACKBONE + k: v for k, v in state.items()}


def check_gp_hyper_parameters(hp: Mapping[str, Any], spec: ModelSpec, path: Path) -> None:
    """The GP's saved ``{pred_shape, size, with_norm}`` (``enc`` too, in some versions) must describe the
    manifest's model: 64-px windows, and the manifest's ``with_norm``. Absent keys are not checked."""
    if "size" in hp and hp["size"] != GP_WINDOW:
        raise UserError(
            f"{path}: hyper_parameters size={hp['size']!r}, a timesformer model takes {GP_WINDOW}"
        )
    if "with_norm" in hp and bool(hp["with_norm"]) != bool(spec.with_norm):
        raise UserError(
            f"{path}: hyper_parameters with_norm={hp['with_norm']!r}, "
            f"manifest model {spec.name!r} says {bool(spec.with_norm)}"
        )
