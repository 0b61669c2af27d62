"""Regenerate the golden tensors in tests/golden/ (run from the repo root: ``python tests/make_golden.py``).

Each ``tests/golden/<name>.pt`` holds a shrunk model of one architecture (same classes and key layout as the
reference configs, far fewer channels), so that ``tests/test_models.py::test_golden_parity`` can catch any change
to the forward computation:

    {"arch": "2.5d" | "csn3d", "kwargs": constructor kwargs, "state_dict": float32 weights,
     "input": (2, n_slices, 64, 64) float32 raw window (n_slices 4-16), "output": model(normalize_windows(input)) float32 logits,
     "versions": {"torch", "timm"} that produced it}

The weights are stored, so the files do not depend on timm's or torch's random init. BatchNorm affine parameters and
running statistics are randomised before saving: at their defaults BN is nearly the identity, and the zero-initialised
``bn3`` of the 2.5D residual blocks would hide every conv in them.

Only regenerate on purpose (a deliberate change of the model code) and say why in the commit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a script run from anywhere, without installing the package

from ink_infer.engine.windows import normalize_windows  # noqa: E402
from ink_infer.models.csn3d import InkDetCSN3D  # noqa: E402
from ink_infer.models.inkdet25d import InkDet25D  # noqa: E402

GOLDEN_DIR = ROOT / "tests" / "golden"
SIDE = 64

# shrunk versions of the reference backbones: same timm classes (deep stem + SE, ConvNeXt, NHWC SwinV2), tiny widths
GOLDEN: dict[str, dict[str, Any]] = {
    "inkdet25d_resnetrs": {
        "arch": "2.5d",
        "kwargs": {
            "backbone": "resnetrs50",
            "in_chans": 2,
            "num_3d_layer": 2,
            "n_slices": 4,
            "dim": 16,
            "encoder_kwargs": {"layers": (1, 1, 1, 1), "channels": (4, 8, 16, 32), "stem_width": 8},
        },
    },
    "inkdet25d_convnext": {
        "arch": "2.5d",
        "kwargs": {
            "backbone": "convnext_tiny.fb_in1k",
            "in_chans": 2,
            "num_3d_layer": 1,
            "n_slices": 6,
            "dim": 16,
            "encoder_kwargs": {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)},
        },
    },
    "inkdet25d_swinv2": {
        "arch": "2.5d",
        "kwargs": {
            "backbone": "swinv2_tiny_window8_256.ms_in1k",
            "in_chans": 2,
            "num_3d_layer": 1,
            "n_slices": 4,
            "dim": 16,
            "encoder_kwargs": {
                "embed_dim": 8,
                "depths": (1, 1, 1, 1),
                "num_heads": (1, 1, 1, 1),
                "img_size": SIDE,
            },
        },
    },
    "csn3d_tiny": {
        "arch": "csn3d",
        "kwargs": {"depth": None, "stage_blocks": (1, 1, 1, 1), "base_channels": 4, "head_dim": 16},
        "n_slices": 16,  # the last stage keeps depth 2, so the max over depth is exercised
    },
}


def build(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """The shrunk model a golden file describes (random init, eval mode)."""
    cls = InkDet25D if arch == "2.5d" else InkDetCSN3D
    return cls(**kwargs).eval()


def n_slices_of(entry: dict[str, Any]) -> int:
    return entry.get("n_slices") or entry["kwargs"]["n_slices"]


def randomize_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))


def make(name: str, entry: dict[str, Any], seed: int) -> Path:
    torch.manual_seed(seed)
    model = build(entry["arch"], entry["kwargs"])
    gen = torch.Generator().manual_seed(seed)
    randomize_norms(model, gen)
    # a raw window like the data: slices in [0, 1], fp16-rounded, plus some structure so std differs per sample
    x = torch.rand(2, n_slices_of(entry), SIDE, SIDE, generator=gen).half().float()
    x[1] = x[1] * 0.3 + 0.2
    with torch.inference_mode():
        y = model(normalize_windows(x))
    payload = {
        "arch": entry["arch"],
        "kwargs": entry["kwargs"],
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "input": x,
        "output": y.clone(),
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
    }
    path = GOLDEN_DIR / f"{name}.pt"
    torch.save(payload, path)
    return path


def main() -> None:
    torch.set_num_threads(2)
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for seed, (name, entry) in enumerate(GOLDEN.items()):
        path = make(name, entry, seed)
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
