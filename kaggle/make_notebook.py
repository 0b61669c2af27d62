"""Write kaggle/submission.ipynb from kaggle/notebook_commands.sh, or check that it is up to date.

    python kaggle/make_notebook.py            # rewrite the notebook
    python kaggle/make_notebook.py --check    # exit 1 when the notebook differs from what would be written
    python kaggle/make_notebook.py --cell     # print the notebook's %%bash cell (what rehearse.sh runs)

The shell commands live in one file; the notebook holds them verbatim in a ``%%bash`` cell, so the rehearsal and
Kaggle run the same text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMANDS = HERE / "notebook_commands.sh"
NOTEBOOK = HERE / "submission.ipynb"
MAGIC = "%%bash\n"

INTRO = """\
# ink_infer: Vesuvius Challenge ink detection, 2nd-place ensemble

Inputs to attach (internet stays off):
- the competition `vesuvius-challenge-ink-detection`;
- the bundle dataset made by `build_wheels.sh` (flat: `ink_infer-*.whl`, `dataset-metadata.json`);
- the weights dataset: `weights_manifest.json` beside `<logdir>/fold{i}/best_fbeta.ckpt`.

The first code cell hands this kernel's Python to the shell cell; the shell cell installs `ink_infer` from the
bundle with `pip install --no-index`, finds the weights by their manifest and writes
`/kaggle/working/submission.csv` (plus `report.json` and `previews/`). Its text is `kaggle/notebook_commands.sh`
of the ink_infer repository, verbatim; `kaggle/rehearse.sh` runs the same cell locally.
"""

PYTHON_CELL = """\
import os
import sys

os.environ["PYTHON"] = sys.executable  # the shell cell installs into, and runs, this kernel's Python
"""


def _lines(text: str) -> list[str]:
    # Jupyter's convention (and ruff's): a cell's last line has no newline.
    return text.rstrip("\n").splitlines(keepends=True)


def render(commands: str) -> dict:
    """The notebook (nbformat 4.5) for the given shell commands."""

    def code(cell_id: str, text: str) -> dict:
        return {
            "cell_type": "code",
            "execution_count": None,
            "id": cell_id,
            "metadata": {},
            "outputs": [],
            "source": _lines(text),
        }

    return {
        "cells": [
            {"cell_type": "markdown", "id": "intro", "metadata": {}, "source": _lines(INTRO)},
            code("kernel-python", PYTHON_CELL),
            code("install-and-run", MAGIC + commands),
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def bash_cell(nb: dict) -> str:
    """Text of the notebook's one ``%%bash`` cell without the magic line, ending in a newline like the file."""
    cells = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith(MAGIC)]
    if len(cells) != 1:
        raise ValueError(f"expected one %%bash cell, found {len(cells)}")
    return "".join(cells[0]["source"])[len(MAGIC) :] + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when submission.ipynb is out of date")
    mode.add_argument("--cell", action="store_true", help="print the notebook's %%%%bash cell")
    args = parser.parse_args(argv)
    if args.cell:
        sys.stdout.write(bash_cell(json.loads(NOTEBOOK.read_text())))
        return 0
    want = dumps(render(COMMANDS.read_text()))
    if args.check:
        if not NOTEBOOK.is_file() or NOTEBOOK.read_text() != want:
            print(
                f"{NOTEBOOK}: out of date with {COMMANDS.name}; run python {Path(__file__).name}",
                file=sys.stderr,
            )
            return 1
        return 0
    NOTEBOOK.write_text(want)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
