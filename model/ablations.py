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


class TransformerBlock(nn.Module):
    """Pre-norm encoder block (attention over the whole clip, no causal mask) + GELU MLP."""

    def __init__(self, dim: int, *, heads: int, mlp_ratio: float, norm_eps: float):
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, return_dt: bool = False):
        b, length, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, length, 3, self.heads, -1).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2))  # [B, heads, L, d/heads]
        x = x + self.out(att.transpose(1, 2).reshape(b, length, d))
        x = x + self.mlp(self.mlp_norm(x))
        return x, None  # attention has no step size Δ


class AvgPoolStage(nn.Module):
    """Mean of each group of k tokens of a frame; the zero padding of a frame's last group is
    left out of its mean so a short group is not shrunk towards zero."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, frames: torch.Tensor, return_dt: bool = False):
        n_frames, t, d = frames.shape
        groups = -(-t // self.k)
        pad = groups * self.k - t
        x = F.pad(frames, (0, 0, 0, pad)).view(n_frames, groups, self.k, d)
        counts = torch.full((groups,), float(self.k), dtype=frames.dtype, device=frames.device)
        counts[-1] = self.k - pad
        return x.sum(2) / counts[:, None], None
