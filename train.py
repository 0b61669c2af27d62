"""Train one manifest config (2.5D or irCSN) as the 2nd-place team did (PIPELINE.md §7), for ink_infer to load.

    python train.py --data /kaggle/input --manifest weights_manifest.json --config NAME --fold 0 --out runs/NAME/fold0
    python train.py ... --out runs/NAME/fold0 --resume runs/NAME/fold0/last.ckpt      # continue an interrupted run
    python train.py --data SYNTH --manifest ink_infer/demo/demo_manifest.json --config demo_25d_mbv3 \\
        --valid-ids 6 --labels area --out runs/demo25d --export ink_infer/demo/demo_25d_mbv3.pt --export-ema-only --export-fp16

Recipe: BCE + (1 - soft F0.5 over the batch) on 1/32 labels (bilinear, align_corners=True; ``--labels area`` for
short CPU runs) smoothed as ``t * 0.8 + 0.1``; AdamW (backbone / rest lr, no decay on biases and norms), cosine
schedule with 2% warm-up, EMA 0.99 (timm ``ModelEmaV2``), AMP on CUDA, gradient clip 2.0; flips, rot90,
shift-scale-rotate, blur / noise, brightness-contrast, 32-aligned cutout, z-shift +-2, channel shuffle in groups,
mixup (input or manifold) and cutmix. Validation: F0.5 of the EMA model at the best percentile threshold
(Nelder-Mead), on the windows' stitched probabilities, as inference stitches them.

Folds (Kaggle layout): train fragment ``2`` is cut into three parts of equal mask area, ``2a``/``2b``/``2c`` (top,
middle, bottom); fold 0 validates on ``1`` and trains on ``2a 2b 2c 3``, fold 1 validates on ``2a`` and trains on
``1 2b 2c 3``. ``--valid-ids`` names other validation fragments or parts (e.g. for the synthetic set).

Writes to ``--out``: ``best_fbeta.ckpt`` (the team's layout, via ``save_checkpoint``: ``model.*`` and
``model_ema.module.*`` plus ``hyper_parameters``; ink_infer loads it unchanged), ``last.ckpt`` (the same plus the
optimizer, scheduler, grad scaler, step and RNG state, for ``--resume``; written at the end of every epoch),
``train_log.jsonl`` (one record per epoch); ``--export`` writes a copy of the best weights for shipping (optionally
the EMA copy only, optionally float16). Prints the manifest entry (with size and sha256) to add.

Data never passes through whole volumes: each fragment is streamed once with ``Volume.read_band`` (row bands) into a
block store, the reference's 32 x 32 patch layout (one ``(nz, 32, 32)`` uint16 block per mask-touching block, only the
slices the model can see with its z-shift). Stores are kept in RAM up to ``--cache-gb`` in total; a fragment that
does not fit (fragment 2 at 35+4 slices is ~7 GB) goes to a block-major ``.npy`` memmap under ``--cache-dir``, read
block by block, so the OS page cache holds what memory allows.

The pieces live in the ``training`` package beside this file (outside the ink_infer wheel): ``training.data``,
``training.augment``, ``training.objective``, ``training.validate`` and ``training.state``; this file is the
command line and the epoch loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import cv2
import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ink_infer.config import ModelSpec
from ink_infer.engine.windows import normalize_windows
from ink_infer.errors import UserError
from ink_infer.manifest import load_manifest
from ink_infer.models import build_model
from ink_infer.models.checkpoint import hyper_parameters_for, save_checkpoint
from ink_infer.run.runtime import keep_freed_memory, resolve_device
from training.augment import mix_batch
from training.data import (
    FOLD_VALID,
    BlockStore,
    TrainData,
    WindowDataset,
    build_stores,
    load_train_data,
    region_origins,
)
from training.objective import criterion, downsample_labels
from training.state import Trainer, export_weights, load_last, make_trainer, manifest_entry, save_last
from training.validate import ValidPart, make_valid_parts, validate

log = logging.getLogger("train")

POSITIVE_ARGS = (
    "epochs",
    "samples_per_epoch",
    "batch_size",
    "valid_windows",
    "valid_every",
    "epochs_this_run",
)
WORKER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(message)  # one line and exit 2, as every user error of the project


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python train.py", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--data", type=Path, required=True, help="/kaggle/input, the competition folder, or a train folder")
    a("--manifest", type=Path, default=Path("weights_manifest.json"))
    a("--config", required=True, help="name of the manifest entry to train")
    a("--out", type=Path, required=True, help="run folder: checkpoints, train_log.jsonl, cache")
    a("--fold", type=int, choices=sorted(FOLD_VALID), default=0)
    a("--valid-ids", default=None, help="fragment / part ids to validate on, comma-separated (not --fold)")
    a("--epochs", type=int, default=30)
    a("--samples-per-epoch", type=int, default=25000, help="random windows per epoch (reference: 25000)")
    a("--batch-size", type=int, default=16)
    a("--lr", type=float, default=1e-3)
    a("--backbone-lr", type=float, default=None, help="encoder/backbone lr (default: --lr)")
    a("--weight-decay", type=float, default=1e-4)
    a("--ema-decay", type=float, default=0.99)
    a("--clip", type=float, default=2.0, help="gradient norm clip")
    a("--mixup-p", type=float, default=0.5)
    a("--mixup-alpha", type=float, default=0.2)
    a("--shift-z", type=int, default=2, help="random z shift of the slice window, +-slices")
    a("--no-aug", action="store_true", help="no augmentation, z-shift or mixing (for checks)")
    a("--labels", choices=("bilinear", "area"), default="bilinear", help="1/32 targets (reference: bilinear)")
    a("--valid-windows", type=int, default=24000, help="first N windows (reference order) to validate on")
    a("--valid-every", type=int, default=1, help="validate every N epochs (and after the last)")
    a("--valid-scale", type=int, default=4, choices=(1, 2, 4, 8, 16, 32), help="validate at 1/N resolution")
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 2)))
    a("--cache-gb", type=float, default=8.0, help="block stores in RAM up to this size, then on disk")
    a("--cache-dir", type=Path, default=None, help="folder for the on-disk block stores (default OUT/cache)")
    a("--resume", type=Path, default=None, help="a last.ckpt of this run to continue from")
    a("--epochs-this-run", type=int, default=None, help="stop after this many epochs (resume later)")
    a("--export", type=Path, default=None, help="also write the best weights here (the file to ship)")
    a("--export-ema-only", action="store_true", help="export only model_ema.module.* (half the size)")
    a("--export-fp16", action="store_true", help="export float16 tensors (the reference ran in fp16)")
    return p


# --- the run -------------------------------------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> None:
    for name in POSITIVE_ARGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: expected a positive number")
    if args.samples_per_epoch < args.batch_size:
        raise UserError(f"--samples-per-epoch {args.samples_per_epoch}: under one batch of {args.batch_size}")
    if args.shift_z < 0 or args.workers < 0 or args.lr <= 0 or not 0 <= args.mixup_p <= 1:
        raise UserError("--shift-z and --workers must be >= 0, --lr > 0, --mixup-p in [0, 1]")
    if (args.export_ema_only or args.export_fp16) and args.export is None:
        raise UserError("--export-ema-only / --export-fp16 need --export FILE")
    if args.resume is not None and not args.resume.is_file():
        raise UserError(f"{args.resume}: --resume checkpoint not found")
    if args.resume is None and (args.out / "last.ckpt").exists():
        raise UserError(
            f"{args.out}: holds a run already (last.ckpt); --resume {args.out / 'last.ckpt'} or a new --out"
        )


def train_device(name: str) -> torch.device:
    """``runtime.resolve_device``, with a malformed name (torch's RuntimeError) as a user error too: inference
    checks the name in its RunConfig first, train takes it straight from the command line."""
    try:
        return resolve_device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu or cuda[:N]") from None


def prepare(args: argparse.Namespace) -> tuple[ModelSpec, TrainData, nn.Module, torch.device]:
    """Every check on the inputs, before anything is logged or computed: a bad input is one line and exit 2."""
    check_args(args)
    device = train_device(args.device)
    models = load_manifest(args.manifest).models
    spec = next((m for m in models if m.name == args.config), None)
    if spec is None:
        names = ", ".join(m.name for m in models)
        raise UserError(f"{args.manifest}: no model named {args.config!r} (it has {names})")
    torch.manual_seed(args.seed)  # the initial weights depend on the seed only
    model = build_model(spec)
    data = load_train_data(args.data, fold=args.fold, valid_ids=args.valid_ids)
    return spec, data, model, device


def loader(
    ds: WindowDataset, args: argparse.Namespace, *, device: torch.device, train: bool
) -> torch.utils.data.DataLoader:
    # the dataset's own per-epoch order is the shuffle (drawn from (seed, epoch)), so the sampler stays sequential
    return torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch_size,
        drop_last=train,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init,
        # forked workers share the in-RAM block stores copy-on-write instead of each unpickling a copy
        multiprocessing_context=WORKER_START if args.workers else None,
    )


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)  # a worker is one process among many: no thread pool of its own
    torch.set_num_threads(1)


def train_epoch(tr: Trainer, ds: WindowDataset, args: argparse.Namespace, *, steps: int) -> float:
    ds.set_epoch(tr.epoch, steps * args.batch_size)
    tr.model.train()
    losses = []
    batches = loader(ds, args, device=tr.device, train=True)
    desc = f"epoch {tr.epoch + 1}/{args.epochs}"
    bar = tqdm(batches, total=steps, desc=desc, unit="step", leave=False, disable=None)
    for x, y in bar:
        losses.append(train_step(tr, x, y, args))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return float(np.mean(losses))


def train_step(tr: Trainer, x: Tensor, y: Tensor, args: argparse.Namespace) -> float:
    """One optimiser step on a batch of raw windows ``(B, Z, S, S)`` in [0, 1] and labels ``(B, S, S)``."""
    rng = np.random.default_rng([args.seed, 3, tr.step])  # a function of the step: resumed runs mix alike
    x, y = x.to(tr.device, non_blocking=True), y.to(tr.device, non_blocking=True)
    lam = None
    if not args.no_aug:
        x, y, lam = mix_batch(x, y, rng, mixup_p=args.mixup_p, alpha=args.mixup_alpha)
    x = normalize_windows(x)  # the per-window standardisation of inference, after mixing (as the reference)
    target = downsample_labels(y, mode=args.labels)
    with torch.autocast(tr.device.type, dtype=torch.float16, enabled=tr.amp):
        if lam is None:
            logits = tr.model(x)
        else:
            feat = tr.features(x)
            logits = tr.head(lam * feat + (1 - lam) * feat.flip(0))
    loss = criterion(logits, target)
    tr.optimizer.zero_grad(set_to_none=True)
    tr.scaler.scale(loss).backward()
    tr.scaler.unscale_(tr.optimizer)  # clip the true gradients, not the scaled ones
    nn.utils.clip_grad_norm_(tr.model.parameters(), args.clip)
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.scheduler.step()
    tr.ema.update(tr.model)
    tr.step += 1
    return float(loss.detach())


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train (or continue) one config; returns the epoch records of this invocation."""
    spec, data, model, device = prepare(args)
    try:
        return train_run(spec, data, model, device, args)
    finally:
        data.close()


def train_run(
    spec: ModelSpec, data: TrainData, model: nn.Module, device: torch.device, args: argparse.Namespace
) -> list[dict[str, Any]]:
    for warning in data.warnings:
        log.warning("%s", warning)
    train_ids, valid_ids = (" ".join(r.id for r in rs) for rs in (data.train, data.valid))
    log.info("%s on %s: train %s, valid %s", spec.name, device, train_ids, valid_ids)
    cache_dir = args.cache_dir or args.out / "cache"
    stores = build_stores(data, spec, shift_z=args.shift_z, cache_gb=args.cache_gb, cache_dir=cache_dir)
    try:
        return train_stores(spec, data, stores, model, device, args)
    finally:
        # on-disk stores are rebuilt by every run (cheap next to training), so they are not left behind
        for path in {Path(s.volume.filename) for s in stores if isinstance(s.volume, np.memmap)}:
            path.unlink(missing_ok=True)


def train_stores(
    spec: ModelSpec,
    data: TrainData,
    stores: list[BlockStore],
    model: nn.Module,
    device: torch.device,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    items = [(r, region_origins(r, data.masks[r.frag])) for r in data.train]
    train_ds = WindowDataset(
        stores, items, spec, augment=not args.no_aug, shift_z=args.shift_z, seed=args.seed
    )
    valid = make_validation(stores, data, spec, args, device=device)
    steps = args.samples_per_epoch // args.batch_size
    tr = make_trainer(model, spec, args, device=device, total=steps * args.epochs)
    if args.resume is not None:
        load_last(tr, args.resume)
        log.info("resumed from %s: epoch %d, step %d", args.resume, tr.epoch, tr.step)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    stop = min(args.epochs, tr.epoch + (args.epochs_this_run or args.epochs))
    records = []
    while tr.epoch < stop:
        records.append(run_epoch(tr, train_ds, valid, args, steps=steps))
    if tr.epoch >= args.epochs:
        finish(tr, args)
    else:
        log.info(
            "stopped after epoch %d of %d: continue with --resume %s",
            tr.epoch,
            args.epochs,
            args.out / "last.ckpt",
        )
    return records


@dataclass(frozen=True)
class Validation:
    loader: torch.utils.data.DataLoader
    parts: list[ValidPart]
    scale: int


def make_validation(
    stores: list[BlockStore],
    data: TrainData,
    spec: ModelSpec,
    args: argparse.Namespace,
    *,
    device: torch.device,
) -> Validation:
    scale = args.valid_scale
    parts = make_valid_parts(
        stores, data.masks, data.valid, spec, scale=scale, max_windows=args.valid_windows
    )
    ds = WindowDataset(stores, [(p.region, p.origins) for p in parts], spec, augment=False, shift_z=0, seed=0)
    return Validation(loader(ds, args, device=device, train=False), parts, scale)


def run_epoch(
    tr: Trainer, train_ds: WindowDataset, valid: Validation, args: argparse.Namespace, *, steps: int
) -> dict[str, Any]:
    """Train one epoch, validate (every --valid-every and at the end), save best/last, log one line."""
    t0 = time.perf_counter()
    record: dict[str, Any] = {"epoch": tr.epoch + 1, "loss": train_epoch(tr, train_ds, args, steps=steps)}
    record |= {"step": tr.step, "lr": tr.optimizer.param_groups[-1]["lr"]}
    tr.epoch += 1
    if tr.epoch % args.valid_every == 0 or tr.epoch == args.epochs:
        record |= validate(tr, valid.loader, valid.parts, scale=valid.scale)
        if record["f05"] > tr.best:
            tr.best, tr.best_epoch, tr.best_path = (
                record["f05"],
                tr.epoch,
                (args.out / "best_fbeta.ckpt").resolve(),
            )
            save_checkpoint(tr.model, tr.best_path, hyper_parameters_for(tr.spec), tr.ema)
    save_last(tr, args.out / "last.ckpt")
    record["seconds"] = time.perf_counter() - t0
    with open(args.out / "train_log.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    scored = ""
    if "f05" in record:
        scored = f", valid F0.5 {record['f05']:.4f} at percentile {record['percentile']:.4f}"
        scored += f" (p > {record['threshold']:.4f})"
    log.info(
        "epoch %d/%d step %d: loss %.4f%s, lr %.2e, %.0fs",
        *(tr.epoch, args.epochs, tr.step, record["loss"], scored, record["lr"], record["seconds"]),
    )
    return record


def finish(tr: Trainer, args: argparse.Namespace) -> None:
    """Export the best epoch's weights if asked, and print the manifest entry of the file to ship."""
    path = tr.best_path
    if path is None or not path.is_file():
        raise UserError(f"{path or args.out / 'best_fbeta.ckpt'}: the best checkpoint of this run is missing")
    if args.export is not None:
        export_weights(path, args.export, ema_only=args.export_ema_only, fp16=args.export_fp16)
        path = args.export
    log.info("best valid F0.5 %.4f at epoch %d: %s", tr.best, tr.best_epoch, path)
    log.info("manifest entry (its file is relative to the folder given as --weights):")
    print(json.dumps(manifest_entry(tr.spec, path)))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 on a user error, as one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        log.setLevel(logging.INFO)
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    keep_freed_memory()  # process-wide, so only when run as a script (tests call main() in their own process)
    sys.exit(main())
