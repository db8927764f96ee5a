"""Turn a run's DeepSpeed checkpoint into a folder that loads without DeepSpeed.

    mambamia export RUN_DIR OUT_DIR [--step N]

OUT_DIR gets `VideoLLM.save_pretrained`'s layout (llm/ in HF format with its tokenizer,
compressor.safetensors, projector.safetensors, mambamia.json): what the next stage's `init_from`
and `mambamia eval` read; plus training.json (the stage's data and frames) and README.md, a model
card (trainer/model_card.py: base LLM, vision tower, compressor, token budget, stages, data
mixture), so the folder can be pushed to a hub as is. Runs in one process on CPU, whatever world size and ZeRO stage trained.

Weights come from the fp32 master copy held by the optimizer partitions (DeepSpeed's
zero_to_fp32 reader), not from the bf16 module copy, so a bf16 run exports its exact master
weights. ZeRO-1 checkpoints leave frozen parameters out of the optimizer partitions; those are
taken from the module state the checkpoint also holds (frozen weights never change, so that copy
is exact in the dtype they were loaded in).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from trainer import errors
from trainer.config import ConfigError
from trainer.lora import ADAPTER_DIR, has_adapters, merge_adapters, split_adapters
from trainer.model_card import card_data, write_card
from trainer.rng import seed_everything
from trainer.checkpoint import (RANK0_MODEL_STATES, Checkpointer, CheckpointError, safe_load,
                                weights_only_loads)


def read_model_states(folder: str | Path) -> dict:
    """Rank 0's model-states file of a checkpoint folder (module state, client state), loaded as
    tensors and plain data only."""
    for name in RANK0_MODEL_STATES:
        if (Path(folder) / name).is_file():
            return safe_load(Path(folder) / name)
    raise CheckpointError(f"{folder}: no {' or '.join(RANK0_MODEL_STATES)}; expected a DeepSpeed "
                          "checkpoint folder")


def consolidated_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Full state dict of the trained module from one checkpoint folder (any ZeRO stage, any size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(folder)
    saved = read_model_states(folder)
    # ZeRO-3 keeps empty placeholders in the module state; everything else there is a real tensor.
    merged = {k: v for k, v in saved["module"].items() if v.numel() > 0}
    if any(folder.glob("*optim_states.pt")):
        with weights_only_loads():  # zero_to_fp32 asks torch.load for weights_only=False
            merged.update(get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name))
    return merged


def _run_config(folder: Path, run_dir: Path):
    """The resolved config the checkpoint was saved with (config.yaml of the run as a fallback)."""
    from trainer.config import RunConfig, build, load_config

    saved = read_model_states(folder)
    if isinstance(saved.get("config"), dict):
        cfg = build(RunConfig, saved["config"], "")
        cfg.validate()
        return cfg
    return load_config(run_dir / "config.yaml")


def export(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None,
           keep_adapters: bool = False) -> Path:
    """Write OUT_DIR from checkpoint `step` (default: the one `latest` names); returns OUT_DIR.

    A LoRA run's adapters are merged into the exported LLM, or with `keep_adapters` written to
    OUT_DIR/lora (peft's layout) beside an llm/ that holds the unchanged base weights."""
    from trainer.train import build_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt = Checkpointer(run_dir)
    # Verified first (every rank's files, sizes, loadable as plain data); without --step a damaged
    # newest checkpoint falls back to the previous complete one, as a resume does.
    step = ckpt.resume_step(step)
    if step is None:
        raise CheckpointError(f"{ckpt.root}: no checkpoint to export")
    folder = ckpt.root / str(step)
    cfg = _run_config(folder, run_dir)
    seed_everything(cfg.seed)  # as training built it: frozen weights a LoRA checkpoint omits come from here
    model = build_model(cfg)
    from trainer.pipeline import is_pipeline_checkpoint, pipeline_state_dict

    state = (pipeline_state_dict(folder, model) if is_pipeline_checkpoint(folder)
             else consolidated_state_dict(folder))
    if cfg.lora.enabled:  # its checkpoints leave the frozen weights out (Checkpointer.exclude_frozen)
        state = {**frozen_state(model, cfg), **state}
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"{folder}: checkpoint does not match the configured model; missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=True)
    adapters = _take_adapters(model, out_dir, keep_adapters)
    model.save_pretrained(out_dir)  # temporary sibling folder + rename
    if adapters is not None:
        os.replace(adapters, out_dir / ADAPTER_DIR)
    from trainer.validation import write_training_record

    write_training_record(cfg, out_dir)  # what eval checks its scoring mode against
    features = json.loads((out_dir / "training.json").read_text()).get("features")
    write_card(out_dir, card_data(cfg, step, features, ckpt.info(step).get("code_version") or "unknown",
                                  adapters=ADAPTER_DIR if adapters is not None else None))
    return out_dir


def frozen_state(model, cfg) -> dict[str, torch.Tensor]:
    """The weights of `model` (as built from `cfg`) that training froze."""
    from trainer.engine import freeze
    from trainer.lora import freeze_base_llm

    freeze(model, cfg.trainable)
    freeze_base_llm(model)
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items() if not v.requires_grad}


def _take_adapters(model, out_dir: Path, keep: bool) -> Path | None:
    """Merge a LoRA model's adapters into its LLM, or (`keep`) write them to a temporary sibling
    of OUT_DIR (returned, moved in once OUT_DIR is in place) and unwrap the base LLM."""
    if not has_adapters(model):
        if keep:
            raise ConfigError("--keep-adapters: this run trained no LoRA adapters (lora.enabled is false)")
        return None
    if not keep:
        merge_adapters(model)
        return None
    tmp = out_dir.parent / f".{out_dir.name}.lora-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    split_adapters(model, tmp)
    return tmp


_EXIT_CODES = """
exit codes: 0 written; 1 unexpected error (traceback); 2 usage or a saved config that does not
load; 4 no usable checkpoint (missing, damaged, unsafe or not matching its config). One line on
stderr names the file for 2 and 4 (trainer/errors.py lists every code).
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mambamia export", description=__doc__ + _EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a `mambamia train` run folder (holds checkpoints/)")
    parser.add_argument("out_dir", help="folder to write; replaced atomically if it exists")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--keep-adapters", action="store_true",
                        help="LoRA runs: write the adapters to OUT_DIR/lora (peft layout) beside the "
                             "unmerged base LLM instead of merging them into llm/")
    args = parser.parse_args(argv)

    def body() -> int:
        out = export(args.run_dir, args.out_dir, step=args.step, keep_adapters=args.keep_adapters)
        print(f"mambamia export: wrote {out}")
        return 0

    return errors.run_reporting("mambamia export", body)
