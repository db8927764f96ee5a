"""Stop requests from the cluster: SIGUSR1 / SIGTERM -> checkpoint at a step boundary -> exit 85.

SLURM sends SIGUSR1 shortly before a time limit (`--signal=B:USR1@N`) and SIGTERM on preemption.
A handler that saved right away would run in the middle of a backward pass, and ranks receive the
signal at different moments, so the handler only sets a flag. At every step boundary the loop asks
`should_stop()`, which all-reduces the flag (MAX) so that every rank takes the same decision at
the same step; the loop then saves a checkpoint and exits with `REQUEUE_EXIT_CODE`, which the
SLURM scripts turn into `scontrol requeue`.

    signals.install()
    while step < total:
        ...train one step...
        if signals.should_stop():
            checkpointer.save(engine, step, client_state)
            sys.exit(signals.REQUEUE_EXIT_CODE)

Note for launchers: torchrun does not forward SIGUSR1 and reports any non-zero worker exit as its
own exit code 1, so the signal must reach the worker processes (srun-launched tasks, or a
script that forwards it) and the requeue decision can read the workers' code 85.
"""
from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

# 85: unused by bash (126-165 are signals/exec errors), by Python (1, 2) and by torchrun (1), so a
# launcher can tell "checkpointed, please requeue" from a crash.
REQUEUE_EXIT_CODE = 85

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)

_received: signal.Signals | None = None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _received
    _received = signal.Signals(signum)


def install(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
    """Replace the default action (terminate) of `signals` with setting the stop flag.

    Must run in the main thread (a Python rule for signal handlers).
    """
    for sig in signals:
        signal.signal(sig, _on_signal)


def received() -> signal.Signals | None:
    """The last stop signal this process received, if any (local, no communication)."""
    return _received


def clear() -> None:
    """Forget a received signal (a test, or a loop that handled the request without exiting)."""
    global _received
    _received = None


def should_stop() -> bool:
    """True on every rank if any rank received a stop signal. Collective when distributed.

    Call it at the same point of every step on every rank: it is an all-reduce.
    """
    local = 1 if _received is not None else 0
    if not (dist.is_available() and dist.is_initialized()):
        return bool(local)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([local], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
