"""``python -m ink_infer.submit``: arguments -> one frozen RunConfig -> pipeline.run -> files. No logic here.

    python -m ink_infer.submit --data /kaggle/input --weights /kaggle/input/ink-infer-weights --out /kaggle/working
    python -m ink_infer.submit --demo --out demo_out
    python -m ink_infer.submit --data DIR --dry-run --allow-random-weights --scale-to 8181x6330

Exit codes (every failure ends with one line on stderr, no traceback): 0 success; 2 bad input or arguments, or
outputs that cannot be written; 1 when no model finished, or a model failed under ``--on-model-error fail``;
130 / 143 when stopped by SIGINT / SIGTERM (finished results stay in OUT/partials: rerun the command to resume).
submission.csv is only ever replaced by a complete one.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import tempfile
from pathlib import Path

from ink_infer.config import (
    CACHE_GB,
    COMPILE_MODES,
    DIRECTIONS,
    LAYER_AXES,
    MISSING_CHUNKS,
    ON_MODEL_ERROR,
    PROB_FORMATS,
    ROTATIONS,
    TTA_MODES,
    Budget,
    RunConfig,
)
from ink_infer.errors import DeviceError, ModelRunError, UserError
from ink_infer.manifest import DEMO_MANIFEST, PACKAGED, default_manifest
from ink_infer.outputs.summary import TABLE, format_table, format_verdicts, table_rows
from ink_infer.run.preflight import check_inputs
from ink_infer.schema import THRESHOLD_REGIONS, cli_type
from ink_infer.synthetic.demo import demo_scores, make_demo_data
from ink_infer.volumes.remote import is_url, parse_storage_options
from ink_infer.volumes.segments import parse_layers

log = logging.getLogger("ink_infer")

USAGE = "python -m ink_infer.submit --data DIR --weights DIR [--out DIR] [options]   (--demo: no data needed)"
EXAMPLES = """\
examples:
  # Kaggle: the 18-model ensemble (packaged manifest) on the hidden test set
  python -m ink_infer.submit --data /kaggle/input --weights /kaggle/input/ink-infer-weights --out /kaggle/working
  # will it fit the 9 hours? a sample of windows per model, projected onto a fragment-1-sized test set
  python -m ink_infer.submit --data /kaggle/input --weights W --dry-run --scale-to 8181x6330
  # try everything without data or weights: the synthetic demo, then its dry run
  python -m ink_infer.submit --demo --out demo_out
  python -m ink_infer.submit --demo --out demo_out --dry-run

exit status: 0 success; 2 bad input or arguments (one line naming what and where); 1 no model finished, or a model
failed under --on-model-error fail; 130 / 143 stopped by SIGINT / SIGTERM (rerun the same command to resume).
"""


def on_kaggle() -> bool:
    """A Kaggle notebook: KAGGLE_KERNEL_RUN_TYPE set (interactive sessions and committed runs alike), or, should an
    image ever not set it, the notebook's /kaggle/working folder present."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or Path("/kaggle/working").is_dir()


def kaggle_partials() -> Path:
    """Kaggle's default for --partials: outside /kaggle/working, whose files become the notebook's output."""
    return Path(tempfile.gettempdir()) / "ink_infer_partials"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; each option's default shown when it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "default:" in text
            or action.default in (None, False, argparse.SUPPRESS, [])
        ):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def error(
        self, message: str
    ) -> None:  # a bad value: one line naming the option, exit 2, as every user error
        self.exit(2, f"error: {message}\n")

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 (argparse's own signature)
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:  # an option nobody knows, most often a typo: the usage line, then what was meant
            problem = "; ".join(self._unknown(a) for a in unknown if a.startswith("-")) or (
                f"unexpected argument {unknown[0]!r} (options take the form --name VALUE)")  # fmt: skip
            self.exit(2, f"usage: {self.usage}\nerror: {problem}\n")
        return parsed

    def _unknown(self, arg: str) -> str:
        """``unrecognized argument --dryrun (did you mean --dry-run?)``"""
        name = arg.split("=", 1)[0]
        known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else " (--help lists the options)"
        return f"unrecognized argument {name}{hint}"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m ink_infer.submit", usage=USAGE, epilog=EXAMPLES,
        formatter_class=lambda prog: _Formatter(prog, max_help_position=30, width=110),
        description="Vesuvius ink detection: the 2nd-place ensemble over every fragment -> submission.csv, "
        "report.json, previews/.",
    )  # fmt: skip
    for add in (_where_arguments, _compute_arguments, _budget_arguments, _fault_arguments, _output_arguments):
        add(p)
    return p


