"""Training metrics: TensorBoard scalars, one JSON line per logged step, and a progress bar.

Only rank 0 writes. Values are computed by the loop (already reduced over ranks where that
matters); this module only formats and stores them. `metrics.jsonl` is appended line by line and
flushed, so a killed run loses at most the line being written; a resumed run appends to it.
"""
from __future__ import annotations

import json
import math
import re
import resource
import time
from pathlib import Path

import torch

# Dense (no sparsity) tensor-core peaks of one device from the vendors' data sheets, TFLOP/s:
# (bf16/fp16, tf32). Matched against the device name torch reports, first match wins, so the more
# specific names (GH200 before H200, H100 PCIe before H100) come first; word boundaries keep A10
# from matching A100 or A10G.
_PEAK_TFLOPS: list[tuple[str, tuple[float, float]]] = [
    (r"GB200", (2500.0, 1250.0)),
    (r"B200", (2250.0, 1100.0)),
    (r"B100", (1750.0, 875.0)),
    (r"GH200", (989.0, 494.0)),
    (r"H100 PCIe", (756.0, 378.0)),
    (r"H100 NVL", (835.0, 418.0)),
    (r"H100|H200|H800", (989.0, 494.0)),
    (r"H20\b", (148.0, 74.0)),
    (r"A100|A800", (312.0, 156.0)),
    (r"\bA30\b", (165.0, 82.0)),
    (r"L40S", (362.0, 183.0)),
    (r"\bL40\b", (181.0, 90.5)),
    (r"\bL4\b", (121.0, 60.0)),
    (r"\bA10\b", (125.0, 62.5)),
    (r"RTX A6000", (154.8, 77.4)),
    (r"MI300X|MI325X", (1307.0, 653.7)),
    (r"MI250X", (383.0, 191.5)),
]


def peak_for_name(name: str, precision: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s of the device called `name` for `precision`, where it comes from), or
    (None, why not). fp32 training is measured against the TF32 tensor-core peak, the most fp32
    matmuls reach (with TF32 allowed; without it MFU comes out low)."""
    column, kind = (0, "bf16") if precision in ("bf16", "fp16") else (1, "tf32")
    for pattern, peaks in _PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks[column] * 1e12, f"{name}, {kind} data-sheet peak"
    return None, (f"MFU is not reported: no peak FLOP/s known for {name!r}; set logging.peak_tflops "
                  "to the device's dense peak in the training precision")


def peak_with_source(device: torch.device, precision: str = "bf16",
                     override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where it comes from), or (None, a sentence saying why MFU is
    not reported). `override_tflops` (config `logging.peak_tflops`) wins over the table."""
    if override_tflops is not None:
        return override_tflops * 1e12, "logging.peak_tflops"
    if device.type != "cuda":
        return None, (f"MFU is not reported on {device.type}: it has no tensor-core peak to compare "
                      "with (set logging.peak_tflops to report one anyway)")
    return peak_for_name(torch.cuda.get_device_name(device), precision)


def peak_flops(device: torch.device, precision: str = "bf16",
               override_tflops: float | None = None) -> float | None:
    """The peak of `peak_with_source`, or None: then no MFU is reported."""
    return peak_with_source(device, precision, override_tflops)[0]


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
                 tensorboard: bool = True, progress_bar: bool = True, wandb=None):
        self.enabled = enabled
        self._writer = self._jsonl = self._bar = None
        # A further sink of the same scalars (trainer/wandb_log.py): log(step, scalars), close().
        self._wandb = wandb if enabled else None
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
        if self._wandb is not None:
            self._wandb.log(step, scalars)
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
        for handle in (self._bar, self._writer, self._jsonl, self._wandb):
            if handle is not None:
                handle.close()
        self._writer = self._jsonl = self._bar = self._wandb = None
