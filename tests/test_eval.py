"""The multiple-choice scorer on hand-made fixtures in each benchmark's converted form.

Every expected accuracy below is counted by hand from the fixture (comments show the count), and
the stub scorer returns controlled log-likelihoods, so the scorer's rules (argmax, ties, missing
answers, grouping, merging) are checked without a model. The last tests run `mambamia eval` on a
real tiny exported model and check its option log-likelihoods against the model's own loss.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from data.shards import ShardWriter, write_index
from trainer.model_card import CARD, _front_matter
from trainer.evaluate import (MalformedItem, choose_option, format_table, iter_records, merge_parts,
                              parse_letter, parse_qa_item, score_items, summarize)


def qa(id, answer, type=None, duration=None, n=4, time_reference=None):
    return {"id": id, "question": f"question {id}?", "options": [f"option {i}" for i in range(n)],
            "answer": answer, "type": type, "duration_bucket": duration, "time_reference": time_reference}


# LVBench: one type per question, a time reference, no duration bucket (every video is > 1 h).
LVBENCH = {
    "lvb_v1": [qa("lvb-1", 2, "key information retrieval", time_reference="00:10-00:20"),
               qa("lvb-2", 0, "event recognition", time_reference="01:00-01:30")],
    "lvb_v2": [qa("lvb-3", 3, "key information retrieval"),
               qa("lvb-4", 1, "event recognition")],
}
# MLVU: candidate lists of different lengths, task names as types.
MLVU = {
    "mlvu_v1": [qa("mlvu-1", 4, "needleQA", n=5), qa("mlvu-2", 1, "plotQA")],
    "mlvu_v2": [qa("mlvu-3", 0, "plotQA")],
}
# Video-MME: duration buckets and task types; the answer of one item is withheld (null).
VIDEOMME = {
    "vmme_v1": [qa("vmme-1", 0, "Counting Problem", "short"), qa("vmme-2", 2, "Action Recognition", "short")],
    "vmme_v2": [qa("vmme-3", 3, "Counting Problem", "long"), qa("vmme-4", None, "Action Recognition", "long")],
}
SCORES = {
    "lvb-1": [0.1, 0.2, 0.9, 0.3],   # -> 2, right
    "lvb-2": [-1, -0.5, -2, -3],     # -> 1, wrong
    "lvb-3": [0, 0, 0, 5],           # -> 3, right
    "lvb-4": [2, 2, 1, 0],           # tie 0/1 -> 0 (lowest index), wrong
    "mlvu-1": [0, 0, 0, 0, 1],       # -> 4, right
    "mlvu-2": [3, 3, 0, 0],          # tie -> 0, wrong
    "mlvu-3": [3, 3, 3, 3],          # four-way tie -> 0, right by the rule
    "vmme-1": [1, 0, 0, 0],          # -> 0, right
    "vmme-2": [0, 1, 0, 0],          # -> 1, wrong
    "vmme-3": [0, 0, 0, 1],          # -> 3, right
    "vmme-4": [0, 0, 1, 0],          # -> 2, answer withheld: not scored
}
TOKENS = {"lvb_v1": 100, "lvb_v2": 300, "mlvu_v1": 50, "mlvu_v2": 70, "vmme_v1": 10, "vmme_v2": 20}


def write_dataset(folder, videos: dict, *, extra_meta=None):
    with ShardWriter(folder, max_samples=2) as writer:
        for key, items in videos.items():
            meta = {"key": key, "video_id": key, "duration": 60.0, "fps": 1.0, "qa": items, "timestamps": [0.0, 30.0],
                    "conversations": [], **(extra_meta or {})}
            writer.write(key, np.full((2, 4, 8), len(key), dtype=np.float16), meta)
    write_index(folder)
    return folder


def stub_loglik(item):
    return SCORES[item.id]


def report_of(folder, rank=0, world_size=1):
    items, tokens = [], {}
    for record in iter_records(folder, rank=rank, world_size=world_size):
        if record.features is not None:
            items += record.items
            tokens[record.key] = TOKENS[record.key]
    return {"predictions": score_items(items, method="loglik", loglik_fn=stub_loglik), "visual_tokens": tokens}


@pytest.mark.parametrize("videos, expected", [
    # LVBench: right lvb-1, lvb-3; wrong lvb-2, lvb-4 (tie) -> 2/4; KIR 2/2, ER 0/2
    (LVBENCH, {"correct": 2, "scored": 4, "unanswered": 0, "tied": 1, "chance": 0.25,
               "by_type": {"event recognition": (0, 2), "key information retrieval": (2, 2)},
               "by_duration": {}, "tokens": (200.0, 300)}),
    # MLVU: right mlvu-1, mlvu-3 (tie at the answer); wrong mlvu-2 (tie) -> 2/3; chance (1/5+1/4+1/4)/3
    (MLVU, {"correct": 2, "scored": 3, "unanswered": 0, "tied": 2, "chance": (0.2 + 0.25 + 0.25) / 3,
            "by_type": {"needleQA": (1, 1), "plotQA": (1, 2)}, "by_duration": {}, "tokens": (60.0, 70)}),
    # Video-MME: right vmme-1, vmme-3; wrong vmme-2; vmme-4 withheld -> 2/3, 1 unanswered
    (VIDEOMME, {"correct": 2, "scored": 3, "unanswered": 1, "tied": 0, "chance": 0.25,
                "by_type": {"Action Recognition": (0, 1), "Counting Problem": (2, 2)},
                "by_duration": {"long": (1, 1), "short": (1, 2)}, "tokens": (15.0, 20)}),
], ids=["lvbench", "mlvu", "videomme"])
def test_accuracy_by_benchmark(tmp_path, videos, expected):
    folder = write_dataset(tmp_path / "ds", videos)
    part = report_of(folder)
    report = summarize(part["predictions"], visual_tokens=part["visual_tokens"], method="loglik")
    assert report["items"] == sum(len(v) for v in videos.values())
    assert report["correct"] == expected["correct"] and report["scored"] == expected["scored"]
    assert report["accuracy"] == pytest.approx(expected["correct"] / expected["scored"])
    assert report["unanswered"] == expected["unanswered"]
    assert report["tied"] == expected["tied"]
    assert report["chance"] == pytest.approx(expected["chance"])
    for group in ("by_type", "by_duration"):
        got = {k: (v["correct"], v["scored"]) for k, v in report[group].items()}
        assert got == expected[group]
    assert (report["visual_tokens"]["mean"], report["visual_tokens"]["max"]) == expected["tokens"]
    table = format_table(report)
    assert f"{100 * expected['correct'] / expected['scored']:5.1f}%" in table
    assert all(name in table for name in expected["by_type"])


def test_ties_pick_lowest_index_and_nan_never_wins():
    assert choose_option([1.0, 2.0, 2.0]) == (1, True)
    assert choose_option([-1.0, -3.0]) == (0, False)
    assert choose_option([float("nan"), -5.0, -7.0]) == (1, False)
    assert choose_option([float("-inf"), float("-inf")]) == (0, True)


def test_missing_answers_are_predicted_but_not_scored():
    items = [parse_qa_item(qa(f"x{i}", None), video_key="v", where="t") for i in range(3)]
    preds = score_items(items, method="loglik", loglik_fn=lambda item: [0, 1, 0, 0])
    report = summarize(preds, visual_tokens={"v": 5}, method="loglik")
    assert [p["predicted"] for p in preds] == [1, 1, 1]
    assert report["scored"] == 0 and report["unanswered"] == 3 and report["accuracy"] is None
    assert "n/a" in format_table(report)


@pytest.mark.parametrize("text, expected", [
    ("B", 1), ("(C)", 2), ("D.", 3), ("A) option 0", 0), ("B: option 1", 1),
    ("Answer: C", 2), ("The answer is (D).", 3), ("the answer is b", 1),
    ("option 2", 2), ("Option 3.", 3),
    ("A red square", None),   # the article, not a choice
    ("E", None),              # out of range for 4 options
    ("", None), ("I do not know", None),
])
def test_parse_letter(text, expected):
    assert parse_letter(text, [f"option {i}" for i in range(4)]) == expected


def test_generate_method_counts_unparsed_as_wrong():
    items = [parse_qa_item(qa(f"g{i}", a), video_key="v", where="t") for i, a in enumerate([1, 2, 0, 3])]
    outputs = {"g0": "B", "g1": "The answer is (C).", "g2": "A red square", "g3": "option 3"}
    preds = score_items(items, method="generate", generate_fn=lambda item: outputs[item.id])
    report = summarize(preds, visual_tokens={"v": 1}, method="generate")
    # g0 right, g1 right, g2 unparsed (wrong), g3 right by option text -> 3/4
    assert (report["correct"], report["scored"], report["unparsed"]) == (3, 4, 1)


@pytest.mark.parametrize("change, field", [
    ({"options": None}, "'options'"), ({"options": ["only one"]}, "'options'"),
    ({"options": ["a", ""]}, "'options'"), ({"answer": 4}, "'answer'"), ({"answer": "B"}, "'answer'"),
    ({"answer": True}, "'answer'"), ({"question": "  "}, "'question'"), ({"type": 3}, "'type'"),
    ({"id": None}, "'id'"),
])
def test_malformed_items_name_the_item_and_field(change, field):
    raw = {**qa("bad-1", 1), **change}
    with pytest.raises(MalformedItem) as err:
        parse_qa_item(raw, video_key="v", where="shard-x.tar: record 'v'")
    message = str(err.value)
    assert field in message and "shard-x.tar: record 'v'" in message and "\n" not in message
    if change.get("id", "bad-1") is not None:
        assert "'bad-1'" in message


def test_malformed_item_in_shards_names_shard_and_record(tmp_path):
    folder = write_dataset(tmp_path / "ds", {"ok_video": [qa("q1", 0)], "bad_video": [qa("q2", 9)]})
    with pytest.raises(MalformedItem, match=r"shard-r00000-000000\.tar: record 'bad_video': qa item 'q2' field 'answer'"):
        list(iter_records(folder))
    dup = write_dataset(tmp_path / "dup", {"v1": [qa("same", 0)], "v2": [qa("same", 1)]})
    with pytest.raises(MalformedItem, match=r"record 'v2': qa item 'same' field 'id'"):
        list(iter_records(dup))


@pytest.mark.parametrize("world_size", [2, 3])
def test_multi_rank_merge_equals_single_rank(tmp_path, world_size):
    folder = write_dataset(tmp_path / "all", {**LVBENCH, **MLVU, **VIDEOMME})
    single_preds, single_tokens = merge_parts([report_of(folder)])
    single = summarize(single_preds, visual_tokens=single_tokens, method="loglik")
    parts = [report_of(folder, r, world_size) for r in range(world_size)]
    keys = [set(p["visual_tokens"]) for p in parts]
    assert all(keys) and sum(map(len, keys)) == len(set().union(*keys)) == 6  # disjoint, complete
    predictions, tokens = merge_parts(parts)
    merged = summarize(predictions, visual_tokens=tokens, method="loglik")
    assert json.dumps(merged, sort_keys=True) == json.dumps(single, sort_keys=True)
    # 2+2+2 right of 4+3+3 scored over the three benchmarks
    assert (merged["correct"], merged["scored"]) == (6, 10)
    with pytest.raises(ValueError, match="scored by two ranks"):
        merge_parts([parts[0], parts[0]])


# ---------------------------------------------------------------- the command on a real tiny model

def _tiny_export(tiny_assets, out_dir):
    import torch

    from model.config import CompressorConfig, VideoLLMConfig
    from model.video_llm import VideoLLM

    cfg = VideoLLMConfig(llm_path=str(tiny_assets["llm"]), compressor=CompressorConfig(
        input_dim=32, hidden_size=32, num_layers=1, k=4, taa_layers=1, keyframes=2, d_state=16,
        headdim=16, ssd_chunk_size=32, gpa_dropout=0.0))
    torch.manual_seed(0)
    model = VideoLLM.build(cfg)
    model.save_pretrained(out_dir)
    return model.eval()


def _oracle_scores(model, item: dict, features: np.ndarray) -> list[float]:
    """Log-likelihood of each option's letter through the training tokenization and the model's
    own label alignment (padded batch, `out.labels`), not through the evaluator's code path."""
    import torch

    from data.text import qa_conversation, tokenize_conversation

    rows = []
    for i in range(len(item["options"])):
        ids, labels = tokenize_conversation(model.tokenizer, qa_conversation({**item, "answer": i}), 512)
        first = next(t for t, lab in enumerate(labels) if lab != -100)
        rows.append((ids, [-100] * first + [labels[first]] + [-100] * (len(ids) - first - 1)))
    width = max(len(ids) for ids, _ in rows)
    pad = model.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    feats = torch.from_numpy(features.astype(np.float32)).expand(len(rows), *features.shape)
    with torch.no_grad():
        out = model(input_ids, mask, feats, torch.ones(len(rows), len(features), dtype=torch.bool), labels=labels)
    logp = torch.log_softmax(out.logits[:, :-1].double(), -1)
    target = out.labels[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (target != -100)).sum(-1).tolist()


