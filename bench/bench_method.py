"""Does MambaMia beat its ablations? A controlled benchmark through the real training path.

Synthetic long-video tasks are generated on the fly at the feature level (patch features of a
static scene plus noise, with planted patterns), so no video is ever seen twice and nothing can be
memorised; every variant trains the same VideoLLM (the demo's tiny Qwen2 LLM after its text
warm-up, compressor, projector, all trainable) with the same recipe, one model per variant and
seed on videos of every length in `--lengths` (each batch one length, drawn at random), and is
scored at each length by the evaluator's option log-likelihood (trainer.evaluate) on fresh videos.

Tasks (the question names the task, options are listed in a fixed order, so text alone is chance):
    needle  ONE frame out of hundreds shows a shape: which of 4 (Spec.needle_kind; by default
            the classes are the same parts in rotated places, so a group mean cannot tell them)
    order   two events (patterns) in two different frames: which came first (2 options)
    count   an event in 1-4 frames: how many (4 options)
Variants (equal visual-token budget at every length: `keyframes` frames x anchors per frame):
    mambamia, mambamia_uniform (uniform keyframes), bimamba (no GPA), causal_mambamia,
    transformer, avgpool. Every variant has the same Time Axis Aggregator and Δ selection except
    mambamia_uniform.

    python bench/bench_method.py --quick                          # CI smoke run, seconds
    python bench/bench_method.py --jobs 2                         # the needle table (~25 min)
    python bench/bench_method.py --jobs 2 --tasks order count     # the other two tasks
    python bench/bench_method.py --tune 1e-3 3e-3 --lengths 64    # the recipe's learning rate
    python bench/bench_method.py --profile --lengths 128          # Δ frame scores, untrained

Scale: 4 patches of 16 features per frame, one anchor per frame (k = 4), 8 kept frames at every
length, a 64-wide 2-layer LLM, 800 steps of 4 videos. Cost grows linearly with length for every
variant but the transformer (quadratic: 1.2 s a step at 1024 frames on one core).

Prints a table of mean ± std accuracy per task and length, writes a PNG plot and a JSON report,
and ends with one JSON line (the report's summary).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.collate import pad_text  # noqa: E402
from data.text import qa_conversation, tokenize_conversation  # noqa: E402
from model.compressor import VideoCompressor  # noqa: E402
from model.config import CompressorConfig, VideoLLMConfig  # noqa: E402
from model.video_llm import VideoLLM  # noqa: E402
from trainer.engine import lr_factor  # noqa: E402
from trainer.evaluate import ModelQA, QAItem, choose_option, write_atomic  # noqa: E402
from trainer.plots import save_figure  # noqa: E402
from trainer.tiny import build_llm, build_tokenizer, warm_up_llm  # noqa: E402

VARIANTS: dict[str, dict] = {
    "mambamia": {},
    "mambamia_uniform": {"frame_selection": "uniform"},
    "bimamba": {"kind": "bimamba"},
    "causal_mambamia": {"kind": "causal_mambamia"},
    "transformer": {"kind": "transformer"},
    "avgpool": {"kind": "avgpool"},
}
TASKS = ("needle", "order", "count")
CLASSES = ("circle", "square", "star", "cross")
EVENTS = ("bell", "flash")


@dataclasses.dataclass(kw_only=True)
class Spec:
    """The synthetic videos and the model that reads them (one per run)."""

    patches: int = 4
    """Patch tokens per frame (4 with k = 4: one anchor per frame, the CPU-affordable case)."""
    dim: int = 16
    """Feature width."""
    noise: float = 0.5
    """Per-frame, per-patch Gaussian noise on top of the video's static scene (scene std 1)."""
    amplitude: float = 3.0
    """RMS per feature channel of a planted pattern (patterns are unit-RMS vectors x this)."""
    needle_patches: int = 4
    """Patches of the one frame that carry the additive needle (all 4 by default). At this
    scale the tiny LLM does not learn to find a one-frame event filling 1 of 4 patches within
    1000 steps (loss stays at chance, 8 frames all kept), while a whole-frame one does."""
    needle_kind: str = "layout"
    """"layout": the needle frame's patches show the same parts in every class, rotated by the
    class index (a shape told from another by where its parts are, like b/d or 6/9), so a mean
    over the frame's group is identical for all classes: average pooling is blind to the class
    by construction, while GPA's weights and the scan's order can see it. "additive": one pattern
    per class added to `needle_patches` patches, which a mean keeps (pooling then ties MambaMia)."""
    needle_amplitude: float = 4.5
    """RMS per channel of each layout part. Two parts in 2 of the 4 patches (the first form
    tried) stayed at chance: 800 steps at 64 frames at 3.0 and at 4.5, 2000 steps at 16 frames
    at 4.5; four parts at 4.5 reached 59% at 16 frames in 800 steps (mambamia, one seed)."""
    keyframes: int = 8
    """Frames kept by every variant: the token budget is keyframes x (patches/k + 1)."""
    keep_first_last: bool = False
    """Off here: forcing the two ends in would spend 2 of the few kept frames on frames that hold
    an event no more often than any other."""
    k: int = 4
    hidden: int = 32


