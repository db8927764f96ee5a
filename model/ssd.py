"""The Mamba2 state-space-dual (SSD) scan: a chunked pure-PyTorch path and mamba_ssm's fused kernel.

`chunk_scan` has the signature and semantics of
`mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`, so on CUDA with mamba_ssm installed
the Triton kernel is a drop-in; everywhere else (CPU, no mamba_ssm, float64) the PyTorch path runs.

The recurrence, per batch b and head h (r = h's group for B and C):
    dt_t = clamp(softplus?(dt_t + dt_bias), *dt_limit)
    s_t  = exp(dt_t * A) * s_{t-1} + dt_t * x_t B_t^T          # s: [p, n]
    y_t  = s_t C_t + D * x_t,   then y_t *= silu(z_t) when z is given
with s_{-1} = initial_states and s reset to 0 wherever seq_idx changes (packed sequences; the
initial state belongs to sequence id 0, as in the kernel).

The chunked form splits time into chunks and works chunk x chunk inside a chunk and
chunk-to-chunk through a short sequential loop over chunk states, so memory grows linearly with L:
the largest buffers hold heads x chunk values per time step, and without autograd only one block
of chunks (REFERENCE_BLOCK_TOKENS steps) is alive at a time.

Run the tests: `python -m pytest tests/test_ssd.py -q`.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# "reference" forces the PyTorch path, "fast" demands the fused kernel (error if unusable),
# None picks the kernel whenever it imports and the tensors live on CUDA. Tests set this.
FORCE_IMPL: str | None = None

_FUSED: Callable | None = None
_FUSED_RESOLVED = False
_LOGGED_PATHS: set[str] = set()

# The PyTorch path tiles time at min(chunk_size, this). chunk_size only sets the blocking (the result
# is the same recurrence, tested), and on CPU the intra-chunk [l, s] work per token grows with the
# tile while the loop over chunk states is cheap: 64 measured fastest for forward at headdim 64,
# d_state 64 (bench/bench_ssd.py), about 2x faster than 256.
REFERENCE_MAX_CHUNK = 64
# ... and runs the chunks in blocks of about this many time steps (see chunk_scan_reference).
REFERENCE_BLOCK_TOKENS = 2048
# exp(-80) ~ 2e-35 and exp(-700) ~ 1e-304: the last steps before exp leaves the normal range.
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


def _fused_kernel() -> Callable | None:
    """mamba_ssm's `mamba_chunk_scan_combined`, or None; imported once, reason logged once."""
    global _FUSED, _FUSED_RESOLVED
    if not _FUSED_RESOLVED:
        _FUSED_RESOLVED = True
        try:
            # mamba_ssm/__init__ imports its CUDA extension unconditionally, so a CPU machine or a
            # Triton-only install raises here rather than at call time.
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        except (ImportError, OSError, RuntimeError) as err:
            logger.info("SSD scan: mamba_ssm kernel unavailable (%s); PyTorch path on all devices", err)
        else:
            _FUSED = mamba_chunk_scan_combined
    return _FUSED


def _log_once(path: str, message: str) -> None:
    if path not in _LOGGED_PATHS:
        _LOGGED_PATHS.add(path)
        logger.info(message)


def chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
):
    """SSD scan. x [b,l,h,p], dt [b,l,h], A [h], B/C [b,l,g,n] (h % g == 0), D [h] or [h,p],
    z [b,l,h,p], dt_bias [h], initial_states [b,h,p,n], seq_idx [b,l] (non-decreasing ints).

    Returns y [b,l,h,p] in x's dtype, or (y, final_states [b,h,p,n]) with return_final_states;
    final states are float32 (float64 for float64 inputs) like the kernel's.
    """
    _check_shapes(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx)
    if FORCE_IMPL not in (None, "reference", "fast"):
        raise ValueError(f"model.ssd.FORCE_IMPL: expected None, 'reference' or 'fast', got {FORCE_IMPL!r}")
    if FORCE_IMPL != "reference":
        kernel = _fused_kernel()
        if kernel is not None and x.is_cuda and x.dtype != torch.float64:  # Triton: no fp64 dots
            _log_once("fast", "SSD scan: mamba_ssm fused Triton kernel")
            return kernel(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                          initial_states=initial_states, seq_idx=seq_idx, dt_softplus=dt_softplus,
                          dt_limit=dt_limit, return_final_states=return_final_states)
        if FORCE_IMPL == "fast":
            raise RuntimeError("model.ssd.FORCE_IMPL='fast' needs mamba_ssm importable and CUDA "
                               "tensors of a 32-bit or 16-bit float dtype")
    _log_once("reference", "SSD scan: chunked PyTorch path")
    return chunk_scan_reference(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                initial_states=initial_states, seq_idx=seq_idx,
                                dt_softplus=dt_softplus, dt_limit=dt_limit,
                                return_final_states=return_final_states)


