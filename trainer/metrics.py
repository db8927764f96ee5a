"""Training metrics: TensorBoard scalars, one JSON line per logged step, and a progress bar.

Only rank 0 writes. Values are computed by the loop (already reduced over ranks where that
matters); this module only formats and stores them. `metrics.jsonl` is appended line by line and
flushed, so a killed run loses at most the line being written; a resumed run appends to it.
"""
from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), FLOP/s.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (CPU, unknown GPU): then no MFU is reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


def train_flops_per_token(num_params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """6N for the matmuls of forward + backward plus the attention scores (PaLM appendix B);
    num_layers=0 gives the plain 6N of a module without attention.

    Counted as if every parameter trained: frozen layers still run their backward for activation
    gradients (but not their weight gradients), so a stage-1 step is overstated by up to a third;
    the same formula in every stage keeps MFU comparable across stages.
    """
    return 6.0 * num_params + 12.0 * num_layers * hidden * seq_len


def memory_gb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"memory/max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory/max_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    # ru_maxrss is in KiB on Linux.
    return {"memory/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricsLogger:
    """Rank 0 writes `run_dir/tensorboard/`, `run_dir/metrics.jsonl` and a tqdm bar; others no-op."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, start_step: int, total_steps: int,
                 tensorboard: bool = True, progress_bar: bool = True):
        self.enabled = enabled
        self._writer = self._jsonl = self._bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past its last checkpoint, so a resumed
            # run's curves do not double back on themselves.
            self._writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, step)
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()

    def progress(self, steps: int, loss: float, samples_per_s: float) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:.1f}", refresh=False)

    def write(self, message: str) -> None:
        """A line above the bar (plain print would tear it)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        for handle in (self._bar, self._writer, self._jsonl):
            if handle is not None:
                handle.close()
        self._writer = self._jsonl = self._bar = None
