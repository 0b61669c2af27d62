"""Everything a run carries from step to step and saves: the trainer (model, EMA, AdamW groups, cosine schedule,
grad scaler, counters), ``last.ckpt`` to resume from, and the exported weights with their manifest entry."""

from __future__ import annotations

import argparse
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV2
from torch import Tensor, nn

from ink_infer.config import ModelSpec
from ink_infer.errors import UserError
from ink_infer.manifest import sha256_file
from ink_infer.models.checkpoint import EMA_PREFIX, MODEL_PREFIX, hyper_parameters_for, strip_prefix
from ink_infer.outputs.atomic import atomic_torch_save
from ink_infer.run.partials import output_fields

WARMUP_FRACTION = 0.02
BACKBONE_PREFIXES = ("encoder.", "backbone.")  # 2.5D timm encoder, irCSN backbone: trained at --backbone-lr
# no weight decay: the reference's name rule, and every 1-D tensor (norm weights) as well
NO_DECAY_NAMES = ("bias", "gamma", "beta")
# the manifest fields that describe a model (the file's name, size, sha256 and weight are added per file)
MODEL_FIELDS = (
    "name",
    "arch",
    "backbone",
    "in_chans",
    "num_3d_layer",
    "depth",
    "stage_blocks",
    "z_range",
    "tile",
)


def split_forward(model: nn.Module) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(features, head) with ``head(features(x)) == model(x)``: where manifold mixup mixes (after depth pooling)."""
    return model.forward_pooled, model.forward_head


@dataclass
class Trainer:
    """Everything that changes while training (and is saved in last.ckpt)."""

    spec: ModelSpec
    model: nn.Module
    ema: ModelEmaV2
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool  # float16 autocast + grad scaling, on CUDA only (the reference trained with precision=16)
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best: float = -1.0
    best_epoch: int = 0
    best_path: Path | None = None  # best_fbeta.ckpt of this run, or of the run it resumed (another --out)
    features: Callable[[Tensor], Tensor] = field(init=False)
    head: Callable[[Tensor], Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.features, self.head = split_forward(self.model)


def param_groups(
    model: nn.Module, *, lr: float, backbone_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """The reference's four AdamW groups: (backbone | rest) x (decay | no decay on biases and norms)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {k: [] for k in product((True, False), repeat=2)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            no_decay = p.ndim <= 1 or any(word in name for word in NO_DECAY_NAMES)
            groups[(name.startswith(BACKBONE_PREFIXES), not no_decay)].append(p)
    return [
        {"params": ps, "lr": backbone_lr if bb else lr, "weight_decay": weight_decay if decay else 0.0}
        for (bb, decay), ps in groups.items()
        if ps
    ]


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, *, total: int, warmup: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``transformers.get_cosine_schedule_with_warmup`` (half a cosine to 0), stepped once per optimiser step."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_trainer(
    model: nn.Module, spec: ModelSpec, args: argparse.Namespace, *, device: torch.device, total: int
) -> Trainer:
    model = model.to(device).train()
    ema = ModelEmaV2(model, decay=args.ema_decay)  # updated after every optimiser step; validated, exported
    backbone_lr = args.backbone_lr or args.lr
    groups = param_groups(model, lr=args.lr, backbone_lr=backbone_lr, weight_decay=args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    scheduler = cosine_with_warmup(optimizer, total=total, warmup=math.ceil(WARMUP_FRACTION * total))
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    return Trainer(spec, model, ema, optimizer, scheduler, scaler, device, amp)


def spec_key(spec: ModelSpec) -> dict[str, Any]:
    """What must not change between a run and its resume: the model and its inputs (not the weight file), the
    fields inference keys its partials by (``ink_infer.run.partials.output_fields``)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in output_fields(spec).items()}


def save_last(tr: Trainer, path: Path) -> None:
    """The team's layout plus what ``--resume`` needs; readable with ``weights_only=True`` (plain values only)."""
    state = {MODEL_PREFIX + k: v.detach().cpu() for k, v in tr.model.state_dict().items()}
    state |= {EMA_PREFIX + k: v.detach().cpu() for k, v in tr.ema.module.state_dict().items()}
    train_state = {
        "model": spec_key(tr.spec),
        "best": tr.best,
        "best_epoch": tr.best_epoch,
        "best_path": str(tr.best_path) if tr.best_path else None,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if tr.device.type == "cuda" else [],
    }
    payload = {
        "state_dict": state,
        "hyper_parameters": hyper_parameters_for(tr.spec),
        "epoch": tr.epoch,
        "global_step": tr.step,
        "optimizer_states": [tr.optimizer.state_dict()],
        "lr_schedulers": [tr.scheduler.state_dict()],
        "grad_scaler": tr.scaler.state_dict(),
        "train_state": train_state,
    }
    atomic_torch_save(payload, path)


def load_last(tr: Trainer, path: Path) -> None:
    """Restore model, EMA, optimiser, scheduler, scaler, counters and RNG from ``save_last``'s file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{path}: not a readable training checkpoint ({why})") from None
    ts = ckpt.get("train_state") if isinstance(ckpt, dict) else None
    if ts is None:
        raise UserError(f"{path}: no training state (--resume takes a last.ckpt, not exported weights)")
    if ts["model"] != spec_key(tr.spec):
        raise UserError(
            f"{path}: trained model {ts['model']['name']!r} differs from --config {tr.spec.name!r}"
        )
    tr.model.load_state_dict(strip_prefix(ckpt["state_dict"], MODEL_PREFIX))
    tr.ema.module.load_state_dict(strip_prefix(ckpt["state_dict"], EMA_PREFIX))
    tr.optimizer.load_state_dict(ckpt["optimizer_states"][0])
    tr.scheduler.load_state_dict(ckpt["lr_schedulers"][0])
    tr.scaler.load_state_dict(ckpt["grad_scaler"])
    tr.epoch, tr.step = ckpt["epoch"], ckpt["global_step"]
    tr.best, tr.best_epoch = ts["best"], ts["best_epoch"]
    tr.best_path = Path(ts["best_path"]) if ts.get("best_path") else None
    torch.set_rng_state(ts["rng_torch"])
    if ts["rng_cuda"] and tr.device.type == "cuda":
        torch.cuda.set_rng_state_all(ts["rng_cuda"])


def export_weights(src: Path, dst: Path, *, ema_only: bool, fp16: bool) -> None:
    """Copy of a team-layout checkpoint for shipping: optionally only ``model_ema.module.*`` (inference prefers the
    EMA copy), optionally float16 (the reference predicted in float16; loading casts back to the model's dtype)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    state = {k: v for k, v in ckpt["state_dict"].items() if not ema_only or k.startswith(EMA_PREFIX)}
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    atomic_torch_save({"state_dict": state, "hyper_parameters": ckpt["hyper_parameters"]}, dst)


def manifest_entry(spec: ModelSpec, path: Path) -> dict[str, Any]:
    """The manifest entry for ``spec`` with ``path`` as its file (relative to the folder given as ``--weights``)."""
    entry = {k: getattr(spec, k) for k in (*MODEL_FIELDS, "crop") if getattr(spec, k) is not None}
    entry = {k: list(v) if isinstance(v, tuple) else v for k, v in entry.items()}
    entry |= {"file": path.name, "sha256": sha256_file(path), "size": path.stat().st_size}
    return entry | {"weight": spec.weight}
