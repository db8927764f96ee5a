"""Gated Patch Aggregation, the MambaMia block and the query stage that stacks blocks.

The layout follows paper §1.2: content is cut into groups of k tokens, one shared learned query is
placed at the END of each group (so even a causal scan lets it see its own group), and the stage
keeps only the query outputs after a final RMSNorm: a k-fold compression.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from model.mixer import Mamba2Mixer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the stream's dtype; the result takes the weight's dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(self.weight.dtype)


class GatedPatchAggregation(nn.Module):
    """Replace each query slot by a gated mix of itself and a softmax-weighted mean of its group.

    Weights and gate are functions of the query alone (paper §1.2): α = softmax(W·drop(q)),
    g = sigmoid(w·drop'(q)) rescaled to [ε, 1-ε], q' = (1-g)·q + g·Σ α_j P_j. The two layers see
    independent dropout masks (drop, drop'), as in the official code. `content_mask` [G, k]
    (False = zero padding) removes padding slots from the softmax.
    """

    def __init__(self, dim: int, k: int, *, init_scale: float = 1e-3, gate_eps: float = 0.01,
                 dropout: float = 0.1):
        super().__init__()
        self.k = k
        self.gate_eps = gate_eps
        self.dropout = nn.Dropout(dropout)
        self.weight_fc = nn.Linear(dim, k)
        self.gate_fc = nn.Linear(dim, 1)
        # Near-zero weights make GPA start as a plain group mean with gate 0.5 (paper §1.2, §5.4).
        with torch.no_grad():
            for fc in (self.weight_fc, self.gate_fc):
                fc.weight.mul_(init_scale)
                fc.bias.zero_()

    def forward(self, h: torch.Tensor, content_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, length, d = h.shape
        if length % (self.k + 1):
            raise ValueError(f"GPA: sequence length {length} is not a multiple of k+1={self.k + 1}")
        groups = h.view(b, length // (self.k + 1), self.k + 1, d)
        content, q = groups[:, :, : self.k], groups[:, :, self.k]  # [B,G,k,D], [B,G,D]
        logits = self.weight_fc(self.dropout(q)).float()  # [B,G,k]
        if content_mask is not None:
            logits = logits.masked_fill(~content_mask, float("-inf"))
        alpha = torch.softmax(logits, dim=-1).to(h.dtype)
        agg = torch.einsum("bgk,bgkd->bgd", alpha, content)
        gate = torch.sigmoid(self.gate_fc(self.dropout(q))) * (1 - 2 * self.gate_eps) + self.gate_eps
        q_new = (1 - gate) * q + gate * agg
        # Content tokens pass unchanged; only the query slots of a copy are rewritten.
        return torch.cat([content, q_new.unsqueeze(2)], dim=2).view(b, length, d)


class MambaMiaBlock(nn.Module):
    """Pre-norm residual block: RMSNorm -> (GPA on query slots) -> Mamba2 mixer -> + residual.

    The residual carries the un-normalised, un-GPA'd input. `gpa=False` gives the BiMamba
    ablation, `bidirectional=False` the causal one. `backward_dt_bias_init="ones"` sets the
    backward direction's dt_bias to 1 as the official code leaves it (CompressorConfig).
    """

    def __init__(self, dim: int, *, k: int | None, gpa: bool, bidirectional: bool, d_state: int,
                 d_conv: int, expand: int, headdim: int, ngroups: int, chunk_size: int,
                 norm_eps: float, init_scale: float, gate_eps: float, gpa_dropout: float,
                 residual_in_fp32: bool, backward_dt_bias_init: str = "ones",
                 norm_before_gate: bool = True):
        super().__init__()
        if gpa and k is None:
            raise ValueError("MambaMiaBlock: GPA needs a group size k")
        self.residual_in_fp32 = residual_in_fp32
        self.norm = RMSNorm(dim, norm_eps)
        self.gpa = (GatedPatchAggregation(dim, k, init_scale=init_scale, gate_eps=gate_eps,
                                          dropout=gpa_dropout) if gpa else None)
        self.mixer = Mamba2Mixer(dim, d_state=d_state, d_conv=d_conv, expand=expand,
                                 headdim=headdim, ngroups=ngroups, chunk_size=chunk_size,
                                 bidirectional=bidirectional, norm_eps=norm_eps,
                                 norm_before_gate=norm_before_gate)
        if bidirectional and backward_dt_bias_init == "ones":
            with torch.no_grad():
                self.mixer.dt_bias_b.fill_(1.0)

    def forward(self, x: torch.Tensor, return_dt: bool = False,
                content_mask: torch.Tensor | None = None):
        residual = x.float() if self.residual_in_fp32 else x
        h = self.norm(x.to(self.norm.weight.dtype))
        if self.gpa is not None:
            h = self.gpa(h, content_mask)
        if return_dt:
            y, dt = self.mixer(h, return_dt=True)
            return residual + y.to(residual.dtype), dt
        return residual + self.mixer(h).to(residual.dtype), None


class QueryStage(nn.Module):
    """A stack of blocks over one video's tokens, optionally pooled by queries.

    Input [F, T, D] (F frames of T tokens). With `k` set, each frame's tokens are zero-padded to a
    multiple of k, a shared query follows every k tokens, all frames are concatenated in time order
    into ONE sequence (no reset between frames or groups), and only query outputs are kept:
    [F, ceil(T/k), D]. With `k=None` (no queries) the output is [F, T, D]. Blocks take
    (x [1, L, D], return_dt, content_mask) and return (x, Δ [1, L, H] or None); content_mask
    [F * ceil(T/k), k] marks real tokens (None when nothing is padded or `mask_padding` is off).
    """

    def __init__(self, blocks: list[nn.Module], dim: int, *, k: int | None, norm_eps: float,
                 gradient_checkpointing: bool = False, mask_padding: bool = True):
        super().__init__()
        self.k = k
        self.mask_padding = mask_padding
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = RMSNorm(dim, norm_eps)
        self.gradient_checkpointing = gradient_checkpointing
        # One shared query vector, init std 1/sqrt(D) as in the official compressor code.
        self.query = nn.Parameter(torch.randn(dim) / math.sqrt(dim)) if k is not None else None

    def forward(self, frames: torch.Tensor, return_dt: bool = False):
        """frames [F, T, D] -> (tokens [F, T', D], Δ per position [F, L/F, H] or None)."""
        n_frames, t, d = frames.shape
        x, content_mask = frames, None
        if self.k is not None:
            groups = -(-t // self.k)
            x = F.pad(x, (0, 0, 0, groups * self.k - t)).view(n_frames, groups, self.k, d)
            q = self.query.to(x.dtype).expand(n_frames, groups, 1, d)
            x = torch.cat([x, q], dim=2)  # [F, G, k+1, D]
            if self.mask_padding and t % self.k:
                content_mask = padding_mask(n_frames, t, self.k, frames.device)
        per_frame = x[0].numel() // d
        x = x.reshape(1, n_frames * per_frame, d)
        dts = []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # early_stop ends the recomputation at the block's last tensor-saving op, i.e.
                # inside the mixer's out_proj, where the backward pass enters the block. Were it
                # to run on past out_proj's forward, ZeRO-3's post-forward hook would free the
                # out_proj weight that backward has already gathered (its gradient then fails to
                # accumulate into the empty parameter). HF's checkpointed decoder layers rely on
                # the same order: their last tensor-saving op is the layer's last projection.
                # The context manager (torch >= 2.1), not checkpoint's early_stop keyword (2.9+).
                with set_checkpoint_early_stop(True):
                    x, dt = checkpoint(block, x, return_dt, content_mask, use_reentrant=False)
            else:
                x, dt = block(x, return_dt, content_mask)
            if dt is not None:
                dts.append(dt)
        x = self.norm_f(x).to(frames.dtype).view(n_frames, per_frame, d)
        if self.k is not None:
            x = x.view(n_frames, -1, self.k + 1, d)[:, :, self.k]
        delta = None
        if return_dt and dts:
            delta = torch.stack(dts).mean(0).view(n_frames, per_frame, -1)
        return x, delta


def padding_mask(n_frames: int, tokens: int, k: int, device: torch.device) -> torch.Tensor:
    """[n_frames * ceil(tokens/k), k] bool: True on real tokens, False on each frame's zero padding."""
    groups = -(-tokens // k)
    real = torch.arange(groups * k, device=device) < tokens
    return real.view(1, groups, k).expand(n_frames, groups, k).reshape(n_frames * groups, k)
