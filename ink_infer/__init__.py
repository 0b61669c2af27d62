"""ink_infer: offline inference for the Vesuvius Challenge ink detection task (2nd-place ensemble)."""

from __future__ import annotations

__version__ = "0.1.0"
