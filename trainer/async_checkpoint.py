"""Asynchronous checkpoint writes: DeepSpeed decides what each rank saves, this module defers the writing.

`SnapshotEngine` implements DeepSpeed's checkpoint-engine interface (`create` / `save` / `commit`)
and stands in for the engine's own one for the length of one `save_checkpoint` call
(trainer/checkpoint.py swaps it in and out). DeepSpeed therefore still chooses every file and its
contents (model states, each rank's ZeRO partition, client state); `save` only copies the state it
is handed into host memory (pinned, reused between saves, on a GPU) and records the path. Once
`save_checkpoint` returns (it ends with a barrier), every rank's state is in its snapshot and
training may change the live tensors; `BackgroundWrite` then writes and fsyncs the snapshot in a
thread while the loop trains on.

Why not one of DeepSpeed 0.19's own engines:
- `DecoupledCheckpointEngine` queues the LIVE tensors to a spawned process (shared memory, no
  copy), so `engine.step()` must block at the next accumulation boundary until the write is done:
  a save longer than one forward + backward stalls training. It also never fsyncs, and rank 0
  writes `latest` before the other ranks' files are known to be on disk.
- `DataStatesCheckpointEngine` wraps the external `datastates` package (C++/CUDA), which is not
  on the package index and has no CPU path.
- `FastCheckpointEngine` writes faster (DeepNVMe) but synchronously.
- `torch.distributed.checkpoint.async_save` (snapshot + background thread, the same idea) writes
  its own format from DTensor state dicts; DeepSpeed's ZeRO partitions are not expressed in it, and
  every reader here (DeepSpeed's load, its universal conversion, `zero_to_fp32`, `verify`) reads
  DeepSpeed's files.

Each rank's thread writes only the files its rank saved, fsyncs each, then leaves a `.rank<r>.done`
file (or `.rank<r>.failed` with the error) in the checkpoint folder; rank 0's thread waits for
every rank's note and then calls `publish` (marker, rename, `latest`), so no collective runs
outside the training thread.
"""
from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DONE_SUFFIX = ".done"
FAILED_SUFFIX = ".failed"
# How often rank 0 looks for the other ranks' notes: short next to any real write.
_POLL_S = 0.05
# Nice value of the writer threads: below every training thread, not starved (19 is the floor).
_WRITER_NICE = 10


def _checkpoint_engine_base() -> type:
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    return CheckpointEngine


class HostBuffers:
    """Pinned host tensors reused from one save to the next (pinning GBs takes seconds per save).

    The n-th tensor copied in a save reuses the n-th buffer of the previous save when its shape
    and dtype match; a save starts only after the previous write finished, so no buffer is in use.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._next = 0

    def start(self) -> None:
        self._next = 0

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor` (its view only, contiguous), detached from autograd."""
        tensor = tensor.detach()
        if tensor.device.type == "cpu":
            return tensor.clone(memory_format=torch.contiguous_format)
        i, self._next = self._next, self._next + 1
        if i < len(self._buffers) and (self._buffers[i].shape, self._buffers[i].dtype) == (tensor.shape, tensor.dtype):
            buffer = self._buffers[i]
        else:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
            self._buffers[i:i + 1] = [buffer]
        return buffer.copy_(tensor, non_blocking=True)


