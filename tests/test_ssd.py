"""chunk_scan (PyTorch path) against a sequential recurrence written here, in float64."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from model import kernels, ssd
from model.ssd import chunk_scan


@pytest.fixture(autouse=True, params=["factored", "segsum"])
def _reference_path(request, monkeypatch):
    """Every test runs twice: chunks with moderate decay take the factored within-chunk product
    (the default here, the inputs' decays are moderate), or every chunk takes the segment-sum path."""
    if request.param == "segsum":
        monkeypatch.setattr(ssd, "_FACTOR_LIMIT", {torch.float32: -1.0, torch.float64: -1.0})
    with kernels.use("reference"):
        yield


def naive_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
               dt_softplus=False, dt_limit=(0.0, math.inf)):
    """One time step at a time: s = exp(dt A) s + dt x B^T; y = s C + D x; y *= silu(z)."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    heads_per_group = h // g
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = torch.log1p(torch.exp(dt))
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    Bh = B.repeat_interleave(heads_per_group, dim=2)  # [b, l, h, n]
    Ch = C.repeat_interleave(heads_per_group, dim=2)
    state = torch.zeros(b, h, p, n, dtype=x.dtype) if initial_states is None else initial_states
    prev_seq = torch.zeros(b, dtype=torch.long)
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)  # [b, h]
        if seq_idx is not None:
            decay = decay * (seq_idx[:, t] == prev_seq)[:, None].to(x.dtype)
            prev_seq = seq_idx[:, t]
        state = decay[:, :, None, None] * state + (dt[:, t, :, None, None] * x[:, t, :, :, None]
                                                    * Bh[:, t, :, None, :])
        y = (state * Ch[:, t, :, None, :]).sum(-1)  # [b, h, p]
        if D is not None:
            y = y + x[:, t] * (D[:, None] if D.dim() == 1 else D)
        if z is not None:
            y = y * z[:, t] * torch.sigmoid(z[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def random_inputs(gen, *, b, l, h, p, g, n, D_shape=None, with_z=False, with_init=False,
                  dtype=torch.float64):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    inputs = {
        "x": rnd(b, l, h, p),
        "dt": rnd(b, l, h, scale=0.5),
        "A": (-torch.rand(h, generator=gen, dtype=dtype) * 2 - 0.1).requires_grad_(),
        "B": rnd(b, l, g, n),
        "C": rnd(b, l, g, n),
    }
    if D_shape is not None:
        inputs["D"] = rnd(*D_shape)
    if with_z:
        inputs["z"] = rnd(b, l, h, p)
    if with_init:
        inputs["initial_states"] = rnd(b, h, p, n)
    return inputs


CASES = [
    # b, l, h, p, g, n, chunk, options
    (2, 37, 4, 3, 2, 5, 8, dict(D_shape=(4,), with_z=True, with_init=True, dt_softplus=True, bias=True)),
    (1, 64, 3, 2, 1, 4, 16, dict(D_shape=(3, 2), dt_softplus=True, bias=True)),
    (2, 19, 6, 2, 3, 3, 32, dict(with_init=True, dt_limit=(0.05, 0.6), dt_softplus=True)),
    (1, 23, 2, 4, 2, 2, 7, dict(D_shape=(2,), with_z=True, dt_limit=(0.0, 1.5))),
]


@pytest.mark.parametrize("b,l,h,p,g,n,chunk,opts", CASES)
def test_matches_naive_recurrence_outputs_states_and_grads(b, l, h, p, g, n, chunk, opts):
    gen = torch.Generator().manual_seed(l * 131 + h)
    inputs = random_inputs(gen, b=b, l=l, h=h, p=p, g=g, n=n, D_shape=opts.get("D_shape"),
                           with_z=opts.get("with_z", False), with_init=opts.get("with_init", False))
    if opts.get("bias"):
        inputs["dt_bias"] = (torch.randn(h, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
    if not opts.get("dt_softplus"):
        # Without softplus dt is used raw; keep it positive so the recurrence is a decay.
        inputs["dt"] = (inputs["dt"].detach().abs() + 0.05).requires_grad_()
    kw = dict(dt_softplus=opts.get("dt_softplus", False), dt_limit=opts.get("dt_limit", (0.0, math.inf)))

    y, final = chunk_scan(**inputs, chunk_size=chunk, return_final_states=True, **kw)
    y_ref, final_ref = naive_scan(**inputs, **kw)
    assert y.dtype == torch.float64 and final.shape == (b, h, p, n)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(final, final_ref, rtol=1e-9, atol=1e-9)

    weights = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    weights_state = torch.randn(final.shape, generator=gen, dtype=torch.float64)
    names = sorted(inputs)
    grads = torch.autograd.grad((y * weights).sum() + (final * weights_state).sum(), [inputs[k] for k in names])
    grads_ref = torch.autograd.grad((y_ref * weights).sum() + (final_ref * weights_state).sum(),
                                    [inputs[k] for k in names])
    for name, got, want in zip(names, grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8, msg=lambda m: f"grad of {name}: {m}")


def test_seq_idx_resets_state_between_packed_sequences():
    gen = torch.Generator().manual_seed(7)
    inputs = random_inputs(gen, b=2, l=30, h=4, p=2, g=2, n=3, D_shape=(4,), with_init=True)
    seq_idx = torch.tensor([[0] * 11 + [1] * 12 + [2] * 7, [1] * 5 + [3] * 25])
    kw = dict(dt_softplus=True, seq_idx=seq_idx)
    y, final = chunk_scan(**inputs, chunk_size=8, return_final_states=True, **kw)
    y_ref, final_ref = naive_scan(**inputs, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(final, final_ref, rtol=1e-9, atol=1e-9)
    # Second oracle: the first sample's middle sequence alone, from a zero state.
    sliced = {k: inputs[k][:1, 11:23] for k in ("x", "dt", "B", "C")}
    alone = chunk_scan(**sliced, A=inputs["A"], D=inputs["D"], chunk_size=8, dt_softplus=True)
    torch.testing.assert_close(y[:1, 11:23], alone, rtol=1e-9, atol=1e-9)


def test_strong_decay_chunks_in_one_scan_match_in_float64_and_float32():
    """Decay logs within a chunk from ~10 (first 64 steps) to thousands (after): far past exp's
    float range, so no factoring of exp(a_l - a_s) can hold there; those chunks must still match."""
    gen = torch.Generator().manual_seed(11)
    b, l, h, p, g, n, chunk = 2, 200, 4, 8, 2, 16, 64
    A = -torch.tensor([1.0, 4.0, 16.0, 10.0], dtype=torch.float64)
    dt = torch.cat([torch.full((b, 64, h), 0.01, dtype=torch.float64),
                    torch.rand(b, l - 64, h, generator=gen, dtype=torch.float64) * 3], dim=1)
    a = torch.cumsum((dt * A)[:, :3 * chunk].reshape(b, 3, chunk, h), dim=2)  # the 3 whole chunks
    assert a[:, 0].abs().max() < 60 and a[:, 1:].abs().amax(dim=(0, 2, 3)).min() > 1000
    inputs = {"x": torch.randn(b, l, h, p, generator=gen, dtype=torch.float64), "dt": dt, "A": A,
              "B": torch.randn(b, l, g, n, generator=gen, dtype=torch.float64),
              "C": torch.randn(b, l, g, n, generator=gen, dtype=torch.float64),
              "D": torch.rand(h, generator=gen, dtype=torch.float64),
              "z": torch.randn(b, l, h, p, generator=gen, dtype=torch.float64),
              "initial_states": torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)}
    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    y_ref, final_ref = naive_scan(**inputs)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        y, final = chunk_scan(**{k: v.detach().to(dtype) for k, v in inputs.items()}, chunk_size=chunk,
                              return_final_states=True)
        assert torch.isfinite(y).all()
        assert (y.double() - y_ref).abs().max() <= tol * y_ref.abs().max()
        assert (final.double() - final_ref).abs().max() <= tol * final_ref.abs().max()
    # Gradients through both kinds of chunk (float64): finite, and the recurrence's.
    y, final = chunk_scan(**inputs, chunk_size=chunk, return_final_states=True)
    weights = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    names = sorted(inputs)
    got = torch.autograd.grad((y * weights).sum() + final.sum(), [inputs[k] for k in names])
    want = torch.autograd.grad((y_ref * weights).sum() + final_ref.sum(), [inputs[k] for k in names])
    for name, g_got, g_want in zip(names, got, want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-8, msg=lambda m: f"grad of {name}: {m}")


def test_independent_of_chunk_size_and_two_segments_equal_one_pass():
    gen = torch.Generator().manual_seed(3)
    inputs = {k: v.detach() for k, v in random_inputs(gen, b=2, l=50, h=4, p=3, g=1, n=4,
                                                       D_shape=(4, 3), with_z=True).items()}
    kw = dict(dt_softplus=True)
    outs = [chunk_scan(**inputs, chunk_size=cs, return_final_states=True, **kw) for cs in (1, 5, 16, 64)]
    for y, final in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(final, outs[0][1], rtol=1e-10, atol=1e-10)

    cut = 21
    first = {k: (v[:, :cut] if k not in ("A", "D") else v) for k, v in inputs.items()}
    second = {k: (v[:, cut:] if k not in ("A", "D") else v) for k, v in inputs.items()}
    y1, s1 = chunk_scan(**first, chunk_size=8, return_final_states=True, **kw)
    y2, s2 = chunk_scan(**second, chunk_size=8, initial_states=s1, return_final_states=True, **kw)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), outs[0][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, outs[0][1], rtol=1e-10, atol=1e-10)


def test_float32_and_bfloat16_return_input_dtype():
    gen = torch.Generator().manual_seed(5)
    inputs = {k: v.detach() for k, v in random_inputs(gen, b=1, l=40, h=2, p=4, g=1, n=8, D_shape=(2,)).items()}
    y64 = chunk_scan(**inputs, chunk_size=16, dt_softplus=True)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        y = chunk_scan(**{k: v.to(dtype) for k, v in inputs.items()}, chunk_size=16, dt_softplus=True)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol * y64.abs().max().item())


def test_memory_is_linear_in_length():
    """Every intermediate saved for backward stays within L * chunk * heads elements; a single
    L x L buffer at L = 4096 would be 32x that bound."""
    L, h, cs = 4096, 2, 64
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    gen = torch.Generator().manual_seed(0)
    inputs = random_inputs(gen, b=1, l=L, h=h, p=2, g=1, n=4, dtype=torch.float32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = chunk_scan(**inputs, chunk_size=cs, dt_softplus=True)
    assert y.shape == (1, L, h, 2)
    assert sizes and max(sizes) <= L * cs * h


def test_bad_shapes_raise_clear_errors():
    x = torch.zeros(1, 8, 2, 3)
    B = torch.zeros(1, 8, 1, 4)
    with pytest.raises(ValueError, match="dt must have shape"):
        chunk_scan(x, torch.zeros(1, 8, 3), torch.zeros(2), B, B, 4)
    with pytest.raises(ValueError, match="B must be"):
        chunk_scan(x, torch.zeros(1, 8, 2), torch.zeros(2), torch.zeros(1, 8, 3, 4), B, 4)
    with pytest.raises(ValueError, match="D must have shape"):
        chunk_scan(x, torch.zeros(1, 8, 2), torch.zeros(2), B, B, 4, D=torch.zeros(3))


def test_fused_mode_without_mamba_ssm_is_a_one_line_error(monkeypatch):
    kernels.reset()
    # None in sys.modules makes the import raise ImportError (also for submodules left behind
    # by another test's failed import of mamba_ssm).
    for name in [n for n in sys.modules if n.split(".")[0] == "mamba_ssm"] + ["mamba_ssm"]:
        monkeypatch.setitem(sys.modules, name, None)
    x = torch.zeros(1, 4, 1, 1)
    B = torch.zeros(1, 4, 1, 1)
    try:
        with kernels.use("fused"), pytest.raises(RuntimeError, match="MAMBAMIA_KERNELS=fused: the SSD scan needs") as err:
            chunk_scan(x, torch.zeros(1, 4, 1), torch.zeros(1), B, B, 4)
        assert "\n" not in str(err.value)
    finally:
        kernels.reset()
