"""The export's model card (trainer/model_card.py) checked against the config it came from."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from trainer.config import load_config
from trainer.model_card import CARD, _front_matter, card_data, main as card_main, write_card

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
FEATURES = {"encoder": "google/siglip2-so400m-patch16-384", "layer": -2, "fps": 1.0, "patches": 16, "dim": 32}


def _real_token_count(cfg, patches: int) -> int:
    """Second implementation of the budget: run the real compressor on real features."""
    from model.compressor import VideoCompressor

    torch.manual_seed(0)
    comp = VideoCompressor(cfg.model.compressor).eval()
    frames = cfg.data.max_frames
    with torch.no_grad():
        tokens = comp(torch.randn(1, frames, patches, cfg.model.compressor.input_dim)).tokens[0]
    return tokens.shape[0] * (tokens.shape[1] + int(cfg.model.frame_separator))


@pytest.fixture
def tiny_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAMIA_TINY", str(tmp_path))
    return tmp_path


def test_card_states_the_config_it_came_from(tiny_env):
    cfg = load_config(CONFIGS / "stage1.yaml", ["data.sources=[{path: /d/a, weight: 2.0}, {path: /d/b, weight: 0.5}]"])
    write_card(tiny_env, card_data(cfg, 8, FEATURES, "v1-test"))
    text = (tiny_env / CARD).read_text()
    data = _front_matter(tiny_env / CARD)
    mm = data["mambamia"]
    assert mm["base_llm"] == cfg.model.llm_path and f"`{cfg.model.llm_path}`" in text
    assert "base_model" not in data  # a local folder is no hub id; the hub would refuse the card
    assert mm["compressor"] == dataclasses.asdict(cfg.model.compressor)
    assert mm["vision_tower"] == FEATURES and FEATURES["encoder"] in text
    assert mm["visual_tokens"] == {"frames": cfg.data.max_frames, "tokens": _real_token_count(cfg, 16)}
    assert f"| {mm['visual_tokens']['tokens']} at {cfg.data.max_frames} frames" in text
    [stage] = mm["stages"]
    assert stage["stage"] == cfg.stage and stage["steps"] == 8 and stage["trainable"] == cfg.trainable
    assert stage["data"] == [{"path": "/d/a", "weight": 2.0}, {"path": "/d/b", "weight": 0.5}]
    assert "`/d/a` (2)" in text and "`/d/b` (0.5)" in text and "v1-test" in text
    assert "No results recorded yet" in text


def test_next_stage_card_carries_base_model_and_earlier_stages(tiny_env):
    stage1 = load_config(CONFIGS / "stage1.yaml")
    export1 = tiny_env / "exports" / "stage1"
    export1.mkdir(parents=True)
    write_card(export1, card_data(stage1, 8, FEATURES, "v1"))
    stage2 = load_config(CONFIGS / "stage2.yaml")
    assert stage2.init_from == str(export1)
    data = card_data(stage2, 5, FEATURES, "v2")
    assert data["mambamia"]["base_llm"] == stage1.model.llm_path  # not the stage-1 export's llm/ copy
    assert [s["stage"] for s in data["mambamia"]["stages"]] == [stage1.stage, stage2.stage]
    assert data["mambamia"]["stages"][1]["trainable"] == ["compressor", "projector", "llm"]
    # An init_from folder without a card: named, its history unknown, never silently dropped.
    (export1 / CARD).unlink()
    unknown = card_data(stage2, 5, None, "v2")
    assert unknown["mambamia"]["base_llm"] == str(export1) and "unknown" in unknown["mambamia"]["stages"][0]["stage"]
    assert "unknown (the training shards were gone" in write_card(tiny_env, unknown).read_text()


def test_eval_results_are_added_and_replaced_by_name(tiny_env, capsys):
    import json

    cfg = load_config(CONFIGS / "stage1.yaml")
    write_card(tiny_env, card_data(cfg, 8, FEATURES, "v1"))
    report = tiny_env / "needle.json"
    for correct in (3, 7):
        report.write_text(json.dumps({"method": "loglik", "items": 8, "accuracy": correct / 8, "chance": 0.25}))
        assert card_main([str(tiny_env), str(report)]) == 0
    rows = _front_matter(tiny_env / CARD)["mambamia"]["eval"]
    assert rows == [{"name": "needle", "method": "loglik", "items": 8, "accuracy": 7 / 8, "chance": 0.25}]
    assert "| needle | loglik | 8 | 87.5% | 25.0% |" in (tiny_env / CARD).read_text()
    report.write_text("{}")
    assert card_main([str(tiny_env), str(report)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_hub_id_base_is_the_hub_base_model(tiny_env):
    cfg = load_config(CONFIGS / "stage1.yaml", ["model.llm_path=Qwen/Qwen2-7B-Instruct"])
    data = card_data(cfg, 8, FEATURES, "v1")
    assert data["base_model"] == "Qwen/Qwen2-7B-Instruct" == data["mambamia"]["base_llm"]
