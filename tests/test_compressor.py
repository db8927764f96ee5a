"""The MambaMia compressor, its ablations and the token budget, checked against closed forms,
naive loops written here, and a second way of counting (running the model)."""
from __future__ import annotations

import math

import pytest
import torch

from model.ablations import AvgPoolStage
from model.budget import visual_token_count
from model.compressor import VideoCompressor
from model.config import (COMPRESSOR_KINDS, PAPER_FPS, PAPER_MAX_FRAMES, CompressorConfig,
                          VideoLLMConfig, paper_config)
from model.gpa import GatedPatchAggregation, MambaMiaBlock


def tiny(**kw) -> CompressorConfig:
    base = dict(input_dim=12, hidden_size=16, num_layers=2, k=4, taa_layers=1, keyframes=3,
                d_state=8, headdim=8, ssd_chunk_size=16, transformer_heads=2)
    base.update(kw)
    return CompressorConfig(**base)


def test_gpa_with_zeroed_layers_keeps_query_half_and_half_with_group_mean():
    torch.manual_seed(0)
    k, d = 5, 6
    gpa = GatedPatchAggregation(d, k, gate_eps=0.01).eval()
    for fc in (gpa.weight_fc, gpa.gate_fc):
        torch.nn.init.zeros_(fc.weight)
        torch.nn.init.zeros_(fc.bias)
    h = torch.randn(2, 3 * (k + 1), d)
    out = gpa(h).view(2, 3, k + 1, d)
    groups = h.view(2, 3, k + 1, d)
    # softmax(0) is uniform and the rescaled gate is 0.5*(1-2ε)+ε = 0.5 exactly.
    expected_q = 0.5 * groups[:, :, k] + 0.5 * groups[:, :, :k].mean(2)
    torch.testing.assert_close(out[:, :, k], expected_q)
    assert torch.equal(out[:, :, :k], groups[:, :, :k])


def test_gpa_matches_a_per_group_loop():
    torch.manual_seed(1)
    k, d, eps = 3, 4, 0.05
    gpa = GatedPatchAggregation(d, k, init_scale=1.0, gate_eps=eps).eval()
    h = torch.randn(1, 4 * (k + 1), d, dtype=torch.float64)
    gpa.double()
    out = gpa(h)
    w, bw = gpa.weight_fc.weight.detach(), gpa.weight_fc.bias.detach()
    wg, bg = gpa.gate_fc.weight.detach()[0], gpa.gate_fc.bias.detach()[0]
    for g in range(4):
        content = h[0, g * (k + 1): g * (k + 1) + k]
        q = h[0, g * (k + 1) + k]
        logits = [float(w[j] @ q + bw[j]) for j in range(k)]
        z = sum(math.exp(v) for v in logits)
        agg = sum(math.exp(logits[j]) / z * content[j] for j in range(k))
        gate = 1 / (1 + math.exp(-float(wg @ q + bg))) * (1 - 2 * eps) + eps
        torch.testing.assert_close(out[0, g * (k + 1) + k], (1 - gate) * q + gate * agg)


def test_block_residual_skips_gpa_and_only_query_slots_reach_the_mixer_changed():
    torch.manual_seed(2)
    k, d = 3, 16
    block = MambaMiaBlock(d, k=k, gpa=True, bidirectional=True, d_state=8, d_conv=4, expand=2,
                          headdim=8, ngroups=1, chunk_size=8, norm_eps=1e-5, init_scale=1.0,
                          gate_eps=0.01, gpa_dropout=0.0, residual_in_fp32=True).eval()
    seen = {}
    block.mixer.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    x = torch.randn(1, 5 * (k + 1), d)
    y, _ = block(x)
    torch.testing.assert_close(y, x + seen["out"])
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * block.norm.weight
    content = torch.ones(5, k + 1, dtype=torch.bool)
    content[:, k] = False
    content = content.flatten()
    torch.testing.assert_close(seen["inp"][0, content], normed[0, content])
    assert not torch.allclose(seen["inp"][0, ~content], normed[0, ~content])


@pytest.mark.parametrize("kind", COMPRESSOR_KINDS)
def test_output_length_equals_budget_for_every_kind(kind):
    # P = 10 is not a multiple of k = 4: each frame is padded to 12 patches, 3 anchors per frame.
    torch.manual_seed(3)
    cfg = tiny(kind=kind, patches_per_frame=10)
    model = VideoCompressor(cfg).eval()
    out = model(torch.randn(1, 7, 10, 12))
    assert out.tokens[0].shape == (3, 3, 16)
    assert visual_token_count(cfg, duration_s=7.0, fps=1.0, max_frames=64) == 3 * 3
    # A VideoLLM adds one separator per kept frame.
    llm_cfg = VideoLLMConfig(llm_path="unused", compressor=cfg)
    assert visual_token_count(llm_cfg, duration_s=7.0, fps=1.0, max_frames=64) == 3 * 4


def test_budget_follows_taa_pooling_and_short_videos_keep_every_frame():
    cfg = tiny(taa_k=2, patches_per_frame=10, keyframes=4)
    model = VideoCompressor(cfg).eval()
    for frames in (2, 6):
        tokens = model(torch.randn(1, frames, 10, 12)).tokens[0]
        # ceil(ceil(10/4)/2) = 2 tokens per frame; min(frames, 4) frames kept.
        assert tokens.shape[:2] == (min(frames, 4), 2)
        assert visual_token_count(cfg, frames, 1.0, 64) == tokens.shape[0] * tokens.shape[1]


