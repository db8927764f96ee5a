"""Weights & Biases as a second sink of the training scalars (`logging.wandb`), rank 0 only.

MetricsLogger hands this sink exactly the scalars it writes to TensorBoard and metrics.jsonl
(loss, learning rates, throughput, visual tokens per sample, data-wait fraction, bad samples,
memory, MFU, validation). The run's resolved config is the W&B run config. The W&B run id is
chosen once per run folder and kept in RUN_DIR/wandb_run_id, so every resume of that folder
(requeues included) continues the same W&B run; W&B's own files go to RUN_DIR/wandb/.
`WANDB_MODE=offline` keeps everything on the machine (`wandb sync RUN_DIR/wandb/offline-run-*`
uploads later). A resumed run logs again the steps a killed run logged past its last checkpoint;
W&B keeps the first values of such steps (TensorBoard's purge_step drops them instead).
"""
from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path

from trainer.config import ConfigError, RunConfig

RUN_ID_FILE = "wandb_run_id"


def _wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("logging.wandb.enabled: needs wandb, which is not installed "
                          "(pip install 'mambamia[wandb]')") from None
    return wandb


def run_id(run_dir: Path, new_id) -> str:
    """The run folder's W&B run id: read from RUN_ID_FILE, or `new_id()` written there first
    (temporary name, then rename) so that a crash right after init still resumes the same run."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        text = path.read_text(encoding="utf-8").strip()
        if text.isalnum():
            return text
        raise ConfigError(f"{path}: expected the W&B run id (letters and digits), got {text[:40]!r}; "
                          "delete the file to start a new W&B run")
    value = new_id()
    tmp = path.with_name(f".{RUN_ID_FILE}.{os.getpid()}.tmp")
    tmp.write_text(value + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return value


class WandbSink:
    """`log(step, scalars)` and `close()` over one W&B run."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path):
        wandb = _wandb()
        run_dir = Path(run_dir)
        opts = cfg.logging.wandb
        config = dataclasses.asdict(cfg)
        self._run = wandb.init(
            project=opts.project, entity=opts.entity, name=opts.run_name or cfg.stage,
            tags=list(opts.tags), id=run_id(run_dir, lambda: secrets.token_hex(6)), resume="allow",
            dir=str(run_dir), config=config,
            # Our own progress bar and log lines stay as they are on the console.
            settings=wandb.Settings(console="off"))
        # A resume may follow a changed config (learning rates, schedule): record what is in effect.
        self._run.config.update(config, allow_val_change=True)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(dict(scalars), step=step)

    def close(self) -> None:
        self._run.finish()


def open_wandb(cfg: RunConfig, run_dir: str | Path, *, is_main: bool) -> WandbSink | None:
    """The W&B sink of rank 0 when `logging.wandb.enabled`, else None."""
    if not (is_main and cfg.logging.wandb.enabled):
        return None
    return WandbSink(cfg, run_dir)
