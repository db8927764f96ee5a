"""Padding-free packing: a packed batch trains exactly like its samples run one by one.

Oracle: each sample forwarded alone (batch of one, no padding, no neighbour), its loss weighted
by its number of target tokens; logits per sample; gradients of the padded batch, whose loss is
the same token-weighted mean.
"""
from __future__ import annotations

import pytest
import torch

from data.collate import pack_text, pad_text
from model.video_llm import VideoLLM
from tests.test_video_llm import FEAT_DIM, PATCHES, config

CONVERSATIONS = [("What colour is the shape?", "red"),
                 ("Which shape appears briefly in the video, and when?", "a blue star, near the end"),
                 ("Count the circles.", "three")]
FRAMES = [5, 2, 4]


def _samples(tokenizer):
    """Token ids and labels (answer only) per sample, features and frame masks padded to 5 frames."""
    ids, labels = [], []
    for question, answer in CONVERSATIONS:
        user = [{"role": "user", "content": "<video>\n" + question}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        x = tokenizer(full, add_special_tokens=False).input_ids
        ids.append(x)
        labels.append([-100] * n_prompt + x[n_prompt:])
    features = torch.randn(len(FRAMES), max(FRAMES), PATCHES, FEAT_DIM)
    frame_mask = torch.arange(max(FRAMES))[None] < torch.tensor(FRAMES)[:, None]
    return ids, labels, features * frame_mask[:, :, None, None], frame_mask


@pytest.fixture(scope="module")
def model(tiny_assets):
    torch.manual_seed(0)
    return VideoLLM.build(config(tiny_assets["llm"])).eval()


def _loss_and_grads(model, **inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_loss_logits_and_gradients_equal_per_sample_runs(model):
    torch.manual_seed(1)
    ids, labels, features, frame_mask = _samples(model.tokenizer)
    total, weighted, alone = 0, 0.0, []
    with torch.no_grad():
        for i, (x, y) in enumerate(zip(ids, labels)):
            one = torch.tensor([x])
            out = model(input_ids=one, attention_mask=torch.ones_like(one), labels=torch.tensor([y]),
                        features=features[i: i + 1, : FRAMES[i]], frame_mask=frame_mask[i: i + 1, : FRAMES[i]])
            targets = int((out.labels[0, 1:] != -100).sum())  # a label is predicted from the token before
            total, weighted = total + targets, weighted + float(out.loss) * targets
            alone.append(out.logits[0])
    packed_out, packed_grads = _loss_and_grads(model, **pack_text(ids, labels), features=features,
                                               frame_mask=frame_mask)
    assert packed_out.loss.item() == pytest.approx(weighted / total, rel=1e-5)
    assert packed_out.logits.shape[:2] == (1, sum(a.shape[0] for a in alone))
    for got, want in zip(packed_out.logits[0].split([a.shape[0] for a in alone]), alone):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # no attention across samples
    padded = pad_text(ids, labels, model.tokenizer.pad_token_id)
    _, padded_grads = _loss_and_grads(model, **padded, features=features, frame_mask=frame_mask)
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_boundaries_are_what_keeps_samples_apart(model):
    """Without per-sample positions (one causal sequence), later samples see earlier ones: the
    equality above is a property of the packing, not of a model that ignores its context."""
    torch.manual_seed(2)
    ids, labels, features, frame_mask = _samples(model.tokenizer)
    packed = pack_text(ids, labels)
    out = model(**packed, features=features, frame_mask=frame_mask)
    visual, _ = model._visual_embeds(features, frame_mask)
    s = model._splice_packed(packed["input_ids"], packed["cu_seqlens"], visual, packed["labels"])
    causal = model.llm(inputs_embeds=s.embeds, use_cache=False).logits  # one sequence, no boundaries
    first = int((s.position_ids[0] == 0).nonzero()[1, 0])
    torch.testing.assert_close(causal[0, :first], out.logits[0, :first], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(causal[0, first:], out.logits[0, first:], atol=1e-3)


def test_packed_input_errors_are_one_line(model):
    ids, labels, features, frame_mask = _samples(model.tokenizer)
    packed = pack_text(ids, labels)
    for bad in (packed["cu_seqlens"][:-1], packed["cu_seqlens"] + 1):
        with pytest.raises(ValueError, match="cu_seqlens") as err:
            model(**{**packed, "cu_seqlens": bad}, features=features, frame_mask=frame_mask)
        assert "\n" not in str(err.value)


def test_training_packed_follows_the_padded_run_step_for_step(tiny_assets, tmp_path):
    """`mambamia train` end to end (loader, trainer, DeepSpeed): with data.pack_sequences the
    same batches give the same losses step after step, grouping by length on in both runs."""
    from pathlib import Path

    from tests.ckpt_worker import launch
    from tests.test_train import _rows, _train_in_run_dir, make_tiny_root

    root = make_tiny_root(tmp_path / "tiny", Path(tiny_assets["llm"]), train=8, val=2)
    common = ["logging.tensorboard=false", "schedule.total_steps=3", "checkpoint.every_steps=0",
              "validation.every_steps=0", "data.group_by_length=true", "data.group_size=4"]
    losses = {}
    for pack in ("false", "true"):
        run = tmp_path / f"pack_{pack}"
        assert launch(run, 1, *common, f"data.pack_sequences={pack}", target=_train_in_run_dir,
                      env={"MAMBAMIA_TINY": str(root)}) == [0], next(run.glob("rank0.*.out")).read_text()[-3000:]
        losses[pack] = [row["loss"] for row in _rows(run) if "loss" in row]
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