def test_eval_command_on_tiny_model(tiny_assets, tmp_path):
    from model.budget import visual_token_count
    from trainer.evaluate import main

    model = _tiny_export(tiny_assets, tmp_path / "export")
    rng = np.random.default_rng(0)
    videos = {"vid_a": [qa("a1", 2, "colour", "short"), qa("a2", None, "colour", "short")],
              "vid_b": [qa("b1", 1, "shape", "medium")]}
    features = {k: rng.standard_normal((5 + i, 16, 32)).astype(np.float16) for i, k in enumerate(videos)}
    with ShardWriter(tmp_path / "ds", max_samples=1) as writer:
        for key, items in videos.items():
            writer.write(key, features[key], {
                "key": key, "duration": float(len(features[key])), "fps": 1.0, "qa": items,
                "timestamps": [float(t) for t in range(len(features[key]))],
                "conversations": [[{"from": "human", "value": "<video>\nDescribe."}, {"from": "gpt", "value": "red"}]]})
    write_index(tmp_path / "ds")

    out = tmp_path / "eval" / "report.json"
    assert main([str(tmp_path / "export"), str(tmp_path / "ds"), "--out", str(out),
                 "--open-ended", str(tmp_path / "eval" / "open.jsonl"), "--max-new-tokens", "3"]) == 0
    report = json.loads(out.read_text())
    preds = {p["id"]: p for p in report["predictions"]}
    for key, items in videos.items():
        for item in items:
            assert preds[item["id"]]["scores"] == pytest.approx(_oracle_scores(model, item, features[key]), abs=1e-4)
        n = len(features[key])
        assert report["videos"][key]["visual_tokens"] == visual_token_count(
            model.config, duration_s=float(n), fps=1.0, max_frames=n, patches_per_frame=16)
    assert report["correct"] == sum(p["predicted"] == p["answer"] for p in preds.values() if p["answer"] is not None)
    assert report["scored"] == 2 and report["unanswered"] == 1
    assert (tmp_path / "eval" / "report.txt").read_text().startswith(" ")
    lines = (tmp_path / "eval" / "open.jsonl").read_text().splitlines()
    # each conversation's first turn, and each question asked bare with its answer's text as reference
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == ["a1", "a2", "b1", "vid_a#0", "vid_b#0"]
    assert [r["reference"] for r in rows] == ["option 2", None, "option 1", "red", "red"]
    assert rows[0]["prompt"] == "<video>\nquestion a1?"

    # two independent jobs: the second to finish merges, and the merge equals the single run
    merged = tmp_path / "eval" / "merged.json"
    for rank in (1, 0):
        assert main([str(tmp_path / "export"), str(tmp_path / "ds"), "--out", str(merged),
                     "--rank", str(rank), "--world-size", "2"]) == 0
    merged_report = json.loads(merged.read_text())
    assert merged_report["world_size"] == 2
    assert [(p["id"], p["predicted"]) for p in merged_report["predictions"]] == \
        [(p["id"], p["predicted"]) for p in report["predictions"]]
    for a, b in zip(merged_report["predictions"], report["predictions"]):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)

    gen = tmp_path / "eval" / "gen.json"
    assert main([str(tmp_path / "export"), str(tmp_path / "ds"), "--out", str(gen),
                 "--method", "generate", "--max-new-tokens", "3"]) == 0
    gen_report = json.loads(gen.read_text())
    for p in gen_report["predictions"]:
        assert isinstance(p["output"], str)
        assert p["predicted"] == parse_letter(p["output"], [f"option {i}" for i in range(4)])
    assert gen_report["unparsed"] == sum(p["predicted"] is None for p in gen_report["predictions"])