def _where_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR|URL",
                   help="/kaggle/input, the competition folder, a folder of fragments or scroll segments "
                        "(<seg>/layers/*.tif, <seg>.zarr), or one of them; or an s3://, https:// or http:// "
                        "zarr store or folder of them")  # fmt: skip
    p.add_argument("--mask", type=Path, default=None, metavar="PNG",
                   help="the mask of the one segment in --data (default: <seg>_mask.png beside it or mask.png in "
                        "it; an OME-Zarr store without one: the papyrus of its coarsest level)")  # fmt: skip
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="remote stores: passed to the file system (s3fs, fsspec's HTTP), e.g. anon=false; repeat "
                        "for more")  # fmt: skip
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="remote stores: where fetched chunks are kept, shared by the models, reruns and workers "
                        "(default: OUT/cache)")  # fmt: skip
    p.add_argument("--cache-gb", type=float, default=CACHE_GB, metavar="GB",
                   help="remote stores: the chunk cache's size, least recently used out; 0: no cache")  # fmt: skip
    p.add_argument("--weights", type=Path, default=None, metavar="DIR",
                   help="the folder holding the manifest's weight files (<config>/fold{0,1}/best_fbeta.ckpt)")  # fmt: skip
    p.add_argument("--manifest", type=Path, default=None, metavar="FILE",
                   help="the models to run, or a packaged manifest by name: 2nd-place (the 18 models) or gp (the "
                        "Grand Prize TimeSformer) (default: DIR/weights_manifest.json of --weights if there, else "
                        "2nd-place)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                   help="where submission.csv, report.json and previews/ go")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="one worker process per device: all (every GPU), cuda:0,cuda:1, or cpu,cpu "
                        "(default: --device alone)")  # fmt: skip


def _compute_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what is computed")
    number_in = _adder(g)
    number_in("--stride", 32, "window stride in pixels: a multiple of 32, at most the smallest model square; "
              "32 is the reference's", metavar="PX")  # fmt: skip
    g.add_argument("--tta", default="scheduled", choices=TTA_MODES,
                   help="flip test-time augmentation: scheduled (the reference: one flip per window, cycling), "
                        "full (all four flips per window, 4x the time) or none")  # fmt: skip
    number_in("--threshold", None, "ink where the probability exceeds this quantile (in [0, 1]) of the region's "
              "probabilities (default: the manifest's, 0.93)")  # fmt: skip
    g.add_argument("--threshold-region", choices=THRESHOLD_REGIONS, default=None,
                   help="pixels the quantile is taken over: covered (mask pixels some window reached; the "
                        "reference) or mask (every mask pixel) (default: the manifest's, covered)")  # fmt: skip
    number_in("--batch-size", None, "windows per forward pass (default: the largest that fits, measured)")
    g.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile each model on the fixed batch shape: default or max-autotune (inductor), "
                        "auto (default on CUDA when Triton and a C compiler are present, else none), or none "
                        "(eager). Outputs differ from eager by float rounding")  # fmt: skip
    g.add_argument("--layers", default=None, metavar="START:STOP",
                   help="scroll segments: the 65 layers of a longer stack the models read (default: the middle "
                        "65)")  # fmt: skip
    g.add_argument("--layer-axis", choices=LAYER_AXES, default=None,
                   help="zarr stores: the axis the layers are on, where neither OME-Zarr axes, the mask's shape nor "
                        "the array's shape tell (default: refused when ambiguous)")  # fmt: skip
    g.add_argument("--missing-chunks", choices=MISSING_CHUNKS, default="warn",
                   help="zarr stores: chunks missing under the mask (read as zeros) are counted and named in "
                        "report.json, or refused before any compute")  # fmt: skip
    g.add_argument("--direction", choices=DIRECTIONS, default=None,
                   help="scroll segments: read the picked layers as they are (forward), in reverse order, for "
                        "segments whose depth runs the other way (reverse), or both ways, writing both maps "
                        "(<id>.forward, <id>.reverse), a preview of the two side by side and report.json's "
                        "comparison of them (both) (default: forward)")  # fmt: skip
    g.add_argument("--reverse-layers", action="store_true", help="the same as --direction reverse")
    g.add_argument("--rotate", type=int, choices=ROTATIONS, default=0, metavar="DEGREES",
                   help="turn the input counterclockwise by 0, 90, 180 or 270 degrees before inference; the outputs "
                        "are turned back (the Kaggle hidden test was turned 90 degrees from training)")  # fmt: skip
    g.add_argument("--allow-random-weights", action="store_true",
                   help="run entries without a weight file with seeded random init (rehearsals; reported)")  # fmt: skip
    g.add_argument("--require-hashes", action="store_true",
                   help="refuse weight files the manifest gives no sha256 for (default: a warning)")  # fmt: skip