@dataclasses.dataclass(kw_only=True)
class Recipe:
    """The training recipe, the same for every variant (tuned once with --tune)."""

    steps: int = 800
    batch: int = 4
    lr: float = 1e-3
    """Peak learning rate of the LLM."""
    module_lr: float = 1e-3
    """Peak learning rate of the freshly initialised compressor and projector. Tuned once for
    every variant with --tune (one validation draw, 64 frames, seed 0, layout needle, 800 steps,
    LLM and module rates equal): mean accuracy over the six variants 41.7% at 1e-3, 36.8% at 3e-3."""
    tasks: tuple = TASKS
    """Tasks mixed in training (and scored)."""
    short_first: float = 0.75
    """Fraction of the steps trained on the shortest videos only, before every length is mixed
    in (a short-to-long curriculum, as long-video recipes do). Mixing all lengths from the start
    left MambaMia at chance at every length (seed 0, loss flat at 0.70): at 1024 frames the needle
    frame is kept in only a quarter to a half of the training videos, and the tiny LLM never
    started to read it, while 800 steps at 64 frames alone reached 98%."""
    warmup: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_items: int = 48
    """Held-out videos per task and length (fresh draws) at the end of training."""


class Patterns:
    """The fixed patterns of one benchmark run: needle classes and events, unit-RMS vectors."""

    def __init__(self, spec: Spec, seed: int):
        gen = np.random.default_rng(10_000 + seed)
        vecs = gen.standard_normal((len(CLASSES) + len(EVENTS) + 1, spec.dim))
        vecs /= np.sqrt((vecs ** 2).mean(1, keepdims=True))
        self.classes = vecs[: len(CLASSES)] * spec.amplitude
        self.events = vecs[len(CLASSES): len(CLASSES) + len(EVENTS)] * spec.amplitude
        self.counted = vecs[-1] * spec.amplitude
        # Layout needle: one part per patch; class c shows the parts rotated by c patches.
        parts = gen.standard_normal((spec.patches, spec.dim))
        self.parts = parts / np.sqrt((parts ** 2).mean(1, keepdims=True)) * spec.needle_amplitude


