"""LoRA on the LLM (trainer/lora.py): what trains, what stays bit-identical, merge, resume.

In-process: the tiny stage-2 model with adapters; only adapters, compressor and projector train;
merged weights give the unmerged model's logits; adapters kept beside the base load through peft.
Two gloo ranks under ZeRO-3 (one uninterrupted run, one resumed from a copy of its step-2
checkpoint): resumed losses equal the uninterrupted ones; the checkpoint's frozen base equals the
LLM files it was loaded from, bit for bit; the optimizer partitions hold only what trains; the
merged export gives the logits the trained (unmerged) engine gave.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="LoRA needs peft: pip install 'mambamia[lora]'")

from trainer.config import load_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGE1 = str(REPO_ROOT / "configs" / "tiny" / "stage1.yaml")
# Stage 1's data and model with the LLM trained through adapters (no export needed to start it).
LORA = ["trainable=[compressor,projector,llm]", "lora.enabled=true", "lora.rank=4", "lora.alpha=8",
        "lora.dropout=0.1", "lora.target_modules=[q_proj,v_proj,down_proj]"]


@pytest.fixture(scope="module")
def tiny_root(tiny_assets, tmp_path_factory):
    from tests.test_train import make_tiny_root

    return make_tiny_root(tmp_path_factory.mktemp("lora") / "tiny", Path(tiny_assets["llm"]))


def _base_weights(llm_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(llm_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def _lora_model(tiny_root, monkeypatch, *extra):
    from trainer.engine import freeze
    from trainer.lora import freeze_base_llm
    from trainer.train import build_model

    monkeypatch.setenv("MAMBAMIA_TINY", str(tiny_root))
    cfg = load_config(STAGE1, [*LORA, *extra])
    torch.manual_seed(0)
    model = build_model(cfg)
    freeze(model, cfg.trainable)
    freeze_base_llm(model)
    return cfg, model


def _batch(model):
    from tests.test_resume import _fixed_batch

    return _fixed_batch(model.tokenizer)


def test_only_adapters_compressor_and_projector_train(tiny_root, monkeypatch):
    _, model = _lora_model(tiny_root, monkeypatch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    in_llm = {n for n in trainable if n.startswith("llm.")}
    assert in_llm and all(".lora_A." in n or ".lora_B." in n for n in in_llm)
    # One A and one B per targeted linear layer of every decoder layer, nothing else.
    layers = model.llm.config.num_hidden_layers
    assert len(in_llm) == 2 * 3 * layers
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in in_llm} == {"q_proj", "v_proj", "down_proj"}
    assert {n.split(".", 1)[0] for n in trainable - in_llm} == {"compressor", "projector", "frame_separator"}


def test_merged_and_kept_adapters_give_the_unmerged_logits(tiny_root, monkeypatch, tmp_path):
    from peft import PeftModel

    from model.video_llm import VideoLLM
    from trainer.lora import merge_adapters, split_adapters

    _, model = _lora_model(tiny_root, monkeypatch, "lora.dropout=0.0")
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to merge
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.3)
    model.eval()
    batch = _batch(model)
    with torch.no_grad():
        unmerged = model(**batch).logits
        base = {k: v.clone() for k, v in model.llm.get_base_model().state_dict().items()}
    kept = tmp_path / "kept"
    split_adapters(model, tmp_path / "adapters")
    model.save_pretrained(kept)
    reloaded = VideoLLM.from_pretrained(kept).eval()
    with torch.no_grad():
        plain = reloaded(**batch).logits
        reloaded.llm = PeftModel.from_pretrained(reloaded.llm, tmp_path / "adapters")
        assert (plain - unmerged).abs().max() > 1e-3  # the adapters matter
        torch.testing.assert_close(reloaded(**batch).logits, unmerged, atol=1e-5, rtol=1e-5)
        merge_adapters(reloaded)
        assert not any(".lora_" in n for n in reloaded.state_dict())
        torch.testing.assert_close(reloaded(**batch).logits, unmerged, atol=1e-5, rtol=1e-5)
    # The unmerged base written beside the adapters is the base the adapters were trained on.
    saved = {k.removeprefix("base_model.model."): v for k, v in _base_weights(kept / "llm").items()}
    base = {k.replace(".base_layer", ""): v for k, v in base.items()}
    assert all(torch.equal(saved[k], base[k]) for k in saved)


def test_lora_config_errors_name_the_key(tiny_root, monkeypatch):
    from trainer.config import ConfigError
    from trainer.train import build_model

    monkeypatch.setenv("MAMBAMIA_TINY", str(tiny_root))
    with pytest.raises(ConfigError, match="lora.enabled: .*trainable"):
        load_config(STAGE1, ["lora.enabled=true"])
    with pytest.raises(ConfigError, match="lora.dropout"):
        load_config(STAGE1, [*LORA, "lora.dropout=1.0"])
    with pytest.raises(ConfigError, match="lora.target_modules"):
        build_model(load_config(STAGE1, [*LORA, "lora.target_modules=[no_such_layer]"]))
