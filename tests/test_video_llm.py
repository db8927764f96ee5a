"""The video LLM end to end on CPU with the tiny local tokenizer and LLMs (nothing downloaded).

Oracles: a splice rebuilt by hand in the test and fed to the LLM directly, cross-entropy computed
here, a greedy decoding loop through forward(), and the token budget function.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from model.budget import visual_token_count
from model.config import CompressorConfig, VideoLLMConfig
from model.video_llm import VideoLLM

PATCHES, FEAT_DIM = 16, 32


def config(llm_path, **kw) -> VideoLLMConfig:
    comp = CompressorConfig(input_dim=FEAT_DIM, patches_per_frame=PATCHES, hidden_size=32,
                            num_layers=1, k=4, taa_layers=1, keyframes=3, d_state=8, headdim=16,
                            ssd_chunk_size=32, **kw.pop("compressor", {}))
    return VideoLLMConfig(llm_path=str(llm_path), compressor=comp, **kw)


def make_batch(tokenizer, seed=0):
    """Two right-padded chat samples of different lengths; labels on the answers only."""
    torch.manual_seed(seed)
    rows = []
    for question, answer in [("What colour is the shape?", "red"),
                             ("Which shape appears briefly in the video?", "a blue star")]:
        user = [{"role": "user", "content": "<video>\n" + question}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                             tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        ids = tokenizer(full, add_special_tokens=False).input_ids
        rows.append((ids, len(p_ids), p_ids))
    length = max(len(r[0]) for r in rows)
    input_ids = torch.full((2, length), tokenizer.pad_token_id)
    attention_mask = torch.zeros(2, length, dtype=torch.long)
    labels = torch.full((2, length), -100)
    for b, (ids, n_prompt, _) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        labels[b, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
    features = torch.randn(2, 5, PATCHES, FEAT_DIM)
    frame_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    prompts = [r[2] for r in rows]
    return input_ids, attention_mask, labels, features, frame_mask, prompts


@pytest.fixture(scope="module")
def qwen(tiny_assets):
    torch.manual_seed(0)
    return VideoLLM.build(config(tiny_assets["llm"]))


def manual_splice(model, ids, labels, feats):
    """One sample, unpadded: text embeddings around the projected kept-frame tokens + separators."""
    vid = model.config.video_token_id
    p = ids.tolist().index(vid)
    tokens = model.compressor(feats[None]).tokens[0]  # [N, T, H]
    visual = model.projector(tokens)
    sep = model.frame_separator.expand(visual.shape[0], 1, -1)
    visual = torch.cat([visual, sep], 1).flatten(0, 1)
    emb = model.llm.get_input_embeddings()
    embeds = torch.cat([emb(ids[:p]), visual, emb(ids[p + 1:])])
    lab = torch.cat([labels[:p], torch.full((visual.shape[0],), -100), labels[p + 1:]])
    return embeds, lab


def test_forward_equals_a_manual_splice_and_loss_is_mean_ce(qwen):
    model = qwen.eval()
    ids, am, labels, feats, fm, _ = make_batch(model.tokenizer)
    with torch.no_grad():
        out = model(ids, am, feats, fm, labels)
        shifted_logits, shifted_labels = [], []
        for b in range(2):
            valid = am[b].bool()
            embeds, lab = manual_splice(model, ids[b][valid], labels[b][valid], feats[b][fm[b]])
            n = embeds.shape[0]
            ref = model.llm(inputs_embeds=embeds[None]).logits[0]
            torch.testing.assert_close(out.logits[b, :n], ref, atol=1e-5, rtol=1e-4)
            assert torch.equal(out.labels[b, :n], lab)
            assert (out.labels[b, n:] == -100).all() and (out.attention_mask[b, n:] == 0).all()
            assert out.attention_mask[b, :n].all()
            frames = int(fm[b].sum())
            budget = visual_token_count(model.config, frames, 1.0, 64)
            assert n == int(valid.sum()) - 1 + budget
            shifted_logits.append(ref[:-1])
            shifted_labels.append(lab[1:])
        ce = F.cross_entropy(torch.cat(shifted_logits), torch.cat(shifted_labels), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce, atol=1e-5, rtol=1e-5)
    assert [k.tolist() for k in out.kept_frames][1] == [0, 1]


def test_backward_reaches_every_parameter_and_groups_partition_them(qwen):
    model = qwen.train()
    model.zero_grad()
    ids, am, labels, feats, fm, _ = make_batch(model.tokenizer)
    model(ids, am, feats, fm, labels).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    groups = model.module_groups()
    names = [n for g in groups.values() for n, _ in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert "frame_separator" in [n for n, _ in groups["projector"]]
    assert all(n.startswith("compressor.") for n, _ in groups["compressor"])
    assert all(n.startswith("llm.") for n, _ in groups["llm"])
    model.zero_grad()


def test_save_then_load_gives_the_same_logits(qwen, tmp_path):
    model = qwen.eval()
    ids, am, labels, feats, fm, _ = make_batch(model.tokenizer)
    model.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left behind
    saved = json.loads((tmp_path / "export" / "mambamia.json").read_text())
    assert saved["llm_path"] == "llm" and saved["compressor"]["k"] == 4
    loaded = VideoLLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, am, feats, fm).logits, model(ids, am, feats, fm).logits)
    bare = VideoLLM.build(config(qwen.config.llm_path, frame_separator=False))
    with pytest.raises(ValueError, match="frame_separator"):
        bare.load_modules(tmp_path / "export")
    # Saving again over an existing export replaces it.
    loaded.save_pretrained(tmp_path / "export")
    assert VideoLLM.from_pretrained(tmp_path / "export").config.video_token_id == model.config.video_token_id


def test_a_model_saved_before_new_compressor_fields_loads_as_it_was_trained(tiny_assets, tmp_path, caplog):
    """A mambamia.json written before norm_before_gate / group_padding / delta_score existed is
    read with the values those models computed with (gate-first norm, zero-padded groups, mean Δ),
    said once, not with today's defaults: the oracle is a model built with those values given
    explicitly, holding the same weights."""
    old_ways = {"norm_before_gate": False, "group_padding": "zeros", "delta_score": "mean",
                "backward_dt_bias_init": "like_forward"}
    torch.manual_seed(0)
    # 16 patches in groups of k=3: the padding choice matters; 2 kept of 5 frames: the score does.
    comp = CompressorConfig(input_dim=FEAT_DIM, patches_per_frame=PATCHES, hidden_size=32, num_layers=1, k=3,
                            taa_layers=1, keyframes=2, d_state=8, headdim=16, ssd_chunk_size=32, **old_ways)
    old = VideoLLM.build(VideoLLMConfig(llm_path=str(tiny_assets["llm"]), compressor=comp)).eval()
    old.save_pretrained(tmp_path / "export")
    path = tmp_path / "export" / "mambamia.json"
    saved = json.loads(path.read_text())
    for key in old_ways:
        del saved["compressor"][key]
    path.write_text(json.dumps(saved))
    with caplog.at_level("WARNING", logger="model.video_llm"):
        loaded = VideoLLM.from_pretrained(tmp_path / "export").eval()
    assert {k: getattr(loaded.config.compressor, k) for k in old_ways} == old_ways
    assert len([r for r in caplog.records if "norm_before_gate=False" in r.getMessage()]) == 1
    ids, am, _, feats, fm, _ = make_batch(old.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, am, feats, fm).logits, old(ids, am, feats, fm).logits)


def test_generate_equals_a_greedy_loop_through_forward(qwen):
    model = qwen.eval()
    _, _, _, feats, fm, prompts = make_batch(model.tokenizer)
    length = max(map(len, prompts))
    ids = torch.full((2, length), model.tokenizer.pad_token_id)
    am = torch.zeros(2, length, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
        am[b, : len(p)] = 1
    new = model.generate(ids, am, feats, fm, max_new_tokens=4, do_sample=False)
    eos = model.tokenizer.eos_token_id
    with torch.no_grad():
        for b, p in enumerate(prompts):
            cur, expected = list(p), []
            for _ in range(4):
                x = torch.tensor([cur])
                logits = model(x, torch.ones_like(x), feats[b:b + 1, fm[b]], None).logits[0, -1]
                expected.append(int(logits.argmax()))
                cur.append(expected[-1])
                if expected[-1] == eos:
                    break
            assert new[b, : len(expected)].tolist() == expected


def test_overfits_one_batch(tiny_assets):
    torch.manual_seed(1)
    model = VideoLLM.build(config(tiny_assets["llm"])).train()
    ids, am, labels, feats, fm, _ = make_batch(model.tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = None
    for _ in range(60):
        loss = model(ids, am, feats, fm, labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # A random LLM starts near ln(vocab) = ln(384) ~ 5.95 nats; memorising the answers takes it
    # two orders of magnitude lower.
    assert first > 4.0 and loss.item() < 0.1, (first, loss.item())


def test_llama_family_trains_saves_and_generates(tiny_assets, tmp_path):
    from transformers import AutoTokenizer

    from trainer.tiny import build_llm

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    build_llm(tmp_path / "llama", tok, family="llama")
    model = VideoLLM.build(config(tmp_path / "llama"))
    assert type(model.llm).__name__ == "LlamaForCausalLM"
    ids, am, labels, feats, fm, prompts = make_batch(model.tokenizer)
    model.train()(ids, am, feats, fm, labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval().save_pretrained(tmp_path / "export")
    loaded = VideoLLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, am, feats, fm).logits, model(ids, am, feats, fm).logits)
    x = torch.tensor([prompts[0]])
    assert loaded.generate(x, torch.ones_like(x), feats[:1], None, max_new_tokens=2,
                           do_sample=False).shape[0] == 1


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_assets):
    torch.manual_seed(2)
    plain = VideoLLM.build(config(tiny_assets["llm"], compressor={"gpa_dropout": 0.0})).train()
    ckpt = VideoLLM.build(config(tiny_assets["llm"], gradient_checkpointing=True,
                                 compressor={"gpa_dropout": 0.0, "gradient_checkpointing": True}))
    ckpt.load_state_dict(plain.state_dict())
    ckpt.train()
    assert ckpt.llm.is_activation_checkpointing and not plain.llm.is_activation_checkpointing
    ids, am, labels, feats, fm, _ = make_batch(plain.tokenizer)
    losses = []
    for m in (plain, ckpt):
        loss = m(ids, am, feats, fm, labels).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


def test_bad_inputs_fail_with_clear_errors(qwen, tiny_assets, tmp_path):
    ids, am, labels, feats, fm, _ = make_batch(qwen.tokenizer)
    vid = qwen.config.video_token_id
    two = ids.clone()
    two[0, 3] = vid
    with pytest.raises(ValueError, match="sample 0 has 2 '<video>' tokens"):
        qwen(two, am, feats, fm, labels)
    with pytest.raises(ValueError, match="video_token"):
        VideoLLM.build(dataclasses.replace(config(tiny_assets["llm"]), video_token="<image>"))
    with pytest.raises(FileNotFoundError, match="mambamia.json"):
        VideoLLM.from_pretrained(tmp_path)
