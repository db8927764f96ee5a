"""The hierarchical video compressor: spatial(-temporal) MambaMia, Time Axis Aggregator, keyframes.

[inferred] paper §1.5 names the two stages but not their exact wiring; this module implements the
recommended reading, each open choice being a CompressorConfig field:

1. input projection of the frozen encoder's patch features to `hidden_size`;
2. spatial stage over ALL frames' patches concatenated in time order as one sequence per video
   (MambaMia: bidirectional Mamba2 + GPA, a query after every k patches of a frame), keeping the
   query outputs: ceil(P/k) anchors per frame;
3. Time Axis Aggregator: bidirectional Mamba2 blocks over the anchor sequence that also return
   their step sizes Δ (mean of both directions and all TAA layers); a frame's score is how far
   its log Δ lies from the video's median, averaged over its positions and heads
   (`delta_score: deviation`), or the mean Δ itself (`mean`); see frame_scores;
4. keep the `keyframes` frames with the largest scores (first and last forced in when
   `keep_first_last`), re-sorted into temporal order; videos with fewer frames keep them all.

Each video runs as its own unpadded sequence (a loop over the batch using frame_mask) so padding
frames never enter the backward scan. Selection is a hard top-k: Δ is trained only through the
TAA outputs it shapes, as in the paper.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from model.ablations import AvgPoolStage, TransformerBlock
from model.config import CompressorConfig
from model.gpa import MambaMiaBlock, QueryStage


class CompressorOutput(NamedTuple):
    # A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 hooks the tensors of a module's output
    # for its backward pass only when it can see them (tuples, lists, dicts), and warns otherwise.
    tokens: list[torch.Tensor]
    """Per sample [N_b, T, hidden]: T tokens for each of the N_b kept frames, in temporal order."""
    kept: list[torch.Tensor]
    """Per sample [N_b] long: indices of the kept frames along the input's frame axis."""
    scores: list[torch.Tensor | None]
    """Per sample [F_b] float: Δ score of each valid frame (frame_scores; None under uniform
    selection)."""


def select_frames(scores: torch.Tensor | None, n_frames: int, budget: int, *, selection: str,
                  keep_first_last: bool, device: torch.device | None = None) -> torch.Tensor:
    """Indices (sorted, long) of the frames to keep out of `n_frames`."""
    if n_frames <= budget:
        return torch.arange(n_frames, device=device)
    if selection == "uniform":
        # Evenly spaced with both ends included; spacing >= 1 so rounding never repeats a frame.
        return torch.linspace(0, n_frames - 1, budget, device=device).round().long()
    if scores is None:
        raise ValueError("select_frames: Δ-based selection needs frame scores")
    rank = scores.detach().float().clone()
    if keep_first_last:
        rank[0] = float("inf")
        if budget > 1:
            rank[-1] = float("inf")
    return torch.topk(rank, budget).indices.sort().values


def frame_scores(delta: torch.Tensor, how: str) -> torch.Tensor:
    """Δ [F, positions, heads] of one video -> a score per frame (CompressorConfig.delta_score)."""
    delta = delta.detach().float()
    if how == "mean":
        return delta.mean(dim=(1, 2))
    # Log space: Δ sits in softplus' exponential regime (dt_bias init ~ log 1e-3..1e-1), so a
    # head's log Δ moves additively with its dt projection and every head counts alike.
    log_delta = delta.clamp_min(torch.finfo(torch.float32).tiny).log()
    typical = log_delta.median(dim=0, keepdim=True).values
    return (log_delta - typical).abs().mean(dim=(1, 2))


def _mamba_blocks(c: CompressorConfig, n: int, *, k: int | None, gpa: bool,
                  bidirectional: bool) -> list[nn.Module]:
    return [MambaMiaBlock(c.hidden_size, k=k, gpa=gpa, bidirectional=bidirectional,
                          d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, headdim=c.headdim,
                          ngroups=c.ngroups, chunk_size=c.ssd_chunk_size, norm_eps=c.norm_eps,
                          init_scale=c.init_scale, gate_eps=c.gate_eps,
                          gpa_dropout=c.gpa_dropout, residual_in_fp32=c.residual_in_fp32,
                          backward_dt_bias_init=c.backward_dt_bias_init,
                          norm_before_gate=c.norm_before_gate)
            for _ in range(n)]


