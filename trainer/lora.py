"""LoRA on the LLM of a VideoLLM, with peft: applied by the trainer, merged by the export.

The model code knows nothing of it: `apply_lora` replaces `model.llm` by a peft model wrapping it
(parameter names gain `base_model.model.` and each targeted linear layer `base_layer` beside
`lora_A` / `lora_B`), which forwards `forward`, `generate`, `config` and the embeddings to the
wrapped LLM. Training and export both build the model through `trainer.train.build_model`, which
calls `apply_lora`, so checkpoints and the export's model agree on names.

    build_model -> apply_lora -> engine.freeze -> freeze_base_llm -> optimizer over what trains

Only the adapters (and the other trainable groups) have requires_grad, so the client optimizer
and every ZeRO stage hold state for them alone; the base weights never change, so checkpoints
leave them out (Checkpointer.exclude_frozen) and a resume or export rebuilds them with the model.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from trainer.config import ConfigError, LoraConfig

ADAPTER_DIR = "lora"
"""Where `mambamia export --keep-adapters` puts the adapters (peft layout) beside llm/."""


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("lora.enabled: needs peft, which is not installed (pip install 'mambamia[lora]')") from None
    return peft


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """`model` with adapters injected into its LLM (in place; returned for chaining); unchanged
    when LoRA is off. Adapter initialisation draws from the torch RNG (lora_A; lora_B starts at
    zero, so the model's outputs are unchanged until it trains)."""
    if not cfg.enabled:
        return model
    peft = _peft()
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(cfg.target_modules), bias="none")
    try:
        model.llm = peft.get_peft_model(model.llm, config)
    except ValueError as err:  # no module of the LLM matches target_modules
        raise ConfigError(f"lora.target_modules: {' '.join(str(err).split())[:300]}") from None
    return model


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def freeze_base_llm(model: nn.Module) -> None:
    """Of the LLM's parameters, only the adapters train (call after the group-level freeze)."""
    for name, param in model.llm.named_parameters():
        param.requires_grad_(is_adapter(name))


def merge_adapters(model: nn.Module) -> None:
    """Fold the adapters into the base weights (W + B A * alpha / rank) and unwrap the LLM, so
    `model.save_pretrained` writes a plain HF model."""
    model.llm = model.llm.merge_and_unload()


def split_adapters(model: nn.Module, folder: str | Path) -> None:
    """Write the adapters to `folder` in peft's layout (adapter_config.json,
    adapter_model.safetensors; load with `peft.PeftModel.from_pretrained(base_llm, folder)`) and
    unwrap the LLM to its unchanged base weights."""
    model.llm.save_pretrained(str(folder))
    model.llm = model.llm.unload()


def has_adapters(model: nn.Module) -> bool:
    return any(is_adapter(name) for name, _ in model.llm.named_parameters())
