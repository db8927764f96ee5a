"""Kernel cases run by tests/test_kernels.py in a process of their own, under Triton's interpreter.

mamba_ssm's real Triton kernels run on CPU tensors here (tests/support/triton_cpu.py sets that up
when this module is imported, which is why it is never imported by the main test run: the file name
keeps pytest from collecting it). With MAMBAMIA_KERNEL_DEVICE=cuda (bench/gpu_check.py) the same cases
run on a GPU instead, the real kernels compiled, with GPU tolerances. Each case compares, forward and backward, the fused path, our
PyTorch reference and a float64 oracle written in the tests (tests/test_ssd.naive_scan, the mixer
composition of tests/test_mixer). Run them alone:

    python -m pytest tests/kernel_cases.py -q          # or: python -m pytest -m kernels
"""
from __future__ import annotations

import math
import os
import types

from tests.support import triton_cpu

ON_CUDA = os.environ.get("MAMBAMIA_KERNEL_DEVICE", "cpu") == "cuda"
if ON_CUDA:
    triton_cpu.register_bare_mamba_ssm()
else:
    triton_cpu.enable()
triton_cpu.register_causal_conv1d_standin()

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import kernels  # noqa: E402
from model.compressor import VideoCompressor  # noqa: E402
from model.config import CompressorConfig  # noqa: E402
from model.mixer import Mamba2Mixer, RMSNormGated  # noqa: E402
from model.ssd import chunk_scan  # noqa: E402
from tests.test_mixer import _one_direction, _randomize  # noqa: E402
from tests.test_ssd import naive_scan  # noqa: E402

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
# Max |got - float64 oracle| relative to max |oracle|. The kernels compute in float32 (measured
# ~1e-6 relative under the interpreter); float16 inputs and outputs round to ~5e-4; on a GPU their
# float32 dots may run as TF32 (~1e-3). An argument passed wrongly at a call site gives errors of
# order 1.
REL_TOL = ({torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 5e-2} if ON_CUDA
           else {torch.float32: 2e-4, torch.float16: 1e-2})
LOSS_RTOL = 1e-2 if ON_CUDA else 1e-4


