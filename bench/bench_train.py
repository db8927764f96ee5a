"""The framework's whole training step vs a bare PyTorch loop: same model, same batches, one run.

    python bench/bench_train.py                        # CPU: tiny stage 1 and 2 configs (~2 min)
    python bench/bench_train.py --profile              # CPU: also where the framework's step time goes
    python bench/bench_train.py --device cuda          # GPU: ~0.5B Qwen2-shaped LLM, bf16, ZeRO-2/3 (~3 min)

framework  what `mambamia train` runs per step (trainer/train.py): the VideoLoader reading shards,
           trainer.train.train_step on the DeepSpeed engine built by trainer.engine.build_engine
           (the config's ZeRO stage and precision, gradient clipping, its optimizer groups and
           schedule), then the metrics line and scalars trainer.train logs every step.
bare       the same model (same seed, same frozen modules, same parameter groups) in a plain loop:
           the same batches already on the device, forward, backward, clip, torch AdamW (fused on
           CUDA), zero_grad. On CUDA the bare model is held in bf16 ("plain eager bf16", the anchor
           of ENVIRONMENT.md), the engine's in bf16 with fp32 masters.

Both run in alternating rounds (--rounds of --steps steps after --warmup steps), so a load swing on a
shared machine hits both alike; each side's time is its best round, in process CPU seconds on CPU
(one process, one intra-op thread: other processes do not inflate it) and wall seconds on CUDA. Throughput counts the LLM's
positions (text plus spliced visual tokens). Target (issue 12): framework >= 0.9x of bare on CPU;
ZeRO-3 >= 0.85x of plain eager on a GPU. On CUDA, MFU uses trainer.metrics' formula and peak table.

The tiny data (trainer.tiny's LLM, synthetic shards) is built in a temporary folder; on CUDA the LLM
is replaced by a randomly initialised Qwen2 of --llm-* shape (defaults: Qwen2-0.5B's layers with a
vocabulary the size of the tiny tokenizer, ~0.36B; --llm-vocab 151936 gives the full 0.49B).
The last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--configs", nargs="+", default=None,
                        help="stage YAMLs (default: configs/tiny/stage1.yaml and stage2.yaml on CPU, "
                             "stage2.yaml with ZeRO-2 and ZeRO-3 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round (CPU 4, CUDA 5)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--override", nargs="*", default=[],
                        help="dotted config overrides for every config, e.g. parallel.zero_stage=1")
    parser.add_argument("--profile", action="store_true",
                        help="CPU: per-phase time of engine vs bare loop (forward, backward, optimizer "
                             "step, rest of the step) and DeepSpeed's costliest functions")
    gpu = parser.add_argument_group("CUDA model and batch (ignored on CPU)")
    gpu.add_argument("--llm-hidden", type=int, default=896)
    gpu.add_argument("--llm-layers", type=int, default=24)
    gpu.add_argument("--llm-heads", type=int, default=14)
    gpu.add_argument("--llm-kv-heads", type=int, default=2)
    gpu.add_argument("--llm-intermediate", type=int, default=4864)
    gpu.add_argument("--llm-vocab", type=int, default=0, help="0: the tiny tokenizer's size")
    gpu.add_argument("--seq-len", type=int, default=4096, help="text tokens per sample")
    gpu.add_argument("--batch-size", type=int, default=4)
    gpu.add_argument("--zero-stages", type=int, nargs="+", default=[2, 3])
    return parser.parse_args(argv)


def build_data(root: Path, *, samples: int, words: int) -> Path:
    """MAMBAMIA_TINY layout (llm/ + shards/train) with answers of about `words` words."""
    from data.shards import ShardWriter, write_index
    from trainer.tiny import build_llm, build_tokenizer
    import numpy as np

    tokenizer = build_tokenizer(root / "tokenizer")
    build_llm(root / "llm", tokenizer)
    rng = np.random.default_rng(0)
    vocabulary = ["red", "green", "blue", "shape", "moves", "left", "right", "the", "circle", "star"]
    out = root / "shards" / "train"
    with ShardWriter(out, max_samples=16) as writer:
        for i in range(samples):
            feats = rng.normal(0, 0.5, (8, 16, 32)).astype(np.float16)
            answer = " ".join(rng.choice(vocabulary, size=words))
            key = f"train_{i:04d}"
            writer.write(key, feats, {
                "key": key, "video_id": key, "source": "synthetic", "timestamps": [float(t) for t in range(8)],
                "fps": 1.0, "duration": 8.0, "encoder": "tiny-siglip", "layer": -2, "qa": [],
                "conversations": [[{"from": "human", "value": "<video>\nDescribe the video."},
                                   {"from": "gpt", "value": answer}]]})
    write_index(out)
    return root


def build_big_llm(root: Path, args) -> Path:
    """A randomly initialised Qwen2 of the --llm-* shape, saved with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    cfg = Qwen2Config(vocab_size=args.llm_vocab or len(tokenizer), hidden_size=args.llm_hidden,
                      intermediate_size=args.llm_intermediate, num_hidden_layers=args.llm_layers,
                      num_attention_heads=args.llm_heads, num_key_value_heads=args.llm_kv_heads,
                      max_position_embeddings=max(8192, 2 * args.seq_len), tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = root / "llm_big"
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_config(path: str, root: Path, overrides: list[str]):
    from trainer.config import load_config

    os.environ["MAMBAMIA_TINY"] = str(root)
    base = [f"run_dir={root / 'runs' / Path(path).stem}", "init_from=null", "validation.sources=[]",
            "checkpoint.every_steps=0", "logging.progress_bar=false", "schedule.total_steps=100000",
            "data.num_workers=0"]
    return load_config(path, base + overrides)


class Framework:
    """trainer.train's per-step work on a fresh engine: train_step, then the logged scalars."""

    def __init__(self, cfg, info):
        from trainer.engine import build_engine, grad_accumulation_steps, resolve_precision
        from trainer.metrics import MetricsLogger
        from trainer.rng import seed_everything
        from trainer.train import build_model, endless, open_loader

        import torch

        seed_everything(cfg.seed)
        model = build_model(cfg)
        self.cfg, self.info, self.model = cfg, info, model
        self.loader = open_loader(cfg.data, model.tokenizer, info.rank, info.world_size, "data")
        self.accum = grad_accumulation_steps(cfg, info.world_size)
        self.engine, self.optimizer, _ = build_engine(model, cfg, world_size=info.world_size,
                                                      total_steps=cfg.schedule.total_steps, on_cuda=info.on_cuda)
        self.dtype = torch.bfloat16 if resolve_precision(cfg, info.on_cuda) == "bf16" else torch.float32
        self.batches = endless(self.loader)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)  # as trainer.train.run does
        self.metrics = MetricsLogger(Path(cfg.run_dir), enabled=True, start_step=0, total_steps=cfg.schedule.total_steps,
                                     tensorboard=cfg.logging.tensorboard, progress_bar=False)
        self.step_count = 0

    def step(self) -> tuple[int, float]:
        from trainer.metrics import memory_gb
        from trainer.train import lr_by_group, train_step

        started = time.perf_counter()
        result = train_step(self.engine, self.batches, self.accum, self.info, self.dtype)
        self.step_count += 1
        elapsed = time.perf_counter() - started
        self.metrics.log(self.step_count, {
            "loss": result.loss, "grad_norm": result.grad_norm, **lr_by_group(self.optimizer),
            "throughput/tokens_per_s": result.tokens / elapsed, "time/step_s": elapsed,
            "time/data_wait_frac": result.data_wait_s / elapsed, **memory_gb(self.info.device)})
        return result.tokens, result.loss

    def close(self) -> None:
        self.metrics.close()