def test_unreadable_record_metadata_names_the_record(tmp_path):
    import io
    import tarfile

    folder = tmp_path / "ds"
    folder.mkdir()
    with tarfile.open(folder / "shard-r00000-000000.tar", "w") as tar:
        for name, payload in (("v1.features.npy", b"\x93NUMPY"), ("v1.json", b"{not json")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    shard = folder / "shard-r00000-000000.tar"
    (folder / "index.json").write_text(json.dumps({"shards": [{"name": shard.name, "samples": 1, "bytes": shard.stat().st_size}]}))
    with pytest.raises(MalformedItem, match=r"shard-r00000-000000\.tar: record 'v1': v1\.json is not valid JSON"):
        list(iter_records(folder))
    (folder / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="index.json: missing"):
        list(iter_records(folder))


# ---------------------------------------------------------------- warnings: scores that mean nothing

def _items(answers, type="colour"):
    return [parse_qa_item(qa(f"d{i}", a, type), video_key=f"v{i}", where="t") for i, a in enumerate(answers)]


def test_flat_letter_probabilities_and_constant_choice_warn():
    from trainer.evaluate import diagnose

    items = _items([0, 1, 2, 3, 1, 2, 3, 0])
    # a model trained on words: 1% of its next-token probability spread evenly over the letters,
    # A a hair ahead, so A wins every item
    flat = [math.log(0.0026), math.log(0.0025), math.log(0.0025), math.log(0.0024)]
    preds = score_items(items, method="loglik", loglik_fn=lambda item: flat)
    numbers, warnings = diagnose(preds, method="loglik", target="letter")
    assert numbers["flat_items"] == 8 and numbers["letter_mass_mean"] == pytest.approx(0.01)
    text = " | ".join(warnings)
    assert "option A chosen on 8 of 8 items" in text and "near-uniform on 8 of 8" in text and "1.0%" in text
    assert all("\n" not in w for w in warnings)
    # the report carries them and the table shows them
    report = summarize(preds, visual_tokens={f"v{i}": 1 for i in range(8)}, method="loglik")
    report["warnings"] = warnings
    assert format_table(report).count("WARNING:") == len(warnings)


def test_a_model_that_knows_its_letters_gets_no_warning():
    from trainer.evaluate import diagnose

    answers = [0, 1, 2, 3, 1, 2, 3, 0]
    items = _items(answers)
    # 95% of the probability on the letters, most of it on the answer (one item wrong)
    def scores(item):
        i = int(item.id[1:])
        best = answers[i] if i != 5 else 0
        return [math.log(0.8 if j == best else 0.05) for j in range(4)]
    preds = score_items(items, method="loglik", loglik_fn=scores)
    numbers, warnings = diagnose(preds, method="loglik", target="letter", training_forms=["mc", "open"])
    assert warnings == [] and numbers["flat_items"] == 0 and numbers["letter_mass_mean"] == pytest.approx(0.95)


def test_constant_choice_per_question_type_and_unparsed_generations_warn():
    from trainer.evaluate import diagnose

    items = _items([0, 1, 2, 3, 0], "colour") + _items([1, 2, 3, 0, 1], "place")
    for i, item in enumerate(items):
        item.id = f"x{i}"
    # option text scoring: "colour" items always pick C, "place" items follow the answer
    preds = score_items(items, method="loglik", loglik_fn=lambda item: [
        0.0 if (j == 2 if item.type == "colour" else j == item.answer) else -1.0 for j in range(4)])
    _, warnings = diagnose(preds, method="loglik", target="text")
    assert len(warnings) == 1 and warnings[0].startswith("type 'colour': option C chosen on 5 of 5 items")
    outputs = ["gred"] * 4 + ["B"] * 6
    gen = score_items(items, method="generate", generate_fn=lambda item: outputs[int(item.id[1:])])
    numbers, warnings = diagnose(gen, method="generate", target="letter")
    assert numbers["unparsed_fraction"] == pytest.approx(0.4) and not any("name no option" in w for w in warnings)
    gen = score_items(items, method="generate", generate_fn=lambda item: "gred")
    _, warnings = diagnose(gen, method="generate", target="letter", training_forms=["open"])
    assert any("10 of 10 generated answers name no option" in w for w in warnings)
    assert any("holds no multiple-choice items" in w for w in warnings)


def _empty_card(export_dir, monkeypatch):
    """A model card as `mambamia export` writes it, with no results yet."""
    from trainer.config import load_config
    from trainer.model_card import card_data, write_card

    monkeypatch.setenv("MAMBAMIA_TINY", str(export_dir))  # the tiny configs' paths resolve under it
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage2.yaml")
    write_card(export_dir, card_data(cfg, 1, {"encoder": "tiny"}, "test"))


def test_eval_warns_on_a_model_whose_letters_are_flat(tiny_assets, tmp_path, monkeypatch):
    """A real model made blind to letters (the letters' output rows equal, so their logits are
    equal) triggers the warning and the report records it; `--target text` scores the option
    text after the bare question, checked against the training tokenization."""
    import torch

    from data.text import tokenize_conversation
    from trainer.evaluate import main

    model = _tiny_export(tiny_assets, tmp_path / "export")
    letters = [model.tokenizer(c, add_special_tokens=False)["input_ids"] for c in "ABCD"]
    assert all(len(ids) == 1 for ids in letters)
    head = model.llm.get_output_embeddings().weight
    with torch.no_grad():
        for ids in letters:
            head[ids[0]] = head[letters[0][0]]
    model.save_pretrained(tmp_path / "export")
    (tmp_path / "export" / "training.json").write_text(json.dumps({"answer_forms": ["open"]}))
    rng = np.random.default_rng(1)
    videos = {f"vid{i}": [qa(f"f{i}", i % 4, "colour")] for i in range(6)}
    features = {k: rng.standard_normal((3, 16, 32)).astype(np.float16) for k in videos}
    with ShardWriter(tmp_path / "ds", max_samples=3) as writer:
        for key, items in videos.items():
            writer.write(key, features[key], {"key": key, "duration": 3.0, "fps": 1.0, "qa": items,
                                              "conversations": [], "timestamps": [0.0, 1.0, 2.0]})
    write_index(tmp_path / "ds")

    out = tmp_path / "eval" / "letters.json"
    assert main([str(tmp_path / "export"), str(tmp_path / "ds"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["diagnostics"]["flat_items"] == 6 and report["tied"] == 6
    assert report["diagnostics"]["training_answer_forms"] == ["open"]
    text = " | ".join(report["warnings"])
    assert "near-uniform on 6 of 6" in text and "option A chosen on 6 of 6" in text
    assert "holds no multiple-choice items" in text
    assert "WARNING:" in out.with_suffix(".txt").read_text()

    out = tmp_path / "eval" / "text.json"
    _empty_card(tmp_path / "export", monkeypatch)
    assert main([str(tmp_path / "export"), str(tmp_path / "ds"), "--out", str(out), "--target", "text"]) == 0
    report = json.loads(out.read_text())
    [row] = _front_matter(tmp_path / "export" / CARD)["mambamia"]["eval"]  # eval recorded itself in the card
    assert row["name"] == "ds" and row["accuracy"] == report["accuracy"] and row["items"] == 6
    assert not any("multiple-choice" in w for w in report["warnings"])
    for p in report["predictions"]:
        item = videos[p["video_key"]][0]
        expected = []
        for option in item["options"]:
            ids, labels = tokenize_conversation(model.tokenizer, [
                {"from": "human", "value": f"<video>\n{item['question']}"}, {"from": "gpt", "value": option}], 256)
            answer = [t for t, lab in enumerate(labels) if lab != -100][:-1]  # not the end-of-turn token
            feats = torch.from_numpy(features[p["video_key"]].astype(np.float32)).unsqueeze(0)
            with torch.no_grad():
                out_ = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), feats,
                             torch.ones(1, 3, dtype=torch.bool), labels=torch.tensor([labels]))
            logp = torch.log_softmax(out_.logits[0].double(), -1)
            spliced = out_.labels[0]
            positions = [t for t in range(1, len(spliced)) if spliced[t] != -100][:len(answer)]
            expected.append(sum(logp[t - 1, spliced[t]].item() for t in positions))
        assert p["scores"] == pytest.approx(expected, abs=1e-4)


def test_one_open_ended_answer_for_every_video_warns():
    from trainer.evaluate import open_ended_warnings

    rows = [{"answer": "gred"} for _ in range(6)]
    assert open_ended_warnings(rows) == [
        "open-ended: 6 of 6 answers are 'gred', whatever the video: the model has not learned to look"]
    varied = [{"answer": c} for c in ["red", "blue", "red", "green", "yellow", "red"]]
    assert open_ended_warnings(varied) == [] and open_ended_warnings(rows[:4]) == []
