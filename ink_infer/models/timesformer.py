"""The Grand Prize (2023) TimeSformer: lucidrains' ``timesformer_pytorch.TimeSformer`` with the GP's arguments.

Source: ``younader/Vesuvius-Grandprize-Winner:inference_timesformer.py`` (``RegressionPLModel``); see
``GP_TIMESFORMER.md`` in the team's reference notes. The module's attribute names (``backbone``, and
``normalization`` when ``with_norm``) are the LightningModule's, so its state-dict keys are the checkpoint's
(``backbone.*``, ``normalization.*``; 137 keys, 142 with the norm; 37,959,696 parameters).

``timesformer_pytorch`` is an optional dependency (``pip install 'ink_infer[timesformer]'``), imported only when
the model is built.
"""

from __future__ import annotations

from torch import Tensor, nn

from ink_infer.config import ModelSpec
from ink_infer.errors import UserError

# The GP's constructor arguments. ``num_frames`` does not change the weights or the outputs (rotary positions,
# no learned position embedding): 26 as the GP's training script and the Hugging Face config say.
BACKBONE_KWARGS = {
    "dim": 512,
    "image_size": 64,
    "patch_size": 16,
    "num_frames": 26,
    "num_classes": 16,
    "channels": 1,
    "depth": 8,
    "heads": 6,
    "dim_head": 64,
    "attn_dropout": 0.1,
    "ff_dropout": 0.1,
}
EXTRA = "pip install 'ink_infer[timesformer]'"


def _timesformer_class() -> type[nn.Module]:
    try:
        from timesformer_pytorch import TimeSformer
    except ImportError as e:
        raise UserError(f"the timesformer arch needs timesformer-pytorch and einops ({e}): {EXTRA}") from None
    return TimeSformer


class GPTimeSformer(nn.Module):
    """``(B, 1, F, 64, 64)`` float32 (F frames = layers, F = 26 for the GP) -> ``(B, 1, 4, 4)`` logits.

    Logit ``k`` of the backbone's 16 is cell ``(k // 4, k % 4)`` (row-major), each cell a 16 x 16 px block of the
    64 x 64 window. ``with_norm``: a ``BatchNorm3d(1)`` on the input first (absent in the GP's training run).
    """

    def __init__(self, *, with_norm: bool = False) -> None:
        super().__init__()
        self.backbone = _timesformer_class()(**BACKBONE_KWARGS)
        if with_norm:
            self.normalization = nn.BatchNorm3d(num_features=1)
        self.with_norm = with_norm

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:  # (B, F, H, W), as the GP accepts
            x = x[:, None]
        if self.with_norm:
            x = self.normalization(x)
        x = self.backbone(x.permute(0, 2, 1, 3, 4))  # (B, F, 1, H, W): frames first, one channel
        return x.view(-1, 1, 4, 4)


def from_spec(spec: ModelSpec) -> nn.Module:
    return GPTimeSformer(with_norm=bool(spec.with_norm))
