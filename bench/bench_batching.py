"""Padding waste and LLM tokens/s: random batches vs length-grouped batches vs packed rows.

    python bench/bench_batching.py                  # ~1 min on 2 idle cores
    python bench/bench_batching.py --samples 8192 --world 16 --micro-batch 2

The length mix (one sample = visual tokens + text tokens):
  video   durations log-uniform from 1 minute (--min-duration) to 1 hour, sampled at the paper's 1 fps up to 256
          frames; visual tokens from model/budget.py for model.config.paper_config() (measured on
          a grid of durations: 730 tokens for 10 s, 4380 for 60 s, 4672 from 64 s on, where the
          TAA keeps its 64 keyframes)
  text    [assumed] LLaVA-Video-178K's mix of instruction data: 14% detailed captions (median ~500
          tokens), 72% open-ended QA conversations (median ~120), 14% multiple choice (median ~80),
          each log-normal and capped at data.max_text_len 2048
The loader's own EpochPlan builds the batches (scheme of data/loader.py, `world` ranks of
`micro-batch` samples): `random` is the default order, `grouped` is data.group_by_length, given
the loader's kind of estimate (visual exact, text length off by a log-normal 15% like bytes / 4);
`packed` is data.pack_sequences over the random batches, one row per micro-batch.

Figures:
  padding waste  pad positions / all positions the LLM computes on, over a whole epoch of every
                 rank's micro-batches, at the paper's full lengths
  tokens/s       real (non-pad) tokens per second of LLM forward + backward on this CPU: a small
                 Qwen2 (transformers, SDPA) on every rank's micro-batches of the first group,
                 lengths divided by --scale so a step fits a CPU; the same samples in every mode,
                 the call is VideoLLM.forward's (padded: 2-D mask; packed: per-sample position
                 ids and no mask, from which transformers builds the block-diagonal causal mask)
The last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.loader import EpochPlan  # noqa: E402
from model.budget import visual_token_count  # noqa: E402
from model.config import PAPER_FPS, PAPER_MAX_FRAMES, paper_config  # noqa: E402

TEXT_MIX = ((0.14, 500.0), (0.72, 120.0), (0.14, 80.0))
"""(share, median tokens) of captions, open-ended QA, multiple choice ([assumed], see above)."""
TEXT_SIGMA = 0.5
MAX_TEXT = 2048
ESTIMATE_NOISE = 0.15


def sample_lengths(n: int, seed: int, min_duration: float) -> tuple[np.ndarray, np.ndarray]:
    """(visual tokens, text tokens) of n samples of the mix in the module docstring."""
    rng = np.random.default_rng(seed)
    grid = np.geomspace(min_duration, 3600.0, 24)
    tokens = np.array([visual_token_count(paper_config(), d, PAPER_FPS, PAPER_MAX_FRAMES) for d in grid])
    visual = tokens[rng.integers(len(grid), size=n)]
    kind = rng.choice(len(TEXT_MIX), size=n, p=[share for share, _ in TEXT_MIX])
    medians = np.array([median for _, median in TEXT_MIX])[kind]
    text = np.minimum(MAX_TEXT, np.maximum(8, medians * rng.lognormal(0.0, TEXT_SIGMA, size=n))).astype(int)
    return visual, text


def micro_batches(lengths: np.ndarray, estimate: np.ndarray | None, args) -> list[list[int]]:
    """Every rank's micro-batches of one epoch as sample indices (the loader's plan)."""
    plan = EpochPlan([len(lengths)], [1.0], len(lengths), args.seed, 0,
                     [estimate] if estimate is not None else None, args.group_size)
    batches = []
    steps = -(-len(lengths) // (args.world * args.micro_batch))
    for b in range(steps):
        for rank in range(args.world):
            positions, _ = plan.rank_batch(0, b, rank, args.world, args.micro_batch)
            batches.append([plan.item(p)[1] for p in positions])
    return batches


def waste(batches: list[list[int]], lengths: np.ndarray, packed: bool) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    computed = real if packed else sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - real / computed


def build_llm(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=8192,
                         attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).train()


def llm_inputs(batch: list[int], visual: np.ndarray, text: np.ndarray, hidden: int, packed: bool,
               scale: int, rng: np.random.Generator) -> dict:
    """Embeddings (visual then text), labels on the text only, as VideoLLM.forward passes them."""
    rows, labels = [], []
    for i in batch:
        v, t = max(1, int(visual[i]) // scale), max(2, int(text[i]) // scale)
        rows.append(torch.from_numpy(rng.standard_normal((v + t, hidden), dtype=np.float32)))
        lab = torch.full((v + t,), -100)
        lab[v + 1:] = torch.from_numpy(rng.integers(0, 512, size=t - 1))
        labels.append(lab)
    if packed:
        pos = torch.cat([torch.arange(r.shape[0]) for r in rows])[None]
        return {"inputs_embeds": torch.cat(rows)[None], "labels": torch.cat(labels)[None],
                "position_ids": pos, "attention_mask": None}
    width = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), width, hidden)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (r, y) in enumerate(zip(rows, labels)):
        embeds[b, : r.shape[0]], lab[b, : r.shape[0]], mask[b, : r.shape[0]] = r, y, 1
    pos = torch.arange(width).expand(len(rows), -1)
    return {"inputs_embeds": embeds, "labels": lab, "position_ids": pos, "attention_mask": mask}


def tokens_per_s(model, batches, visual, text, args, packed: bool) -> float:
    rng = np.random.default_rng(args.seed)
    inputs = [llm_inputs(b, visual, text, args.hidden, packed, args.scale, rng) for b in batches]
    real = sum(int(sum(max(1, int(visual[i]) // args.scale) + max(2, int(text[i]) // args.scale)
                       for i in b)) for b in batches)
    model(**inputs[0], use_cache=False).loss.backward()  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        for x in inputs:
            model.zero_grad(set_to_none=True)
            model(**x, use_cache=False).loss.backward()
        best = min(best, time.perf_counter() - start)
    return real / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4096, help="samples in the epoch (default 4096)")
    p.add_argument("--world", type=int, default=8, help="data-parallel ranks (default 8)")
    p.add_argument("--micro-batch", type=int, default=4, help="samples per rank per batch (default 4)")
    p.add_argument("--group-size", type=int, default=256,
                   help="data.group_size, a multiple of world x micro-batch (default 256)")
    p.add_argument("--scale", type=int, default=32, help="lengths divided by this for timing (default 32)")
    p.add_argument("--hidden", type=int, default=128, help="LLM width for timing (default 128)")
    p.add_argument("--layers", type=int, default=2, help="LLM layers for timing (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per mode, best kept (default 2)")
    p.add_argument("--min-duration", type=float, default=60.0,
                   help="shortest video in seconds (default 60; LLaVA-Video-178K also holds many "
                        "clips under 30 s, whose visual tokens vary: try 10)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.group_size % (args.world * args.micro_batch):
        p.error(f"--group-size {args.group_size}: expected a multiple of --world x --micro-batch "
                f"= {args.world * args.micro_batch}, so that groups are whole global batches")
    torch.set_num_threads(min(2, torch.get_num_threads()))

    visual, text = sample_lengths(args.samples, args.seed, args.min_duration)
    lengths = visual + text
    noise = np.random.default_rng(args.seed + 1).lognormal(0.0, ESTIMATE_NOISE, size=args.samples)
    estimate = visual + text * noise
    plans = {"random": micro_batches(lengths, None, args), "grouped": micro_batches(lengths, estimate, args)}
    result = {"samples": args.samples, "min_duration_s": args.min_duration, "world": args.world, "micro_batch": args.micro_batch,
              "group_size": args.group_size, "mean_length": float(lengths.mean()),
              "visual_tokens_min_max": [int(visual.min()), int(visual.max())],
              "text_tokens_p10_p50_p90": [int(x) for x in np.percentile(text, [10, 50, 90])]}
    modes = {"random": (plans["random"], False), "grouped": (plans["grouped"], False),
             "packed": (plans["random"], True)}
    for name, (batches, packed) in modes.items():
        result[f"pad_waste_{name}"] = round(waste(batches, lengths, packed), 4)
        print(f"[batching] padding waste {name:8s} {result[f'pad_waste_{name}']:.2%}", flush=True)

    # Timing: every rank's micro-batches of the first group. Grouping reorders samples within a
    # group only, so both orders time the same samples.
    model = build_llm(args)
    count = args.group_size // args.micro_batch
    timed = {k: v[:count] for k, v in plans.items()}
    assert sorted(i for b in timed["random"] for i in b) == sorted(i for b in timed["grouped"] for i in b)
    for name, batches, packed in (("random", timed["random"], False), ("grouped", timed["grouped"], False),
                                  ("packed", timed["random"], True)):
        result[f"tokens_per_s_{name}"] = round(tokens_per_s(model, batches, visual, text, args, packed), 1)
        print(f"[batching] LLM fwd+bwd tokens/s {name:8s} {result[f'tokens_per_s_{name}']:.0f} "
              f"({len(batches)} micro-batches, lengths / {args.scale})", flush=True)
    for name in ("grouped", "packed"):
        result[f"speedup_{name}"] = round(result[f"tokens_per_s_{name}"] / result["tokens_per_s_random"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
