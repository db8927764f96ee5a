"""Mamba2Mixer against transformers' Mamba2Mixer (torch path) and against a composition written here."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

from model import kernels
from model.mixer import Mamba2Mixer, RMSNormGated
from tests.test_ssd import naive_scan

SIZES = dict(d_model=16, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=8)  # 4 heads


@pytest.fixture(autouse=True)
def _reference_paths():
    with kernels.use("reference"):
        yield


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its structured init (ones, log(1..H)) so a mix-up would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)


def _hf_mixer() -> HFMamba2Mixer:
    config = Mamba2Config(hidden_size=16, num_heads=4, head_dim=8, expand=2, state_size=8, n_groups=2,
                          conv_kernel=4, chunk_size=8, num_hidden_layers=1, layer_norm_epsilon=1e-5,
                          use_bias=False, use_conv_bias=True)
    return HFMamba2Mixer(config, layer_idx=0)


def test_causal_mixer_equals_transformers_mixer_with_same_weights():
    torch.manual_seed(0)
    ours = Mamba2Mixer(**SIZES, norm_before_gate=False).double()  # transformers gates first
    _randomize(ours, seed=1)
    theirs = _hf_mixer().double().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)

    h = torch.randn(2, 21, 16, dtype=torch.float64, requires_grad=True)  # 21: not a multiple of 8
    y, delta = ours(h, return_dt=True)
    y_hf = theirs(h)
    # transformers computes the scan and the norm in float32 even for float64 modules.
    torch.testing.assert_close(y, y_hf, rtol=1e-5, atol=1e-6)

    weights = torch.randn_like(y)
    names = sorted(name for name, _ in ours.named_parameters())
    ours_p, theirs_p = dict(ours.named_parameters()), dict(theirs.named_parameters())
    grads = torch.autograd.grad((y * weights).sum(), [h] + [ours_p[n] for n in names])
    grads_hf = torch.autograd.grad((y_hf * weights).sum(), [h] + [theirs_p[n] for n in names])
    for name, got, want in zip(["input", *names], grads, grads_hf):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")

    dt_raw = F.linear(h, ours.in_proj.weight)[..., -4:]
    torch.testing.assert_close(delta, torch.log1p(torch.exp(dt_raw + ours.dt_bias)), rtol=1e-6, atol=1e-7)

    # And the other way: transformers' weights load into ours unchanged.
    reloaded = Mamba2Mixer(**SIZES, norm_before_gate=False).double()
    reloaded.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(reloaded(h), y, rtol=1e-12, atol=1e-12)


def _causal_conv_silu(u, weight, bias):
    """u [B, L, C], weight [C, 1, K]: out_t = silu(bias + sum_j w_j u_{t-K+1+j}), zeros before t=0."""
    K = weight.shape[-1]
    padded = F.pad(u, (0, 0, K - 1, 0))
    out = bias + sum(weight[:, 0, j] * padded[:, j:j + u.shape[1]] for j in range(K))
    return out * torch.sigmoid(out)


def _gated_rmsnorm(y, z, weight, groups, eps, norm_before_gate):
    """Closed form: w * rms(y) * silu(z) (norm first) or w * rms(y * silu(z)) (gate first), per group."""
    gate = z * torch.sigmoid(z)

    def rms(v):
        v = v.unflatten(-1, (groups, -1))
        return (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)

    return weight * (rms(y) * gate if norm_before_gate else rms(y * gate))


def _one_direction(zxbcdt, conv, dt_bias, A_log, D, norm_weight, *, norm_before_gate, inner=32, heads=4,
                   groups=2, state=8):
    b, l, _ = zxbcdt.shape
    z, xBC, dt = zxbcdt.split([inner, inner + 2 * groups * state, heads], dim=-1)
    xBC = _causal_conv_silu(xBC, conv.weight, conv.bias)
    x, B, C = xBC.split([inner, groups * state, groups * state], dim=-1)
    y, _ = naive_scan(x.reshape(b, l, heads, -1), dt, -torch.exp(A_log), B.reshape(b, l, groups, state),
                      C.reshape(b, l, groups, state), D=D, dt_bias=dt_bias, dt_softplus=True)
    return _gated_rmsnorm(y.reshape(b, l, inner), z, norm_weight, groups, 1e-5, norm_before_gate)


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_bidirectional_mixer_equals_composition_from_naive_recurrence(norm_before_gate):
    torch.manual_seed(2)
    mixer = Mamba2Mixer(**SIZES, bidirectional=True, norm_before_gate=norm_before_gate).double()
    _randomize(mixer, seed=3)
    h = torch.randn(2, 13, 16, dtype=torch.float64)
    y, delta = mixer(h, return_dt=True)

    zxbcdt = F.linear(h, mixer.in_proj.weight)
    y_f = _one_direction(zxbcdt, mixer.conv1d, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight,
                         norm_before_gate=norm_before_gate)
    y_b = _one_direction(zxbcdt.flip(1), mixer.conv1d_b, mixer.dt_bias_b, mixer.A_b_log, mixer.D_b,
                         mixer.norm_b.weight, norm_before_gate=norm_before_gate)
    expected = F.linear(y_f + y_b.flip(1), mixer.out_proj.weight)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-10)

    # Δ of the backward scan, computed in its own (reversed) time order and then reversed back.
    dt_raw = zxbcdt[..., -4:]
    delta_f = torch.log1p(torch.exp(dt_raw + mixer.dt_bias))
    delta_b = torch.log1p(torch.exp(dt_raw.flip(1) + mixer.dt_bias_b)).flip(1)
    torch.testing.assert_close(delta, (delta_f + delta_b) / 2, rtol=1e-6, atol=1e-7)


def test_backward_direction_matters_and_is_anticausal():
    """Changing the last token moves the first output only in the bidirectional mixer."""
    torch.manual_seed(4)
    h = torch.randn(1, 10, 16)
    h2 = h.clone()
    h2[:, -1] += 1.0
    causal = Mamba2Mixer(**SIZES)
    bidir = Mamba2Mixer(**SIZES, bidirectional=True)
    torch.testing.assert_close(causal(h)[:, :-1], causal(h2)[:, :-1])
    assert (bidir(h)[:, 0] - bidir(h2)[:, 0]).abs().max() > 1e-4


def test_gradients_reach_every_parameter():
    torch.manual_seed(5)
    mixer = Mamba2Mixer(**SIZES, bidirectional=True, bias=True)
    y = mixer(torch.randn(2, 11, 16))
    (y * torch.randn_like(y)).sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_init_follows_the_paper_and_marks_no_weight_decay():
    torch.manual_seed(6)
    mixer = Mamba2Mixer(d_model=64, d_state=16, headdim=16, bidirectional=True)  # 8 heads
    for suffix, a_log in (("", mixer.A_log), ("_b", mixer.A_b_log)):
        dt = F.softplus(getattr(mixer, "dt_bias" + suffix))
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
        torch.testing.assert_close(a_log, torch.tensor([math.log(i) for i in range(1, 9)]))
        torch.testing.assert_close(getattr(mixer, "D" + suffix), torch.ones(8))
    no_decay = {name for name, p in mixer.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert no_decay == {"dt_bias", "A_log", "D", "dt_bias_b", "A_b_log", "D_b"}


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_norm_both_orders_against_closed_form(norm_before_gate):
    torch.manual_seed(7)
    norm = RMSNormGated(12, group_size=4, eps=1e-6, norm_before_gate=norm_before_gate).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, z = torch.randn(3, 12, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    # One group by hand: rms over its 4 channels, silu(z) = z sigmoid(z) applied before or after.
    gate = z * torch.sigmoid(z)
    v = x if norm_before_gate else x * gate
    expected = torch.empty_like(x)
    for g in range(3):
        chunk = v[:, 4 * g:4 * g + 4]
        expected[:, 4 * g:4 * g + 4] = chunk / torch.sqrt((chunk * chunk).sum(-1, keepdim=True) / 4 + 1e-6)
    expected = norm.weight * (expected * gate if norm_before_gate else expected)
    torch.testing.assert_close(norm(x, z), expected)
    # The two orders differ (a test of one would not pass for the other).
    other = RMSNormGated(12, group_size=4, eps=1e-6, norm_before_gate=not norm_before_gate).double()
    other.load_state_dict(norm.state_dict())
    assert (other(x, z) - expected).abs().max() > 1e-2


def test_compressor_config_sets_every_mixer_norm_order():
    from model.compressor import VideoCompressor
    from model.config import CompressorConfig

    assert CompressorConfig().norm_before_gate is True  # the official MambaMia default (paper.md)
    for flag in (True, False):
        config = CompressorConfig(input_dim=8, hidden_size=16, num_layers=1, k=4, keyframes=2, d_state=4,
                                  headdim=8, norm_before_gate=flag)
        norms = [m for m in VideoCompressor(config).modules() if isinstance(m, RMSNormGated)]
        assert len(norms) == 4 and all(n.norm_before_gate is flag for n in norms)  # 2 stages x 2 directions


def test_bad_config_and_input_raise():
    with pytest.raises(ValueError, match="multiple of headdim"):
        Mamba2Mixer(d_model=10, headdim=8)
    with pytest.raises(ValueError, match="ngroups 3 must divide"):
        Mamba2Mixer(d_model=16, headdim=8, ngroups=3)
    with pytest.raises(ValueError, match=r"hidden_states \[batch, seqlen, 16\]"):
        Mamba2Mixer(**SIZES)(torch.zeros(2, 5, 8))
