"""SwinV2 window attention for inference: the continuous position bias computed once, the attention fused.

timm's ``WindowAttention`` recomputes its continuous relative position bias on every forward: a 2 -> 512 ->
heads MLP over the window's ``(2w - 1)**2`` relative offsets, a gather to ``(heads, w*w, w*w)`` and a sigmoid,
in every block of every batch, although at inference it depends on the weights alone. ``freeze_window_bias``
computes it once per module, with the module's own parameters, dtype and device (so the very numbers timm
computes), and replaces the module's forward by one that adds it as a constant; with ``fused=True`` the attention
itself goes through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on
CUDA), the bias and the shifted windows' mask as its additive mask and the cosine attention's per-head logit scale
folded into the queries. The result equals timm's forward to float rounding (``tests/test_models.py``).

Apply after the weights are loaded and the model is on its device in its dtype (``model_run.load_model``): the
bias is computed from the weights at that moment, and a later ``load_state_dict`` would not change it.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn


def _window_attention_class():
    try:
        from timm.models.swin_transformer_v2 import WindowAttention
    except ImportError:  # a timm without SwinV2: nothing to freeze
        return None
    return WindowAttention


@torch.no_grad()
def position_bias(attn: nn.Module) -> torch.Tensor:
    """``(heads, N, N)``: the module's ``16 * sigmoid(cpb_mlp(table))[index]``, as timm's forward computes it."""
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
    n = attn.window_size[0] * attn.window_size[1]
    bias = table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
    return 16 * torch.sigmoid(bias)


def freeze_window_bias(model: nn.Module, *, fused: bool) -> int:
    """Every SwinV2 window attention of ``model`` with its bias frozen (and, ``fused``, its attention through
    ``scaled_dot_product_attention``). Returns how many modules were changed (0 for a model without any)."""
    cls = _window_attention_class()
    if cls is None:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, cls):
            module.register_buffer("frozen_bias", position_bias(module), persistent=False)
            module.forward = types.MethodType(_fused_forward if fused else _frozen_forward, module)
            changed += 1
    return changed


def _qkv(self, x: torch.Tensor):
    b, n, c = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x) + qkv_bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    return qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # each (B_, heads, N, d)


def _logit_scale(self) -> torch.Tensor:
    return torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()


def _frozen_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm's ``WindowAttention.forward`` with the bias read, not recomputed."""
    b, n, c = x.shape
    q, k, v = _qkv(self, x)
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn * _logit_scale(self) + self.frozen_bias.unsqueeze(0)
    if mask is not None:
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, n, n)
    attn = self.attn_drop(attn.softmax(dim=-1))
    return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


def _fused_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention through ``scaled_dot_product_attention``: ``softmax(q' k'^T + bias [+ mask]) v`` with
    ``q' = normalize(q) * logit_scale`` and ``k' = normalize(k)``, scale 1."""
    b, n, c = x.shape
    q, k, v = _qkv(self, x)
    q = F.normalize(q, dim=-1) * _logit_scale(self)
    k = F.normalize(k, dim=-1)
    bias = self.frozen_bias.to(q.dtype)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), scale=1.0)
    else:
        num_win = mask.shape[0]
        shape = (-1, num_win, self.num_heads, n, q.shape[-1])
        full = (bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)).unsqueeze(0)  # (1, windows, heads, N, N)
        out = F.scaled_dot_product_attention(
            q.view(shape), k.view(shape), v.view(shape), attn_mask=full, scale=1.0
        )
        out = out.view(-1, self.num_heads, n, q.shape[-1])
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
