"""Checkpoint save time beside writing the same bytes raw to the same disk, resume time, and what
an asynchronous save (`checkpoint.async`) costs the training steps it overlaps.

    python bench/bench_checkpoint.py [--params 32e6] [--zero 2] [--repeats 5] [--dir DIR]
                                     [--batch 64] [--overlap-repeats 3]

One process, CPU, fp32, DeepSpeed ZeRO-`zero` with a torch AdamW (weights + master copy + two Adam
moments). Each repeat times, in rotating order: `Checkpointer.save` (DeepSpeed serialisation, fsync
of every file, marker, rename, `latest`); the same save with torch.save's per-record crc32 on
(`Checkpointer(crc32=True)`); and the bytes of such a checkpoint written with plain `write` +
`fsync` into the same folder (the floor any format has on this disk). Then a fresh engine is built
and `Checkpointer.load` is timed. Medians are reported; ratio = save / raw (target <= 1.3).

Then, in the same process, training steps (batch `--batch` through the model, backward, AdamW)
are timed in rounds of: plain steps; an asynchronous save followed by steps until it is published
(`in_flight()` false); a synchronous save. Reported: the median plain step, the median step while
a write is in flight (slowdown target <= 5%), the stall of the save call itself (host snapshot),
the whole extra time an async save costs training (stall + slowdown x steps it overlapped), and
the synchronous save's stall, all also in units of plain steps. On a 2-core machine the writer
thread competes with the training thread for the second core, and with anything else running.
The last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

# Run as a plain script from a checkout: make the repository importable without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _single_process_env() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port), DS_ACCELERATOR="cpu").items():
        os.environ.setdefault(key, value)


def _engine(params: int, zero: int):
    import deepspeed

    width = 1024
    layers = max(1, round(params / (width * width + width)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": zero},
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    # One step so the optimizer holds its moments, as in any checkpoint taken during training.
    loss = engine(torch.randn(1, width)).square().mean()
    engine.backward(loss)
    engine.step()
    return engine, sum(p.numel() for p in model.parameters())


def _train_step(engine, batch: torch.Tensor) -> float:
    started = time.perf_counter()
    loss = engine(batch).square().mean()
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - started


def overlap(engine, work: Path, batch_size: int, repeats: int) -> dict:
    """Training step times with an asynchronous save in flight vs without, beside a synchronous
    save, in interleaved rounds (see the module docstring)."""
    from trainer.checkpoint import Checkpointer

    async_ckpt = Checkpointer(work / "async", keep_last=1, async_save=True)
    sync_ckpt = Checkpointer(work / "sync", keep_last=1)
    batch = torch.randn(batch_size, engine.module[0].in_features)
    plain, in_flight, stalls, overlapped, sync_saves = [], [], [], [], []
    for _ in range(3):  # warm-up: allocator, first optimizer steps
        _train_step(engine, batch)
    for step in range(1, repeats + 1):
        plain += [_train_step(engine, batch) for _ in range(5)]
        started = time.perf_counter()
        async_ckpt.save(engine, step, {"step": step})
        stalls.append(time.perf_counter() - started)
        n = 0
        while async_ckpt.in_flight():
            in_flight.append(_train_step(engine, batch))
            n += 1
        async_ckpt.wait()
        overlapped.append(n)
        plain += [_train_step(engine, batch) for _ in range(5)]
        started = time.perf_counter()
        sync_ckpt.save(engine, step, {"step": step})
        sync_saves.append(time.perf_counter() - started)
    step_s, flight_s = statistics.median(plain), statistics.median(in_flight or [float("nan")])
    stall_s, sync_s, steps = statistics.median(stalls), statistics.median(sync_saves), statistics.median(overlapped)
    extra_s = stall_s + max(0.0, flight_s - step_s) * steps
    return {"batch": batch_size, "overlap_repeats": repeats, "step_s": round(step_s, 4),
            "step_in_flight_s": round(flight_s, 4),
            "step_slowdown_in_flight": round(flight_s / step_s - 1, 4), "target_step_slowdown": 0.05,
            "steps_per_async_save": steps, "async_save_stall_s": round(stall_s, 4),
            "async_save_extra_s": round(extra_s, 4), "async_save_extra_steps": round(extra_s / step_s, 3),
            "sync_save_stall_s": round(sync_s, 4), "sync_save_stall_steps": round(sync_s / step_s, 3)}


def _write_raw(files: dict[str, bytes], folder: Path) -> float:
    folder.mkdir()
    started = time.perf_counter()
    for name, data in files.items():
        with open(folder / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=32e6)
    parser.add_argument("--zero", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp dir)")
    parser.add_argument("--batch", type=int, default=64,
                        help="rows per training step in the overlap measurement (sets the step time)")
    parser.add_argument("--overlap-repeats", type=int, default=3,
                        help="rounds of plain steps / async save / sync save (0: skip)")
    args = parser.parse_args()

    _single_process_env()
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT build
    import deepspeed

    from trainer.checkpoint import Checkpointer

    deepspeed.init_distributed(dist_backend="gloo")
    work = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir))
    engine, numel = _engine(int(args.params), args.zero)
    # Old steps are deleted outside the timed region (below), as the raw copies are: freeing
    # hundreds of MB is the file system's cost, not the format's.
    ckpt = Checkpointer(work, keep_last=10**6)
    with_crc = Checkpointer(work / "crc32", keep_last=10**6, crc32=True)
    # The bytes a checkpoint of this engine consists of, for the raw writes (an untimed save).
    ckpt.save(engine, 0, {"step": 0})
    files = {p.name: p.read_bytes() for p in (ckpt.root / "0").iterdir() if p.is_file()}
    total_bytes = sum(len(b) for b in files.values())
    times: dict[str, list[float]] = {"save": [], "crc32": [], "raw": []}
    loads = []

    def timed(name: str, step: int) -> None:
        started = time.perf_counter()
        if name == "raw":
            _write_raw(files, work / f"raw{step}")
        else:
            (ckpt if name == "save" else with_crc).save(engine, step, {"step": step})
        times[name].append(time.perf_counter() - started)

    try:
        for step in range(1, args.repeats + 1):
            # Rotate the order: a shared disk drifts, and whatever runs first meets other writeback.
            names = ["save", "crc32", "raw"]
            for name in names[step % 3:] + names[:step % 3]:
                timed(name, step)
            for folder in (work / f"raw{step}", ckpt.root / str(step - 1), with_crc.root / str(step - 1)):
                shutil.rmtree(folder, ignore_errors=True)
            fresh, _ = _engine(int(args.params), args.zero)
            started = time.perf_counter()
            client = ckpt.load(fresh)
            loads.append(time.perf_counter() - started)
            assert client["step"] == step
            del fresh
        save_s, crc_s, raw_s = (statistics.median(times[k]) for k in ("save", "crc32", "raw"))
        load_s = statistics.median(loads)
        shutil.rmtree(ckpt.root, ignore_errors=True)
        shutil.rmtree(with_crc.root, ignore_errors=True)
        steps = overlap(engine, work, args.batch, args.overlap_repeats) if args.overlap_repeats else {}
        result = {"params": numel, "zero_stage": args.zero, "checkpoint_bytes": total_bytes,
                  "repeats": args.repeats, "save_s": round(save_s, 4), "raw_write_s": round(raw_s, 4),
                  "save_over_raw": round(save_s / raw_s, 3), "target_save_over_raw": 1.3,
                  "save_crc32_s": round(crc_s, 4), "save_crc32_over_raw": round(crc_s / raw_s, 3),
                  "resume_load_s": round(load_s, 4),
                  "save_GBps": round(total_bytes / save_s / 1e9, 3),
                  "raw_GBps": round(total_bytes / raw_s / 1e9, 3),
                  "all_s": {k: [round(t, 3) for t in v] for k, v in times.items()}, **steps}
        print(f"checkpoint of {numel / 1e6:.1f}M params, {total_bytes / 1e6:.0f} MB: save {save_s:.3f} s, "
              f"raw write {raw_s:.3f} s ({save_s / raw_s:.2f}x; with torch.save crc32 {crc_s / raw_s:.2f}x), "
              f"resume {load_s:.3f} s")
        if steps:
            print(f"training step {steps['step_s']:.3f} s; with an async save in flight "
                  f"{steps['step_in_flight_s']:.3f} s ({100 * steps['step_slowdown_in_flight']:+.1f}%) over "
                  f"{steps['steps_per_async_save']} steps; async save stalls {steps['async_save_stall_s']:.3f} s, "
                  f"costs {steps['async_save_extra_steps']:.2f} steps in all; sync save stalls "
                  f"{steps['sync_save_stall_s']:.3f} s ({steps['sync_save_stall_steps']:.2f} steps)")
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