def scene(spec: Spec, frames: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.standard_normal((1, spec.patches, spec.dim))
    return (base + spec.noise * rng.standard_normal((frames, spec.patches, spec.dim))).astype(np.float32)


def make_video(task: str, spec: Spec, pat: Patterns, frames: int, rng: np.random.Generator):
    """(features [F, P, D] float32, question, options, answer index, frames holding the events)."""
    x = scene(spec, frames, rng)
    if task == "needle" and spec.needle_kind == "layout":
        answer = int(rng.integers(len(CLASSES)))
        where = [int(rng.integers(frames))]
        x[where[0]] += np.roll(pat.parts, answer, axis=0)
        return x, "Which shape appears briefly in the video?", list(CLASSES), answer, where
    if task == "needle":
        answer = int(rng.integers(len(CLASSES)))
        where = [int(rng.integers(frames))]
        patches = rng.choice(spec.patches, spec.needle_patches, replace=False)
        x[where[0], patches] += pat.classes[answer]
        return x, "Which shape appears briefly in the video?", list(CLASSES), answer, where
    if task == "order":
        where = sorted(int(f) for f in rng.choice(frames, 2, replace=False))
        answer = int(rng.integers(2))  # which event comes first
        for frame, event in zip(where, (answer, 1 - answer)):
            x[frame] += pat.events[event]
        return x, "Which event happens first in the video?", list(EVENTS), answer, where
    if task == "count":
        answer = int(rng.integers(4))
        where = sorted(int(f) for f in rng.choice(frames, answer + 1, replace=False))
        x[where] += pat.counted
        return x, "How many times does the flash appear?", ["1", "2", "3", "4"], answer, where
    raise ValueError(f"bench_method: unknown task {task!r}; expected one of {list(TASKS)}")


def compressor_config(variant: str, spec: Spec) -> CompressorConfig:
    return CompressorConfig(
        input_dim=spec.dim, patches_per_frame=spec.patches, hidden_size=spec.hidden, num_layers=1,
        k=spec.k, taa_layers=1, keyframes=spec.keyframes, d_state=16, headdim=16, expand=2,
        ssd_chunk_size=64, gpa_dropout=0.0, transformer_heads=2,
        keep_first_last=spec.keep_first_last, **VARIANTS[variant])


def build_model(variant: str, spec: Spec, llm_dir: Path, seed: int) -> VideoLLM:
    torch.manual_seed(seed)
    cfg = VideoLLMConfig(llm_path=str(llm_dir), compressor=compressor_config(variant, spec),
                         attn_implementation="sdpa")
    return VideoLLM.build(cfg)


def batch_of(tokenizer, videos: list) -> dict:
    """The trainer's inputs for a list of (features, question, options, answer, where)."""
    ids, labels = [], []
    for _, question, options, answer, _ in videos:
        conv = qa_conversation({"question": question, "options": options, "answer": answer})
        i, lab = tokenize_conversation(tokenizer, conv, 256)
        ids.append(i)
        labels.append(lab)
    text = pad_text(ids, labels, tokenizer.pad_token_id)
    feats = torch.from_numpy(np.stack([v[0] for v in videos]))
    text["features"] = feats
    text["frame_mask"] = torch.ones(feats.shape[:2], dtype=torch.bool)
    return text


def train(model: VideoLLM, spec: Spec, recipe: Recipe, pat: Patterns, lengths: list[int],
          rng: np.random.Generator) -> list[float]:
    """The trainer's step in memory: AdamW over every parameter (no decay on vectors), the
    trainer's warm-up + cosine schedule, gradient clipping; a fresh batch every step, of the
    shortest length for the first `recipe.short_first` of the steps, then of a length drawn
    from `lengths` (one length per batch, as a length-bucketed loader gives)."""
    groups = []
    for name, params in model.module_groups().items():
        lr = recipe.lr if name == "llm" else recipe.module_lr
        for decay in (True, False):
            chosen = [p for _, p in params if (p.ndim >= 2) == decay]
            groups.append({"params": chosen, "lr": lr,
                           "weight_decay": recipe.weight_decay if decay else 0.0})
    opt = torch.optim.AdamW(groups)
    warm = math.ceil(recipe.warmup * recipe.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, recipe.steps, warm, 0.1))
    model.train()
    losses = []
    for step in range(recipe.steps):
        tasks = rng.choice(recipe.tasks, recipe.batch)
        short = step < recipe.short_first * recipe.steps
        frames = min(lengths) if short else int(rng.choice(lengths))
        out = model(**batch_of(model.tokenizer, [make_video(t, spec, pat, frames, rng)
                                                 for t in tasks]))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
    return losses


