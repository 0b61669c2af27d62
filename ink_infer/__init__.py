"""ink_infer: offline inference for the Vesuvius Challenge ink detection task (the 2nd-place ensemble).

The Python API (``api.py``): ``load_ensemble``, ``predict``, ``predict_all``. It is imported on first use, so
that ``import ink_infer`` (and the CLI's checks before torch is loaded) stays light.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "load_ensemble", "predict", "predict_all", "Ensemble", "Prediction"]

_API = {"load_ensemble", "predict", "predict_all", "Ensemble", "Prediction"}


def __getattr__(name: str):
    if name in _API:
        from ink_infer import api

        return getattr(api, name)
    raise AttributeError(f"module 'ink_infer' has no attribute {name!r}")