def test_paper_budget_is_about_4_7k_for_an_hour():
    cfg = paper_config()
    n = visual_token_count(cfg, 3600.0, PAPER_FPS, PAPER_MAX_FRAMES)
    c = cfg.compressor
    # 256 frames sampled, 64 kept, 576/8 anchors each plus a separator.
    assert n == c.keyframes * (c.patches_per_frame // c.k + 1)
    assert 4600 <= n <= 4800
    # 30 s at 1 fps: 30 frames, fewer than the 64 keyframes, all kept.
    assert visual_token_count(cfg, 30.0, PAPER_FPS, PAPER_MAX_FRAMES) == 30 * 73


@pytest.mark.parametrize("kind", COMPRESSOR_KINDS)
def test_gradients_reach_every_parameter(kind):
    torch.manual_seed(4)
    model = VideoCompressor(tiny(kind=kind, taa_k=2)).train()
    out = model(torch.randn(2, 5, 8, 12), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]).bool())
    sum((t ** 2).sum() for t in out.tokens).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("keep_first_last", [False, True])
def test_delta_selection_keeps_highest_mean_delta_frames_in_temporal_order(keep_first_last):
    torch.manual_seed(5)
    n_frames, budget = 9, 4
    model = VideoCompressor(tiny(keyframes=budget, keep_first_last=keep_first_last)).eval()
    seen = {}
    model.taa.blocks[0].mixer.register_forward_hook(lambda m, a, out: seen.update(dt=out[1]))
    x = torch.randn(1, n_frames, 8, 12)
    out = model(x)
    scores = out.scores[0]
    # Score = mean Δ over the frame's anchors (8/4 = 2 per frame) and heads.
    torch.testing.assert_close(scores, seen["dt"][0].view(n_frames, 2, -1).mean((1, 2)))
    order = torch.argsort(scores, descending=True).tolist()
    if keep_first_last:
        middle = [i for i in order if i not in (0, n_frames - 1)]
        expected = sorted([0, n_frames - 1] + middle[: budget - 2])
    else:
        expected = sorted(order[:budget])
    assert out.kept[0].tolist() == expected
    # The tokens are the TAA outputs of exactly those frames.
    full = VideoCompressor(tiny(keyframes=n_frames)).eval()
    full.load_state_dict(model.state_dict())
    torch.testing.assert_close(out.tokens[0], full(x).tokens[0][expected])


def test_uniform_selection_picks_evenly_spaced_frames():
    model = VideoCompressor(tiny(frame_selection="uniform", keyframes=4, taa_layers=0)).eval()
    out = model(torch.randn(1, 12, 8, 12))
    # round(i * 11 / 3) for i = 0..3: 0, 3.67, 7.33, 11.
    assert out.kept[0].tolist() == [0, 4, 7, 11]
    assert out.scores[0] is None


@pytest.mark.parametrize("kind", ["mambamia", "transformer"])
def test_padding_frames_do_not_change_a_sample(kind):
    torch.manual_seed(6)
    model = VideoCompressor(tiny(kind=kind, keyframes=3)).eval()
    a, b = torch.randn(5, 8, 12), torch.randn(4, 8, 12)
    padded = torch.stack([a, torch.cat([b, 1e3 * torch.randn(1, 8, 12)])])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]).bool()
    batch = model(padded, mask)
    alone = model(b[None])
    torch.testing.assert_close(batch.tokens[1], alone.tokens[0])
    assert batch.kept[1].tolist() == alone.kept[0].tolist()
    torch.testing.assert_close(batch.tokens[0], model(a[None]).tokens[0])


def test_avgpool_is_the_mean_of_real_tokens_of_each_group():
    frames = torch.randn(2, 7, 3)
    out, _ = AvgPoolStage(3)(frames)
    expected = torch.stack([frames[:, 0:3].mean(1), frames[:, 3:6].mean(1), frames[:, 6:7].mean(1)], 1)
    torch.testing.assert_close(out, expected)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(7)
    plain = VideoCompressor(tiny(gpa_dropout=0.0)).train()
    ckpt = VideoCompressor(tiny(gpa_dropout=0.0, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 5, 8, 12)
    grads, calls = [], []
    for m in (plain, ckpt):
        count = [0]
        # A pre-hook: the recompute stops early once it has what backward needs.
        m.spatial.blocks[0].register_forward_pre_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        sum(t.pow(2).sum() for t in m(x).tokens).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
        calls.append(count[0])
    assert calls == [1, 2]  # the checkpointed block is recomputed in backward
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_config_round_trip_and_clear_errors():
    cfg = paper_config()
    assert VideoLLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        CompressorConfig.from_dict({"kk": 3})
    with pytest.raises(TypeError, match=r"CompressorConfig\.k: expected int"):
        CompressorConfig.from_dict({"k": 2.5})
    with pytest.raises(ValueError, match="kind"):
        CompressorConfig(kind="lstm")
    with pytest.raises(ValueError, match="taa_layers"):
        CompressorConfig(taa_layers=0)
    with pytest.raises(ValueError, match="features must be"):
        VideoCompressor(tiny(patches_per_frame=10))(torch.randn(1, 2, 8, 12))


@pytest.mark.parametrize("kind", ["mambamia", "causal_mambamia"])
def test_spatial_scan_spans_frames_and_causal_variant_never_looks_ahead(kind):
    # One sequence per video (no reset per frame): editing frame 2 moves frame 0's anchors only
    # through the backward scan, and a later frame always sees an earlier one.
    torch.manual_seed(8)
    stage = VideoCompressor(tiny(kind=kind)).eval().spatial
    x = torch.randn(4, 8, 16)
    edited = x.clone()
    edited[2] += 1.0
    before, _ = stage(x)
    after, _ = stage(edited)
    assert torch.equal(before[0], after[0]) == (kind == "causal_mambamia")
    x0 = x.clone()
    x0[0] += 1.0
    assert not torch.allclose(stage(x0)[0][3], before[3])
