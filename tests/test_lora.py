"""LoRA on the LLM (trainer/lora.py): what trains, what stays bit-identical, merge, resume.

In-process: the tiny stage-2 model with adapters; only adapters, compressor and projector train;
merged weights give the unmerged model's logits; adapters kept beside the base load through peft.
Two gloo ranks under ZeRO-3 (one uninterrupted run, one resumed from a copy of its step-2
checkpoint): resumed losses equal the uninterrupted ones; the trained engine's frozen base equals
the LLM files it was loaded from, bit for bit; no rank's checkpoint files hold a frozen weight and
the optimizer partitions hold only what trains; the merged export gives the logits the trained
(unmerged) engine gave.
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
    # An export that kept its adapters beside the base cannot start a stage: they would be lost.
    kept = tiny_root / "exports" / "kept"
    for name in ("llm", "lora"):
        (kept / name).mkdir(parents=True, exist_ok=True)
    for name in ("compressor.safetensors", "projector.safetensors"):
        (kept / name).touch()
    with pytest.raises(ConfigError, match="init_from: .*--keep-adapters"):
        build_model(load_config(STAGE1, [f"init_from={kept}"]))


# ------------------------------------------------------------------------------------------------
# Two ranks under ZeRO-3 (and W&B offline when installed): one launch uninterrupted, one resumed.

STEPS = 4
ZERO3 = [f"schedule.total_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
         "validation.every_steps=0", "logging.tensorboard=false", "parallel.zero_stage=3", *LORA]


def _have_wandb() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


@pytest.mark.slow
def test_zero3_lora_resumes_exactly_keeps_base_and_exports_merged(tiny_root, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from tests.test_resume import FROZEN_ENV, LOGITS_ENV, _copy_checkpoint, _logits_of, _losses, _train
    from tests.ckpt_worker import launch
    from trainer.checkpoint import weights_only_loads
    from trainer.export import consolidated_state_dict, main as export_main
    from trainer.wandb_log import RUN_ID_FILE

    wandb = ["logging.wandb.enabled=true", "logging.wandb.project=ci"] if _have_wandb() else []
    env = {"MAMBAMIA_TINY": str(tiny_root), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    full, resumed = tiny_root / "runs" / "lora_full", tiny_root / "runs" / "lora_resumed"
    dumped_at, frozen_at = tiny_root / "lora_logits.pt", tiny_root / "lora_frozen.pt"
    dumps = {LOGITS_ENV: str(dumped_at), FROZEN_ENV: str(frozen_at)}
    assert launch(full, 2, *ZERO3, *wandb, target=_train, env={**env, **dumps}) == [0, 0]
    expected = _losses(full)
    assert sorted(expected) == list(range(1, STEPS + 1))
    # A resume of a copy of the step-2 checkpoint, two ranks again: the same losses from step 3.
    _copy_checkpoint(full, resumed, 2)
    if wandb:
        (resumed / RUN_ID_FILE).write_text((full / RUN_ID_FILE).read_text())
    assert launch(resumed, 2, *ZERO3, *wandb, target=_train, env=env) == [0, 0]
    losses = _losses(resumed)
    assert sorted(losses) == [3, 4]
    for step in (3, 4):
        assert losses[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step
    if wandb:  # the resumed run continued the W&B run its folder names
        run_id = (full / RUN_ID_FILE).read_text().strip()
        assert [p.name.rsplit("-", 1)[1] for p in (resumed / "wandb").glob("offline-run-*")] == [run_id]

    folder = full / "checkpoints" / str(STEPS)
    state = consolidated_state_dict(folder)
    # The frozen base LLM, as the trained engine holds it, is bit for bit the files it was loaded from.
    base = _assert_base_unchanged(torch.load(frozen_at), tiny_root / "llm")
    # Checkpoints hold what trains: no frozen weight in any rank's files.
    _assert_no_frozen_saved(folder, set(torch.load(frozen_at)))
    # The optimizer partitions hold what trains and nothing else; the adapters did train.
    with weights_only_loads():
        trained = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name,
                                                           exclude_frozen_parameters=True)
    assert {k.split(".", 1)[0] for k in trained} == {"compressor", "projector", "frame_separator", "llm"}
    assert all(".lora_" in k for k in trained if k.startswith("llm."))
    assert all(state[k].abs().max() > 0 for k in trained if ".lora_B." in k)

    dumped = torch.load(dumped_at, weights_only=False)
    merged, kept = tmp_path / "merged", tmp_path / "kept"
    assert export_main([str(full), str(merged)]) == 0
    assert not (merged / "lora").exists()
    torch.testing.assert_close(_logits_of(merged, dumped), dumped["logits"], atol=1e-5, rtol=1e-5)
    assert export_main([str(full), str(kept), "--keep-adapters"]) == 0
    assert (kept / "lora" / "adapter_config.json").is_file()
    kept_base = _base_weights(kept / "llm")
    assert all(torch.equal(kept_base[k], base[k]) for k in base)
    assert "LoRA r=4" in (merged / "README.md").read_text()


def _assert_base_unchanged(frozen: dict[str, torch.Tensor], llm_dir: Path) -> dict[str, torch.Tensor]:
    base = _base_weights(llm_dir)
    as_hf = {k.removeprefix("llm.base_model.model.").replace(".base_layer", ""): k
             for k in frozen if k.startswith("llm.")}
    assert set(base) <= set(as_hf)
    assert all(torch.equal(frozen[as_hf[k]], base[k]) for k in base)
    return base


def _assert_no_frozen_saved(folder: Path, frozen: set[str]) -> None:
    from trainer.checkpoint import safe_load

    files = sorted(folder.glob("*model_states.pt"))
    assert files
    for path in files:
        saved = safe_load(path)
        assert not set(saved["module"]) & frozen, path
        assert not saved.get("frozen_param_fragments"), path


@pytest.mark.slow
def test_zero2_lora_with_recomputation_keeps_base_and_exports_merged(tiny_root, tmp_path):
    """One rank, ZeRO-2, the LLM's activation checkpointing on (as tiny stage 2 has it)."""
    from tests.test_resume import FROZEN_ENV, LOGITS_ENV, _logits_of, _train
    from tests.ckpt_worker import launch
    from trainer.export import consolidated_state_dict, main as export_main

    run, dumped_at = tiny_root / "runs" / "lora_zero2", tiny_root / "lora_zero2_logits.pt"
    frozen_at = tiny_root / "lora_zero2_frozen.pt"
    overrides = ["schedule.total_steps=2", "validation.every_steps=0", "logging.tensorboard=false",
                 "parallel.zero_stage=2", "model.gradient_checkpointing=true", *LORA]
    env = {"MAMBAMIA_TINY": str(tiny_root), LOGITS_ENV: str(dumped_at), FROZEN_ENV: str(frozen_at)}
    assert launch(run, 1, *overrides, target=_train, env=env) == [0]
    state = consolidated_state_dict(run / "checkpoints" / "2")
    _assert_base_unchanged(torch.load(frozen_at), tiny_root / "llm")
    _assert_no_frozen_saved(run / "checkpoints" / "2", set(torch.load(frozen_at)))
    assert all(state[k].abs().max() > 0 for k in state if ".lora_B." in k)
    assert export_main([str(run), str(tmp_path / "merged")]) == 0
    dumped = torch.load(dumped_at, weights_only=False)
    torch.testing.assert_close(_logits_of(tmp_path / "merged", dumped), dumped["logits"], atol=1e-5, rtol=1e-5)


def test_resume_refuses_a_changed_lora_setup_and_follows_wandb_changes(tiny_root, monkeypatch):
    import dataclasses

    from trainer.config import ConfigError, resume_changes

    monkeypatch.setenv("MAMBAMIA_TINY", str(tiny_root))
    saved = dataclasses.asdict(load_config(STAGE1, LORA))
    with pytest.raises(ConfigError, match=r"lora.rank 4 -> 8 \(the checkpoint holds the adapters"):
        resume_changes(saved, load_config(STAGE1, [*LORA, "lora.rank=8"]))
    with pytest.raises(ConfigError, match=r"lora.enabled True -> False"):
        resume_changes(saved, load_config(STAGE1, [*LORA, "lora.enabled=false"]))
    follows = resume_changes(saved, load_config(STAGE1, [*LORA, "logging.wandb.enabled=true"]))
    assert follows == ["logging.wandb.enabled False -> True"]
