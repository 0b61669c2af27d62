"""The project's exceptions.

A ``UserError`` is something the user can fix (a bad file, a bad flag). The CLI prints its message as one line on
stderr and exits with code 2; it never shows a traceback. Messages name the file and what was expected, e.g.
``test/a/surface_volume/37.tif: 512x640, other slices 700x1100``.
"""

from __future__ import annotations

import enum


class UserError(Exception):
    """A problem with the user's input or arguments: reported as one line, exit code 2."""


class ModelRunError(Exception):
    """A model failed while running (not the user's input): the pipeline may skip the model and go on."""


class DeviceError(Exception):
    """The device failed in a way that poisons the process (a CUDA error, a device-side assert): every later model
    would fail the same way, so the run ends (exit 1); finished results stay in OUT/partials for a rerun."""


def size_text(n: float) -> str:
    """A byte count as a person reads it, with the digits that tell two figures apart (``512.0 KiB``, ``3.2 GiB``)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def cuda_poisoned(e: BaseException) -> bool:
    """A CUDA error (illegal access, device-side assert, launch failure) leaves the context unusable: every later
    call on the device fails too. Asked only of an exception torch raised, so torch is imported already."""
    import torch

    accel = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises this type for CUDA errors
    if accel is not None and isinstance(e, accel):
        return True
    # older torch (and some kernels still) raise a RuntimeError whose message starts "CUDA error: ..."
    return isinstance(e, RuntimeError) and str(e).startswith("CUDA error")


class ErrorKind(str, enum.Enum):
    """Why a worker, part or rank ended, as its part report records it (the value is what report.json says)."""

    USER = "user"  # a UserError: the input went bad
    MODEL = "model"  # a ModelRunError that ends the run (``--on-model-error fail``)
    DEVICE = "device"  # a DeviceError: a CUDA error poisoned the process
    INTERNAL = "internal"  # a bug in ink_infer (its traceback is in the worker's stderr)
    DIED = "died"  # a spawned worker that ended without a word (SIGKILL, a crash): its units are recomputed

    @classmethod
    def of(cls, error: BaseException) -> ErrorKind:
        kinds = {UserError: cls.USER, ModelRunError: cls.MODEL, DeviceError: cls.DEVICE}
        return kinds.get(type(error), cls.INTERNAL)

    def ends_the_run(self) -> type[Exception] | None:
        """The exception the run ends with when a worker ended so, or None (a dead worker's units are
        recomputed by the parent)."""
        return {ErrorKind.USER: UserError, ErrorKind.DEVICE: DeviceError}.get(
            self, None if self is ErrorKind.DIED else ModelRunError
        )
