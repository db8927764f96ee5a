"""The model card (README.md) of an export folder, so the folder can be pushed to a hub as is.

    python -m trainer.model_card EXPORT_DIR REPORT.json [--name NAME]   # add a `mambamia eval` result

The card's YAML front matter holds everything the card says in machine-readable form (hub keys
`base_model` (when the base LLM is a hub id), `library_name`, `pipeline_tag`, `tags`, plus `mambamia:` with the vision tower, the
compressor, the token budget, every stage that led to these weights and the evaluation results);
the Markdown below it is rendered from that data alone. A later stage's export reads its
`init_from` card to carry the original base LLM and the earlier stages forward, and adding an
evaluation result re-renders the card from its own front matter.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"


def _front_matter(path: Path) -> dict[str, Any] | None:
    """The YAML between the leading `---` lines of a card, or None (no card, or not ours)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return None
    try:
        data = yaml.safe_load(text[4:text.index("\n---\n", 4)])
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("mambamia"), dict) else None


def visual_tokens(cfg, features: dict | None) -> int | None:
    """Visual tokens the LLM reads for a video of `data.max_frames` frames (model/budget.py), or
    None when the patches per frame are unknown."""
    from model.budget import visual_token_count

    patches = ((features or {}).get("patches") or cfg.data.num_patches
               or cfg.model.compressor.patches_per_frame)
    if patches is None:
        return None
    frames = cfg.data.max_frames
    return visual_token_count(cfg.model, float(frames), 1.0, frames, patches_per_frame=patches)


def stage_record(cfg, step: int) -> dict[str, Any]:
    """What one stage did: its name, steps, what trained at which rate, its data mixture."""
    return {"stage": cfg.stage, "steps": step, "trainable": list(cfg.trainable),
            "lr": {g: cfg.optimizer.group_lr.get(g, cfg.optimizer.lr) for g in cfg.trainable},
            "global_batch_size": cfg.parallel.global_batch_size, "zero_stage": cfg.parallel.zero_stage,
            "max_frames": cfg.data.max_frames,
            "lora": dataclasses.asdict(cfg.lora) if cfg.lora.enabled else None,
            "data": [{"path": s.path, "weight": s.weight} for s in cfg.data.sources]}


def card_data(cfg, step: int, features: dict | None, code_version: str, *,
              adapters: str | None = None) -> dict[str, Any]:
    """The front matter of the card of an export of `cfg`'s run at `step`; `adapters`: the folder
    holding unmerged LoRA adapters (`mambamia export --keep-adapters`)."""
    previous = _front_matter(Path(cfg.init_from) / CARD) if cfg.init_from else None
    base = (previous or {}).get("mambamia", {}).get("base_llm") or (cfg.init_from or cfg.model.llm_path)
    earlier = (previous or {}).get("mambamia", {}).get("stages") or []
    if cfg.init_from and previous is None:  # an export without a card: name it, stages unknown
        earlier = [{"stage": f"unknown (init_from {cfg.init_from} has no card)"}]
    comp = dataclasses.asdict(cfg.model.compressor)
    # The hub validates `base_model` as a model id: a local folder is named only under mambamia.
    hub = {"base_model": base} if _is_hub_id(base) else {}
    return {
        "library_name": "mambamia", **hub, "pipeline_tag": "video-text-to-text",
        "tags": ["mambamia", "video-llm", "long-video", "mamba2"],
        "mambamia": {
            "base_llm": base,
            "vision_tower": features, "projector": cfg.model.projector,
            "frame_separator": cfg.model.frame_separator, "compressor": comp,
            "visual_tokens": {"frames": cfg.data.max_frames, "tokens": visual_tokens(cfg, features)},
            "stages": [*earlier, stage_record(cfg, step)], "code_version": code_version,
            "unmerged_adapters": adapters,
            "eval": [],  # the previous stage's results describe other weights
        },
    }


def _is_hub_id(name: str) -> bool:
    """`owner/name` as the hub spells repo ids, and not a folder on this machine."""
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) is not None
            and not Path(name).exists())


