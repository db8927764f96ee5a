"""The `mambamia` command: one entry point, one subcommand per job.

    mambamia convert   annotations (+ videos or feature files) -> WebDataset shards
    mambamia extract   videos -> feature shards (no annotations needed)
    mambamia train     one training stage from a YAML config with dotted overrides
    mambamia export    a run's checkpoint -> consolidated HF-style folder
    mambamia eval      score an exported model on multiple-choice / open-ended shards
    mambamia ask       ask an exported model about one video file (--explain draws its frame choice)
    mambamia demo      the laptop-sized end-to-end run (synthetic videos, tiny models)
    mambamia tiny      a tiny-model workspace for your own videos, and the whole path through it

Each subcommand lives in its own module and parses its own arguments, so `mambamia X --help`
explains X fully. Imports are lazy: `mambamia convert` never imports DeepSpeed.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

# name -> (module:function, one-line summary). Each function takes argv (list[str]) and returns an
# exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("data.cli:convert_main", "annotations + videos/feature files -> WebDataset shards"),
    "extract": ("data.cli:extract_main", "videos -> frame-feature shards with a local vision encoder"),
    "train": ("trainer.train:main", "train one stage: mambamia train CONFIG.yaml [key.sub=value ...]"),
    "export": ("trainer.export:main", "RUN_DIR OUT_DIR: consolidated folder loadable without DeepSpeed"),
    "eval": ("trainer.evaluate:main", "EXPORT_DIR SHARDS: multiple-choice accuracy / open-ended answers"),
    "ask": ("trainer.ask:main", "EXPORT_DIR VIDEO \"question\": the model's answer about one video file"),
    "demo": ("trainer.demo:main", "end-to-end run on synthetic videos with tiny local models"),
    "tiny": ("trainer.workspace:main", "WS [--videos V --train A --test B]: your videos through tiny models"),
}


def _usage() -> str:
    lines = ["usage: mambamia COMMAND [args...]", "", "commands:"]
    lines += [f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `mambamia COMMAND --help` for the arguments of each command."]
    return "\n".join(lines)


def configure_logging() -> None:
    """The project's own loggers (model/, data/, trainer/) print INFO lines such as the kernel
    choice to stderr, on the first rank only: without a handler Python drops everything below
    WARNING, and on N ranks each line would appear N times. Warnings still show on every rank."""
    rank = int(os.environ.get("RANK", "0") or 0)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    for package in ("model", "data", "trainer"):
        logger = logging.getLogger(package)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mambamia: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    configure_logging()
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


def entry() -> int:
    """The process entry point (`mambamia`, `python -m trainer.cli`): main, then the process group
    is torn down before the interpreter exits. Left to interpreter shutdown, gloo's threads were
    sometimes destroyed while still joinable, and a rank that had finished its work aborted
    (SIGABRT, "terminate called without an active exception")."""
    code = main()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(entry())
