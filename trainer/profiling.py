"""torch.profiler around chosen optimizer steps (`profiling.steps: [start, end]`), on every rank.

Each rank writes one trace, `RUN_DIR/profile/<host>_rank<r>.<time_ns>.pt.trace.json`: the file
name and folder layout of torch's `tensorboard_trace_handler`, so `tensorboard --logdir
RUN_DIR/profile` (with the torch-tb-profiler plugin) lists every rank as a worker, and each file
is Chrome trace JSON that chrome://tracing and https://ui.perfetto.dev open. Steps are marked
(`ProfilerStep#<step>`) with the trainer's step numbers.

    profiler = StepProfiler(run_dir, cfg.profiling.steps, rank=rank)
    while step < total:
        profiler.step_begins(step + 1)
        ...one optimizer step...
        step += 1
        profiler.step_ended(step)
    profiler.close()                    # in a finally: a run that stops early keeps its trace
"""
from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, profile

log = logging.getLogger(__name__)


class StepProfiler:
    """Records optimizer steps `steps[0]..steps[1]` (inclusive, counted from 1); a no-op when
    `steps` is empty or a resumed run starts past them."""

    def __init__(self, run_dir: str | Path, steps: list[int], *, rank: int):
        self.folder = Path(run_dir) / "profile"
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.rank = rank
        self.trace: Path | None = None
        self._prof: profile | None = None

    def step_begins(self, step: int) -> None:
        """Start recording if `step` is the first profiled step (or the first one this run reaches)."""
        if self._prof is None and self.trace is None and self.first <= step <= self.last:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            # Shapes name the matmuls in the trace; stacks and memory would multiply its size. A
            # schedule (record every step) is what makes torch mark the steps in the trace.
            self._prof = profile(activities=activities, record_shapes=True,
                                 schedule=lambda _: ProfilerAction.RECORD)
            self._prof.step_num = step  # ProfilerStep#<n> markers carry the trainer's step numbers
            self._prof.start()

    def step_ended(self, step: int) -> None:
        if self._prof is None:
            return
        if step >= self.last:
            self.close()
        else:
            self._prof.step()

    def close(self) -> None:
        """Stop recording and write the trace (a run that ends or stops inside the range too)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        worker = f"{socket.gethostname()}_rank{self.rank}"
        path = self.folder / f"{worker}.{time.time_ns()}.pt.trace.json"
        tmp = path.with_name(path.name + ".tmp")
        prof.export_chrome_trace(str(tmp))
        tmp.replace(path)  # the plugin never lists a half-written trace
        self.trace = path
        log.info("profiler trace of steps %d-%d written to %s", self.first, self.last, path)