def evaluate(model: VideoLLM, spec: Spec, recipe: Recipe, pat: Patterns, frames: int,
             rng: np.random.Generator) -> dict:
    """Accuracy per task with the evaluator's letter log-likelihood scoring, plus how often the
    compressor kept a frame holding the planted pattern (needle frame, any event frame)."""
    qa = ModelQA(model, model.tokenizer, max_frames=None, target="letter")
    out = {}
    for task in recipe.tasks:
        correct = kept_hits = 0
        for i in range(recipe.eval_items):
            x, question, options, answer, where = make_video(task, spec, pat, frames, rng)
            item = QAItem(id=f"{task}-{i}", video_key=str(i), question=question, options=options,
                          answer=answer)
            choice, _ = choose_option(qa.option_logliks(item, x))
            correct += choice == answer
            _, kept = qa.visual_summary(x)
            kept_hits += bool(set(kept) & set(where))
        out[task] = {"accuracy": correct / recipe.eval_items,
                     "kept_event_frame": kept_hits / recipe.eval_items}
    return out


def run_one(variant: str, lengths: list[int], seed: int, spec: Spec, recipe: Recipe,
            llm_dir: Path, *, eval_seed: int) -> dict:
    """Train one model on videos of `lengths` (mixed), score it at each of them."""
    model = build_model(variant, spec, llm_dir, seed)
    pat = Patterns(spec, seed)
    t0 = time.perf_counter()
    losses = train(model, spec, recipe, pat, lengths, np.random.default_rng([seed, *lengths, 1]))
    train_s = time.perf_counter() - t0
    results = {}
    for frames in lengths:
        result = evaluate(model, spec, recipe, pat, frames,
                          np.random.default_rng([seed, frames, eval_seed]))
        if model.compressor.config.frame_selection == "delta":
            # 17.7's check on the trained TAA: a distinct frame among identical ones must rank
            # first (the rank out of `frames`, 5 draws).
            result["trained_planted_ranks"] = [
                score_profile(model.compressor, spec, frames, s)["planted_rank"] for s in range(5)]
        results[str(frames)] = result
    tail = max(1, len(losses) // 10)
    return {"variant": variant, "seed": seed, "lengths": lengths, "results": results,
            "loss_start": statistics.mean(losses[:tail]), "loss_end": statistics.mean(losses[-tail:]),
            "train_s": train_s, "seconds": time.perf_counter() - t0}


def summarize(runs: list[dict], variants: list[str], lengths: list[int], tasks: tuple) -> dict:
    table = {}
    for v in variants:
        for n in lengths:
            for task in tasks:
                cells = [r["results"][str(n)][task] for r in runs
                         if r["variant"] == v and str(n) in r["results"]]
                accs = [c["accuracy"] for c in cells]
                kept = [c["kept_event_frame"] for c in cells]
                if accs:
                    table[f"{v}/{n}/{task}"] = {
                        "mean": statistics.mean(accs),
                        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "kept_event_frame": statistics.mean(kept), "seeds": len(accs)}
    return table


def format_table(table: dict, variants: list[str], lengths: list[int], tasks: tuple) -> str:
    head = f"{'variant':<18}" + "".join(f"{t + '@' + str(n):>16}" for t in tasks for n in lengths)
    lines = [head]
    for v in variants:
        cells = []
        for task in tasks:
            for n in lengths:
                c = table.get(f"{v}/{n}/{task}")
                cells.append(f"{100 * c['mean']:6.1f} ± {100 * c['std']:4.1f}" if c else "-")
        lines.append(f"{v:<18}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def plot(table: dict, variants: list[str], lengths: list[int], tasks: tuple, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chance = {"needle": 0.25, "order": 0.5, "count": 0.25}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 1.5, 3.6), sharey=True,
                             squeeze=False)
    axes = axes[0]
    for ax, task in zip(axes, tasks):
        for i, v in enumerate(variants):
            m = [table[f"{v}/{n}/{task}"]["mean"] for n in lengths]
            s = [table[f"{v}/{n}/{task}"]["std"] for n in lengths]
            # Dodged sideways so that variants with equal scores stay visible.
            dodge = 2 ** (0.06 * (i - (len(variants) - 1) / 2))
            ax.errorbar([n * dodge for n in lengths], m, yerr=s, marker="o", capsize=3, label=v)
        ax.axhline(chance[task], color="grey", ls=":", lw=1)
        ax.set_ylim(0.0, 1.05)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_title(task)
        ax.set_xlabel("frames per video")
    axes[0].set_ylabel("accuracy (mean ± std over seeds)")
    axes[-1].legend(fontsize=7)
    save_figure(fig, path)


def score_profile(model: VideoCompressor, spec: Spec, frames: int, seed: int = 0) -> dict:
    """Δ frame scores over time on identical frames (one noiseless scene repeated), the frames
    kept from them, and the rank of one distinct frame planted at a random position."""
    model = model.eval()
    gen = np.random.default_rng(seed)
    x = np.repeat(scene(dataclasses.replace(spec, noise=0.0), 1, gen), frames, axis=0)
    with torch.no_grad():
        flat = model(torch.from_numpy(x)[None])
    pos = int(gen.integers(1, frames - 1))
    x[pos] = gen.standard_normal(x[pos].shape)
    with torch.no_grad():
        planted = model(torch.from_numpy(x)[None])
    ranks = torch.argsort(planted.scores[0], descending=True).tolist()
    return {"scores": flat.scores[0].tolist(), "kept_identical": flat.kept[0].tolist(),
            "planted_at": pos, "planted_rank": ranks.index(pos)}


PROFILE_CASES = {
    # name: compressor overrides; "before" is the code before the fix (mean Δ, both dt_bias alike)
    "before (mean Δ, dt_bias_b like forward)": {"delta_score": "mean",
                                                "backward_dt_bias_init": "like_forward"},
    "before, causal spatial stage": {"delta_score": "mean", "backward_dt_bias_init": "like_forward",
                                     "kind": "causal_mambamia"},
    "before, avgpool spatial stage (no scan)": {"delta_score": "mean", "kind": "avgpool",
                                                "backward_dt_bias_init": "like_forward"},
    "mean Δ, dt_bias_b = 1 (official)": {"delta_score": "mean"},
    "after (deviation of log Δ, dt_bias_b = 1)": {},
}


def describe_profile(name: str, prof: list[dict], frames: int) -> str:
    s = np.asarray(prof[0]["scores"])
    mid = float(np.median(s))
    marks = sorted({0, 1, 2, 4, frames // 4, frames // 2, frames - 3, frames - 2, frames - 1})
    ranks = [p["planted_rank"] for p in prof]
    return (f"{name}\n  score / median at frames {marks}: "
            + " ".join(f"{s[m] / mid:.4f}" for m in marks)
            + f"\n  kept on identical frames: {prof[0]['kept_identical']}"
            + f"\n  planted distinct frame's rank (0 = first) over {len(ranks)} seeds: {ranks}")


def selection_recall(variant: str, spec: Spec, frames: int, delta_score: str, *, seeds: int = 3,
                     videos: int = 20) -> list[float]:
    """Per seed, the fraction of needle videos whose needle frame an UNTRAINED compressor keeps."""
    out = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        cfg = dataclasses.replace(compressor_config(variant, spec), delta_score=delta_score)
        model = VideoCompressor(cfg).eval()
        pat, rng = Patterns(spec, seed), np.random.default_rng([seed, 7])
        hits = 0
        for _ in range(videos):
            x, *_, where = make_video("needle", spec, pat, frames, rng)
            with torch.no_grad():
                hits += where[0] in model(torch.from_numpy(x)[None]).kept[0].tolist()
        out.append(hits / videos)
    return out


def _profile(spec: Spec, frames: int, seeds: int = 8) -> dict:
    report = {"selection_recall": {}}
    print(f"needle frame kept by an untrained compressor ({spec.keyframes} of {frames} frames; "
          f"uniform would keep {spec.keyframes / frames:.0%}):")
    for variant in [v for v in VARIANTS if not VARIANTS[v].get("frame_selection")]:
        for how in ("mean", "deviation"):
            recall = selection_recall(variant, spec, frames, how)
            print(f"  {variant:<16} Δ score {how:<9}: {' '.join(f'{r:.0%}' for r in recall)}",
                  flush=True)
            report["selection_recall"][f"{variant}/{how}"] = recall
    for name, overrides in PROFILE_CASES.items():
        prof = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            cfg = dataclasses.replace(compressor_config("mambamia", spec), **overrides)
            prof.append(score_profile(VideoCompressor(cfg), spec, frames, seed))
        print(describe_profile(name, prof, frames), flush=True)
        report[name] = {"profile_seed0": prof[0]["scores"],
                        "planted_ranks": [p["planted_rank"] for p in prof]}
    return report


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: 2 variants, 1 length (32 frames), 2 seeds, all 3 tasks, "
                        "a few steps")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--lengths", nargs="+", type=int, default=[64, 256, 1024],
                   help="frames per video (default: 64 256 1024; the budget is 8 kept frames at "
                        "every length)")
    p.add_argument("--train-on", choices=["mixed", "each"], default="mixed",
                   help="mixed (default): one model per variant and seed, trained on the "
                        "shortest length first, then on every length (--short-first), scored at "
                        "every length; each: one model per length, trained and scored at it")
    p.add_argument("--short-first", type=float, default=Recipe.short_first,
                   help="fraction of the steps on the shortest videos only (default 0.75)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained in parallel processes, one thread each (default 1)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant and length (default 3)")
    p.add_argument("--steps", type=int, default=Recipe.steps, help="training steps per run")
    p.add_argument("--lr", type=float, default=Recipe.lr,
                   help="peak learning rate of the LLM, every variant")
    p.add_argument("--module-lr", type=float, default=Recipe.module_lr,
                   help="peak learning rate of compressor and projector, every variant")
    p.add_argument("--tasks", nargs="+", default=["needle"], choices=list(TASKS),
                   help="tasks mixed in training and scored (default: needle; mixing tasks "
                        "shares the steps between them)")
    p.add_argument("--needle", choices=["layout", "additive"], default=Spec.needle_kind,
                   help="the needle task's pattern (see Spec.needle_kind; default layout)")
    p.add_argument("--eval-items", type=int, default=Recipe.eval_items,
                   help="held-out videos per task per run")
    p.add_argument("--tune", nargs="+", type=float, default=None, metavar="LR",
                   help="instead of the table: train every variant at the shortest length once "
                        "per LR (LLM and compressor alike) and score on a validation draw; the "
                        "best mean over variants wins")
    p.add_argument("--profile", action="store_true",
                   help="instead of the table: print Δ frame-score profiles on identical frames")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for bench_method.json and bench_method.png")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = Spec(needle_kind=args.needle)
    recipe = Recipe(steps=args.steps, lr=args.lr, module_lr=args.module_lr, eval_items=args.eval_items,
                    tasks=tuple(args.tasks), short_first=args.short_first)
    variants, lengths, seeds = args.variants, sorted(args.lengths), args.seeds
    if args.quick:
        variants, lengths, seeds = ["mambamia", "avgpool"], [32], 2
        recipe = dataclasses.replace(recipe, steps=6, eval_items=4, tasks=TASKS)
    if args.profile:
        print(json.dumps({"profile": {str(n): _profile(spec, n) for n in lengths}}))
        return 0
    t0 = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(Path(tmp) / "tok")
        build_llm(Path(tmp) / "llm", tok)
        # The real recipe starts from a pretrained LLM; the demo's text warm-up stands in for it.
        warm_up_llm(Path(tmp) / "llm")
        if args.tune:
            return _tune(args.tune, variants, lengths[0], spec, recipe, Path(tmp) / "llm",
                         args.jobs, t0)
        if args.train_on == "mixed":
            jobs = [(v, tuple(lengths), seed) for seed in range(seeds) for v in variants]
        else:  # one model per length, longest first: the comparison that matters most
            jobs = [(v, (n,), seed) for n in reversed(lengths) for seed in range(seeds)
                    for v in variants]
        runs = _run_all(jobs, spec, recipe, Path(tmp) / "llm", args.jobs, t0)
    tasks = recipe.tasks
    table = summarize(runs, variants, lengths, tasks)
    wall = time.perf_counter() - t0
    print(format_table(table, variants, lengths, tasks))
    print(f"wall time {wall:.0f} s; chance: needle 25%, order 50%, count 25%")
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / ("bench_method_quick.png" if args.quick else "bench_method.png")
    plot(table, variants, lengths, tasks, png)
    report = {"spec": dataclasses.asdict(spec), "recipe": dataclasses.asdict(recipe),
              "runs": runs, "table": table, "wall_s": wall, "plot": str(png)}
    path = args.out / ("bench_method_quick.json" if args.quick else "bench_method.json")
    write_atomic(path, json.dumps(report, indent=1) + "\n")
    longest = lengths[-1]
    summary = {"bench": "method", "wall_s": round(wall, 1), "frames": longest, "plot": str(png),
               "accuracy_at_longest": {t: {v: round(table[f"{v}/{longest}/{t}"]["mean"], 3)
                                           for v in variants} for t in tasks}}
    print(json.dumps(summary))
    return 0


def _log_run(r: dict, t0: float) -> None:
    accs = " | ".join(f"{n}: " + " ".join(f"{t} {100 * res[t]['accuracy']:.0f}% (kept "
                                          f"{100 * res[t]['kept_event_frame']:.0f}%)"
                                          for t in res if t in TASKS)
                      for n, res in r["results"].items())
    print(f"[{time.perf_counter() - t0:7.0f}s] {r['variant']:<17} seed {r['seed']}: {accs} | loss "
          f"{r['loss_start']:.2f}->{r['loss_end']:.2f} ({r['seconds']:.0f}s)", flush=True)


def _worker(job: tuple, spec: Spec, recipe: Recipe, llm_dir: Path, eval_seed: int) -> dict:
    torch.set_num_threads(1)
    variant, lengths, seed = job
    return run_one(variant, list(lengths), seed, spec, recipe, llm_dir, eval_seed=eval_seed)


def _run_all(jobs: list[tuple], spec: Spec, recipe: Recipe, llm_dir: Path, workers: int,
             t0: float, *, eval_seed: int = 2) -> list[dict]:
    """Every (variant, lengths, seed) job, in `workers` processes; results in job order."""
    args = (spec, recipe, llm_dir, eval_seed)
    if workers <= 1:
        runs = []
        for job in jobs:
            runs.append(_worker(job, *args))
            _log_run(runs[-1], t0)
        return runs
    import concurrent.futures
    import multiprocessing

    results = {}
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(_worker, job, *args): job for job in jobs}
        for fut in concurrent.futures.as_completed(futures):
            results[futures[fut]] = fut.result()
            _log_run(results[futures[fut]], t0)
    return [results[job] for job in jobs]


def _tune(lrs: list[float], variants: list[str], frames: int, spec: Spec, recipe: Recipe,
          llm_dir: Path, workers: int, t0: float) -> int:
    """One validation draw (eval seed 3, never the table's 2) per learning rate, every variant
    trained at `frames` with seed 0; the rate with the best mean over variants wins."""
    means = {}
    for lr in lrs:
        r = dataclasses.replace(recipe, lr=lr, module_lr=lr)
        runs = _run_all([(v, (frames,), 0) for v in variants], spec, r, llm_dir, workers, t0,
                        eval_seed=3)
        accs = [statistics.mean(run["results"][str(frames)][t]["accuracy"] for t in r.tasks)
                for run in runs]
        means[lr] = statistics.mean(accs)
        print(f"lr {lr:g}: mean validation accuracy over variants and tasks "
              f"{100 * means[lr]:.1f}% ({' '.join(f'{v} {100 * a:.0f}' for v, a in zip(variants, accs))})",
              flush=True)
    print(json.dumps({"bench": "method_tune", "frames": frames, "accuracy_by_lr": means,
                      "best_lr": max(means, key=means.get)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