def build_spatial_stage(c: CompressorConfig) -> nn.Module:
    """The per-kind spatial stage: [F, P, hidden] -> ([F, ceil(P/k), hidden], None)."""
    mask_padding = c.group_padding == "masked"
    if c.kind == "avgpool":
        return AvgPoolStage(c.k, mask_padding)
    if c.kind == "transformer":
        blocks = [TransformerBlock(c.hidden_size, heads=c.transformer_heads,
                                   mlp_ratio=c.transformer_mlp_ratio, norm_eps=c.norm_eps,
                                   rope_base=c.transformer_rope_base)
                  for _ in range(c.num_layers)]
    else:
        blocks = _mamba_blocks(c, c.num_layers, k=c.k, gpa=c.kind != "bimamba",
                               bidirectional=c.kind != "causal_mambamia")
    return QueryStage(blocks, c.hidden_size, k=c.k, norm_eps=c.norm_eps,
                      gradient_checkpointing=c.gradient_checkpointing, mask_padding=mask_padding)


class VideoCompressor(nn.Module):
    """features [B, F, P, input_dim] + frame_mask [B, F] -> CompressorOutput (see module doc)."""

    def __init__(self, config: CompressorConfig):
        super().__init__()
        self.config = config
        c = config
        self.input_proj = nn.Linear(c.input_dim, c.hidden_size)
        nn.init.xavier_uniform_(self.input_proj.weight)
        nn.init.zeros_(self.input_proj.bias)
        self.spatial = build_spatial_stage(c)
        self.taa = None
        if c.taa_layers:
            self.taa = QueryStage(
                _mamba_blocks(c, c.taa_layers, k=c.taa_k, gpa=c.taa_k is not None,
                              bidirectional=True),
                c.hidden_size, k=c.taa_k, norm_eps=c.norm_eps,
                gradient_checkpointing=c.gradient_checkpointing,
                mask_padding=c.group_padding == "masked")

    def compress_video(self, frames: torch.Tensor):
        """One video's valid frames [F, P, input_dim] -> (tokens [N, T, H], kept [N], scores)."""
        c = self.config
        x = self.input_proj(frames.to(self.input_proj.weight.dtype))  # [F, P, H]
        anchors, _ = self.spatial(x)  # [F, A, H]
        scores = None
        if self.taa is not None:
            anchors, delta = self.taa(anchors, return_dt=c.frame_selection == "delta")
            if delta is not None:
                scores = frame_scores(delta, c.delta_score)  # [F], for selection and logs
        kept = select_frames(scores, frames.shape[0], c.keyframes, selection=c.frame_selection,
                             keep_first_last=c.keep_first_last, device=frames.device)
        return anchors.index_select(0, kept), kept, scores

    def forward(self, features: torch.Tensor,
                frame_mask: torch.Tensor | None = None) -> CompressorOutput:
        c = self.config
        if (features.dim() != 4 or features.shape[-1] != c.input_dim or features.shape[1] < 1
                or c.patches_per_frame not in (None, features.shape[2])):
            raise ValueError(f"compressor: features must be [B, F >= 1, "
                             f"{c.patches_per_frame or 'P'}, {c.input_dim}], got "
                             f"{list(features.shape)}")
        tokens, kept, scores = [], [], []
        for b in range(features.shape[0]):
            if frame_mask is None:
                valid_idx, frames = None, features[b]
            else:
                valid_idx = frame_mask[b].nonzero().squeeze(1)
                if valid_idx.numel() == 0:
                    raise ValueError(f"compressor: sample {b} has no valid frame in frame_mask")
                frames = features[b].index_select(0, valid_idx)
            t, k_idx, s = self.compress_video(frames)
            tokens.append(t)
            kept.append(k_idx if valid_idx is None else valid_idx[k_idx])
            scores.append(s)
        return CompressorOutput(tokens=tokens, kept=kept, scores=scores)