class Bare:
    """The same model in a plain loop over batches already in memory (see module doc)."""

    def __init__(self, cfg, info, batches: list[dict]):
        import torch

        from trainer.engine import build_optimizer, freeze, param_groups
        from trainer.rng import seed_everything
        from trainer.train import build_model, to_device

        seed_everything(cfg.seed)
        model = build_model(cfg).to(info.device)
        freeze(model, cfg.trainable)
        self.dtype = torch.bfloat16 if info.on_cuda else torch.float32
        if info.on_cuda:
            model.to(self.dtype)
        self.model = model.train()
        self.optimizer, _ = build_optimizer(param_groups(model, cfg), cfg, total_steps=cfg.schedule.total_steps,
                                            on_cuda=info.on_cuda)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = cfg.optimizer.grad_clip
        self.batches = [to_device(b, info.device, self.dtype) for b in batches]
        self.position = 0

    def step(self, accum: int) -> tuple[int, float]:
        import torch

        tokens, loss_sum = 0, 0.0
        for _ in range(accum):
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            out = self.model(**batch)
            (out.loss / accum).backward()
            tokens += int(out.attention_mask.sum())
            loss_sum += out.loss.item()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return tokens, loss_sum / accum


def collect_batches(cfg, info, tokenizer, count: int) -> list[dict]:
    """The first `count` micro-batches the framework's loader yields (same seed, same order)."""
    from trainer.train import endless, open_loader

    batches = endless(open_loader(cfg.data, tokenizer, info.rank, info.world_size, "data"))
    return [next(batches) for _ in range(count)]