def render(data: dict[str, Any]) -> str:
    """README.md text: the front matter, then Markdown drawn from it."""
    mm = data["mambamia"]
    tower, budget = mm["vision_tower"] or {}, mm["visual_tokens"]
    comp = mm["compressor"]
    lines = ["---", yaml.safe_dump(data, sort_keys=False).rstrip(), "---", "",
             f"# MambaMia video LLM: {mm['stages'][-1]['stage']}", "",
             "A long-video LLM: frame features from a vision tower, compressed by a bidirectional "
             "Mamba2 (MambaMia) compressor with Δ-based keyframe selection, projected and spliced "
             "into a causal LLM. Load it with `mambamia ask`, `mambamia eval`, or "
             "`VideoLLM.from_pretrained` (model/video_llm.py).", "",
             "## Model", "", "| part | value |", "|---|---|",
             f"| base LLM | `{mm['base_llm']}` |",
             f"| vision tower | {_tower(tower)} |",
             f"| compressor | {comp['kind']}: hidden {comp['hidden_size']}, {comp['num_layers']} layer(s), "
             f"k {comp['k']}, {comp['keyframes']} keyframes by {comp['frame_selection']} |",
             f"| projector | {mm['projector']}, frame separator: {mm['frame_separator']} |",
             f"| visual tokens per video | {budget['tokens'] if budget['tokens'] is not None else 'unknown'} "
             f"at {budget['frames']} frames (model/budget.py) |", "",
             *([f"llm/ holds the base LLM; the LoRA adapters trained on it are in {mm['unmerged_adapters']}/ "
                "(peft layout): `PeftModel.from_pretrained(llm, adapters)` applies them.", ""]
               if mm.get("unmerged_adapters") else []),
             "The full compressor configuration is `mambamia.compressor` in this file's front matter "
             "and `compressor` in `mambamia.json`.", "",
             "## Training", "", "| stage | steps | trains (lr) | batch | ZeRO | frames | data mixture (weight) |",
             "|---|---|---|---|---|---|---|"]
    lines += [_stage_row(s) for s in mm["stages"]]
    lines += ["", f"Code version: `{mm['code_version']}`.", "", "## Evaluation", ""]
    if mm["eval"]:
        lines += ["| benchmark | method | items | accuracy | chance |", "|---|---|---|---|---|"]
        lines += [f"| {e['name']} | {e['method']} | {e['items']} | {_pct(e['accuracy'])} | {_pct(e['chance'])} |"
                  for e in mm["eval"]]
    else:
        lines += ["No results recorded yet."]
    lines += ["", "Score shards and record the result here:", "", "```",
              "mambamia eval EXPORT_DIR SHARDS_DIR --out report.json",
              "python -m trainer.model_card EXPORT_DIR report.json --name BENCHMARK", "```", ""]
    return "\n".join(lines)


def _tower(tower: dict) -> str:
    if not tower:
        return "unknown (the training shards were gone at export)"
    return (f"`{tower.get('encoder')}` layer {tower.get('layer')}, {tower.get('patches')} patches x "
            f"{tower.get('dim')} per frame, sampled at {tower.get('fps')} fps")


def _stage_row(s: dict) -> str:
    if "steps" not in s:
        return f"| {s['stage']} | | | | | | |"
    lora = f", LoRA r={s['lora']['rank']}" if s.get("lora") else ""
    trains = ", ".join(f"{g} ({lr:g}{lora if g == 'llm' else ''})" for g, lr in s["lr"].items())
    mixture = ", ".join(f"`{d['path']}` ({d['weight']:g})" for d in s["data"])
    return (f"| {s['stage']} | {s['steps']} | {trains} | {s['global_batch_size']} | {s['zero_stage']} "
            f"| {s['max_frames']} | {mixture} |")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def write_card(out_dir: str | Path, data: dict[str, Any]) -> Path:
    from trainer.evaluate import write_atomic

    path = Path(out_dir) / CARD
    write_atomic(path, render(data))
    return path


def record_eval(export_dir: str | Path, report: dict[str, Any], name: str) -> Path:
    """Add (or replace, by `name`) one `mambamia eval` report's headline numbers in the card."""
    path = Path(export_dir) / CARD
    data = _front_matter(path)
    if data is None:
        raise ValueError(f"{path}: no mambamia model card; export the run again with `mambamia export`")
    try:
        row = {"name": name, "method": report["method"], "items": int(report["items"]),
               "accuracy": report["accuracy"], "chance": report["chance"]}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"report: expected a `mambamia eval --out` JSON report, missing {err}") from None
    data["mambamia"]["eval"] = [e for e in data["mambamia"]["eval"] if e["name"] != name] + [row]
    return write_card(export_dir, data)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.model_card", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("report", help="a `mambamia eval --out` JSON report")
    parser.add_argument("--name", default=None, help="benchmark name (default: the report's file stem)")
    args = parser.parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text())
        path = record_eval(args.export_dir, report, args.name or Path(args.report).stem)
    except (OSError, ValueError) as err:
        print(f"model_card: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"model_card: updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
