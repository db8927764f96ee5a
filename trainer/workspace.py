"""Your own videos at tiny scale: a workspace for the `configs/tiny` stages, and the whole path.

    mambamia tiny WS                  # tiny tokenizer/LLM/SigLIP in WS; prints the commands to run
    mambamia tiny WS --videos VIDEOS --train train.json --test test.json
                                      # ... and runs them: convert, stage 1, export, stage 2, export, eval

The tiny configs read `$MAMBAMIA_TINY`: a folder holding `llm/` and `shards/{train,val}/`; their
runs and exports go there too. This command lays that folder out. With annotations it also runs
every step through the same `mambamia` commands a cluster user runs, printing each one first (so
any step can be rerun by hand), with its output in `WS/logs/`.

Annotations: any form `mambamia convert` reads (LLaVA/ShareGPT conversations, MLVU, Video-MME,
LVBench). `--test` items become the validation set of both stages and what `mambamia eval` scores.
Evaluation scores in the form the training data taught: option letters when the training shards
hold multiple-choice items, otherwise each option's text as the answer to the bare question
(`--target text`); open-ended answers are written beside the report either way. Training runs
2 processes (ZeRO-3 by default, as the demo); by hand one process works too.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from trainer.demo import CONFIGS, StepFailed, run_command, train


def build_models(ws: Path, seed: int = 0) -> None:
    """WS/{tokenizer,llm,vision} from trainer.tiny; folders already there are kept."""
    from transformers.utils import logging as hf_logging

    from trainer.tiny import build_llm, build_tokenizer, build_vision_encoder

    hf_logging.disable_progress_bar()
    if not (ws / "tokenizer" / "tokenizer_config.json").is_file():
        build_tokenizer(ws / "tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ws / "tokenizer"))
    if not (ws / "llm" / "config.json").is_file():
        build_llm(ws / "llm", tokenizer, seed=seed)
    if not (ws / "vision" / "config.json").is_file():
        build_vision_encoder(ws / "vision", seed=seed)


def _convert(args: argparse.Namespace, ws: Path, annotations: str, split: str) -> list[str]:
    return ["convert", "--videos", args.videos, "--annotations", annotations, "--encoder", str(ws / "vision"),
            "--fps", str(args.fps), "--max-frames", str(args.max_frames), "--merge",
            "--out", str(ws / "shards" / split)]


def _overrides(args: argparse.Namespace, steps: int) -> list[str]:
    return [f"data.max_frames={args.max_frames}", f"model.compressor.keyframes={args.keyframes}",
            f"schedule.total_steps={steps}", f"checkpoint.every_steps={steps}",
            f"validation.every_steps={max(1, steps // 2)}", f"parallel.zero_stage={args.zero_stage}",
            f"seed={args.seed}"]


def plan(args: argparse.Namespace, ws: Path) -> list[tuple[str, list[str]]]:
    """(step name, `mambamia` arguments) in order; eval's target is chosen when it runs."""
    stage1_steps = max(2, args.steps // 2)
    return [
        ("convert_train", _convert(args, ws, args.train, "train")),
        ("convert_val", _convert(args, ws, args.test, "val")),
        ("train_stage1", ["train", str(CONFIGS / "stage1.yaml"), *_overrides(args, stage1_steps)]),
        ("export_stage1", ["export", str(ws / "runs" / "stage1"), str(ws / "exports" / "stage1")]),
        ("train_stage2", ["train", str(CONFIGS / "stage2.yaml"), *_overrides(args, args.steps)]),
        ("export_stage2", ["export", str(ws / "runs" / "stage2"), str(ws / "exports" / "stage2")]),
        ("eval", ["eval", str(ws / "exports" / "stage2"), str(ws / "shards" / "val"),
                  "--out", str(ws / "eval" / "report.json"), "--open-ended", str(ws / "eval" / "open_ended.jsonl")]),
    ]


def eval_target(ws: Path) -> str:
    """`letter` when the training shards teach multiple-choice letters, else `text`."""
    from trainer.validation import training_forms

    return "letter" if "mc" in training_forms((str(ws / "shards" / "train"),)) else "text"


def _shown(argv: list[str]) -> str:
    return "mambamia " + " ".join(shlex.quote(a) for a in argv)


def run_all(args: argparse.Namespace, ws: Path) -> int:
    os.environ["MAMBAMIA_TINY"] = str(ws)  # the tiny configs (and the subprocesses) read it
    print(f"export MAMBAMIA_TINY={shlex.quote(str(ws))}", flush=True)
    started = time.time()
    logs = ws / "logs"
    for name, argv in plan(args, ws):
        if name == "eval":
            argv = [*argv, "--target", eval_target(ws)]
        print(f"$ {_shown(argv)}", flush=True)
        if argv[0] == "train":
            total = int(next(a for a in argv if a.startswith("schedule.total_steps=")).split("=")[1])
            train(name, Path(argv[1]), argv[2:], ws / "runs" / name.removeprefix("train_"), logs / f"{name}.log",
                  total)
        else:
            run_command(name, argv, logs / f"{name}.log")
    report = ws / "eval" / "report.txt"
    print(report.read_text(), end="")
    print(f"done in {time.time() - started:.0f} s; report {ws / 'eval' / 'report.json'}, "
          f"open-ended answers {ws / 'eval' / 'open_ended.jsonl'}, logs {logs}")
    ask = ["ask", str(ws / "exports" / "stage2"), "VIDEO", "QUESTION", "--encoder", str(ws / "vision"),
           "--explain", "why.png"]
    print(f"ask the model about a video: {_shown(ask)}")
    return 0


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mambamia tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workspace", help="folder to lay out (created; models already there are kept)")
    p.add_argument("--videos", help="root the annotations' video paths are relative to")
    p.add_argument("--train", help="training annotations (any form `mambamia convert` reads)")
    p.add_argument("--test", help="held-out annotations: validation and evaluation")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second (default 1)")
    p.add_argument("--max-frames", type=int, default=16, help="frames per video at most (default 16)")
    p.add_argument("--keyframes", type=int, default=4, help="frames the compressor keeps (default 4)")
    p.add_argument("--steps", type=int, default=40, help="stage-2 optimizer steps; stage 1 gets half (default 40)")
    p.add_argument("--zero-stage", type=int, choices=[1, 2, 3], default=3,
                   help="DeepSpeed ZeRO stage of both training stages (default 3, as the demo)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    given = [args.videos is not None, args.train is not None, args.test is not None]
    if any(given) and not all(given):
        p.error("--videos, --train and --test go together (or none of them: only build the models)")
    if args.steps < 2 or args.max_frames < 1 or not 1 <= args.keyframes <= args.max_frames:
        p.error(f"expected --steps >= 2 and 1 <= --keyframes <= --max-frames, got {args.steps}, "
                f"{args.keyframes}, {args.max_frames}")
    for name in ("videos", "train", "test"):
        value = getattr(args, name)
        if value is not None and not Path(value).exists():
            p.error(f"--{name}: {value} does not exist")
    return args


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    ws = Path(args.workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    build_models(ws, seed=args.seed)
    print(f"tiny tokenizer, LLM and SigLIP in {ws}", flush=True)
    if args.videos is None:
        demo = argparse.Namespace(videos="VIDEOS", train="train.json", test="test.json", fps=1.0,
                                  max_frames=16, keyframes=4, steps=40, zero_stage=3, seed=0)
        print(f"\nnext, with your videos and annotations (or all at once: mambamia tiny {shlex.quote(str(ws))} "
              "--videos VIDEOS --train train.json --test test.json):\n")
        print(f"export MAMBAMIA_TINY={shlex.quote(str(ws))}")
        for name, argv_ in plan(demo, ws):
            print(_shown(argv_) + ("  --target text   # --target letter when training answers are letters"
                                   if name == "eval" else ""))
        return 0
    used = [name for name in ("shards", "runs", "exports") if (ws / name).is_dir() and any((ws / name).iterdir())]
    if used:
        # convert would add these videos to the shards there and training would resume old runs
        print(f"mambamia tiny: {ws} already holds {', '.join(used)}/ (an earlier run, or the demo's): pick a "
              "fresh folder, or remove them to start over", file=sys.stderr)
        return 1
    try:
        return run_all(args, ws)
    except StepFailed as err:
        print(f"mambamia tiny: {err}", file=sys.stderr)
        return 1