def timed_rounds(sides: dict, args, sync, clock) -> dict:
    """Alternating rounds of --steps steps; per side the best round's tokens/s by `clock`."""
    for fn in sides.values():
        for _ in range(args.warmup):
            fn()
    sync()
    best = {name: 0.0 for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            sync()
            start, tokens = clock(), 0
            for _ in range(args.steps):
                tokens += fn()[0]
            sync()
            best[name] = max(best[name], tokens / (clock() - start))
    return best


def profile_phases(framework: Framework, bare: Bare, micro_batches: int) -> dict:
    """Per micro-batch CPU ms of forward, backward and optimizer step, engine vs bare, on the same
    in-memory batches (interleaved), plus the rest of the framework's step (loader, metrics, the
    step's all-reduce) as whole steps minus their engine phases; and DeepSpeed's functions with the
    most own time during the engine's phases (cProfile)."""
    import torch

    phases: dict[str, float] = {}

    def timed(key, fn):
        start = time.process_time()
        result = fn()
        phases[key] = phases.get(key, 0.0) + time.process_time() - start
        return result

    engine, accum = framework.engine, framework.accum
    for i in range(micro_batches):
        batch = bare.batches[i % len(bare.batches)]
        out = timed("framework forward", lambda: engine(**batch))
        timed("framework backward", lambda: engine.backward(out.loss))
        timed("framework step", engine.step)
        out = timed("bare forward", lambda: bare.model(**batch))
        timed("bare backward", lambda: (out.loss / accum).backward())
        if (i + 1) % accum == 0:
            timed("bare step", lambda: (torch.nn.utils.clip_grad_norm_(bare.params, bare.clip) if bare.clip > 0 else None,
                                        bare.optimizer.step(), bare.optimizer.zero_grad(set_to_none=True)))
    steps = micro_batches // accum
    timed("framework whole steps", lambda: [framework.step() for _ in range(steps)])
    engine_part = sum(v for k, v in phases.items() if k.startswith("framework ") and "whole" not in k)
    phases["framework rest of step"] = phases.pop("framework whole steps") - engine_part
    per_micro = {k: round(1000 * v / micro_batches, 2) for k, v in phases.items()}
    print(f"profile, CPU ms per micro-batch over {micro_batches} micro-batches:")
    for key, ms in per_micro.items():
        print(f"  {key:24s} {ms:8.2f}")
    profiler = cProfile.Profile()  # a separate pass: its overhead would distort the times above
    profiler.enable()
    for i in range(micro_batches):
        engine.backward(engine(**bare.batches[i % len(bare.batches)]).loss)
        engine.step()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    own = sorted(((v[2], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in stats.items()
                  if "deepspeed" in k[0]), reverse=True)[:8]
    print("  DeepSpeed functions with the most own time in the engine's phases (cProfile):")
    for seconds, where in own:
        print(f"    {1000 * seconds / micro_batches:7.2f} ms  {where}")
    return per_micro


def bench_config(path: str, root: Path, overrides: list[str], info, args, label: str) -> dict:
    import torch

    sync = torch.cuda.synchronize if info.on_cuda else (lambda: None)
    cfg = run_config(path, root, overrides)
    framework = Framework(cfg, info)
    needed = framework.accum * (args.warmup + args.rounds * args.steps)
    bare = Bare(cfg, info, collect_batches(cfg, info, framework.model.tokenizer, needed))
    # On CPU the process's CPU seconds (one process, one intra-op thread; gloo's threads count too),
    # which other processes on a shared machine do not inflate; on CUDA wall seconds.
    clock = time.perf_counter if info.on_cuda else time.process_time
    best = timed_rounds({"framework": framework.step, "bare": lambda: bare.step(framework.accum)}, args, sync, clock)
    row = {"config": label, "zero_stage": cfg.parallel.zero_stage, "precision": cfg.parallel.precision,
           "accum": framework.accum, "framework_tokens_per_s": round(best["framework"], 1),
           "bare_tokens_per_s": round(best["bare"], 1), "ratio": round(best["framework"] / best["bare"], 3)}
    if info.on_cuda:
        row.update(mfu(framework, best))
    print(f"{label}: ZeRO-{row['zero_stage']} {row['precision']}  framework {row['framework_tokens_per_s']:.0f} "
          f"tok/s  bare {row['bare_tokens_per_s']:.0f} tok/s  ratio {row['ratio']:.3f}x"
          + (f"  MFU {row['framework_mfu']:.3f} vs {row['bare_mfu']:.3f}" if "bare_mfu" in row else ""), flush=True)
    if args.profile and not info.on_cuda:
        row["profile_ms_per_micro_batch"] = profile_phases(framework, bare, 4 * args.steps * framework.accum)
    framework.close()
    return row


def release_memory() -> None:
    """Free the last config's engine and models (their last references died with bench_config)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mfu(framework: Framework, best: dict) -> dict:
    """Model FLOPs utilisation of both sides: the LLM's 6N + attention per token (trainer.metrics)."""
    from trainer.metrics import peak_flops, train_flops_per_token

    peak = peak_flops(framework.info.device)
    if peak is None:
        return {}
    llm = framework.model.llm
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in llm.parameters())
    seq = framework.cfg.data.max_text_len
    per_token = train_flops_per_token(numel, llm.config.num_hidden_layers, llm.config.hidden_size, seq)
    return {"llm_params": numel, "framework_mfu": round(best["framework"] * per_token / peak, 4),
            "bare_mfu": round(best["bare"] * per_token / peak, 4)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_cuda = args.device == "cuda"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not on_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if on_cuda and not torch.cuda.is_available():
        print("bench_train: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 1
    if on_cuda:
        from bench.bench_ssd import _allow_triton_only_mamba_ssm

        _allow_triton_only_mamba_ssm()
    if not on_cuda:
        torch.set_num_threads(1)
    args.steps = args.steps or (5 if on_cuda else 4)
    from trainer.dist import init_distributed
    from trainer.engine import quiet_known_warnings

    quiet_known_warnings()
    info = init_distributed()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        if on_cuda:
            build_data(root, samples=64, words=args.seq_len)
            llm = build_big_llm(root, args)
            common = [f"model.llm_path={llm}", "parallel.precision=bf16", f"data.batch_size={args.batch_size}",
                      f"parallel.global_batch_size={args.batch_size}", f"data.max_text_len={args.seq_len}",
                      "model.gradient_checkpointing=false", "model.llm_dtype=float32",
                      "logging.tensorboard=false"]  # tensorboard is not among the wheels that travel
            for path in args.configs or [str(REPO_ROOT / "configs/tiny/stage2.yaml")]:
                for zero in args.zero_stages:
                    rows.append(bench_config(path, root, common + [f"parallel.zero_stage={zero}", *args.override],
                                             info, args,
                                             f"{Path(path).stem} ~{args.llm_layers}-layer Qwen2"))
                    release_memory()
        else:
            build_data(root, samples=32, words=24)
            for path in args.configs or [str(REPO_ROOT / f"configs/tiny/stage{n}.yaml") for n in (1, 2)]:
                rows.append(bench_config(path, root, args.override, info, args, Path(path).stem))
                release_memory()
    target = 0.85 if on_cuda else 0.9
    worst = min(r["ratio"] for r in rows)
    report = {"bench": "train", "device": str(info.device), "clock": "wall" if on_cuda else "process CPU time",
              "rounds": args.rounds, "steps_per_round": args.steps,
              "rows": rows, "target_ratio": target, "worst_ratio": worst, "meets_target": worst >= target}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
