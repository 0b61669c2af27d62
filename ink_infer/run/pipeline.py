"""The whole story of a run, and the only module that knows it:

    prepare (checks, fragments -> plans, weights, device: ``PreparedRun``)  ->  report head
    -> an executor computes its units (``executors``: this process, --devices workers, a part, a rank, nothing)
    -> the merge: each model's units, computed here or read back, into each fragment's ensemble (``merge``)
    -> outputs (threshold, RLE, submission.csv, maps, previews)  |  a dry run: the projection and its verdicts
    -> report.json (after every model, and at the end, always with a final status)

Faults. Everything the user can fix is found before any compute and is a ``UserError``. A model that fails while
running, for what a model can cause (``faults.MODEL_ERRORS``), is recorded in report.json and skipped
(``--on-model-error skip``) or ends the run (``fail``); its results join the ensemble for every fragment or for none.
A bug keeps its traceback; a CUDA error (``DeviceError``) ends the run. Each finished unit is saved under
``OUT/partials``, so a rerun resumes where a crash, a full disk or SIGTERM stopped it. submission.csv is only ever
replaced, atomically, by a complete one: it is absent or valid, never partial.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable

from ink_infer.config import RunConfig
from ink_infer.errors import DeviceError, ModelRunError, UserError
from ink_infer.outputs.ensemble import FragmentEnsemble
from ink_infer.outputs.raster import remove_scratch, scratch_path
from ink_infer.outputs.report import Interruption, RunReport, write_report
from ink_infer.outputs.write import OutputOptions, write_outputs
from ink_infer.run.budget import verdicts
from ink_infer.run.executors import executor_for, makespan_hours
from ink_infer.run.merge import run_models
from ink_infer.run.preflight import Inputs
from ink_infer.run.prepare import Checked, PreparedRun, prepare, start_report
from ink_infer.run.stop import Interrupted, StopRequest

log = logging.getLogger(__name__)


# what a run does with the ensembles once every model has joined: the CLI's writes the outputs (``write_tail``);
# the Python API's keeps the maps (``api.predict``)
Tail = Callable[[PreparedRun, RunReport, list[FragmentEnsemble]], None]


def run(cfg: RunConfig, inputs: Inputs | None = None, *, checked: Checked | None = None,
        tail: Tail | None = None) -> RunReport:  # fmt: skip
    """Run the ensemble over every fragment and write the outputs; returns the run's report. ``inputs``: what
    ``preflight.check_inputs`` found, when the caller ran it already (the CLI, before importing torch);
    ``checked``: the manifest's weights, already checked (the API's loaded ensemble); ``tail``: what is done with
    the ensembles instead of writing the outputs (not in dry runs).

    Raises ``UserError`` (bad input, outputs that cannot be written), ``ModelRunError`` (no model finished, or one
    failed under ``--on-model-error fail``), ``DeviceError`` and ``stop.Interrupted`` (SIGTERM / SIGINT);
    report.json records each."""
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    prepared = prepare(cfg, inputs, checked)
    report = start_report(prepared, started)
    if cfg.dry_run and prepared.rank is not None and prepared.rank.rank != 0:
        # a dry run is rank 0's alone: it projects the ranks' makespan; nothing is sampled or written here
        report.status, report.mode = "ok", f"rank {prepared.rank.rank} of {prepared.rank.world_size}"
        return report
    executor = executor_for(prepared)
    report_path = executor.report_path(cfg.out)
    with StopRequest() as stop:
        try:
            computed = executor.compute(prepared, stop, t0)
            report.parts = computed.parts
            if computed.ended is not None:
                raise computed.ended
            if computed.own_part is not None:  # one part of the units: partials only, no outputs
                report.parts = [computed.own_part]
                for m in computed.own_part.models:
                    report.add_model(m)
            else:
                ensembles = run_models(prepared, report, stop, t0, computed)
                stop.check()
                (tail if tail is not None and not cfg.dry_run else write_tail)(prepared, report, ensembles)
        except Interrupted as e:
            running = [m.name for m in report.models if m.status == "interrupted"]
            report.status = "interrupted"
            report.interrupted = Interruption(e.cause, running[-1] if running else None)
            write_report(report_path, report, t0, final=False)
            e.args = (interrupted_message(report, cfg),)
            raise
        except (ModelRunError, UserError, DeviceError) as e:
            report.status, report.error = "failed", str(e)
            write_report(report_path, report, t0, final=False)
            raise
        except (
            Exception
        ) as e:  # a bug: the traceback is kept (exit 1), and report.json still ends in a status
            report.status = "failed"
            report.error = f"internal error: {type(e).__name__}: {e}".splitlines()[0]
            write_report(report_path, report, t0, final=False)
            raise
        finally:
            remove_scratch(scratch_path(cfg.partials_dir))  # spilled maps are never resumed from
    report.status = "ok"
    write_report(report_path, report, t0, final=True)
    return report


def write_tail(run: PreparedRun, report: RunReport, ensembles: list[FragmentEnsemble]) -> None:
    """The tail: a dry run's projection and verdicts, or the outputs (and the partials deleted when not kept)."""
    cfg = run.cfg
    if cfg.dry_run:
        report.projection = verdicts(report.models, cfg.budget, makespan_hours=makespan_hours(report, run))
        return
    check_some_model_finished(run, ensembles)
    maps = cfg.save_probabilities
    if maps is None:  # researchers' segments get their pictures of the ink; Kaggle runs a submission
        maps = any(p.fragment.layout != "kaggle" for p in run.plans)
    report.submission = write_outputs(
        list(run.plans), ensembles, OutputOptions(cfg.out, run.threshold, cfg.previews, maps, cfg.prob_format),
        partials_kept=report.partials_kept, partials_dir=cfg.partials_dir,
    )  # fmt: skip
    remove_scratch(scratch_path(cfg.partials_dir))  # before the partials' folder may go
    if not cfg.keep_partials:  # the submission is written: nothing left to resume
        report.partials.deleted = run.store().clear()
    unsaved = [
        r.partial for m in report.models for r in m.fragments.values() if "No space" in (r.partial or "")
    ]
    if unsaved:  # said once, here, not once per file as the disk filled
        log.warning("%s: %d finished result(s) not saved (no space left on device): a rerun recomputes them",
                    cfg.partials_dir, len(unsaved))  # fmt: skip


def check_some_model_finished(run: PreparedRun, ensembles: list[FragmentEnsemble]) -> None:
    if not any(e.weight_sum for e in ensembles) and any(len(p.origins) for p in run.plans):
        raise ModelRunError("no model finished: no submission written")


def interrupted_message(report: RunReport, cfg: RunConfig) -> str:
    """The one line an interrupted run ends with: where it stopped, what is kept, how to resume."""
    where = report.interrupted
    during = f" during model {where.model}" if where.model else ""
    return (
        f"interrupted by {where.signal}{during}: no submission written; {report.partials_kept} finished (model, "
        f"fragment) result(s) kept in {cfg.partials_dir}: rerun the same command to resume"
    )
