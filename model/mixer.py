"""The Mamba2 mixer, causal or bidirectional (paper.md §1.3), with the per-token step sizes Δ.

    zxbcdt = in_proj(h)                                  # [B, L, 2I + 2GN + H], split z | xBC | dt
    y_f = direction(zxbcdt)                              # conv1d, SiLU, SSD, gated RMSNorm with z
    y_b = direction_b(zxbcdt.flip(1)).flip(1)            # bidirectional only: own conv/dt_bias/A/D/norm
    out = out_proj(y_f + y_b)                            # summed, not averaged, before the shared out_proj

Forward-direction parameter names are those of transformers' `Mamba2Mixer` (in_proj, conv1d,
dt_bias, A_log, D, norm.weight, out_proj), so a causal mixer's state_dict loads into it and vice
versa; the backward direction adds conv1d_b, dt_bias_b, A_b_log, D_b, norm_b as in the MambaMia code.

Each direction runs mamba_ssm's fused `mamba_split_conv1d_scan_combined` when model.kernels picks
it (mamba_ssm and causal_conv1d import; CUDA tensors, or MAMBAMIA_KERNELS=fused); otherwise a
PyTorch conv1d followed by `model.ssd.chunk_scan` and `RMSNormGated`, each of which asks
model.kernels for its own fused kernel (so with mamba_ssm but no causal_conv1d only the conv runs
in PyTorch).

Run the tests: `python -m pytest tests/test_mixer.py -q`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model import kernels
from model.ssd import chunk_scan

class RMSNormGated(nn.Module):
    """RMSNorm over groups of `group_size` channels, gated by silu(z).

    norm_before_gate=True (the official MambaMia code, mamba_ssm's default): y = w * rmsnorm(x) * silu(z);
    False (transformers' Mamba2): y = w * rmsnorm(x * silu(z)). Computed in float32 or wider, or by
    mamba_ssm's `rmsnorm_fn` where model.kernels picks it.
    """

    def __init__(self, hidden_size: int, *, group_size: int | None = None, eps: float = 1e-5,
                 norm_before_gate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size or hidden_size
        if hidden_size % self.group_size:
            raise ValueError(f"RMSNormGated: group_size {self.group_size} must divide hidden_size {hidden_size}")
        self.eps = eps
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        kernel = kernels.kernel_for(kernels.GATED_NORM, x)
        if kernel is not None:
            return kernel(x, self.weight, None, z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)
        in_dtype = x.dtype
        x = x.to(_at_least_fp32(in_dtype))
        gate = F.silu(z.to(x.dtype)) if z is not None else None
        if gate is not None and not self.norm_before_gate:
            x = x * gate
        grouped = x.unflatten(-1, (-1, self.group_size))  # [..., groups, group_size]
        x = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        if gate is not None and self.norm_before_gate:
            x = x * gate
        return self.weight * x.to(in_dtype)


class Mamba2Mixer(nn.Module):
    """Mamba2 mixer on [B, L, d_model]; `bidirectional=True` adds the flipped-time scan.

    Init (paper §1.3/§5.8): dt_bias = softplus^-1(dt), dt ~ exp(U[log dt_min, log dt_max]) floored at
    dt_init_floor; A_log = log(1..H); D = 1; projections keep nn.Linear's init with zero biases.
    A_log, D and dt_bias (and their _b twins) carry `_no_weight_decay = True` for the optimizer groups.
    norm_before_gate: the gated norm's order (see RMSNormGated); True as in the official MambaMia
    code, False reproduces transformers' Mamba2Mixer.
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        bidirectional: bool = False,
        norm_eps: float = 1e-5,
        norm_before_gate: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
    ):
        super().__init__()
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"Mamba2Mixer: expand * d_model = {d_inner} must be a multiple of headdim {headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"Mamba2Mixer: ngroups {ngroups} must divide the number of heads {nheads}")
        self.d_model, self.d_inner, self.d_state, self.d_conv = d_model, d_inner, d_state, d_conv
        self.headdim, self.nheads, self.ngroups, self.chunk_size = headdim, nheads, ngroups, chunk_size
        self.bidirectional = bidirectional
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.conv_dim = d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + nheads, bias=bias)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        for linear in (self.in_proj, self.out_proj):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

        def conv() -> nn.Conv1d:
            return nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                             padding=d_conv - 1, bias=conv_bias)

        def norm() -> RMSNormGated:
            return RMSNormGated(d_inner, group_size=d_inner // ngroups, eps=norm_eps,
                                norm_before_gate=norm_before_gate)

        def dt_bias() -> nn.Parameter:
            log_dt = torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            dt = torch.exp(log_dt).clamp(min=dt_init_floor)
            return _no_decay(nn.Parameter(dt + torch.log(-torch.expm1(-dt))))  # softplus^-1(dt)

        def a_log() -> nn.Parameter:
            return _no_decay(nn.Parameter(torch.log(torch.arange(1, nheads + 1, dtype=torch.float32))))

        def skip_d() -> nn.Parameter:
            return _no_decay(nn.Parameter(torch.ones(nheads)))

        self.conv1d, self.dt_bias, self.A_log, self.D, self.norm = conv(), dt_bias(), a_log(), skip_d(), norm()
        if bidirectional:
            self.conv1d_b, self.dt_bias_b, self.A_b_log, self.D_b, self.norm_b = (
                conv(), dt_bias(), a_log(), skip_d(), norm())

    def forward(self, hidden_states: torch.Tensor, return_dt: bool = False):
        """hidden_states [B, L, d_model] -> y [B, L, d_model], or (y, Δ [B, L, H]) with return_dt.

        Δ = clamp(softplus(dt + dt_bias), *dt_limit) per head, float32 (float64 for float64
        inputs), without autograd history; for the bidirectional mixer the mean of both directions'
        Δ in original time order.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2Mixer: expected hidden_states [batch, seqlen, {self.d_model}], "
                             f"got {tuple(hidden_states.shape)}")
        zxbcdt = self.in_proj(hidden_states)  # [B, L, I + conv_dim + H]
        y = self._direction(zxbcdt, self.conv1d, self.dt_bias, self.A_log, self.D, self.norm)
        if self.bidirectional:
            # The backward scan reads the same projections reversed in time (paper.md §5, item 1).
            y_b = self._direction(zxbcdt.flip(1), self.conv1d_b, self.dt_bias_b, self.A_b_log,
                                  self.D_b, self.norm_b)
            y = y + y_b.flip(1)
        out = self.out_proj(y.to(hidden_states.dtype))
        if not return_dt:
            return out
        # Δ only ranks frames (a hard top-k), so it carries no graph. Under activation
        # checkpointing this also keeps out_proj the last op that saves tensors: the recomputation
        # then stops inside out_proj, before ZeRO-3's post-forward hook would free the out_proj
        # weight that the backward pass has already gathered (model/gpa.py, QueryStage).
        with torch.no_grad():
            dt_raw = zxbcdt[..., -self.nheads:].to(_at_least_fp32(zxbcdt.dtype))  # [B, L, H]
            delta = self._delta(dt_raw, self.dt_bias)
            if self.bidirectional:
                # dt_raw is shared: reversing the backward scan's Δ only changes which bias it saw.
                delta = (delta + self._delta(dt_raw, self.dt_bias_b)) / 2
        return out, delta

    def _delta(self, dt_raw: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
        return F.softplus(dt_raw + dt_bias.to(dt_raw.dtype)).clamp(min=self.dt_limit[0], max=self.dt_limit[1])

    def _direction(self, zxbcdt: torch.Tensor, conv1d: nn.Conv1d, dt_bias: nn.Parameter,
                   A_log: nn.Parameter, D: nn.Parameter, norm: RMSNormGated) -> torch.Tensor:
        """One scan direction over zxbcdt [B, L, ...] in its own time order -> [B, L, I] (pre out_proj)."""
        A = -torch.exp(A_log.to(_at_least_fp32(A_log.dtype)))  # [H]
        fused = kernels.split_conv1d_kernel(zxbcdt)
        if fused is not None:
            return fused(zxbcdt, conv1d.weight.squeeze(1), conv1d.bias, dt_bias, A, D, self.chunk_size,
                         dt_limit=self.dt_limit, activation="silu", rmsnorm_weight=norm.weight,
                         rmsnorm_eps=norm.eps, headdim=self.headdim, ngroups=self.ngroups,
                         norm_before_gate=norm.norm_before_gate)
        batch, seqlen, _ = zxbcdt.shape
        z, xBC, dt_raw = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        # Depthwise causal conv: left padding of d_conv - 1, keep the first L outputs.
        xBC = conv1d(xBC.transpose(1, 2).to(conv1d.weight.dtype))[..., :seqlen].transpose(1, 2)
        xBC = F.silu(xBC)  # [B, L, conv_dim]
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = chunk_scan(
            x.reshape(batch, seqlen, self.nheads, self.headdim), dt_raw, A,
            B.reshape(batch, seqlen, self.ngroups, self.d_state),
            C.reshape(batch, seqlen, self.ngroups, self.d_state),
            self.chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
        )  # [B, L, H, P]
        return norm(y.reshape(batch, seqlen, self.d_inner), z)


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _no_decay(param: nn.Parameter) -> nn.Parameter:
    param._no_weight_decay = True
    return param
