"""torchrun worker for tests/test_pipeline.py: trains the tiny VideoLLM through the pipeline engine.

    torchrun --nproc_per_node 2 -- tests/pipeline_worker.py OUT LLM_PATH --stages 2 --steps 3

Writes OUT/losses.json (per step, from global rank 0), OUT/params_<rank>.pt (trainable parameters
of data-parallel replica 0 after the first step, VideoLLM names), optionally a checkpoint at
--save-at, a SIGKILL of every rank after step --kill-at, a resume from the run folder's checkpoint
(--resume), and OUT/pipeline_logits.pt (the last stage's logits on `eval_batch(0)` after training).
The batches are a function of (step, replica, micro-batch) only, so the test rebuilds them.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.config import DataConfig, DataSource  # noqa: E402
from model.config import CompressorConfig, VideoLLMConfig  # noqa: E402
from trainer.config import OptimizerConfig, ParallelConfig, RunConfig, ScheduleConfig  # noqa: E402

PATCHES, FEAT_DIM, MICRO = 16, 32, 2
LR, EPS = 1e-3, 1e-6
QUESTIONS = [("What colour is the shape?", "red"), ("Which shape appears briefly?", "a blue star"),
             ("How many objects move?", "two"), ("Where does the circle go at the end of it?", "left")]


def model_config(llm_path: str, gradient_checkpointing: bool = False) -> VideoLLMConfig:
    comp = CompressorConfig(input_dim=FEAT_DIM, patches_per_frame=PATCHES, hidden_size=32,
                            num_layers=1, k=4, taa_layers=1, keyframes=3, d_state=8, headdim=16,
                            ssd_chunk_size=32, gpa_dropout=0.0)
    return VideoLLMConfig(llm_path=llm_path, compressor=comp, attn_implementation="sdpa",
                          gradient_checkpointing=gradient_checkpointing)


def run_config(llm_path: str, run_dir: str, *, stages: int, dp: int, micro_batches: int,
               zero_stage: int = 1, gradient_checkpointing: bool = False) -> RunConfig:
    """Constant lr (no warm-up, min_lr_ratio 1), no clipping, no decay: one plain AdamW."""
    return RunConfig(run_dir=run_dir, stage="pipeline_test", seed=0,
                     model=model_config(llm_path, gradient_checkpointing),
                     trainable=["compressor", "projector", "llm"],
                     data=DataConfig(sources=[DataSource(path="unused")], batch_size=MICRO),
                     optimizer=OptimizerConfig(lr=LR, eps=EPS, grad_clip=0.0),
                     schedule=ScheduleConfig(total_steps=100, warmup_ratio=0.0, min_lr_ratio=1.0),
                     parallel=ParallelConfig(zero_stage=zero_stage, pipeline_stages=stages,
                                             global_batch_size=MICRO * micro_batches * dp))


def make_batch(tokenizer, seed: int) -> dict[str, torch.Tensor]:
    """MICRO right-padded chat samples; text lengths and frame counts vary with the seed."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(MICRO):
        question, answer = QUESTIONS[(seed + 3 * b) % len(QUESTIONS)]
        user = [{"role": "user", "content": "<video>\n" + question}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                             tokenize=False)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        rows.append((tokenizer(full, add_special_tokens=False).input_ids, n_prompt))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((MICRO, length), tokenizer.pad_token_id)
    attention_mask = torch.zeros(MICRO, length, dtype=torch.long)
    labels = torch.full((MICRO, length), -100)
    frames = 6
    frame_mask = torch.zeros(MICRO, frames, dtype=torch.bool)
    for b, (ids, n_prompt) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        labels[b, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
        frame_mask[b, : int(torch.randint(3, frames + 1, (1,), generator=g))] = True
    features = torch.randn(MICRO, frames, PATCHES, FEAT_DIM, generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "features": features, "frame_mask": frame_mask}


def batch_seed(step: int, replica: int, micro: int) -> int:
    return 1000 * step + 10 * replica + micro


def batches_from(tokenizer, start_step: int, replica: int, micro_batches: int):
    step = start_step
    while True:
        for j in range(micro_batches):
            yield make_batch(tokenizer, batch_seed(step, replica, j))
        step += 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("llm")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()

    from model.video_llm import VideoLLM
    from trainer.checkpoint import Checkpointer
    from trainer.dist import init_distributed
    from trainer.pipeline import (build_pipeline_engine, data_parallel_coords, micro_batches,
                                  train_step)

    torch.set_num_threads(1)
    info = init_distributed()
    out = Path(args.out)
    dp = info.world_size // args.stages
    cfg = run_config(args.llm, str(out / "run"), stages=args.stages, dp=dp,
                     micro_batches=args.micro_batches, gradient_checkpointing=args.checkpointing)
    torch.manual_seed(cfg.seed)
    model = VideoLLM.build(cfg.model)
    engine, _, _ = build_pipeline_engine(model, cfg, world_size=info.world_size, total_steps=100,
                                         on_cuda=False)
    replica, _ = data_parallel_coords(engine)
    ckpt = Checkpointer(cfg.run_dir)
    start = 0
    if args.resume:
        client = ckpt.load(engine)
        assert client is not None, "nothing to resume"
        start = client["step"]
    data = micro_batches(batches_from(model.tokenizer, start, replica, args.micro_batches),
                         info.device, torch.float32)
    losses = {}
    for step in range(start, args.steps):
        loss, _, skipped, _ = train_step(engine, data)
        assert not skipped
        losses[step + 1] = loss
        if step == 0 and replica == 0:
            here = {id(p) for p in engine.module.parameters()}
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()
                        if p.requires_grad and id(p) in here}, out / f"params_{info.rank}.pt")
        if step + 1 == args.save_at:
            ckpt.save(engine, step + 1, {"step": step + 1, "world_size": info.world_size})
        if step + 1 == args.kill_at:
            torch.distributed.barrier()
            if info.rank == 0:
                (out / "losses.json").write_text(json.dumps(losses))
            torch.distributed.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
    if args.resume:
        ckpt.save(engine, args.steps, {"step": args.steps, "world_size": info.world_size})
        batch = iter([next(micro_batches(iter([make_batch(model.tokenizer, 0)]), info.device,
                                         torch.float32))])
        result = engine.eval_batch(batch, return_logits=True, num_micro_batches=1)
        if engine.is_last_stage() and replica == 0:
            torch.save(result[1][0], out / "pipeline_logits.pt")
    if info.rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