def snapshot(obj: Any, buffers: HostBuffers) -> Any:
    """A copy of a state dict that shares no memory with it: tensors copied to host memory,
    containers rebuilt, anything else deep-copied (so later changes cannot reach the file)."""
    if isinstance(obj, torch.Tensor):
        return buffers.copy(obj)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # same class and attributes (a state dict's `_metadata`)
        for key, value in obj.items():
            out[key] = snapshot(value, buffers)
        return out
    if isinstance(obj, list):
        return [snapshot(v, buffers) for v in obj]
    if isinstance(obj, tuple):
        items = [snapshot(v, buffers) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return copy.deepcopy(obj)


def make_snapshot_engine(buffers: HostBuffers):
    """A DeepSpeed checkpoint engine whose `save` snapshots (see the module docstring)."""
    base = _checkpoint_engine_base()

    class SnapshotEngine(base):
        def __init__(self) -> None:
            super().__init__(None)
            self.name = "MambamiaSnapshotEngine"
            self.files: list[tuple[Any, str]] = []
            buffers.start()

        def create(self, info) -> None:
            pass

        def save(self, state_dict, path: str) -> None:
            self.files.append((snapshot(state_dict, buffers), path))

        def load(self, path: str, map_location=None):
            raise RuntimeError("the snapshot engine only saves")

        def commit(self, info) -> bool:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the non-blocking device-to-host copies are complete
            return True

        def preserves_storage_sharing(self) -> bool:
            # False: DeepSpeed skips its own clone of the model states, since `save` copies anyway.
            return False

    return SnapshotEngine()


class BackgroundWrite:
    """One rank's write of one checkpoint in a thread; rank 0 also publishes it once every rank is done.

    `publish` (rank 0 only) runs in the thread after all `world_size` ranks left their done note.
    `crash_after_first_file`: a test hook, SIGKILL this process in the middle of the write.
    """

    def __init__(self, files: list[tuple[Any, str]], folder: Path, *, rank: int, world_size: int,
                 crc32: bool, publish: Callable[[], None] | None, crash_after_first_file: bool = False):
        self.folder, self.rank, self.world_size = folder, rank, world_size
        self.error: str | None = None
        self._files, self._crc32, self._publish = files, crc32, publish
        self._crash = crash_after_first_file
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-write-{folder.name}",
                                        daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> str | None:
        """Wait for the write (and, on rank 0, the publication); the error text, None if it worked."""
        self._thread.join()
        return self.error

    def _run(self) -> None:
        _yield_cpu_to_training()
        try:
            self._write_own_files()
            if self._publish is not None:
                self._wait_for_ranks()
                self._publish()
        except Exception as err:  # reported by join(); the previous checkpoint stays `latest`
            self.error = f"{type(err).__name__}: {str(err).strip()[:300]}"
            log.error("asynchronous checkpoint write into %s failed: %s", self.folder, self.error)
            if self._publish is None:
                _note(self.folder / f".rank{self.rank}{FAILED_SUFFIX}", self.error)

    def _write_own_files(self) -> None:
        # The flag is global and read when torch.save opens its archive writer; the training
        # thread does not save meanwhile (a save waits for this write).
        previous = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(self._crc32)
        try:
            for i, (state, path) in enumerate(self._files):
                torch.save(state, path)
                fsync_path(Path(path))
                if self._crash and i == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            torch.serialization.set_crc32_options(previous)
        self._files = []  # the snapshot's memory goes back before the wait for other ranks
        if self._publish is None:
            _note(self.folder / f".rank{self.rank}{DONE_SUFFIX}", "")

    def _wait_for_ranks(self) -> None:
        others = [r for r in range(self.world_size) if r != self.rank]
        while True:
            failed = [r for r in others if (self.folder / f".rank{r}{FAILED_SUFFIX}").exists()]
            if failed:
                text = (self.folder / f".rank{failed[0]}{FAILED_SUFFIX}").read_text()
                raise RuntimeError(f"rank {failed[0]} could not write its files: {text}")
            if all((self.folder / f".rank{r}{DONE_SUFFIX}").exists() for r in others):
                break
            time.sleep(_POLL_S)
        for r in others:
            (self.folder / f".rank{r}{DONE_SUFFIX}").unlink()


def _yield_cpu_to_training() -> None:
    """Lower this thread's scheduling priority (Linux schedules threads one by one), so that where
    the cores are busy the training thread runs first and the write takes the time left over.
    Where that is not possible the write simply competes at the same priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _WRITER_NICE)
    except (AttributeError, OSError):  # not Linux / not permitted
        pass


def _note(path: Path, text: str) -> None:
    """A rank's done/failed note, durable before it is visible under its name."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (renames), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
