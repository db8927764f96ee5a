"""Spatial stages that replace MambaMia in the ablations, with the same queries and budget.

"bimamba" and "causal_mambamia" are MambaMia blocks with GPA or bidirectionality switched off
(built in model/compressor.py). Here live the two stages that are not Mamba at all: a pre-norm
transformer encoder with bidirectional attention over the same query layout (the AV paper's
"Resampler" comparison), and plain average pooling of each group of k tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.gpa import RMSNorm


def rotate(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary positions on [B, heads, L, dh]: channel pair (i, i + dh/2) of position t is rotated
    by the angle t * base^(-2i/dh), so attention scores depend on relative position."""
    length, dh = x.shape[-2], x.shape[-1]
    # Angles in fp32 at least: bf16 cannot tell position 1000 from 1004.
    wide = torch.promote_types(x.dtype, torch.float32)
    inv_freq = base ** (-torch.arange(0, dh, 2, device=x.device, dtype=wide) / dh)
    angle = torch.arange(length, device=x.device, dtype=wide)[:, None] * inv_freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)  # [L, dh/2]
    a, b = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class TransformerBlock(nn.Module):
    """Pre-norm encoder block (attention over the whole clip, no causal mask) + GELU MLP.

    Positions: rotary (RoPE) on queries and keys, numbered over the whole clip's sequence (all
    frames' patches and query slots in time order), so the shared query becomes a distinct anchor
    at every slot and attention knows frame order (CompressorConfig.transformer_rope_base).
    """

    def __init__(self, dim: int, *, heads: int, mlp_ratio: float, norm_eps: float,
                 rope_base: float = 10000.0):
        super().__init__()
        self.heads = heads
        self.rope_base = rope_base
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, return_dt: bool = False,
                content_mask: torch.Tensor | None = None):
        # content_mask (GPA's padding mask) does not apply: padding is ordinary zero input here,
        # as it is for the Mamba scan.
        b, length, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, length, 3, self.heads, -1).unbind(2)
        q, k = (rotate(t.transpose(1, 2), self.rope_base) for t in (q, k))
        att = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))  # [B, heads, L, d/heads]
        x = x + self.out(att.transpose(1, 2).reshape(b, length, d))
        x = x + self.mlp(self.mlp_norm(x))
        return x, None  # attention has no step size Δ


class AvgPoolStage(nn.Module):
    """Mean of each group of k tokens of a frame. With `mask_padding` the zero padding of a
    frame's last group is left out of its mean, as GPA leaves it out of its softmax; without it
    the zeros count, as they do in GPA then (CompressorConfig.group_padding)."""

    def __init__(self, k: int, mask_padding: bool = True):
        super().__init__()
        self.k = k
        self.mask_padding = mask_padding

    def forward(self, frames: torch.Tensor, return_dt: bool = False):
        n_frames, t, d = frames.shape
        groups = -(-t // self.k)
        pad = groups * self.k - t
        x = F.pad(frames, (0, 0, 0, pad)).view(n_frames, groups, self.k, d)
        counts = torch.full((groups,), float(self.k), dtype=frames.dtype, device=frames.device)
        if self.mask_padding:
            counts[-1] = self.k - pad
        return x.sum(2) / counts[:, None], None
