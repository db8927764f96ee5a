"""Pipeline bubble: measured idle fraction of each stage vs the 1F1B formula (p-1)/(m+p-1).

Measured twice: with the stages split by parameter count (the trainer's default) and by forward
time measured on one micro-batch (`build_pipeline_engine(sample=...)`).

    python bench/bench_pipeline.py [--stages 2] [--micro-batches 1 2 4 8] [--steps 3]

Launches itself under torchrun (CPU, gloo, one process per stage) on a tiny VideoLLM (trainer.tiny,
4 decoder layers). Per stage and per `train_batch`, busy = time inside the engine's ForwardPass
and BackwardPass instructions; wall = the whole `train_batch` minus the gradient all-reduces and
the optimizer step (outside the schedule the formula describes). Measured bubble = 1 - busy/wall,
averaged over stages and the steps after a warm-up step. The formula assumes equal stage times
and free communication, so gloo's send/recv time shows up as extra bubble here. The last line is
one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_COMPUTE = ("ForwardPass", "BackwardPass")
_OUTSIDE = ("ReduceGrads", "ReduceTiedGrads", "OptimizerStep")


def timed_instructions(engine) -> dict[str, float]:
    """Wrap the engine's instruction map so that every instruction's seconds are summed by name."""
    spent: dict[str, float] = {}
    table = dict(type(engine)._INSTRUCTION_MAP)
    for kind, fn in table.items():
        def wrapper(self, _fn=fn, _name=kind.__name__, **kwargs):
            t0 = time.perf_counter()
            try:
                return _fn(self, **kwargs)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - t0
        table[kind] = wrapper
    engine._INSTRUCTION_MAP = table
    return spent


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from model.video_llm import VideoLLM
    from tests.pipeline_worker import batches_from, run_config
    from trainer.dist import init_distributed
    from trainer.pipeline import build_pipeline_engine, micro_batches, train_step

    torch.set_num_threads(1)
    info = init_distributed()
    results: dict[str, dict] = {"params": {}, "time": {}}
    for split, m in itertools.product(results, args.micro_batches):
        cfg = run_config(args.llm, "unused", stages=args.stages, dp=1, micro_batches=m)
        torch.manual_seed(0)
        model = VideoLLM.build(cfg.model)
        sample = None
        if split == "time":
            sample = next(micro_batches(batches_from(model.tokenizer, 0, 0, m), info.device,
                                        torch.float32))[0]
        engine, _, _ = build_pipeline_engine(model, cfg, world_size=info.world_size, total_steps=100,
                                             on_cuda=False, sample=sample, log=lambda _msg: None)
        spent = timed_instructions(engine)
        data = micro_batches(batches_from(model.tokenizer, 0, 0, m), info.device, torch.float32)
        fractions = []
        for step in range(args.steps + 1):
            spent.clear()
            dist.barrier()
            _, _, _, wall = train_step(engine, data)
            wall -= sum(spent.get(k, 0.0) for k in _OUTSIDE)
            busy = sum(spent.get(k, 0.0) for k in _COMPUTE)
            if step > 0:  # the first step builds buffers and exchanges shapes
                fractions.append(1.0 - busy / wall)
        per_rank = [None] * info.world_size
        dist.all_gather_object(per_rank, sum(fractions) / len(fractions))
        p = args.stages
        results[split][m] = {"measured": sum(per_rank) / len(per_rank), "per_stage": per_rank,
                             "layer_bounds": list(engine.module.parts),
                             "formula": (p - 1) / (m + p - 1)}
    if info.rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--llm", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return 0

    from trainer.dist import free_port
    from trainer.tiny import build_llm, build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(Path(tmp) / "tokenizer")
        build_llm(Path(tmp) / "llm", tok, hidden_size=128, num_layers=4)
        out = Path(tmp) / "bubble.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.stages),
               "--master_port", str(free_port()), "--", __file__, "--stages", str(args.stages),
               "--steps", str(args.steps), "--llm", str(Path(tmp) / "llm"), "--out", str(out),
               "--micro-batches", *map(str, args.micro_batches)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            return 1
        results = json.loads(out.read_text())
    p = args.stages
    print(f"pipeline bubble, {p} stages (CPU, gloo, tiny VideoLLM), mean over {args.steps} steps")
    print(f"{'split by':>9} {'micro-batches':>14} {'measured':>9} {'formula':>8} {'ratio':>6}")
    summary = {}
    for split, rows in results.items():
        summary[split] = {}
        for m, r in rows.items():
            ratio = r["measured"] / r["formula"]
            print(f"{split:>9} {m:>14} {r['measured']:>9.3f} {r['formula']:>8.3f} {ratio:>6.2f}")
            summary[split][m] = {**r, "ratio_measured_to_formula": ratio}
    print(json.dumps({"stages": p, "steps": args.steps, "bubble": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
