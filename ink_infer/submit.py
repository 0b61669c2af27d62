"""``python -m ink_infer.submit``: arguments -> one frozen RunConfig -> pipeline.run -> files. No logic here.

    python -m ink_infer.submit --data /kaggle/input --weights /kaggle/input/<weights> --out /kaggle/working
    python -m ink_infer.submit --demo --out demo_out
    python -m ink_infer.submit --data DIR --dry-run --allow-random-weights --scale-to 8181x6330

Exit codes (every failure ends with one line on stderr, no traceback): 0 success; 2 bad input or arguments, or
outputs that cannot be written; 1 when no model finished, or a model failed under ``--on-model-error fail``;
130 / 143 when stopped by SIGINT / SIGTERM (finished results stay in OUT/partials: rerun the command to resume).
submission.csv is only ever replaced by a complete one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import Budget, RunConfig, ThresholdSpec
from .errors import DeviceError, ModelRunError, UserError
from .manifest import DEMO_MANIFEST
from .schema import cli_type
from .summary import TABLE, format_table, format_verdicts, table_rows

log = logging.getLogger("ink_infer")

DEFAULT_MANIFEST = Path("weights_manifest.json")
DEMO_TEST = (("a", 576, 768), ("b", 512, 704))  # a few lines of letters each: scores vary less
DEMO_SEED = 20230614  # not a training seed: the demo scores held-out fragments


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as every user error
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m ink_infer.submit", description="Vesuvius ink detection: ensemble -> submission.csv"
    )

    def number(option: str, default, help: str, **kwargs) -> None:
        """A numeric option, parsed and range-checked by its rule in ``schema.CLI_NUMBERS``."""
        p.add_argument(option, type=cli_type(option), default=default, help=help, **kwargs)

    p.add_argument(
        "--data", type=Path, help="/kaggle/input, the competition folder, or a folder of fragment dirs"
    )
    p.add_argument(
        "--manifest", type=Path, default=None, help="weights_manifest.json (default: ./weights_manifest.json)"
    )
    p.add_argument("--weights", type=Path, default=None, help="folder holding the manifest's weight files")
    p.add_argument(
        "--out", type=Path, default=Path("."), help="where submission.csv, report.json, previews/ go"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    number(
        "--stride",
        32,
        "window stride in pixels, a multiple of 32, at most the smallest model square (reference: 32)",
    )
    p.add_argument("--tta", default="scheduled", choices=["none", "scheduled", "full"])
    number(
        "--threshold",
        None,
        "quantile in [0, 1] of the region's probabilities (default: the manifest's, 0.93)",
    )
    p.add_argument("--threshold-region", choices=["covered", "mask"], default=None)
    number("--batch-size", None, "windows per batch (default: automatic)")
    p.add_argument(
        "--dry-run", action="store_true", help="run a sample of windows per model and project the full run"
    )
    number("--max-windows", 64, "windows per fragment and model in a dry run")
    p.add_argument(
        "--scale-to", action="append", default=[], metavar="HxW", help="also project a fragment of this size"
    )
    p.add_argument(
        "--allow-random-weights", action="store_true", help="run entries without weights with random init"
    )
    number("--budget-hours", 9.0, "time budget of the run")
    number("--host-mem-gb", 13.0, "host memory budget (dry-run verdict)")
    number("--gpu-mem-gb", 16.0, "GPU memory the run is held to")
    p.add_argument(
        "--on-model-error",
        choices=["skip", "fail"],
        default="skip",
        help="a model failing mid-run is skipped (recorded in report.json) or ends the run",
    )
    number(
        "--max-nonfinite",
        0.01,
        "windows of a fragment that may give NaN/inf (zeroed, counted) before the model counts as failed",
        metavar="FRACTION",
    )
    p.add_argument(
        "--fresh", action="store_true", help="recompute everything, ignoring results saved in OUT/partials"
    )
    p.add_argument(
        "--devices",
        default=None,
        metavar="LIST",
        help="one worker process per device: all (every GPU), cuda:0,cuda:1, or cpu,cpu (default: --device alone)",
    )
    number(
        "--unit-windows",
        16384,
        "a fragment with more windows is computed as row ranges of at most this many (units to share out)",
    )
    number("--num-parts", 1, "split the units into this many parts (array jobs); run each with --part-id")
    number("--part-id", 0, "the part this process computes (0 .. --num-parts - 1); it writes partials only")
    p.add_argument(
        "--merge-only",
        action="store_true",
        help="build submission.csv from the partials of every part (same arguments otherwise); compute nothing",
    )
    p.add_argument("--no-previews", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--demo", action="store_true", help="generate a synthetic test set under OUT and run the demo models"
    )
    return p


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--scale-to {text!r}: expected HxW, e.g. 8181x6330") from None
    if h <= 0 or w <= 0:
        raise UserError(f"--scale-to {text!r}: sizes must be positive")
    return h, w


def parse_devices(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise UserError(f"--devices {text!r}: expected all, or cpu / cuda:N, comma-separated")
    return names


def config_from_args(args: argparse.Namespace) -> RunConfig:
    data, manifest, weights, allow_random = args.data, args.manifest, args.weights, args.allow_random_weights
    if args.demo:
        data = make_demo_data(args.out)
        manifest = manifest or DEMO_MANIFEST
        weights = weights or DEMO_MANIFEST.parent  # the trained demo checkpoints ship inside the package
    if data is None:
        raise UserError("--data DIR is required (or --demo)")
    threshold = None
    if args.threshold is not None or args.threshold_region is not None:
        from .manifest import load_manifest

        base = load_manifest(manifest or DEFAULT_MANIFEST).threshold
        threshold = ThresholdSpec(
            percentile=base.percentile if args.threshold is None else args.threshold,
            region=args.threshold_region or base.region,
        )
    return RunConfig(
        data=data, out=args.out, manifest=manifest or DEFAULT_MANIFEST, weights=weights, device=args.device,
        stride=args.stride, tta=args.tta, threshold=threshold, dry_run=args.dry_run, max_windows=args.max_windows,
        scale_to=tuple(parse_size(s) for s in args.scale_to), allow_random_weights=allow_random,
        batch_size=args.batch_size, budget=Budget(args.budget_hours, args.host_mem_gb, args.gpu_mem_gb),
        quiet=args.quiet, previews=not args.no_previews, on_model_error=args.on_model_error,
        max_nonfinite=args.max_nonfinite, devices=parse_devices(args.devices), unit_windows=args.unit_windows,
        num_parts=args.num_parts, part_id=args.part_id, merge_only=args.merge_only,
    )  # fmt: skip


def make_demo_data(out: Path) -> Path:
    """A small synthetic Kaggle-layout test set under OUT/demo_data (kept if already there)."""
    from .synthetic import write_dataset

    root = out / "demo_data"
    comp = root / "vesuvius-challenge-ink-detection"
    if not (comp / "sample_submission.csv").exists():
        log.info("writing the synthetic demo test set to %s", root)
        comp = write_dataset(root, test=DEMO_TEST, seed=DEMO_SEED)
    return comp


def demo_scores(data: Path, out: Path, *, previews: bool = False) -> dict[str, float]:
    """F0.5 of the submission against the synthetic ground truth (OUT/demo_data/ground_truth/<id>.png).

    ``previews`` also writes OUT/previews/<id>_truth.png: found ink green, false ink red, missed ink blue."""
    import cv2

    from .metrics import fbeta
    from .previews import write_truth_preview
    from .rle import read_submission, rle_decode

    scores = {}
    for frag_id, rle in read_submission(out / "submission.csv"):
        truth = cv2.imread(str(data.parent / "ground_truth" / f"{frag_id}.png"), cv2.IMREAD_GRAYSCALE)
        if truth is None:
            continue
        ink, truth = rle_decode(rle, truth.shape), truth > 0
        scores[frag_id] = fbeta(ink, truth)
        if previews and (out / "previews").is_dir():
            mask = cv2.imread(str(data / "test" / frag_id / "mask.png"), cv2.IMREAD_GRAYSCALE)
            if mask is not None:
                write_truth_preview(out / "previews" / f"{frag_id}_truth.png", ink, truth, mask > 0)
    return scores


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    from . import pipeline  # torch and timm load here, after the arguments are known to be well-formed
    from .stop import Interrupted

    try:
        cfg = config_from_args(args)
        report = pipeline.run(cfg, fresh=args.fresh)
    except UserError as e:
        for line in str(e).splitlines():  # one line per problem (several bad checkpoints: one line each)
            print(f"error: {line}", file=sys.stderr)
        return 2
    except (ModelRunError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    print(format_table(table_rows(report), TABLE))
    if report.submission is not None:
        print(f"wrote {report.submission.path}, {cfg.out / 'report.json'}, {cfg.out / 'previews'}/")
    elif report.projection is None:  # one part of the units: partials only
        print(f"{report.mode}: {report.partials_kept} unit(s) in {cfg.out / 'partials'}; when every part is done, "
              "run the same command with --merge-only instead of --num-parts / --part-id")  # fmt: skip
    else:
        print(format_verdicts(report.projection))
        print(f"wrote {cfg.out / 'report.json'} (dry run: no submission)")
        failed = [m.name for m in report.models if m.status == "failed"]
        if failed:  # a rehearsal that hides a failing model would pass at home and fail at hour 8
            print(
                f"error: dry run: {len(failed)} model(s) failed: {', '.join(failed)} (see report.json)",
                file=sys.stderr,
            )
            return 1
    if args.demo:
        for frag_id, f05 in demo_scores(cfg.data, cfg.out, previews=cfg.previews).items():
            print(f"demo: fragment {frag_id} F0.5 = {f05:.3f} against the synthetic ground truth")
        if cfg.previews:
            print(
                f"demo: {cfg.out / 'previews'}/<id>_truth.png: found ink green, false ink red, missed ink blue"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
