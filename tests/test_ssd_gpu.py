"""GPU tier: mamba_ssm's fused kernels against our PyTorch paths, forward and backward.

Run on a CUDA machine with mamba_ssm installed: `python -m pytest tests/test_ssd_gpu.py -m gpu -s`
(-s shows the max abs differences). Skipped everywhere else.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from model import kernels, ssd
from model.mixer import Mamba2Mixer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Max |fused - reference| allowed, relative to max |reference|: the kernel keeps some operands in
# the input dtype (and its float32 dots may run as TF32) while our reference computes everything
# in float32. A semantic mismatch shows as an error of order 1.
REL_TOL = {torch.float32: 1e-2, torch.bfloat16: 5e-2}


@pytest.fixture(scope="module")
def ssd_combined():
    # The SSD Triton kernels do not use mamba_ssm's selective-scan CUDA extension, but the
    # package __init__ imports it; a Triton-only install (no compiled extension) gets a stub.
    if "selective_scan_cuda" not in sys.modules:
        try:
            import selective_scan_cuda  # noqa: F401
        except ImportError:
            sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    return pytest.importorskip("mamba_ssm.ops.triton.ssd_combined")


@pytest.fixture(autouse=True)
def _fresh_dispatch():
    """Forget any dispatch decision made before the stub above existed; auto mode."""
    kernels.reset()
    with kernels.use("auto"):
        yield
    kernels.reset()


def _report(label: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    diff = (got.float() - want.float()).abs()
    scale = want.float().abs().max().clamp(min=1e-6)
    print(f"{label}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}, "
          f"max |ref| {scale.item():.3e}")
    assert diff.max() <= REL_TOL[dtype] * scale, label


def _scan_inputs(dtype, *, b=2, l=1000, h=8, p=64, g=2, n=64):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    return {
        "x": rnd(b, l, h, p), "dt": rnd(b, l, h, scale=0.5),
        "A": -torch.rand(h, generator=gen, device="cuda") * 2 - 0.1,  # the kernel wants float32 A
        "B": rnd(b, l, g, n, scale=0.3), "C": rnd(b, l, g, n, scale=0.3),
        "D": rnd(h).float(), "z": rnd(b, l, h, p), "dt_bias": rnd(h, scale=0.3).float(),
        "initial_states": rnd(b, h, p, n, scale=0.1).float(),
    }


def _forward_backward(fn, inputs, **kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, final = fn(**leaves, chunk_size=256, dt_softplus=True, return_final_states=True, **kw)
    gen = torch.Generator(device="cuda").manual_seed(1)
    w_y = torch.randn(y.shape, generator=gen, device="cuda")
    w_s = torch.randn(final.shape, generator=gen, device="cuda")
    ((y.float() * w_y).sum() + (final.float() * w_s).sum()).backward()
    return y, final, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_chunk_scan_matches_reference(ssd_combined, dtype):
    inputs = _scan_inputs(dtype)
    y, final, grads = _forward_backward(ssd_combined.mamba_chunk_scan_combined, inputs)
    y_ref, final_ref, grads_ref = _forward_backward(ssd.chunk_scan_reference, inputs)
    assert y.dtype == y_ref.dtype == dtype
    _report(f"{dtype} y", y, y_ref, dtype)
    _report(f"{dtype} final_states", final, final_ref, dtype)
    for name in sorted(grads):
        _report(f"{dtype} grad {name}", grads[name], grads_ref[name], dtype)


def test_chunk_scan_dispatches_to_fused_kernel_on_cuda(ssd_combined, monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return ssd_combined.mamba_chunk_scan_combined(*args, **kwargs)

    monkeypatch.setitem(kernels._loaded, kernels.SSD_SCAN, (spy, ""))
    inputs = {k: v.detach() for k, v in _scan_inputs(torch.bfloat16, l=300).items()}
    seq_idx = torch.zeros(2, 300, dtype=torch.int32, device="cuda")
    seq_idx[:, 170:] = 1
    kw = dict(chunk_size=64, dt_softplus=True, seq_idx=seq_idx)
    got = ssd.chunk_scan(**inputs, **kw)
    assert len(calls) == 1 and calls[0]["seq_idx"] is seq_idx
    _report("bf16 seq_idx y", got, ssd.chunk_scan_reference(**inputs, **kw), torch.bfloat16)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fused_mixer_matches_reference(ssd_combined, bidirectional):
    if kernels._load(kernels.SPLIT_CONV1D)[0] is None:
        pytest.skip("causal_conv1d is not installed: the mixer's split-conv1d kernel is unavailable")
    torch.manual_seed(0)
    mixer = Mamba2Mixer(256, d_state=64, headdim=64, bidirectional=bidirectional).cuda()
    h = torch.randn(2, 700, 256, device="cuda")
    outputs = {}
    for impl in ("fused", "reference"):
        mixer.zero_grad()
        leaf = h.clone().requires_grad_()
        with kernels.use(impl):
            y, delta = mixer(leaf, return_dt=True)
        (y * torch.linspace(-1, 1, y.shape[-1], device="cuda")).sum().backward()
        outputs[impl] = (y, delta, leaf.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()})
    fast, ref = outputs["fused"], outputs["reference"]
    _report("mixer y", fast[0], ref[0], torch.float32)
    torch.testing.assert_close(fast[1], ref[1])
    _report("mixer grad input", fast[2], ref[2], torch.float32)
    for name in sorted(fast[3]):
        _report(f"mixer grad {name}", fast[3][name], ref[3][name], torch.float32)