def _check_shapes(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx) -> None:
    if x.dim() != 4:
        raise ValueError(f"chunk_scan: x must be [batch, seqlen, heads, headdim], got {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, l) or h % B.shape[2] != 0:
        raise ValueError(f"chunk_scan: B must be [{b}, {l}, groups dividing {h}, dstate], got {tuple(B.shape)}")
    g, n = B.shape[2:]
    expected = {
        "dt": (dt, (b, l, h)), "A": (A, (h,)), "C": (C, (b, l, g, n)), "z": (z, (b, l, h, p)),
        "dt_bias": (dt_bias, (h,)), "initial_states": (initial_states, (b, h, p, n)),
        "seq_idx": (seq_idx, (b, l)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"chunk_scan: {name} must have shape {shape}, got {tuple(tensor.shape)}")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"chunk_scan: D must have shape ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_scan: chunk_size must be a positive integer, got {chunk_size}")


def chunk_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
):
    """The chunked SSD in PyTorch (any device, differentiable); same contract as `chunk_scan`.

    Works in chunks of min(chunk_size, REFERENCE_MAX_CHUNK) time steps, processed in blocks of
    about REFERENCE_BLOCK_TOKENS steps that hand the state on from one block to the next."""
    in_dtype = x.dtype
    cdt = torch.float64 if in_dtype == torch.float64 else torch.float32
    b, seqlen, h, p = x.shape
    g, n = B.shape[2:]
    cs = min(chunk_size, REFERENCE_MAX_CHUNK)
    nc = math.ceil(seqlen / cs)
    pad = nc * cs - seqlen

    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20 as in the kernel: identity above it
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])

    # Padding steps get dt = 0: no decay and no input, so they leave the final state untouched.
    def chunked(t: torch.Tensor) -> torch.Tensor:  # [b, l, ...] -> [b, c, cs, ...]
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t
        return t.reshape(b, nc, cs, *t.shape[2:])

    x_c = chunked(x.to(cdt))  # [b, c, cs, h, p]
    dt_c = chunked(dt)  # [b, c, cs, h]
    B_c = chunked(B.to(cdt)).permute(0, 1, 3, 2, 4)  # [b, c, g, cs, n]
    C_c = chunked(C.to(cdt)).permute(0, 1, 3, 2, 4)  # [b, c, g, cs, n]
    seqs: tuple = (None, None, None)
    if seq_idx is not None:
        # Padding joins each row's last sequence so it cannot reset the final state.
        seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1).reshape(b, nc, cs)
        seq_end = seq[:, :, -1]  # [b, c]
        seq_prev = torch.cat([torch.zeros_like(seq_end[:, :1]), seq_end[:, :-1]], dim=1)
        seqs = (seq, seq_end, seq_prev)

    if initial_states is None:
        state = torch.zeros(b, g, n, h // g, p, dtype=cdt, device=x.device)
    else:
        state = initial_states.to(cdt).reshape(b, g, h // g, p, n).permute(0, 1, 4, 2, 3)  # [b, g, n, r, p]
    # Blocks of chunks keep every intermediate at block size (cache-sized, and bounded memory for
    # inference); split, not slicing in a loop, so backward concatenates gradients once.
    per_block = max(1, REFERENCE_BLOCK_TOKENS // cs)
    pieces = [t.split(per_block, dim=1) if t is not None else [None] * math.ceil(nc / per_block)
              for t in (x_c, dt_c, B_c, C_c, *seqs)]
    ys = []
    for x_b, dt_b, B_b, C_b, seq_b, seq_end_b, seq_prev_b in zip(*pieces):
        y_b, state = _scan_chunks(x_b, dt_b, A.to(cdt), B_b, C_b, state, seq_b, seq_end_b, seq_prev_b)
        ys.append(y_b)
    y = torch.cat(ys, dim=1)  # [b, c, g, cs, r, p]

    y = y.transpose(2, 3).reshape(b, nc * cs, h, p)[:, :seqlen]  # [b, l, h, p]
    if D is not None:
        y = torch.addcmul(y, x.to(cdt), D.to(cdt)[:, None] if D.dim() == 1 else D.to(cdt))
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(in_dtype)
    if return_final_states:
        return y, state.permute(0, 1, 3, 4, 2).reshape(b, h, p, n)  # [b, g, n, r, p] -> [b, h, p, n]
    return y


def _scan_chunks(x_c, dt_c, A, B_c, C_c, state, seq, seq_end, seq_prev):
    """Steps 1-4 of the chunked scan over consecutive chunks, from the state entering the first.

    x_c [b, c, cs, h, p], dt_c [b, c, cs, h] (processed), A [h], B_c/C_c [b, c, g, cs, n],
    state [b, g, n, r, p] (r = heads per group); seq/seq_end/seq_prev: chunk sequence ids or None.
    Returns y [b, c, g, cs, r, p] and the state after the last chunk.
    """
    b, nc, cs, h, p = x_c.shape
    g, n, r = state.shape[1], state.shape[2], state.shape[3]
    cdt = x_c.dtype

    # Heads split as (g, r) so B and C are shared by the r heads of a group without a copy.
    dA_cs = torch.cumsum(dt_c * A, dim=2)  # [b, c, cs, h]
    # Contiguous head-major layouts: elementwise results inherit their inputs' strides, and the
    # [l, s] buffers below must come out contiguous or every matmul on them copies them first.
    dA_cs = dA_cs.permute(0, 1, 3, 2).reshape(b, nc, g, r, cs).contiguous()  # [b, c, g, r, cs]
    xdt_tok = (x_c * dt_c[..., None]).reshape(b, nc, cs, g, r, p).transpose(2, 3)  # [b, c, g, s, r, p]
    xdt = xdt_tok.permute(0, 1, 2, 4, 3, 5).contiguous()  # [b, c, g, r, s, p]

    # 1. Within a chunk: y_l += sum_{s<=l} (C_l . B_s) exp(dA_cs_l - dA_cs_s) dt_s x_s.
    # The causal (and sequence) mask goes on the r-times smaller C.B scores. The [.., l, s] decay,
    # the largest buffer, is built in place and clamped to [floor, 0] like the kernel's
    # exp(min(., 0)): above the diagonal it is masked anyway, and below the floor exp leaves the
    # normal float range, where it is ~8x slower and its value is nil next to the other terms.
    keep = torch.ones(cs, cs, dtype=torch.bool, device=x_c.device).tril()  # [l, s]
    if seq is not None:
        keep = keep & (seq[..., :, None] == seq[..., None, :])[:, :, None]
    scores = (C_c @ B_c.transpose(-1, -2)).masked_fill(~keep, 0.0)[:, :, :, None]  # [b, c, g, 1, l, s]
    decay_ls = dA_cs[..., :, None] - dA_cs[..., None, :]  # [b, c, g, r, l, s]
    decay_ls = decay_ls.clamp_(min=_EXP_FLOOR[cdt], max=0.0).exp_()
    y_diag = (scores * decay_ls) @ xdt  # [b, c, g, r, l, p]

    # Steps 2-4 hold a group's states as one [n, r*p] matrix: its r heads share B and C, so each
    # chunk's state build-up and read-out is one [cs, n] x [n, r*p] product, not r small ones.
    dA_tok = dA_cs.transpose(-1, -2)  # [b, c, g, s, r]

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(dA_tok[..., -1:, :] - dA_tok)  # [b, c, g, s, r]
    if seq is not None:
        decay_to_end = decay_to_end * (seq == seq_end[..., None])[:, :, None, :, None].to(cdt)
    weighted = (xdt_tok * decay_to_end[..., None]).reshape(b, nc, g, cs, r * p)
    chunk_states = B_c.transpose(-1, -2) @ weighted  # [b, c, g, n, r*p]

    # 3. Chunk to chunk: a sequential loop over chunk states (linear memory, no chunk x chunk
    # segment-sum matrix); the state entering chunk c is what step 4 reads.
    chunk_decay = torch.exp(dA_cs[..., -1])  # [b, c, g, r]
    if seq is not None:
        chunk_decay = chunk_decay * (seq_end == seq_prev)[:, :, None, None].to(cdt)
    states_in = []
    # unbind, not [:, c]: indexing in a loop makes backward materialise one full-size zero
    # gradient per chunk (quadratic in L); unbind's backward stacks once.
    for carry, new_state in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
        states_in.append(state)
        state = torch.addcmul(new_state.reshape(b, g, n, r, p), carry[:, :, None, :, None], state)
    prev_states = torch.stack(states_in, dim=1).reshape(b, nc, g, n, r * p)

    # 4. The incoming state read out at each position: y_l += exp(dA_cs_l) C_l . state_in.
    decay_in = torch.exp(dA_tok)  # [b, c, g, l, r]
    if seq is not None:
        decay_in = decay_in * (seq == seq_prev[..., None])[:, :, None, :, None].to(cdt)
    y_off = (C_c @ prev_states).reshape(b, nc, g, cs, r, p)
    return torch.addcmul(y_diag.transpose(3, 4), y_off, decay_in[..., None]), state
