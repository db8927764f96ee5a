"""Process group and device: chosen once from the environment and logged once.

CUDA present -> NCCL, one GPU per local rank; otherwise the CPU accelerator and gloo. The training
code is the same on both; only this module and `engine.build_ds_config` look at the device.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join (or, without a launcher, create) the process group that DeepSpeed will use."""
    import deepspeed

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
    deepspeed.init_distributed(dist_backend=backend)
    info = DistInfo(rank=torch.distributed.get_rank(), local_rank=local_rank,
                    world_size=torch.distributed.get_world_size(), device=device, backend=backend)
    if info.is_main:
        name = torch.cuda.get_device_name(device) if info.on_cuda else f"CPU, {torch.get_num_threads()} threads"
        print(f"[dist] {info.world_size} process(es), backend {backend}, device {device} ({name})",
              flush=True)
    return info

