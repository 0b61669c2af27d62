"""The 2.5D model (reference ``InkDetModel``, PIPELINE.md §2): a timm 2D encoder per slice group + 3D mixing over groups.

The ``n_slices`` input slices are cut into ``G = n_slices // in_chans`` contiguous groups of ``in_chans`` slices; each
group goes through the 2D encoder as one image, the last (stride 32) feature map is projected to ``dim`` channels, the
``G`` maps are stacked along a depth axis and mixed by ``num_3d_layer`` residual 3D blocks, then pooled over depth
(mean and max) and turned into one logit per 32 x 32 cell by a 1x1 head.

Attribute names (``encoder``, ``conv_proj``, ``conv3d``, ``head``) and their layouts are the state-dict keys of the
team's checkpoints; do not rename them.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import Tensor, nn

from ink_infer.config import ModelSpec
from ink_infer.errors import UserError
from ink_infer.geometry import WIDTH_DEFAULTS

PROJ_DIM = WIDTH_DEFAULTS["dim"]  # width of conv_proj / conv3d / head in every reference 2.5D config
DROP_RATE = 0.4  # reference training flags; inert at eval (classifier removed, stochastic depth off)
DROP_PATH_RATE = 0.2


class ResidualConv3D(nn.Module):
    """Bottleneck 3D block: 1x1x1 -> (1x1x1, 3x3x3 depthwise) -> 1x1x1, plus a 1x1x1 conv + BN shortcut.

    ``(B, in_dim, D, H, W) -> (B, out_dim, D, H/stride, W/stride)``. All convs are bias-free; ``bn3`` starts at zero
    (as in the reference) so a freshly built block is its shortcut.
    """

    def __init__(self, in_dim: int, mid_dim: int, out_dim: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_dim, mid_dim, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid_dim)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Sequential(
            nn.Conv3d(mid_dim, mid_dim, 1, bias=False),
            nn.Conv3d(mid_dim, mid_dim, 3, stride=(1, stride, stride), padding=1, groups=mid_dim, bias=False),
        )
        self.bn2 = nn.BatchNorm3d(mid_dim)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv3d(mid_dim, out_dim, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_dim)
        nn.init.zeros_(self.bn3.weight)
        # the reference always has this shortcut conv, even at stride 1 with in_dim == out_dim (keys depend on it)
        self.downsample = nn.Sequential(
            nn.Conv3d(in_dim, out_dim, 1, stride=(1, stride, stride), bias=False),
            nn.BatchNorm3d(out_dim),
        )
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


class InkDet25D(nn.Module):
    """2.5D ink detector.

    Input ``(B, n_slices, H, W)`` float, already sliced to the model's z range and normalised per sample
    (``engine.windows.normalize_windows``); H and W multiples of 32 (and the size a fixed-size backbone such as SwinV2 expects).
    Output ``(B, 1, H/32, W/32)`` logits, same dtype and device as the input.

    ``dim`` and ``encoder_kwargs`` exist for shrunk test models; the reference configs use ``dim=512`` and none.
    """

    def __init__(
        self,
        backbone: str,
        in_chans: int,
        num_3d_layer: int,
        n_slices: int,
        *,
        dim: int = PROJ_DIM,
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if in_chans <= 0 or n_slices % in_chans:
            raise ValueError(f"n_slices {n_slices} is not a multiple of in_chans {in_chans}")
        self.in_chans = in_chans
        self.n_slices = n_slices
        self.groups = n_slices // in_chans
        self.encoder = timm.create_model(
            backbone,
            pretrained=False,  # weights always come from the user's checkpoint
            in_chans=in_chans,
            features_only=True,
            drop_rate=DROP_RATE,
            drop_path_rate=DROP_PATH_RATE,
            **(encoder_kwargs or {}),
        )
        # timm's Format is a str Enum, so this equals "NHWC" for SwinV2-style encoders; plain CNNs may lack the attribute
        self.output_fmt = getattr(self.encoder, "output_fmt", "NCHW")
        num_features = self.encoder.feature_info.channels()[-1]
        self.conv_proj = nn.Sequential(
            nn.Conv2d(num_features, dim, 1), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)
        )
        self.conv3d = nn.Sequential(*[ResidualConv3D(dim, dim, dim) for _ in range(num_3d_layer)])
        self.head = nn.Sequential(
            nn.Conv2d(2 * dim, dim, 1),
            nn.ReLU(inplace=True),  # the reference puts ReLU before the BN here
            nn.BatchNorm2d(dim),
            nn.Conv2d(dim, 1, 1),
        )

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, n_slices, H, W) -> (B, dim, G, H/32, W/32)``: per-group 2D features stacked along depth."""
        bs, n, h, w = x.shape
        if n != self.n_slices:
            raise ValueError(f"expected {self.n_slices} slices, got input of shape {tuple(x.shape)}")
        # contiguous groups: group g holds slices [g*in_chans, (g+1)*in_chans); sample-major batch of B*G images
        x = x.reshape(bs * self.groups, self.in_chans, h, w)
        feat = self.encoder(x)[-1]
        if self.output_fmt == "NHWC":
            feat = feat.permute(0, 3, 1, 2)
        feat = self.conv_proj(feat)
        _, c, fh, fw = feat.shape
        return feat.reshape(bs, self.groups, c, fh, fw).transpose(1, 2)

    def forward_pooled(self, x: Tensor) -> Tensor:
        """``(B, n_slices, H, W) -> (B, 2 * dim, H/32, W/32)``: the 3D convs, then depth pooled by mean and max."""
        feat = self.conv3d(self.forward_features(x))
        return torch.cat([feat.mean(2), feat.amax(2)], dim=1)

    def forward_head(self, pooled: Tensor) -> Tensor:
        """``(B, 2 * dim, h, w) -> (B, 1, h, w)`` logits (training mixes features between the two halves)."""
        return self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_pooled(x))


def from_spec(spec: ModelSpec) -> InkDet25D:
    """Build the reference-size 2.5D model a manifest entry describes (random init, ``pretrained=False``)."""
    if not spec.backbone or spec.num_3d_layer is None:
        raise UserError(f"model {spec.name!r}: a 2.5d model needs 'backbone' and 'num_3d_layer'")
    if not timm.is_model(spec.backbone):
        raise UserError(
            f"model {spec.name!r}: backbone {spec.backbone!r} is not a timm {timm.__version__} model"
        )
    return InkDet25D(spec.backbone, spec.in_chans, spec.num_3d_layer, spec.n_slices, dim=spec.width("dim"))
