"""The held-out task of issue 17: training data answered in words, multiple-choice test items.

Validation must measure the answer form training teaches (and report each form apart), and the
whole path convert -> train -> eval must run on such data and say plainly what it cannot score.
"""
from __future__ import annotations

import math
import shutil
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
    from data.text import VIDEO_TOKEN, qa_conversation
    from trainer.evaluate import iter_records
    from trainer.train import validation_loss

    train = _write(tmp_path / "train", word_records(4), seed=0)
    val = _write(tmp_path / "val", mc_records(5), seed=1)
    model = tiny_model(tiny_assets)
    scalars = validation_loss(model, *_one_process_validation(train, val, batch_size=2, tokenizer=model.tokenizer))

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


def _one_process_validation(train, val, *, batch_size, tokenizer):
    """validation_loss's arguments after the model: a run config with `train` as training data and
    `val` as validation data, the tokenizer, one CPU process, float32."""
    import torch

    from trainer.dist import DistInfo

    cfg = SimpleNamespace(
        data=DataConfig(sources=[DataSource(path=str(train))], batch_size=batch_size, max_frames=8, max_text_len=256),
        validation=SimpleNamespace(sources=[DataSource(path=str(val))], max_batches=0))
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    return cfg, tokenizer, info, torch.float32


def test_validation_averages_every_trained_form(tiny_assets, tmp_path, process_group):
    from trainer.train import validation_loss

    # training teaches both forms: val/loss is the sample mean over both forms' samples
    train = _write(tmp_path / "train", {**word_records(2), **mc_records(2)}, seed=0)
    val = _write(tmp_path / "val", {**word_records(3), **mc_records(2)}, seed=1)
    model = tiny_model(tiny_assets)
    s = validation_loss(model, *_one_process_validation(train, val, batch_size=3, tokenizer=model.tokenizer))
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
def test_validation_share_counts_every_sample_once_in_full_batches(n, world, batch):
    from trainer.validation import _my_batches

    samples = list(range(n))
    shares = [_my_batches(samples, r, world, batch) for r in range(world)]
    # every rank makes the same calls with the same batch size (ZeRO-3), as training's loader does
    assert len({len(s) for s in shares}) == 1
    assert all(len(b) == batch for share in shares for b in share)
    counted = sorted(x for share in shares for b in share for x, c in b if c)
    assert counted == samples


# ---------------------------------------------------------------- the held-out run, end to end

def _held_out_task(root):
    """Short needle videos; LLaVA training annotations answered in words; an MLVU-style test
    file whose items carry no question_id (as MLVU's own files)."""
    import json

    from data.needle import QUESTION, NeedleConfig, write_needle_task

    common = dict(duration_s=12.0, fps=2.0, size=32, needle_side=1.0, needle_s=3.0)
    train = write_needle_task(root / "videos", NeedleConfig(videos=8, seed=0, **common), split="train",
                              progress=False)
    # 3 test videos: 6 held-out samples (letter and word form) do not fill the last validation
    # batch of 2 ranks x 2, which must not leave ZeRO-3's ranks out of step
    test = write_needle_task(root / "videos", NeedleConfig(videos=3, seed=1, **common), split="test",
                             progress=False)
    truth = json.loads(train["truth"].read_text())["videos"]
    (root / "train.json").write_text(json.dumps([
        {"id": t["video_id"], "video": f"train/{t['video_id']}.mp4", "conversations": [
            {"from": "human", "value": f"<video>\n{QUESTION}"}, {"from": "gpt", "value": t["colour"]}]}
        for t in truth]))
    mcq = json.loads(test["mcq"].read_text())
    for item in mcq:
        del item["question_id"]
    (root / "test.json").write_text(json.dumps(mcq))
    return root


