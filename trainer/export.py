"""Turn a run's DeepSpeed checkpoint into a folder that loads without DeepSpeed.

    mambamia export RUN_DIR OUT_DIR [--step N]

OUT_DIR gets `VideoLLM.save_pretrained`'s layout (llm/ in HF format with its tokenizer,
compressor.safetensors, projector.safetensors, mambamia.json): what the next stage's `init_from`
and `mambamia eval` read. Runs in one process on CPU, whatever world size and ZeRO stage trained.

Weights come from the fp32 master copy held by the optimizer partitions (DeepSpeed's
zero_to_fp32 reader), not from the bf16 module copy, so a bf16 run exports its exact master
weights. ZeRO-1 checkpoints leave frozen parameters out of the optimizer partitions; those are
taken from the module state the checkpoint also holds (frozen weights never change, so that copy
is exact in the dtype they were loaded in).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from trainer.checkpoint import Checkpointer

# Rank 0's module state (and client state): ZeRO-0/1/2 write one file, ZeRO-3 one per rank.
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def read_model_states(folder: str | Path) -> dict:
    """Rank 0's model-states file of a checkpoint folder: module state, client state."""
    for name in MODEL_STATES:
        if (Path(folder) / name).is_file():
            return torch.load(Path(folder) / name, map_location="cpu", weights_only=False)
    raise FileNotFoundError(f"{folder}: no {' or '.join(MODEL_STATES)}; expected a DeepSpeed "
                            "checkpoint folder")


def check_zero3_partitions(folder: str | Path, world_size: int) -> None:
    """Every rank's ZeRO-3 partition files must be in `folder`: each holds a slice of EVERY
    parameter (trainable in its optimizer file, frozen in its model-states file), so a folder
    missing one is not the trained model. DeepSpeed's reader says so only for optimizer files; a
    missing model-states file it passes over (measured with 0.19.8)."""
    # `*`: bf16 runs prefix the optimizer files with `bf16_`.
    names = [f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"
             for rank in range(world_size) for kind in ("model", "optim")]
    missing = [name for name in names if not any(Path(folder).glob(f"*{name}"))]
    if missing:
        raise FileNotFoundError(f"{folder}: ZeRO-3 checkpoint of {world_size} ranks lacks the partition "
                                f"files {missing}; expected zero_pp_rank_<0..{world_size - 1}>_mp_rank_00_"
                                "{model,optim}_states.pt (were all ranks writing to the same file system?)")


def consolidated_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Full state dict of the trained module from one checkpoint folder (any ZeRO stage, any size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(folder)
    saved = read_model_states(folder)
    # ZeRO-3 keeps empty placeholders in the module state; everything else there is a real tensor.
    merged = {k: v for k, v in saved["module"].items() if v.numel() > 0}
    if any(folder.glob("*optim_states.pt")):
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


def export(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None) -> Path:
    """Write OUT_DIR from checkpoint `step` (default: the one `latest` names); returns OUT_DIR."""
    from trainer.train import build_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt = Checkpointer(run_dir)
    if step is None:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{ckpt.root}: no complete checkpoint to export")
    elif step not in ckpt.complete_steps():
        raise FileNotFoundError(f"{ckpt.root / str(step)}: not a complete checkpoint; complete "
                                f"steps are {ckpt.complete_steps()}")
    folder = ckpt.root / str(step)
    info = ckpt.info(step)
    if int(info.get("zero_stage", 0)) == 3:
        check_zero3_partitions(folder, int(info["world_size"]))
    cfg = _run_config(folder, run_dir)
    model = build_model(cfg)
    from trainer.pipeline import is_pipeline_checkpoint, pipeline_state_dict

    state = (pipeline_state_dict(folder, model) if is_pipeline_checkpoint(folder)
             else consolidated_state_dict(folder))
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match the configured model; missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out_dir)  # temporary sibling folder + rename
    from trainer.validation import write_training_record

    write_training_record(cfg, out_dir)  # what eval checks its scoring mode against
    return out_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mambamia export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a `mambamia train` run folder (holds checkpoints/)")
    parser.add_argument("out_dir", help="folder to write; replaced atomically if it exists")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out_dir, step=args.step)
    except (FileNotFoundError, ValueError) as err:
        print(f"mambamia export: {err}", file=sys.stderr)
        return 1
    print(f"mambamia export: wrote {out}")
    return 0
