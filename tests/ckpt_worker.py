"""A toy DeepSpeed training run driving trainer.checkpoint / trainer.signals, plus its launcher.

`launch(run_dir, world, *args)` forks `world` ranks, each calling `main([run_dir, *args])` with
RANK/WORLD_SIZE/MASTER_* set (`python tests/ckpt_worker.py RUN_DIR ...` under torchrun runs the same
worker). The model is a two-layer MLP whose first layer is frozen (ZeRO-1/2 checkpoints omit
frozen parameters from the optimizer state, a case resumption must survive). Batches are a pure
function of (step, global micro-batch index), so a 2-rank run and a 1-rank run with 2 micro-batches
per step see the same global batch and can be compared loss for loss.

Rank 0 appends one JSON line per step to RUN_DIR/log.<tag>.jsonl: step, mean loss over the global
batch, a draw from every rank's torch RNG (to check RNG restore), the loader position each rank had.
"""
from __future__ import annotations

import argparse
import json
import os
import multiprocessing
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from trainer.dist import free_port


def _batch(step: int, micro: int, dim: int = 8, rows: int = 4):
    import torch

    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(rows, dim, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def _model(dim: int = 8):
    import torch
    from torch import nn

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(dim, 16)
            self.head = nn.Sequential(nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
            self.frozen.requires_grad_(False)

        def forward(self, x, y):
            return torch.nn.functional.mse_loss(self.head(self.frozen(x)), y)

    return Toy()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--tag", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--global-micro", type=int, default=2, help="micro-batches per step, all ranks")
    p.add_argument("--signal-at", type=int, default=0, help="rank 0 sends itself SIGUSR1 after it")
    p.add_argument("--dump-final", default="", help="rank 0 saves the full trained weights here")
    p.add_argument("--async-save", action="store_true", help="checkpoint.async: background writes")
    args = p.parse_args(argv)

    import importlib

    import torch
    import torch.distributed as dist

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    from trainer import signals
    from trainer.checkpoint import Checkpointer, gather_client_state, restore_rng
    from trainer.rng import seed_everything

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    accum = args.global_micro // world
    seed_everything(0)
    model = _model()
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero},
        "steps_per_print": 10**9,
    }
    params = [q for q in model.parameters() if q.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                      optimizer=torch.optim.AdamW(params, lr=3e-2, weight_decay=0.1))
    seed_everything(1 + rank)  # distinct streams per rank, so restoring the wrong one shows
    ckpt = Checkpointer(args.run_dir, keep_last=args.keep_last, async_save=args.async_save)
    signals.install()
    step, loader_pos = 0, 0
    client = ckpt.load(engine)
    if client is not None:
        step = client["step"]
        restore_rng(client)
        states = client["loader_states"]
        # The toy loader's state is its position; all ranks advance together.
        loader_pos = states[rank]["position"] if rank < len(states) else states[0]["position"]
    log_path = Path(args.run_dir) / f"log.{args.tag}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    while step < args.steps:
        step += 1
        losses = []
        for m in range(accum):
            x, y = _batch(step, rank * accum + m)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        loader_pos += 1
        summed = torch.tensor([sum(losses)], dtype=torch.float64)
        dist.all_reduce(summed)
        draws = [None] * world
        dist.all_gather_object(draws, (torch.rand(1).item(), loader_pos))
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": summed.item() / (accum * world),
                                    "draws": [d[0] for d in draws],
                                    "positions": [d[1] for d in draws]}) + "\n")
        if step == args.signal_at and rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        stop = signals.should_stop()
        if stop or step % args.save_every == 0 or step == args.steps:
            ckpt.save(engine, step, gather_client_state(step=step, epoch=0,
                                                        loader_state={"position": loader_pos},
                                                        config=vars(args)))
        if stop:
            ckpt.wait()  # exit 85 only once the checkpoint is durable and published
            return signals.REQUEUE_EXIT_CODE
    ckpt.wait()
    if args.dump_final:
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):  # full tensors under ZeRO-3, else a no-op
            if rank == 0:
                torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()},
                           args.dump_final)
    return 0


def _run_rank(target: Callable[[list[str]], int], argv: list[str], env: dict[str, str],
              log_file: Path) -> None:
    """Body of a forked rank: environment, output to its own file, exit with the target's code."""
    os.environ.update(env)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # Python-level streams too: under pytest they are capture objects, not file descriptors 1, 2.
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    code = 1
    try:
        code = int(target(argv) or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def launch(run_dir: Path, world: int, *args: str, target: Callable[[list[str]], int] = main,
           env: dict[str, str] | None = None, timeout: float = 240) -> list[int]:
    """Fork `world` ranks running `target([run_dir, *args])`; return every rank's exit code
    (negative: killed by that signal).

    Forking from a process that already imported torch and DeepSpeed saves each rank several
    seconds of imports (gloo is fork-safe; NCCL would need spawn). Like torchrun, the survivors
    are killed once a rank dies, since they would otherwise wait in a collective until gloo's
    30-minute timeout.
    """
    import importlib

    import torch

    # A forked child inherits the parent's OpenMP runtime; one started with several threads
    # deadlocks in the child. tests/conftest.py sets OMP_NUM_THREADS=1 before torch loads.
    if torch.get_num_threads() != 1:
        raise RuntimeError("launch() forks: start the parent with OMP_NUM_THREADS=1 "
                           f"(it has {torch.get_num_threads()} threads)")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ctx = multiprocessing.get_context("fork")
    procs, logs = [], []
    for rank in range(world):
        e = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
             "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
        logs.append(run_dir / f"rank{rank}.{os.getpid()}.out")
        q = ctx.Process(target=_run_rank, args=(target, [str(run_dir), *args], e, logs[-1]))
        q.start()
        procs.append(q)
    deadline = time.monotonic() + timeout
    died_at = None
    while any(q.is_alive() for q in procs):
        if died_at is None and any(q.exitcode not in (None, 0, 85) for q in procs):
            died_at = time.monotonic()
        if time.monotonic() > deadline or (died_at and time.monotonic() - died_at > 3):
            for q in procs:
                if q.is_alive():
                    q.kill()
        time.sleep(0.05)
    for rank, q in enumerate(procs):
        q.join()
        if q.exitcode not in (0, 85, -signal.SIGKILL):
            print(f"--- rank {rank} exited {q.exitcode}:\n{logs[rank].read_text()[-4000:]}")
    return [q.exitcode for q in procs]


def read_log(run_dir: Path, tag: str) -> dict[int, dict]:
    lines = (Path(run_dir) / f"log.{tag}.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
