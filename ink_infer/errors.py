"""The project's exceptions.

A ``UserError`` is something the user can fix (a bad file, a bad flag). The CLI prints its message as one line on
stderr and exits with code 2; it never shows a traceback. Messages name the file and what was expected, e.g.
``test/a/surface_volume/37.tif: 512x640, other slices 700x1100``.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or arguments: reported as one line, exit code 2."""


class ModelRunError(Exception):
    """A model failed while running (not the user's input): the pipeline may skip the model and go on."""


class DeviceError(Exception):
    """The device failed in a way that poisons the process (a CUDA error, a device-side assert): every later model
    would fail the same way, so the run ends (exit 1); finished results stay in OUT/partials for a rerun."""
