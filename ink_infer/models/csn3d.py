"""The irCSN 3D model (reference ``InkDetResNet3dCSNModel``, PIPELINE.md §3), in plain torch.

The backbone re-implements mmaction2's ``ResNet3dCSN`` with ``bottleneck_mode="ir"`` (interaction-reduced: the 3x3x3
conv of each bottleneck is depthwise), without mmcv. Submodule names follow mmcv's ``ConvModule`` (``conv``, ``bn``;
its ReLU ``activate`` has no state) so the team's checkpoints load strictly: ``backbone.conv1.conv.weight``,
``backbone.layer1.0.conv2.0.conv.weight``, ``backbone.layer1.0.downsample.bn.running_var``, ...
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ink_infer.config import ModelSpec
from ink_infer.errors import UserError
from ink_infer.geometry import WIDTH_DEFAULTS

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
BN_EPS = 1e-3  # mmaction's CSN norm_cfg; the head's 2D BNs keep torch's 1e-5 as in the reference
EXPANSION = 4
SPATIAL_STRIDES = (1, 2, 2, 2)
TEMPORAL_STRIDES = (1, 2, 2, 2)
HEAD_DIM = WIDTH_DEFAULTS["head_dim"]

Triple = tuple[int, int, int]


class ConvModule(nn.Sequential):
    """Bias-free Conv3d + BN3d (eps 1e-3) [+ ReLU], named like mmcv's ConvModule: ``conv``, ``bn``, ``activate``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int | Triple,
        *,
        stride: int | Triple = 1,
        padding: int | Triple = 0,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm3d(out_ch, eps=BN_EPS)
        if act:
            self.activate = nn.ReLU(inplace=True)


class CSNBottleneck(nn.Module):
    """irCSN bottleneck, "pytorch" style (stride on the 3x3x3 conv).

    ``(B, inplanes, D, H, W) -> (B, planes*4, D/t, H/s, W/s)``.
    """

    def __init__(self, inplanes: int, planes: int, *, spatial_stride: int, temporal_stride: int) -> None:
        super().__init__()
        stride = (temporal_stride, spatial_stride, spatial_stride)
        self.conv1 = ConvModule(inplanes, planes, 1)
        # a one-element Sequential because the "ip" variant puts a 1x1x1 conv before it (keys are conv2.0.*)
        self.conv2 = nn.Sequential(ConvModule(planes, planes, 3, stride=stride, padding=1, groups=planes))
        self.conv3 = ConvModule(planes, planes * EXPANSION, 1, act=False)
        self.downsample: ConvModule | None = None
        if spatial_stride != 1 or inplanes != planes * EXPANSION:
            self.downsample = ConvModule(inplanes, planes * EXPANSION, 1, stride=stride, act=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv3(self.conv2(self.conv1(x)))
        return self.relu(out + identity)


class ResNet3dCSN(nn.Module):
    """irCSN ResNet-3D backbone. ``(B, in_channels, D, H, W)`` -> last stage ``(B, base*32, D/8, H/32, W/32)``.

    The stem keeps the depth (no temporal stride); stages 2-4 halve depth and side. ``stage_blocks`` overrides
    ``depth`` for shrunk test/demo models with the same key layout.
    """

    def __init__(
        self,
        depth: int | None = 50,
        *,
        stage_blocks: tuple[int, ...] | None = None,
        in_channels: int = 1,
        base_channels: int = 64,
    ) -> None:
        super().__init__()
        if stage_blocks is None:
            if depth not in STAGE_BLOCKS:
                raise ValueError(f"depth {depth!r}: expected one of {sorted(STAGE_BLOCKS)} or stage_blocks")
            stage_blocks = STAGE_BLOCKS[depth]
        if len(stage_blocks) != len(SPATIAL_STRIDES) or min(stage_blocks) < 1:
            raise ValueError(
                f"stage_blocks {stage_blocks!r}: expected {len(SPATIAL_STRIDES)} positive counts"
            )
        self.conv1 = ConvModule(in_channels, base_channels, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
        self.maxpool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        inplanes = base_channels
        self.stage_names: list[str] = []
        for i, n_blocks in enumerate(stage_blocks):
            planes = base_channels * 2**i
            blocks = [
                CSNBottleneck(
                    inplanes if b == 0 else planes * EXPANSION,
                    planes,
                    spatial_stride=SPATIAL_STRIDES[i] if b == 0 else 1,
                    temporal_stride=TEMPORAL_STRIDES[i] if b == 0 else 1,
                )
                for b in range(n_blocks)
            ]
            inplanes = planes * EXPANSION
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{i + 1}")
        self.out_channels = inplanes
        self._init_weights()

    def _init_weights(self) -> None:
        # mmcv's kaiming_init defaults (fan_out, relu); only matters for training from scratch
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x


class InkDetCSN3D(nn.Module):
    """irCSN ink detector.

    Input ``(B, n_slices, H, W)`` float, already sliced, cropped and normalised per sample; H, W multiples of 32 and
    ``n_slices >= 8`` so the last stage keeps some depth. Output ``(B, 1, H/32, W/32)`` logits.
    ``head_dim`` exists for shrunk test models (reference: 512).
    """

    def __init__(
        self,
        depth: int | None = 50,
        *,
        stage_blocks: tuple[int, ...] | None = None,
        in_channels: int = 1,
        base_channels: int = 64,
        head_dim: int = HEAD_DIM,
    ) -> None:
        super().__init__()
        self.backbone = ResNet3dCSN(
            depth, stage_blocks=stage_blocks, in_channels=in_channels, base_channels=base_channels
        )
        c = self.backbone.out_channels
        self.head = nn.Sequential(
            nn.BatchNorm2d(c),
            nn.Conv2d(c, head_dim, 1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(head_dim),
            nn.Conv2d(head_dim, 1, 1),
        )

    def forward_pooled(self, x: Tensor) -> Tensor:
        """``(B, n_slices, H, W) -> (B, C, H/32, W/32)``: the backbone over the slices as depth, depth max-pooled."""
        # the slices become the depth axis of a one-channel volume: (B, 1, D, H, W)
        feat = self.backbone(x.unsqueeze(1))
        return torch.amax(feat, dim=2)  # the reference pools depth by max only

    def forward_head(self, pooled: Tensor) -> Tensor:
        """``(B, C, h, w) -> (B, 1, h, w)`` logits."""
        return self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_pooled(x))


def from_spec(spec: ModelSpec) -> InkDetCSN3D:
    """Build the irCSN model a manifest entry describes (random init)."""
    if spec.in_chans != 1:
        raise UserError(f"model {spec.name!r}: csn3d models take in_chans 1, manifest says {spec.in_chans}")
    if spec.stage_blocks is None and spec.depth not in STAGE_BLOCKS:
        raise UserError(f"model {spec.name!r}: depth {spec.depth!r}, expected one of {sorted(STAGE_BLOCKS)}")
    return InkDetCSN3D(
        spec.depth,
        stage_blocks=spec.stage_blocks,
        base_channels=spec.width("base_channels"),
        head_dim=spec.width("head_dim"),
    )
