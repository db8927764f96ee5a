"""Process group and device: chosen once from the environment and logged once.

CUDA present -> NCCL, one GPU per local rank; otherwise the CPU accelerator and gloo. The training
code is the same on both; only this module and `engine.build_ds_config` look at the device.

Two checks for runs spread over several hosts:
- every collective (including those of the groups DeepSpeed creates later) gives up after
  `MAMBAMIA_PG_TIMEOUT` seconds, so the survivors of a dead host end with an error instead of
  waiting in an all-reduce for torch's default half hour;
- `DistInfo.check_shared_folder(run_dir)`: every rank must see the files rank 0 writes there
  (checkpoints are written by all ranks and published by rank 0).
"""
from __future__ import annotations

import math
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import ConfigError

PG_TIMEOUT_ENV = "MAMBAMIA_PG_TIMEOUT"
# Long enough for rank 0's slow parts while the others wait in a barrier (publishing a large
# checkpoint, converting one to the universal format on resume); short next to a job's hours.
DEFAULT_PG_TIMEOUT_S = 900.0
# A file another host created can take a moment to appear on a network file system.
SHARED_CHECK_WAIT_S = 5.0


@dataclass(kw_only=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_shared_folder(self, folder: str | os.PathLike) -> None:
        """Collective: raise on every rank unless every rank sees the files rank 0 writes in `folder`.

        A run folder on node-local disks would let each host write its own checkpoints that no
        resume could put together; this finds out at start instead of at the first resume.
        """
        if self.world_size == 1:
            return
        folder = Path(folder)
        token = [uuid.uuid4().hex if self.is_main else None]
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f".shared_check.{token[0]}").write_text(token[0])
        dist.broadcast_object_list(token, src=0)  # also the barrier: the file exists from here on
        path = folder / f".shared_check.{token[0]}"
        deadline = time.monotonic() + SHARED_CHECK_WAIT_S
        while not (seen := _reads(path, token[0])) and time.monotonic() < deadline:
            time.sleep(0.25)
        views = [None] * self.world_size
        dist.all_gather_object(views, (seen, socket.gethostname()))
        if self.is_main:
            path.unlink(missing_ok=True)
        blind = [f"{rank} ({host})" for rank, (ok, host) in enumerate(views) if not ok]
        if blind:
            raise ConfigError(
                f"run_dir {folder} is not shared between the hosts: rank(s) {', '.join(blind)} do not "
                f"see the file rank 0 ({views[0][1]}) wrote there; put the run folder on storage every "
                "node mounts at the same path (see slurm/README.md)")


def _reads(path: Path, token: str) -> bool:
    try:
        return path.read_text() == token
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_timeout() -> timedelta:
    """How long any collective waits for the other ranks: `MAMBAMIA_PG_TIMEOUT` seconds."""
    text = os.environ.get(PG_TIMEOUT_ENV, "")
    if not text:
        return timedelta(seconds=DEFAULT_PG_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"{PG_TIMEOUT_ENV}={text!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


def init_distributed() -> DistInfo:
    """Join (or, without a launcher, create) the process group that DeepSpeed will use."""
    import deepspeed
    from torch.distributed import distributed_c10d

    if "RANK" not in os.environ:
        # A plain `python -m ...` run: DeepSpeed would otherwise go looking for MPI.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from trainer.engine import skip_shm_build

        skip_shm_build()
        device, backend = torch.device("cpu"), "gloo"
    timeout = pg_timeout()
    # Groups created after init (DeepSpeed clones the world group for ZeRO) take torch's module
    # default, not the default group's timeout: without this they would wait 30 minutes.
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    info = DistInfo(rank=torch.distributed.get_rank(), local_rank=local_rank,
                    world_size=torch.distributed.get_world_size(), device=device, backend=backend)
    if info.is_main:
        name = torch.cuda.get_device_name(device) if info.on_cuda else f"CPU, {torch.get_num_threads()} threads"
        print(f"[dist] {info.world_size} process(es), backend {backend}, device {device} ({name}), "
              f"collective timeout {timeout.total_seconds():.0f} s", flush=True)
    return info
