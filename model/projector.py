"""Projector from compressor width to LLM width (LLaVA's `mlp2x_gelu` or `linear`)."""
from __future__ import annotations

from torch import nn


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"projector: expected 'mlp2x_gelu' or 'linear', got {kind!r}")