def assert_close_rel(label: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Max abs difference within REL_TOL[dtype] of the reference's largest magnitude."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    diff = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-6)
    assert diff <= REL_TOL[dtype] * scale, f"{label}: max abs diff {diff:.3e} > {REL_TOL[dtype]:.0e} * {scale:.3e}"


def _scan_inputs(gen, *, b, l, h, p, g, n, dtype, D_shape, seq_break=None):
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    inputs = {
        "x": rnd(b, l, h, p).to(dtype), "dt": rnd(b, l, h, scale=0.5).to(dtype),
        "A": -(torch.rand(h, generator=gen, dtype=torch.float64) * 2 + 0.1).float(),
        "B": rnd(b, l, g, n, scale=0.5).to(dtype), "C": rnd(b, l, g, n, scale=0.5).to(dtype),
        "D": rnd(*D_shape).float(), "z": rnd(b, l, h, p).to(dtype),
        "dt_bias": rnd(h, scale=0.3).float(), "initial_states": rnd(b, h, p, n, scale=0.3).float(),
    }
    seq_idx = None
    if seq_break is not None:  # two packed sequences per row, the first from the initial state
        seq_idx = torch.zeros(b, l, dtype=torch.int32)
        seq_idx[:, seq_break:] = 1
        seq_idx = seq_idx.to(DEVICE)
    return {k: v.to(DEVICE) for k, v in inputs.items()}, seq_idx


def _scan_outputs(fn, inputs, seq_idx, kw):
    """y, final states and the gradients of a fixed random projection of both, for every input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, final = fn(**leaves, seq_idx=seq_idx, return_final_states=True, **kw)
    gen = torch.Generator().manual_seed(99)
    w_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device)
    w_s = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(y.device)
    ((y.double() * w_y).sum() + (final.double() * w_s).sum()).backward()
    return {"y": y, "final_states": final, **{f"grad {k}": v.grad for k, v in leaves.items()}}


def _oracle(inputs, seq_idx, kw):
    """naive_scan in float64 on the CPU (it builds CPU tensors), from the same (rounded) inputs."""
    def fn(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, return_final_states, chunk_size, **rest):
        return naive_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                          seq_idx=None if seq_idx is None else seq_idx.long(), **rest)

    return _scan_outputs(fn, {k: v.double().cpu() for k, v in inputs.items()},
                         None if seq_idx is None else seq_idx.cpu(), kw)


def check_scan(inputs, seq_idx, kw, dtype, *, mode="fused"):
    """Fused and reference against the float64 oracle, forward and backward; raises on a mismatch."""
    want = _oracle(inputs, seq_idx, kw)
    for impl in (mode, "reference"):
        with kernels.use(impl):
            got = _scan_outputs(chunk_scan, inputs, seq_idx, kw)
        assert got["y"].dtype == dtype
        for name in want:
            assert_close_rel(f"{impl} {name}", got[name], want[name], dtype)


# Each case: (dtype, sizes, D shape, packed break, keyword arguments). Together they cover D [h] and
# [h, p], z, dt_bias, dt_softplus, dt_limit, initial and final states, seq_idx, groups fewer than
# heads, and lengths not divisible by chunk_size.
SCAN_CASES = {
    "fp32-groups-z-softplus": (torch.float32, dict(b=2, l=45, h=4, p=8, g=2, n=8), (4,), None,
                               dict(chunk_size=16, dt_softplus=True)),
    "fp32-Dhp-limit-seqidx": (torch.float32, dict(b=1, l=40, h=2, p=8, g=1, n=16), (2, 8), 23,
                              dict(chunk_size=16, dt_softplus=True, dt_limit=(0.05, 0.8))),
    "fp16-groups-z-softplus": (torch.float16, dict(b=1, l=37, h=4, p=16, g=2, n=16), (4,), None,
                               dict(chunk_size=16, dt_softplus=True)),
}
if ON_CUDA:  # bfloat16 dots are wrong in Triton's interpreter (ENVIRONMENT.md): GPU only
    SCAN_CASES["bf16-groups-z-softplus"] = (torch.bfloat16, *SCAN_CASES["fp16-groups-z-softplus"][1:])


@pytest.mark.parametrize("case", sorted(SCAN_CASES))
def test_ssd_scan_fused_reference_oracle(case):
    dtype, sizes, D_shape, seq_break, kw = SCAN_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    inputs, seq_idx = _scan_inputs(gen, **sizes, dtype=dtype, D_shape=D_shape, seq_break=seq_break)
    check_scan(inputs, seq_idx, kw, dtype)


def _gated_norm_oracle(x, z, weight, group_size, eps, norm_before_gate):
    gate = z * torch.sigmoid(z)
    v = (x if norm_before_gate else x * gate).unflatten(-1, (-1, group_size))
    normed = (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    return weight * (normed * gate if norm_before_gate else normed)


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_norm_fused_reference_oracle(norm_before_gate):
    gen = torch.Generator().manual_seed(5)
    x, z = torch.randn(2, 7, 24, generator=gen).to(DEVICE), torch.randn(2, 7, 24, generator=gen).to(DEVICE)
    w_out = torch.randn(2, 7, 24, generator=gen, dtype=torch.float64).to(DEVICE)
    norm = RMSNormGated(24, group_size=8, eps=1e-5, norm_before_gate=norm_before_gate)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
    norm.to(DEVICE)

    def run(fn, x, z, weight):
        x, z = (t.detach().clone().requires_grad_() for t in (x, z))
        weight = torch.nn.Parameter(weight.detach().clone())
        y = fn(x, z, weight)
        (y.double() * w_out).sum().backward()
        return [y, x.grad, z.grad, weight.grad]

    def ours(impl):
        def fn(x, z, weight):
            norm.weight = weight
            with kernels.use(impl):
                return norm(x, z)
        return fn

    norm.weight.requires_grad_(False)
    want = run(lambda x, z, w: _gated_norm_oracle(x, z, w, 8, 1e-5, norm_before_gate),
               x.double(), z.double(), norm.weight.double())
    for impl in ("fused", "reference"):
        got = run(ours(impl), x, z, norm.weight)
        for label, g, expected in zip(("y", "grad x", "grad z", "grad weight"), got, want):
            assert_close_rel(f"{impl} norm_before_gate={norm_before_gate} {label}", g, expected, torch.float32)


SIZES = dict(d_model=16, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=8)  # 4 heads


def _mixer_oracle(mixer, h, norm_before_gate):
    """The bidirectional mixer composed in float64 from the naive recurrence (tests/test_mixer.py)."""
    m = {k: v.double().cpu() for k, v in mixer.state_dict().items()}

    def direction(zxbcdt, suffix):
        conv = types.SimpleNamespace(weight=m[f"conv1d{suffix}.weight"], bias=m[f"conv1d{suffix}.bias"])
        a_log = m["A_b_log" if suffix else "A_log"]
        return _one_direction(zxbcdt, conv, m[f"dt_bias{suffix}"], a_log, m[f"D{suffix}"],
                              m[f"norm{suffix}.weight"], norm_before_gate=norm_before_gate)

    zxbcdt = F.linear(h, m["in_proj.weight"])
    y = direction(zxbcdt, "") + direction(zxbcdt.flip(1), "_b").flip(1)
    return F.linear(y, m["out_proj.weight"])


def _mixer_outputs(mixer, h, impl):
    mixer.zero_grad()
    leaf = h.detach().clone().requires_grad_()
    with kernels.use(impl):
        y, delta = mixer(leaf, return_dt=True)
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64, device=y.device).view(y.shape)
    (y.double() * weights).sum().backward()
    return y, delta, leaf.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()}


def check_mixer(mixer, h, norm_before_gate):
    """Fused and reference mixer against the float64 composition (forward) and each other (backward)."""
    want = _mixer_oracle(mixer, h.double().cpu(), norm_before_gate)
    fused, ref = _mixer_outputs(mixer, h, "fused"), _mixer_outputs(mixer, h, "reference")
    for impl, got in (("fused", fused), ("reference", ref)):
        assert_close_rel(f"{impl} mixer y", got[0], want, torch.float32)
    torch.testing.assert_close(fused[1], ref[1])
    assert_close_rel("mixer grad input", fused[2], ref[2], torch.float32)
    for name in sorted(fused[3]):
        assert_close_rel(f"mixer grad {name}", fused[3][name], ref[3][name], torch.float32)


@pytest.mark.parametrize("path,norm_before_gate", [
    ("split_conv1d", True), ("split_conv1d", False), ("conv1d_then_kernels", False)])
def test_bidirectional_mixer_fused_reference_oracle(path, norm_before_gate, monkeypatch):
    """Both fused mixer paths: mamba_split_conv1d_scan_combined (with the causal_conv1d stand-in,
    exercising our conv weight layout, norm weight, dt_limit, headdim, ngroups, norm order), and a
    PyTorch conv1d followed by the fused SSD scan and gated norm (no causal_conv1d)."""
    kernels.reset()
    if path == "conv1d_then_kernels":
        monkeypatch.setitem(kernels._loaded, kernels.SPLIT_CONV1D, (None, kernels.NO_CAUSAL_CONV1D))
    torch.manual_seed(3)
    mixer = Mamba2Mixer(**SIZES, bidirectional=True, norm_before_gate=norm_before_gate,
                        dt_limit=(0.0, 2.0))
    _randomize(mixer, seed=4)
    h = torch.randn(2, 19, 16, generator=torch.Generator().manual_seed(6))
    check_mixer(mixer.to(DEVICE), h.to(DEVICE), norm_before_gate)


def _flip_arg(piece, change):
    """Wrap the real kernel of `piece` so that one argument reaches it wrongly."""
    real = kernels._load(piece)[0]

    def broken(*args, **kwargs):
        args, kwargs = change(list(args), dict(kwargs))
        return real(*args, **kwargs)
    return broken


def _invert_norm_order(args, kwargs):
    kwargs["norm_before_gate"] = not kwargs["norm_before_gate"]
    return args, kwargs


def _swap_b_c(args, kwargs):
    args[3], args[4] = args[4], args[3]
    return args, kwargs


def test_a_broken_call_site_is_detected(monkeypatch):
    """The comparisons above fail when one argument of a fused call site is wrong."""
    kernels.reset()
    monkeypatch.setitem(kernels._loaded, kernels.SPLIT_CONV1D, (_flip_arg(kernels.SPLIT_CONV1D, _invert_norm_order), ""))
    torch.manual_seed(3)
    mixer = Mamba2Mixer(**SIZES, bidirectional=True)
    _randomize(mixer, seed=4)
    with pytest.raises(AssertionError, match="fused mixer y"):
        check_mixer(mixer.to(DEVICE), torch.randn(1, 11, 16, device=DEVICE), norm_before_gate=True)

    monkeypatch.setitem(kernels._loaded, kernels.SSD_SCAN, (_flip_arg(kernels.SSD_SCAN, _swap_b_c), ""))
    dtype, sizes, D_shape, seq_break, kw = SCAN_CASES["fp32-groups-z-softplus"]
    inputs, seq_idx = _scan_inputs(torch.Generator().manual_seed(1), **sizes, dtype=dtype, D_shape=D_shape)
    with pytest.raises(AssertionError, match="fused y"):
        check_scan(inputs, seq_idx, kw, dtype)


def _tiny_compressor() -> VideoCompressor:
    config = CompressorConfig(input_dim=12, hidden_size=16, num_layers=1, k=4, taa_layers=1, keyframes=2,
                              d_state=8, headdim=8, ngroups=2, ssd_chunk_size=16, gpa_dropout=0.0)
    torch.manual_seed(0)
    return VideoCompressor(config)


def _train(impl: str, steps: int):
    """A few AdamW steps of a tiny MambaMia compressor; per step the loss, kept frames, Δ scores and
    (first step) the gradients."""
    model = _tiny_compressor().to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    features = torch.randn(1, 5, 6, 12, generator=gen)  # 5 frames of 6 patches (padded to 8 = 2 groups)
    target = torch.randn(2, 2, 16, generator=gen)
    features, target = features.to(DEVICE), target.to(DEVICE)
    history = []
    with kernels.use(impl):
        for _ in range(steps):
            out = model(features)
            loss = F.mse_loss(out.tokens[0], target)
            optimizer.zero_grad()
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            optimizer.step()
            history.append((loss.item(), out.kept[0].tolist(), out.scores[0], grads))
    return history


def test_fused_mode_trains_a_tiny_compressor_like_reference():
    """MAMBAMIA_KERNELS=fused (set by the launching test) trains the compressor with the losses of
    the reference path within float32 tolerance; Δ scores, kept frames and gradients agree."""
    assert os.environ.get(kernels.ENV_VAR) == "fused"
    kernels.reset()
    assert kernels.mode() == "fused"
    fused = _train("fused", steps=3)
    reference = _train("reference", steps=3)
    for step, (f, r) in enumerate(zip(fused, reference)):
        assert math.isclose(f[0], r[0], rel_tol=LOSS_RTOL), f"step {step}: loss {f[0]} vs {r[0]}"
        assert f[1] == r[1], f"step {step}: kept frames {f[1]} vs {r[1]}"
        assert_close_rel(f"step {step} delta scores", f[2], r[2], torch.float32)
    for name in sorted(reference[0][3]):
        assert_close_rel(f"step 0 grad {name}", fused[0][3][name], reference[0][3][name], torch.float32)