def _budget_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dry run and budget")
    number_in = _adder(g)
    g.add_argument("--dry-run", action="store_true",
                   help="run a sample of windows per model and project the full run against the budget")  # fmt: skip
    number_in("--max-windows", 64, "windows per fragment and model in a dry run")
    g.add_argument("--scale-to", action="append", default=[], metavar="HxW",
                   help="also project a fragment of this size, e.g. 8181x6330 (repeatable)")  # fmt: skip
    number_in("--budget-hours", 9.0, "the run's time budget: a model projected to end past it (less 10 %%) is "
              "skipped")  # fmt: skip
    number_in("--host-mem-gb", 13.0, "host memory budget the dry run's verdict is held to")
    number_in(
        "--gpu-mem-gb", 16.0, "GPU memory the run is held to (batch sizes, the memory cap on bigger cards)"
    )


def _fault_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("faults, resume and many devices")
    number_in = _adder(g)
    g.add_argument("--on-model-error", choices=ON_MODEL_ERROR, default="skip",
                   help="a model failing mid-run is skipped (recorded in report.json) or ends the run")  # fmt: skip
    number_in("--max-nonfinite", 0.01, "share of a fragment's windows that may give NaN/inf (zeroed, counted) "
              "before the model counts as failed", metavar="FRACTION")  # fmt: skip
    g.add_argument("--fresh", action="store_true", help="recompute everything, ignoring saved partials")
    g.add_argument("--partials", type=Path, default=None, metavar="DIR",
                   help="where finished (model, fragment) results are saved and resumed from (default: "
                        "OUT/partials; on Kaggle a temporary folder outside /kaggle/working)")  # fmt: skip
    g.add_argument("--keep-partials", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the partials after a successful submission (default: kept, except on Kaggle, "
                        "where they are deleted)")  # fmt: skip
    number_in("--unit-windows", 16384, "a fragment with more windows is computed as row ranges of at most about "
              "this many (units to share out)")  # fmt: skip
    number_in("--num-parts", 1, "split the units into this many parts (array jobs); run each with --part-id")
    number_in(
        "--part-id", 0, "the part this process computes (0 .. --num-parts - 1); it writes partials only"
    )
    g.add_argument("--merge-only", action="store_true",
                   help="build submission.csv from the partials of every part (same arguments otherwise)")  # fmt: skip


def _output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    number_in = _adder(g)
    g.add_argument("--no-previews", action="store_true", help="do not write previews/<id>.png")
    g.add_argument("--save-probabilities", action=argparse.BooleanOptionalAction, default=None,
                   help="write OUT/probabilities/<id>.tif (full-resolution uint8, tiled) and OUT/masks/<id>.png "
                        "(default: for scroll segments, not for Kaggle fragments)")  # fmt: skip
    g.add_argument("--prob-format", choices=tuple(PROB_FORMATS), default="tiff",
                   help="the probability maps' files: a tiled uint8 TIFF, or an OME-Zarr multiscale pyramid "
                        "(what VC3D, napari and neuroglancer open; needs the zarr package)")  # fmt: skip
    g.add_argument("--save-model-maps", action="store_true",
                   help="also each model's probability map, OUT/probabilities/<id>.<model>.tif")  # fmt: skip
    g.add_argument("--gp-png", action="store_true", help="also the GP script's own picture of each timesformer "
                   "model's map: OUT/gp_png/<model>/<id>_prediction_rotated_0_layer_17.png")  # fmt: skip
    g.add_argument("--quiet", action="store_true", help="only warnings, errors and the final table")
    number_in("--progress-every", 60.0, "seconds between progress lines when stderr is not a terminal (a "
              "notebook cell, a log file)", metavar="SECONDS")  # fmt: skip
    g.add_argument("--demo", action="store_true",
                   help="write a synthetic test set under OUT and run the packaged demo models on it")  # fmt: skip


def _adder(group):
    """``number(option, default, help)`` for an argument group: parsed and range-checked by ``schema.CLI_NUMBERS``."""

    def number(option: str, default, help: str, **kwargs) -> None:
        group.add_argument(option, type=cli_type(option), default=default, help=help, **kwargs)

    return number


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


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> RunConfig:
    """The one frozen RunConfig of the run; paths made absolute (report.json records them), the Kaggle defaults
    for the partials applied."""
    data, manifest, weights, allow_random = args.data, args.manifest, args.weights, args.allow_random_weights
    if args.demo:
        data = make_demo_data(args.out)
        manifest = manifest or DEMO_MANIFEST
        weights = weights or DEMO_MANIFEST.parent  # the trained demo checkpoints ship inside the package
    if data is None:
        raise UserError("--data DIR is required (or --demo)")
    manifest = PACKAGED.get(str(manifest), manifest) or default_manifest(weights)
    partials = args.partials or (kaggle_partials() if on_kaggle() else None)
    keep = args.keep_partials if args.keep_partials is not None else not on_kaggle()
    absolute = lambda p: None if p is None else Path(p).absolute()  # noqa: E731
    return RunConfig(
        data=data if is_url(data) else absolute(data), mask=absolute(args.mask), cache=absolute(args.cache),
        cache_gb=args.cache_gb, storage_options=parse_storage_options(args.storage_option), out=absolute(args.out), manifest=absolute(manifest), weights=absolute(weights),
        device=args.device, stride=args.stride, tta=args.tta, compile=args.compile, threshold_percentile=args.threshold,
        threshold_region=args.threshold_region, dry_run=args.dry_run,
        max_windows=args.max_windows, scale_to=tuple(parse_size(s) for s in args.scale_to),
        allow_random_weights=allow_random, batch_size=args.batch_size,
        budget=Budget(args.budget_hours, args.host_mem_gb, args.gpu_mem_gb), quiet=args.quiet,
        previews=not args.no_previews, on_model_error=args.on_model_error, max_nonfinite=args.max_nonfinite,
        devices=parse_devices(args.devices), unit_windows=args.unit_windows, num_parts=args.num_parts,
        part_id=args.part_id, merge_only=args.merge_only, partials=absolute(partials), keep_partials=keep,
        require_hashes=args.require_hashes, progress_every=args.progress_every, fresh=args.fresh,
        layers=parse_layers(args.layers), direction=args.direction, reverse_layers=args.reverse_layers, layer_axis=args.layer_axis,
        missing_chunks=args.missing_chunks,
        save_probabilities=args.save_probabilities, save_model_maps=args.save_model_maps, gp_png=args.gp_png,
        prob_format=args.prob_format, rotate=args.rotate,
        argv=tuple(sys.argv[:1] + (sys.argv[1:] if argv is None else list(argv))),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        cfg = config_from_args(args, argv)
        # torch-free: paths, manifest, stride, weight files, before torch (4-14 s to import) is loaded
        inputs = check_inputs(cfg)
    except UserError as e:
        return _user_error(e)
    from ink_infer.run import pipeline
    from ink_infer.run.stop import Interrupted

    try:
        report = pipeline.run(cfg, inputs)
    except UserError as e:
        return _user_error(e)
    except (ModelRunError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code  # 130 for SIGINT, 143 for SIGTERM (the shell's convention); 1 for a lost rank
    if cfg.dry_run and report.projection is None:  # a torchrun rank but rank 0
        print(f"{report.mode}: the dry run is rank 0's; its report.json projects every rank's share")
        return 0
    print(format_table(table_rows(report), TABLE))
    if report.submission is not None:
        print(f"wrote {report.submission.path}, {cfg.out / 'report.json'}, {cfg.out / 'previews'}/")
        if report.submission.maps:
            print(f"wrote {len(report.submission.maps)} probability map(s) and ink mask(s) in "
                  f"{cfg.out / 'probabilities'}/ and {cfg.out / 'masks'}/")  # fmt: skip
        if report.partials.deleted:
            print(
                f"deleted {report.partials.deleted} partial(s) in {cfg.partials_dir} (--keep-partials keeps them)"
            )
    elif report.projection is None:  # one part of the units: partials only
        print(f"{report.mode}: {report.partials_kept} unit(s) in {cfg.partials_dir}; when every part is done, "
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
    if args.demo and report.submission is not None:
        _demo_report(cfg, report)
    return 0


def _demo_report(cfg: RunConfig, report) -> None:
    """The demo's F0.5 against the synthetic ground truth: printed, drawn, and recorded in report.json."""
    from ink_infer.outputs.previews import TRUTH_LEGEND
    from ink_infer.outputs.report import write_report

    report.demo_scores = demo_scores(cfg.data, cfg.out, previews=cfg.previews)
    for frag_id, f05 in report.demo_scores.items():
        print(f"demo: fragment {frag_id} F0.5 = {f05:.3f} against the synthetic ground truth")
    if cfg.previews:
        print(f"demo: {cfg.out / 'previews'}/<id>_truth.png: {TRUTH_LEGEND}")
    write_report(cfg.out / "report.json", report, None, final=True)


def _user_error(e: UserError) -> int:
    for line in str(e).splitlines():  # one line per problem (several bad checkpoints: one line each)
        print(f"error: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
