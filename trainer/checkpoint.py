"""Crash-safe DeepSpeed checkpoints in a run folder, resumable at the same or another world size.

Layout of `RUN_DIR/checkpoints/`:

    <step>/                DeepSpeed's files + `mambamia_checkpoint.json` (the completion marker)
    <step>.partial/        a save in progress (or one a crash interrupted): never loaded
    <step>_universal/      DeepSpeed universal form of <step>, made when the world size changed
    latest                 the step to resume from, written last

A save writes into `<step>.partial/` on every rank; after a barrier rank 0 writes the marker,
renames the folder to `<step>/`, then replaces `latest` (temp + rename), then prunes old steps.
A crash at any moment therefore leaves `latest` naming a complete folder; the leftovers of the
interrupted save are removed by the next `load`. All ranks must see the same file system.

    ckpt = Checkpointer(run_dir, keep_last=3)
    client = ckpt.load(engine)                      # None on a fresh run
    ...
    ckpt.save(engine, step, gather_client_state(step=step, epoch=epoch,
                                                loader_state=loader.state_dict(), config=cfg))
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.rng import get_rng_state, set_rng_state

log = logging.getLogger(__name__)

MARKER = "mambamia_checkpoint.json"
PARTIAL_SUFFIX = ".partial"
UNIVERSAL_SUFFIX = "_universal"
LATEST = "latest"
# Test hook: rank 0 SIGKILLs itself after DeepSpeed wrote the files of this step but before the
# marker, the rename and `latest` (the worst moment for a crash).
CRASH_IN_SAVE_ENV = "MAMBAMIA_TEST_CRASH_IN_SAVE"
# DeepSpeed's `ds_to_universal` refuses ZeRO-1/2 checkpoints without this top-level entry; an
# empty pattern table is right for a model without tensor or pipeline parallel slices.
_UNIVERSAL_INFO_KEY = "universal_checkpoint_info"

_STEP_DIR = re.compile(r"^(\d+)$")
# Everything `_remove_leftovers` may delete: step folders and what saves, conversions (DeepSpeed's
# converter writes `latest_universal`) and `latest` updates leave behind.
_OURS = re.compile(r"^(\d+)(\.partial|_universal|_universal\.partial)?$|^latest\.tmp\.\d+$"
                   r"|^latest_universal$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary name, flush it to disk, then rename it over `path`."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync_files(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync(path)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (renames), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def code_version() -> str:
    """`git describe` of the source tree when it is a checkout, else the installed package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return f"mambamia {metadata.version('mambamia')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def gather_client_state(*, step: int, epoch: int, loader_state: dict[str, Any],
                        config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Client state for `Checkpointer.save`, holding the loader and RNG state of EVERY rank.

    Collective (all_gather_object): call it on all ranks. `extra` entries are stored as given.
    """
    mine = {"loader": loader_state, "rng": get_rng_state()}
    per_rank: list[Any] = [mine]
    if _world_size() > 1:
        per_rank = [None] * _world_size()
        dist.all_gather_object(per_rank, mine)
    return {
        "step": step,
        "epoch": epoch,
        "world_size": _world_size(),
        "loader_states": [r["loader"] for r in per_rank],
        "rng_states": [r["rng"] for r in per_rank],
        "config": config,
        "code_version": code_version(),
        **extra,
    }


def restore_rng(client_state: dict[str, Any]) -> bool:
    """Restore this rank's generators; False (nothing restored) when the rank did not exist then.

    At a new world size the ranks beyond the old count keep the generators the loop seeded.
    """
    states = client_state["rng_states"]
    if _rank() >= len(states):
        return False
    set_rng_state(states[_rank()])
    return True


class Checkpointer:
    """Save / find / load DeepSpeed checkpoints of one run folder (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, *, keep_last: int = 3, crc32: bool = False):
        """`crc32`: let torch.save checksum every record. Off by default: it halves the save speed
        (measured by bench/bench_checkpoint.py) and guards only against storage corruption, not
        against the interrupted writes the marker protocol handles."""
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last: expected an integer >= 1, got {keep_last}")
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.crc32 = crc32

    def complete_steps(self) -> list[int]:
        """Steps whose folder holds the completion marker, oldest first."""
        if not self.root.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.root.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
        return sorted(steps)

    def _read_latest(self) -> str | None:
        path = self.root / LATEST
        return path.read_text().strip() if path.is_file() else None

    def latest_step(self) -> int | None:
        """The step `latest` names, if its folder is complete; else the newest complete step.

        `latest` stays authoritative over newer complete folders: it is what a person edits to
        roll a run back, and a folder it does not name may be from an abandoned trajectory.
        """
        complete = self.complete_steps()
        text = self._read_latest()
        if text is not None:
            if text.isdigit() and int(text) in complete:
                return int(text)
            log.warning("%s names %r, which is not a complete checkpoint; using the newest complete "
                        "one instead", self.root / LATEST, text)
        return complete[-1] if complete else None

    def info(self, step: int) -> dict[str, Any]:
        """The marker of a complete checkpoint: step, world_size, zero_stage, code_version, saved_at."""
        return json.loads((self.root / str(step) / MARKER).read_text())

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, client_state: dict[str, Any]) -> Path:
        """Collective: every rank writes its part into `<step>.partial/`; rank 0 then publishes it."""
        final = self.root / str(step)
        # Saving the step `latest` already names (a stop signal right at a periodic save) would
        # only rewrite identical state; every rank reads the same two files, so all skip together.
        if self._read_latest() == str(step) and (final / MARKER).is_file():
            _barrier()
            return final
        tag = f"{step}{PARTIAL_SUFFIX}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tag, ignore_errors=True)
            # A folder of this step that `latest` does not name is stale: published by a run that
            # crashed before updating `latest`, or left from a trajectory rolled back past it.
            _remove_checkpoint(final)
            _remove_checkpoint(self.root / f"{step}{UNIVERSAL_SUFFIX}")
        _barrier()
        state = {_UNIVERSAL_INFO_KEY: _universal_info(), **client_state}
        started = time.perf_counter()
        crc32 = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(self.crc32)
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=state, save_latest=False)
        finally:
            torch.serialization.set_crc32_options(crc32)
        # save_checkpoint ends with a barrier: from here every rank's files are closed.
        if os.environ.get(CRASH_IN_SAVE_ENV) == str(step) and _rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if _rank() == 0:
            _fsync_files(self.root / tag)  # the data must be on disk before the marker vouches for it
            marker = {"step": step, "world_size": _world_size(),
                      "zero_stage": int(engine.zero_optimization_stage()),
                      "code_version": client_state.get("code_version") or code_version(),
                      "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "save_seconds": round(time.perf_counter() - started, 3)}
            _write_atomic(self.root / tag / MARKER, json.dumps(marker, indent=1) + "\n")
            os.replace(self.root / tag, final)
            _fsync(self.root)
            _write_atomic(self.root / LATEST, f"{step}\n")
            self._prune(keep={step})
        _barrier()
        return final

    def _prune(self, keep: set[int]) -> None:
        steps = self.complete_steps()
        keep = keep | set(steps[-self.keep_last:])
        for step in steps:
            if step not in keep:
                _remove_checkpoint(self.root / str(step))
                _remove_checkpoint(self.root / f"{step}{UNIVERSAL_SUFFIX}")

    # ------------------------------------------------------------------ load
    def load(self, engine) -> dict[str, Any] | None:
        """Collective: load the step `latest` names into `engine`; returns its client state.

        None when the run folder has no complete checkpoint. A checkpoint written by another
        number of ranks or under another ZeRO stage (0-2 among themselves; 3 only to 3) goes
        through DeepSpeed's universal format (converted once, on rank 0, kept as `<step>_universal/`).
        """
        if _rank() == 0:
            self._remove_leftovers()
        _barrier()
        step = self.latest_step()
        if step is None:
            return None
        info = self.info(step)
        saved = (int(info["world_size"]), int(info["zero_stage"]))
        now = (_world_size(), int(engine.zero_optimization_stage()))
        if (saved[1] == 3) != (now[1] == 3):
            # ZeRO-3 names and splits its model-state files per rank; DeepSpeed's universal load
            # does not translate between that layout and the single file of stages 0-2.
            raise RuntimeError(f"{self.root / str(step)}: saved under ZeRO-{saved[1]}, this run uses "
                               f"ZeRO-{now[1]}; resume with zero stage {saved[1]}, or start a new run "
                               "from an export of this one (`mambamia export`, then init_from)")
        if saved == now:
            load_path, client = engine.load_checkpoint(str(self.root), tag=str(step))
        else:
            log.warning("checkpoint %d was written by %d ranks under ZeRO-%d, this run has %d under "
                        "ZeRO-%d: loading it through DeepSpeed's universal checkpoint format",
                        step, *saved, *now)
            load_path, client = self._load_universal(engine, step)
        if load_path is None:
            raise RuntimeError(f"{self.root / str(step)}: DeepSpeed could not load this checkpoint")
        client = dict(client or {})
        client.pop(_UNIVERSAL_INFO_KEY, None)
        return client

    def _load_universal(self, engine, step: int):
        tag = f"{step}{UNIVERSAL_SUFFIX}"
        if _rank() == 0 and not (self.root / tag / MARKER).is_file():
            _convert_to_universal(self.root / str(step), self.root / tag)
        _barrier()
        # The flag is read at load time only, so it is switched on for this one load rather than
        # baked into the DeepSpeed config, where it would also apply to same-size resumes.
        config = engine._config
        previous = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            return engine.load_checkpoint(str(self.root), tag=tag)
        finally:
            config.load_universal_checkpoint = previous

    def _remove_leftovers(self) -> None:
        """Delete what interrupted saves, conversions and prunes left; only names this class makes."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            m = _OURS.match(path.name)
            if m is None or path.name == LATEST:
                continue
            if path.is_file():  # latest.tmp.<pid> (crash before its rename), latest_universal
                path.unlink()
            elif m.group(2) in (PARTIAL_SUFFIX, f"{UNIVERSAL_SUFFIX}{PARTIAL_SUFFIX}") \
                    or not (path / MARKER).is_file():
                log.warning("removing incomplete checkpoint folder %s", path)
                shutil.rmtree(path, ignore_errors=True)


def _universal_info() -> dict[str, Any]:
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}


def _convert_to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's ds_to_universal in this process, into a temporary folder renamed when done."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = dst.with_name(dst.name + PARTIAL_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    # One worker each: the converter's process pools only pay off on many-core nodes with big
    # checkpoints, and forking a pool inside a rank of a running job is fragile.
    args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    ds_to_universal.main(args)
    # The converter also points a `latest_universal` file at its output; loads here name the tag.
    (dst.parent / "latest_universal").unlink(missing_ok=True)
    _fsync_files(tmp)
    shutil.copy2(src / MARKER, tmp / MARKER)
    os.replace(tmp, dst)
    _fsync(dst.parent)


def _remove_checkpoint(path: Path) -> None:
    """Marker first: a prune interrupted half-way leaves a folder `load` knows to be incomplete."""
    if not path.is_dir():
        return
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
