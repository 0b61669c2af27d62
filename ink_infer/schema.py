"""One schema for every value a user gives: the manifest's fields, its threshold, and the CLI's numbers.

Each rule checks a value's type and range and returns it (ints as int, reals as float); a value that breaks it
raises ``Invalid`` with what was expected, which the caller turns into a one-line ``UserError`` naming the field
or option. Booleans are never numbers here (JSON ``true`` is not a tile size), NaN and infinity never reals.
The tables below hold the rule of every manifest field and every CLI number. Rules across fields live with the
values they relate: a manifest entry's (``z_range`` within the slices, widths only for their arch) in
``manifest.py``, the run's (``--part-id`` below ``--num-parts``, options that exclude each other) in
``config.RunConfig``.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

from ink_infer.geometry import ARCHS, BLOCK, GP_CHOICES, GP_VARIANT_KEYS, N_SLICES

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class Invalid(ValueError):
    """A value outside its rule; the message says what was expected."""


@dataclass(frozen=True)
class Int:
    lo: int | None = None
    hi: int | None = None
    multiple_of: int | None = None
    choices: tuple[int, ...] | None = None

    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.multiple_of:
            return f"a multiple of {self.multiple_of}" + _bounds(self.lo, self.hi, lo_open=False)
        if self.lo == 1:
            return "a positive integer" + (f" at most {self.hi}" if self.hi is not None else "")
        return "an integer" + _bounds(self.lo, self.hi, lo_open=False)

    def check(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(self.expected())
        ok = (
            (self.choices is None or value in self.choices)
            and (self.lo is None or value >= self.lo)
            and (self.hi is None or value <= self.hi)
            and (self.multiple_of is None or value % self.multiple_of == 0)
        )
        if not ok:
            raise Invalid(self.expected())
        return value


@dataclass(frozen=True)
class Real:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded

    def expected(self) -> str:
        return "a finite number" + _bounds(self.lo, self.hi, lo_open=self.lo_open)

    def check(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Invalid(self.expected())
        value = float(value)
        low_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        if not low_ok or (self.hi is not None and value > self.hi):
            raise Invalid(self.expected())
        return value


@dataclass(frozen=True)
class Text:
    choices: tuple[str, ...] | None = None
    pattern: re.Pattern | None = None
    what: str = "a non-empty string"

    def expected(self) -> str:
        return "one of " + ", ".join(self.choices) if self.choices else self.what

    def check(self, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise Invalid(self.expected())
        if (self.choices and value not in self.choices) or (
            self.pattern and not self.pattern.fullmatch(value)
        ):
            raise Invalid(self.expected())
        return value


@dataclass(frozen=True)
class IntList:
    length: int
    item: Int

    def expected(self) -> str:
        return f"a list of {self.length} integers, each {self.item.expected()}"

    def check(self, value: object) -> tuple[int, ...]:
        if not isinstance(value, list) or len(value) != self.length:
            raise Invalid(self.expected())
        try:
            return tuple(self.item.check(v) for v in value)
        except Invalid:
            raise Invalid(self.expected()) from None


def _bounds(lo: float | None, hi: float | None, *, lo_open: bool) -> str:
    if lo is not None and hi is not None and not lo_open:
        return f" in [{lo:g}, {hi:g}]"
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    return (" " + " and ".join(parts)) if parts else ""


@dataclass(frozen=True)
class Bool:
    def expected(self) -> str:
        return "true or false"

    def check(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise Invalid(self.expected())
        return value


Rule = Int | Real | Text | IntList | Bool

# Every key of a manifest model entry. ``None`` is allowed for the keys in NULLABLE_MODEL_KEYS (an optional key
# given as null means absent; "file" and "sha256" null mean "no file" / "not hashed yet").
MODEL_FIELDS: dict[str, Rule] = {
    "name": Text(),
    "arch": Text(choices=ARCHS),
    "in_chans": Int(lo=1, hi=N_SLICES),
    "z_range": IntList(2, Int()),  # [start, stop) within the slices: checked with the other fields
    "tile": Int(lo=BLOCK, hi=2048, multiple_of=BLOCK),
    "crop": Int(lo=BLOCK, hi=2048, multiple_of=BLOCK),
    "backbone": Text(what="a timm model name"),
    "num_3d_layer": Int(lo=1, hi=32),
    "depth": Int(choices=(50, 101, 152)),
    "stage_blocks": IntList(4, Int(lo=1, hi=64)),
    "dim": Int(lo=1, hi=8192),
    "base_channels": Int(lo=1, hi=1024),
    "head_dim": Int(lo=1, hi=8192),
    "with_norm": Bool(),
    "stride": Int(lo=1, hi=64),
    "divisor": Real(lo=1.0),  # 8-bit values run to 200: a smaller divisor is no scale anyone trained on
    **{key: Text(choices=choices) for key, choices in GP_CHOICES.items()},
    "sigma": Real(lo=0.25),  # px; narrower, the Gaussian's weights underflow to 0 on every pixel of the tile
    "file": Text(what="a path under --weights"),
    "sha256": Text(pattern=_HEX64, what="64 hex digits"),
    "size": Int(lo=1),
    "weight": Real(lo=0.0, lo_open=True),
}
NULLABLE_MODEL_KEYS = {"crop", "backbone", "depth", "stage_blocks", "dim", "base_channels", "head_dim", "file",
                       "sha256", "size", "with_norm", *GP_VARIANT_KEYS}  # fmt: skip

THRESHOLD_REGIONS = ("covered", "mask")  # the pixels the threshold's quantile is taken over
THRESHOLD_FIELDS: dict[str, Rule] = {
    "percentile": Real(lo=0.0, hi=1.0),
    "region": Text(choices=THRESHOLD_REGIONS),
}

# The CLI's numbers (``None``: the option's default, e.g. automatic batch size).
CLI_NUMBERS: dict[str, Rule] = {
    "--stride": Int(lo=BLOCK, multiple_of=BLOCK),
    "--threshold": Real(lo=0.0, hi=1.0),
    "--batch-size": Int(lo=1, hi=4096),
    "--max-windows": Int(lo=1),
    "--budget-hours": Real(lo=0.0, lo_open=True),
    "--host-mem-gb": Real(lo=0.0, lo_open=True),
    "--gpu-mem-gb": Real(lo=0.0, lo_open=True),
    "--max-nonfinite": Real(lo=0.0, hi=1.0),
    "--unit-windows": Int(lo=1),
    "--num-parts": Int(lo=1, hi=100000),
    "--part-id": Int(lo=0),
    "--progress-every": Real(lo=0.0),
    "--cache-gb": Real(lo=0.0),
}


def check_field(rule: Rule, value: object, where: str, key: str):
    """``rule.check(value)``, or ``Invalid`` worded as ``<where>: <key> <value>, expected ...``."""
    try:
        return rule.check(value)
    except Invalid as e:
        raise Invalid(f"{where}: {key} {value!r}, expected {e}") from None


def cli_type(option: str):
    """An argparse ``type=`` for ``option``: its rule from CLI_NUMBERS, errors as one argparse line."""
    rule = CLI_NUMBERS[option]

    def parse(text: str):
        try:
            return rule.check(int(text) if isinstance(rule, Int) else float(text))
        except (Invalid, ValueError) as e:
            e = e if isinstance(e, Invalid) else rule.expected()
            raise argparse.ArgumentTypeError(f"{text!r}, expected {e}") from None

    parse.__name__ = option.lstrip("-")
    return parse