@pytest.mark.slow
def test_held_out_task_runs_end_to_end_and_says_what_it_cannot_score(tmp_path):
    """convert (~1 fps) -> stage 1 -> export -> stage 2 -> export -> eval through `mambamia tiny`
    (2 processes, ZeRO-3)."""
    import json

    from trainer.evaluate import iter_records, main as eval_main
    from trainer.workspace import main

    data = _held_out_task(tmp_path / "data")
    ws = tmp_path / "ws"
    assert main([str(ws), "--videos", str(data / "videos"), "--train", str(data / "train.json"),
                 "--test", str(data / "test.json"), "--steps", "4", "--max-frames", "12"]) == 0

    for record in iter_records(ws / "shards" / "val"):  # ~1 frame per second of the 12 s videos
        times = record.meta["timestamps"]
        assert 10 <= len(times) <= 12 and np.diff(times) == pytest.approx(1.0, abs=0.26)
    export = ws / "exports" / "stage2"
    assert json.loads((export / "training.json").read_text())["answer_forms"] == ["open"]
    rows = [json.loads(line) for line in (ws / "runs" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/loss" in r]
    assert val and all(r["val/loss"] == r["val/loss_open"] and "val/loss_mc" in r for r in val)
    assert "val/loss_mc scores a form training never asked for" in (ws / "logs" / "train_stage2.log").read_text()

    # the words the model learned are scored as words, every item scored
    report = json.loads((ws / "eval" / "report.json").read_text())
    assert report["target"] == "text" and report["items"] == report["scored"] == 3
    assert len(set(p["id"] for p in report["predictions"])) == 3
    assert len((ws / "eval" / "open_ended.jsonl").read_text().splitlines()) == 3
    # letters asked of a model taught words: said plainly
    out = tmp_path / "letters.json"
    assert eval_main([str(export), str(ws / "shards" / "val"), "--out", str(out)]) == 0
    warnings = json.loads(out.read_text())["warnings"]
    assert any("holds no multiple-choice items" in w for w in warnings)


def test_tiny_workspace_builds_models_once_and_prints_the_commands(tmp_path, capsys, monkeypatch):
    from trainer.config import load_config
    from trainer.demo import CONFIGS
    from trainer.workspace import main

    ws = tmp_path / "ws"
    assert main([str(ws)]) == 0
    out = capsys.readouterr().out
    for part in ("llm/config.json", "vision/config.json", "vision/preprocessor_config.json",
                 "tokenizer/tokenizer_config.json"):
        assert (ws / part).is_file(), part
    assert f"export MAMBAMIA_TINY={ws}" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("mambamia ")] == \
        ["convert", "convert", "train", "export", "train", "export", "eval"]
    # the printed layout is what the tiny configs read
    monkeypatch.setenv("MAMBAMIA_TINY", str(ws))
    cfg = load_config(CONFIGS / "stage2.yaml")
    assert cfg.model.llm_path == str(ws / "llm") and cfg.init_from == str(ws / "exports" / "stage1")
    assert cfg.data.sources[0].path == str(ws / "shards" / "train")

    stamp = (ws / "llm" / "config.json").stat().st_mtime_ns
    assert main([str(ws)]) == 0  # a second call keeps the models
    assert (ws / "llm" / "config.json").stat().st_mtime_ns == stamp

    (ws / "shards" / "train").mkdir(parents=True)
    (ws / "shards" / "train" / "index.json").write_text("{}")
    capsys.readouterr()
    ann = tmp_path / "a.json"
    ann.write_text("[]")
    assert main([str(ws), "--videos", str(tmp_path), "--train", str(ann), "--test", str(ann)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds shards/" in err[0]
    with pytest.raises(SystemExit):
        main([str(ws), "--videos", str(tmp_path)])  # --train and --test missing


def test_letter_answers_in_conversations_are_the_multiple_choice_form(tmp_path):
    from trainer.validation import conversation_form, training_forms

    def conv(answer):
        return [{"from": "human", "value": "<video>\nWhich colour?\nA. red\nB. blue"}, {"from": "gpt", "value": answer}]

    assert [conversation_form(conv(a)) for a in ("B", "(B)", "B. blue", "C:", "blue", "A red square", "")] == \
        ["mc", "mc", "mc", "mc", "open", "open", "open"]
    # the demo's training data: ShareGPT conversations answered by letter teach the letter form
    letters = _write(tmp_path / "letters", {f"t{i}": {"conversations": [conv("AB"[i % 2])]} for i in range(3)}, 0)
    assert training_forms((str(letters),)) == {"mc"}
    assert training_forms((str(_write(tmp_path / "words", word_records(2), 0)),)) == {"open"}


def test_held_out_list_is_built_once_and_rebuilt_when_the_index_changes(tiny_assets, tmp_path,
                                                                       process_group, monkeypatch):
    from trainer import validation
    from trainer.train import validation_loss

    train = _write(tmp_path / "train", word_records(2), seed=0)
    val = _write(tmp_path / "val", mc_records(3), seed=1)
    model = tiny_model(tiny_assets)
    builds = []
    real = validation.held_out_samples
    monkeypatch.setattr(validation, "held_out_samples",
                        lambda *a, **k: builds.append(1) or real(*a, **k))
    args = _one_process_validation(train, val, batch_size=2, tokenizer=model.tokenizer)
    first = validation_loss(model, *args)
    assert validation_loss(model, *args) == first
    assert len(builds) == 1
    # a rewritten held-out folder (two more records) is read afresh: one more open and mc sample each
    shutil.rmtree(val)
    _write(tmp_path / "val", mc_records(5), seed=1)
    again = validation_loss(model, *args)
    assert len(builds) == 2 and again != first
