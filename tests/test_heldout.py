"""The held-out task of issue 17: training data answered in words, multiple-choice test items.

Validation must measure the answer form training teaches (and report each form apart), and the
whole path convert -> train -> eval must run on such data and say plainly what it cannot score.
"""
from __future__ import annotations

import math
import socket
from types import SimpleNamespace

import numpy as np
import pytest

from data.config import DataConfig, DataSource
from data.shards import ShardWriter, write_index

COLOURS = ["red", "green", "blue", "yellow"]
FRAMES, PATCHES, DIM = 3, 16, 32


def _write(folder, records: dict[str, dict], seed: int):
    rng = np.random.default_rng(seed)
    with ShardWriter(folder, max_samples=2) as writer:
        for key, fields in records.items():
            meta = {"key": key, "video_id": key, "timestamps": [float(t) for t in range(FRAMES)],
                    "fps": 1.0, "duration": float(FRAMES), "conversations": [], "qa": [], **fields}
            writer.write(key, rng.standard_normal((FRAMES, PATCHES, DIM)).astype(np.float16), meta)
    write_index(folder)
    return folder


def word_records(n: int) -> dict[str, dict]:
    return {f"train_{i}": {"conversations": [[
        {"from": "human", "value": "<video>\nWhat colour was the shape?"},
        {"from": "gpt", "value": COLOURS[i % 4]}]]} for i in range(n)}


def mc_records(n: int) -> dict[str, dict]:
    return {f"test_{i}": {"qa": [{"id": f"q{i}", "question": "What colour was the shape?",
                                  "options": list(COLOURS), "answer": (i * 3) % 4, "type": "colour"}]}
            for i in range(n)}


@pytest.fixture
def process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny_model(tiny_assets):
    import torch

    from model.config import CompressorConfig, VideoLLMConfig
    from model.video_llm import VideoLLM

    cfg = VideoLLMConfig(llm_path=str(tiny_assets["llm"]), compressor=CompressorConfig(
        input_dim=DIM, hidden_size=32, num_layers=1, k=4, taa_layers=1, keyframes=2, d_state=16,
        headdim=16, ssd_chunk_size=32, gpa_dropout=0.0))
    torch.manual_seed(0)
    return VideoLLM.build(cfg).eval()


def _oracle_loss(model, conversation, features) -> float:
    """The model's own mean answer-token loss for one sample, unbatched."""
    import torch

    from data.text import tokenize_conversation

    ids, labels = tokenize_conversation(model.tokenizer, conversation, 256)
    feats = torch.from_numpy(features.astype(np.float32)).unsqueeze(0)
    with torch.no_grad():
        out = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), feats,
                    torch.ones(1, len(features), dtype=torch.bool), labels=torch.tensor([labels]))
    return out.loss.item()


def test_validation_reports_each_answer_form_and_the_trained_one(tiny_assets, tmp_path, process_group):
    import torch

    from data.text import VIDEO_TOKEN, qa_conversation
    from trainer.dist import DistInfo
    from trainer.evaluate import iter_records
    from trainer.train import validation_loss

    train = _write(tmp_path / "train", word_records(4), seed=0)
    val = _write(tmp_path / "val", mc_records(5), seed=1)
    model = tiny_model(tiny_assets)
    cfg = SimpleNamespace(
        data=DataConfig(sources=[DataSource(path=str(train))], batch_size=2, max_frames=8, max_text_len=256),
        validation=SimpleNamespace(sources=[DataSource(path=str(val))], max_batches=0))
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")

    scalars = validation_loss(model, cfg, model.tokenizer, info, torch.float32)

    letters, words = [], []
    for record in iter_records(val):
        item = record.meta["qa"][0]
        letters.append(_oracle_loss(model, qa_conversation(item), record.features))
        words.append(_oracle_loss(model, [{"from": "human", "value": f"{VIDEO_TOKEN}\n{item['question']}"},
                                          {"from": "gpt", "value": item["options"][item["answer"]]}],
                                  record.features))
    assert set(scalars) == {"val/loss", "val/loss_open", "val/loss_mc"}
    assert scalars["val/loss_mc"] == pytest.approx(sum(letters) / 5, rel=1e-4)
    assert scalars["val/loss_open"] == pytest.approx(sum(words) / 5, rel=1e-4)
    # training taught words only: the headline curve is the word-answer loss
    assert scalars["val/loss"] == pytest.approx(scalars["val/loss_open"])
    assert model.training  # back in training mode for the next step
    assert all(math.isfinite(v) for v in scalars.values())


def test_validation_averages_every_trained_form(tiny_assets, tmp_path, process_group):
    import torch

    from trainer.dist import DistInfo
    from trainer.train import validation_loss

    # training teaches both forms: val/loss is the sample mean over both forms' samples
    train = _write(tmp_path / "train", {**word_records(2), **mc_records(2)}, seed=0)
    val = _write(tmp_path / "val", {**word_records(3), **mc_records(2)}, seed=1)
    model = tiny_model(tiny_assets)
    cfg = SimpleNamespace(
        data=DataConfig(sources=[DataSource(path=str(train))], batch_size=3, max_frames=8, max_text_len=256),
        validation=SimpleNamespace(sources=[DataSource(path=str(val))], max_batches=0))
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    s = validation_loss(model, cfg, model.tokenizer, info, torch.float32)
    # 3 conversations + 2 items in word form = 5 open samples; 2 letter samples
    assert s["val/loss"] == pytest.approx((5 * s["val/loss_open"] + 2 * s["val/loss_mc"]) / 7)


def test_mismatch_note_names_the_untaught_form(tmp_path):
    from trainer.validation import mismatch_note, training_forms

    train = _write(tmp_path / "train", word_records(2), seed=0)
    cfg = SimpleNamespace(data=SimpleNamespace(sources=[DataSource(path=str(train))]))
    assert training_forms((str(train),)) == {"open"}
    note = mismatch_note(cfg, {"val/loss": 1.0, "val/loss_open": 1.0, "val/loss_mc": 2.0})
    assert note is not None and "val/loss_mc" in note and "\n" not in note
    # said once per run, and not at all when training teaches every held-out form
    assert mismatch_note(cfg, {"val/loss": 1.0, "val/loss_open": 1.0, "val/loss_mc": 2.0}) is None
    assert mismatch_note(cfg, {"val/loss": 1.0, "val/loss_open": 1.0}) is None


@pytest.mark.parametrize("n, world, batch", [(7, 2, 2), (4, 2, 2), (1, 3, 2), (10, 3, 1)])
def test_validation_share_covers_every_sample_once_with_equal_batch_counts(n, world, batch):
    from trainer.validation import _my_batches

    samples = list(range(n))
    shares = [_my_batches(samples, r, world, batch) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # same number of forwards on every rank
    flat = sorted(x for share in shares for b in share for x in b)
    assert flat == samples
