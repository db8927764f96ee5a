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

With `async_save=True` the same protocol runs later: `save` returns once each rank holds a
host-memory snapshot of what DeepSpeed would have written, each rank's thread writes and fsyncs its
own files and leaves a done note, and rank 0's thread publishes (marker, rename, `latest`) only
after every rank's note. A second `save` first waits for the first (`wait`, collective); a crash or
SIGKILL during the background write leaves a `.partial` folder and `latest` on the previous step.
Call `wait()` on every rank before exiting (a stop signal exits only after it).

The marker also lists every file of the folder with its size, and the resolved config. Before a
resume, rank 0 verifies the checkpoint `latest` names: marker readable, every listed file present
with its recorded size, every `.pt` loadable as tensors and plain data. A damaged one (truncated or
missing file, unreadable marker) is skipped with a one-line warning and the previous complete step
is used; if step folders exist but none is usable, the load stops with one line (`CheckpointError`)
rather than silently starting afresh over them.

Nothing from a checkpoint runs code: every `torch.load` on the way, DeepSpeed's included, is forced
to `weights_only=True` (`weights_only_loads`).

    ckpt = Checkpointer(run_dir, keep_last=3)
    client = ckpt.load(engine)                      # None on a fresh run
    ...
    ckpt.save(engine, step, gather_client_state(step=step, epoch=epoch,
                                                loader_state=loader.state_dict(), config=cfg))
    ckpt.wait()                                     # before exiting (a no-op for synchronous saves)
"""
from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from trainer.async_checkpoint import BackgroundWrite, HostBuffers, fsync_path, make_snapshot_engine
from trainer.rng import get_rng_state, set_rng_state

log = logging.getLogger(__name__)

MARKER = "mambamia_checkpoint.json"
PARTIAL_SUFFIX = ".partial"
UNIVERSAL_SUFFIX = "_universal"
LATEST = "latest"
# Test hook: rank 0 SIGKILLs itself after DeepSpeed wrote the files of this step but before the
# marker, the rename and `latest` (the worst moment for a crash); with async saves, in its
# background write, after its first file, while the training thread has moved on.
CRASH_IN_SAVE_ENV = "MAMBAMIA_TEST_CRASH_IN_SAVE"
# DeepSpeed's `ds_to_universal` refuses ZeRO-1/2 checkpoints without this top-level entry; an
# empty pattern table is right for a model without tensor or pipeline parallel slices.
_UNIVERSAL_INFO_KEY = "universal_checkpoint_info"

_STEP_DIR = re.compile(r"^(\d+)$")
# The rank-0 module-states file: one for ZeRO-0/1/2 (and pipeline stage 0), one per rank for ZeRO-3.
RANK0_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (damaged, incomplete, unsafe); the message names the file."""
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


def _allow_deepspeed_data_classes() -> None:
    """Let `weights_only` loads rebuild the three DeepSpeed classes its optimizer-state files pickle.

    Each only holds numbers and defines no unpickling hook of its own (`__setstate__`,
    `__reduce__`), so rebuilding one sets attributes and runs nothing the file chooses:
    `fragment_address` (a dataclass of two ints), `ZeroStageEnum` (an int Enum) and `LossScaler`
    (the static loss scale). Found with `torch.serialization.get_unsafe_globals_in_checkpoint` on
    ZeRO-1/2/3 checkpoints, fp32 and bf16, of deepspeed 0.19.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([fragment_address, ZeroStageEnum, LossScaler])


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside runs with `weights_only=True`, even where the caller asks for False.

    DeepSpeed's checkpoint engine, its ZeRO readers, `zero_to_fp32` and `ds_to_universal` all call
    `torch.load(..., weights_only=False)`. torch's `TORCH_FORCE_WEIGHTS_ONLY_LOAD`, read at every
    call, overrides that argument, so one switch covers every loader on the way without patching
    DeepSpeed (a replaced checkpoint engine would only cover the engine's own loads). A file that
    needs anything beyond tensors, containers, numbers and strings then fails to load instead of
    running code.
    """
    _allow_deepspeed_data_classes()
    saved = {name: os.environ.pop(name, None) for name in (_FORCE_WEIGHTS_ONLY, _FORCE_NO_WEIGHTS_ONLY)}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def safe_load(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """`torch.load` of a checkpoint file on the CPU, tensors and plain data only."""
    with weights_only_loads():
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary name, flush it to disk, then rename it over `path`."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _fsync_files(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_path(path)


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

    def __init__(self, run_dir: str | os.PathLike, *, keep_last: int = 3, crc32: bool = False,
                 async_save: bool = False, exclude_frozen: bool = False):
        """`crc32`: let torch.save checksum every record. Off by default: it halves the save speed
        (measured by bench/bench_checkpoint.py) and guards only against storage corruption, not
        against the interrupted writes the marker protocol handles.

        `async_save`: `save` returns after a host-memory snapshot and the files are written in the
        background (see `save`, `wait`); costs host memory for one copy of each rank's state.

        `exclude_frozen`: leave frozen parameters out of the files (a LoRA run's base LLM: they
        never change and the model build reloads them); loads then accept their absence."""
        if keep_last < 1:
            raise ValueError(f"checkpoint keep_last: expected an integer >= 1, got {keep_last}")
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.crc32 = crc32
        self.async_save = async_save
        self._pending: BackgroundWrite | None = None
        self._host_buffers = HostBuffers()
        self.exclude_frozen = exclude_frozen

    def complete_steps(self) -> list[int]:
        """Steps whose folder holds the completion marker, oldest first."""
        if not self.root.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.root.iterdir()
                 if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
        return sorted(steps)

    def _read_latest(self) -> str | None:
        path = self.root / LATEST
        return path.read_bytes().decode(errors="replace").strip() if path.is_file() else None

    def latest_step(self) -> int | None:
        """The step `latest` names, if its folder has a marker; else the newest such step.

        `latest` stays authoritative over newer complete folders: it is what a person edits to
        roll a run back, and a folder it does not name may be from an abandoned trajectory.
        Cheap (no file is verified); `resume_step` is what a resume and an export use.
        """
        complete = self.complete_steps()
        text = self._read_latest()
        if text is not None:
            if text.isdigit() and int(text) in complete:
                return int(text)
            log.warning("%s names %r, which is not a complete checkpoint; using the newest complete "
                        "one instead", self.root / LATEST, text[:40])
        return complete[-1] if complete else None

    def info(self, step: int) -> dict[str, Any]:
        """The marker of a checkpoint: step, world_size, zero_stage, code_version, saved_at, files
        (name -> bytes), config (the resolved run config); raises CheckpointError if unreadable."""
        return _read_marker(self.root / str(step), step)

    def verify(self, step: int) -> dict[str, Any]:
        """The marker of checkpoint `step` once its files check out; CheckpointError naming the
        first problem otherwise (unreadable marker, missing or resized file, a `.pt` that does not
        load as tensors and plain data)."""
        folder = self.root / str(step)
        marker = _read_marker(folder, step)
        files = marker.get("files")
        if files is None:  # written before markers listed their files
            _check_layout(folder)
        else:
            _check_manifest(folder, files)
        _check_loadable(folder)
        return marker

    def resume_step(self, step: int | None = None) -> int | None:
        """The step to resume or export from: `step` if given, else the one `latest` names, falling
        back to older ones, newest first, past damaged ones (one warning line each).

        None when there is no step folder at all. CheckpointError when `step` is not usable, or
        when step folders exist and none is: starting afresh would overwrite them.
        """
        if step is not None:
            self.verify(step)
            return step
        candidates = self._candidates()
        problems: list[tuple[int, CheckpointError]] = []
        for candidate in candidates:
            try:
                self.verify(candidate)
            except CheckpointError as err:
                problems.append((candidate, err))
                continue
            for skipped, err in problems:
                log.warning("checkpoint %d is not usable, using checkpoint %d instead: %s",
                            skipped, candidate, err)
            return candidate
        if candidates:
            raise CheckpointError(f"{self.root}: no usable checkpoint among steps {candidates} (newest: "
                                  f"{problems[0][1]}); move the folder away to start afresh")
        return None

    def _candidates(self) -> list[int]:
        """Step folders to try: the one `latest` names, then older ones, newest first (all of them,
        newest first, without a readable `latest`)."""
        if not self.root.is_dir():
            return []
        steps = sorted((int(m.group(1)) for p in self.root.iterdir()
                        if (m := _STEP_DIR.match(p.name)) and p.is_dir()), reverse=True)
        text = self._read_latest()
        if text is not None and text.isdigit() and int(text) in steps:
            named = int(text)
            return [named] + [s for s in steps if s < named]
        if text is not None:
            log.warning("%s names %r, which is not a checkpoint folder; trying the newest ones",
                        self.root / LATEST, text[:40])
        return steps

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, client_state: dict[str, Any]) -> Path:
        """Collective: every rank writes its part into `<step>.partial/`; rank 0 then publishes it.

        With `async_save` the call returns once every rank holds a host-memory snapshot of its
        part; the files are written, fsynced and published by background threads
        (trainer/async_checkpoint.py). Either way a save first waits for the one in flight.
        """
        self.wait()
        final = self.root / str(step)
        # Saving the step `latest` already names (a stop signal right at a periodic save) would
        # only rewrite identical state, unless that folder is damaged (a resume fell back past
        # it). Rank 0 decides for all.
        if self._already_saved(step):
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
        marker = {"step": step, "world_size": _world_size(),
                  "zero_stage": int(engine.zero_optimization_stage()),
                  "code_version": client_state.get("code_version") or (code_version() if _rank() == 0 else ""),
                  "config": client_state.get("config")}
        started = time.perf_counter()
        if self.async_save:
            self._save_in_background(engine, tag, state, marker, started)
            return final
        crc32 = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(self.crc32)
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=state, save_latest=False,
                                   exclude_frozen_parameters=self.exclude_frozen)
        finally:
            torch.serialization.set_crc32_options(crc32)
        # save_checkpoint ends with a barrier: from here every rank's files are closed.
        if os.environ.get(CRASH_IN_SAVE_ENV) == str(step) and _rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if _rank() == 0:
            self._publish(marker, started)
        _barrier()
        return final

    def _publish(self, marker: dict[str, Any], started: float) -> None:
        """Rank 0, once every rank's files are written: fsync them, write the marker, rename the
        folder to its step, then move `latest` (each durable before the next), then prune."""
        step = marker["step"]
        folder = self.root / f"{step}{PARTIAL_SUFFIX}"
        _fsync_files(folder)  # the data must be on disk before the marker vouches for it
        marker = {**marker, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "save_seconds": round(time.perf_counter() - started, 3), "async": self.async_save,
                  "files": _manifest(folder)}
        _write_atomic(folder / MARKER, json.dumps(marker, indent=1) + "\n")
        os.replace(folder, self.root / str(step))
        fsync_path(self.root)
        _write_atomic(self.root / LATEST, f"{step}\n")
        self._prune(keep=step)

    def _save_in_background(self, engine, tag: str, state: dict[str, Any], marker: dict[str, Any],
                            started: float) -> None:
        """DeepSpeed's save_checkpoint with the snapshot engine swapped in, then the write thread.

        The engine's own checkpoint engine is put back at once, so loads keep using it."""
        snapshots = make_snapshot_engine(self._host_buffers)
        own = engine.checkpoint_engine
        engine.checkpoint_engine = snapshots
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=state, save_latest=False,
                                   exclude_frozen_parameters=self.exclude_frozen)
        finally:
            engine.checkpoint_engine = own
        # save_checkpoint ends with a barrier: every rank holds its snapshot, training may go on.
        step = marker["step"]
        self._pending = BackgroundWrite(
            snapshots.files, self.root / tag, rank=_rank(), world_size=_world_size(), crc32=self.crc32,
            publish=(lambda: self._publish(marker, started)) if _rank() == 0 else None,
            crash_after_first_file=os.environ.get(CRASH_IN_SAVE_ENV) == str(step) and _rank() == 0)
        log.info("checkpoint %d: snapshot taken in %.3f s, writing in the background", step,
                 time.perf_counter() - started)

    def in_flight(self) -> bool:
        """Whether an asynchronous save is still being written or published (local, no communication)."""
        return self._pending is not None and not self._pending.done()

    def wait(self) -> None:
        """Collective when `async_save`: block until the save in flight is durable on every rank
        and published. Raises CheckpointError on every rank if any rank's write failed (the
        previous checkpoint then stays `latest`). Call it on all ranks before exiting."""
        if not self.async_save:
            return
        pending, self._pending = self._pending, None
        error = pending.join() if pending is not None else None
        errors = [error]
        if _world_size() > 1:
            errors = [None] * _world_size()
            dist.all_gather_object(errors, error)
        failed = [(rank, text) for rank, text in enumerate(errors) if text]
        if failed:
            rank, text = failed[0]
            raise CheckpointError(f"{pending.folder if pending else self.root}: asynchronous save failed on "
                                  f"rank {rank} ({text}); `latest` still names the previous checkpoint")

    def _already_saved(self, step: int) -> bool:
        """Collective: `latest` names `step` and its folder's files match its marker."""
        decision = [False]
        if _rank() == 0 and self._read_latest() == str(step):
            try:
                _check_manifest(self.root / str(step), self.info(step).get("files") or {})
                decision = [True]
            except CheckpointError:
                pass
        if _world_size() > 1:
            dist.broadcast_object_list(decision, src=0)
        return decision[0]

    def _prune(self, keep: int) -> None:
        """Keep `keep` and the newest `keep_last` steps whose files are all there (sizes checked,
        nothing loaded); remove other step folders, damaged ones older than `keep` included."""
        steps = self.complete_steps()
        intact = []
        for step in steps:
            try:
                _check_manifest(self.root / str(step), _read_marker(self.root / str(step), step).get("files") or {})
                intact.append(step)
            except CheckpointError:
                pass
        kept = {keep} | set(intact[-self.keep_last:])
        for step in steps:
            if step not in kept and (step in intact or step < keep):
                _remove_checkpoint(self.root / str(step))
                _remove_checkpoint(self.root / f"{step}{UNIVERSAL_SUFFIX}")

    # ------------------------------------------------------------------ load
    def resume_point(self) -> dict[str, Any] | None:
        """Collective: the verified marker of the checkpoint to resume from, None on a fresh run.

        Rank 0 removes what interrupted saves left, picks and verifies the step (`resume_step`)
        and broadcasts its decision, so every rank loads the same step or raises the same
        CheckpointError.
        """
        decision: list[Any] = [None]
        if _rank() == 0:
            try:
                self._remove_leftovers()
                step = self.resume_step()
                decision = [("ok", None if step is None else self.info(step))]
            except CheckpointError as err:
                decision = [("error", str(err))]
        if _world_size() > 1:
            dist.broadcast_object_list(decision, src=0)
        kind, value = decision[0]
        if kind == "error":
            raise CheckpointError(value)
        return value

    def load(self, engine) -> dict[str, Any] | None:
        """Collective: `resume_point` then `load_point`; None when there is nothing to resume."""
        point = self.resume_point()
        return None if point is None else self.load_point(engine, point)

    def load_point(self, engine, point: dict[str, Any]) -> dict[str, Any]:
        """Collective: load the checkpoint `point` (from `resume_point`) into `engine`; returns its
        client state.

        A checkpoint written by another number of ranks or under another ZeRO stage (0-2 among
        themselves; 3 only to 3) goes through DeepSpeed's universal format (converted once, on
        rank 0, kept as `<step>_universal/`).
        """
        step = int(point["step"])
        saved = (int(point["world_size"]), int(point["zero_stage"]))
        now = (_world_size(), int(engine.zero_optimization_stage()))
        if (saved[1] == 3) != (now[1] == 3):
            # ZeRO-3 names and splits its model-state files per rank; DeepSpeed's universal load
            # does not translate between that layout and the single file of stages 0-2.
            raise CheckpointError(f"{self.root / str(step)}: saved under ZeRO-{saved[1]}, this run uses "
                                  f"ZeRO-{now[1]}; resume with zero stage {saved[1]}, or start a new run "
                                  "from an export of this one (`mambamia export`, then init_from)")
        try:
            with weights_only_loads():
                if saved == now:
                    load_path, client = engine.load_checkpoint(str(self.root), tag=str(step),
                                                               load_module_strict=not self.exclude_frozen)
                else:
                    log.warning("checkpoint %d was written by %d ranks under ZeRO-%d, this run has %d "
                                "under ZeRO-%d: loading it through DeepSpeed's universal checkpoint "
                                "format", step, *saved, *now)
                    load_path, client = self._load_universal(engine, step)
        except Exception as err:  # whatever DeepSpeed met in files that passed `verify`
            raise CheckpointError(f"{self.root / str(step)}: DeepSpeed could not load it "
                                  f"({_first_line(err)})") from err
        if load_path is None:
            raise CheckpointError(f"{self.root / str(step)}: DeepSpeed could not load this checkpoint")
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
            return engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=not self.exclude_frozen)
        finally:
            config.load_universal_checkpoint = previous

    def _remove_leftovers(self) -> None:
        """Delete what interrupted saves, conversions and prunes left; only names this class makes.

        A `<step>/` folder without a marker is never published that way (the marker is written
        before the rename), so it is what a prune leaves when interrupted between removing the
        marker and the files, or a checkpoint whose marker was lost otherwise. Its files decide:
        if every rank's files are there and load, it is complete and its marker is rewritten from
        them; if not, it is the unfinished prune and is removed.
        """
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            m = _OURS.match(path.name)
            if m is None or path.name == LATEST:
                continue
            if path.is_file():  # latest.tmp.<pid> (crash before its rename), latest_universal
                path.unlink()
            elif m.group(2) is None and not (path / MARKER).exists():
                self._restore_or_remove(path, int(m.group(1)))
            elif m.group(2) in (PARTIAL_SUFFIX, f"{UNIVERSAL_SUFFIX}{PARTIAL_SUFFIX}") \
                    or not (path / MARKER).is_file():
                log.warning("removing incomplete checkpoint folder %s", path)
                shutil.rmtree(path, ignore_errors=True)

    def _restore_or_remove(self, folder: Path, step: int) -> None:
        try:
            marker = _marker_from_files(folder, step)
        except CheckpointError as err:
            log.warning("removing checkpoint folder %s: no completion marker and incomplete (%s)",
                        folder, err)
            shutil.rmtree(folder, ignore_errors=True)
            return
        _write_atomic(folder / MARKER, json.dumps(marker, indent=1) + "\n")
        log.warning("checkpoint %s had no completion marker; its files are complete (%d ranks, "
                    "ZeRO-%d): marker rewritten", folder, marker["world_size"], marker["zero_stage"])


def _read_marker(folder: Path, step: int) -> dict[str, Any]:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    path = folder / MARKER
    try:
        marker = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no completion marker {MARKER}") from None
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: unreadable completion marker ({_first_line(err)})") from None
    valid = (isinstance(marker, dict) and marker.get("step") == step
             and type(marker.get("world_size")) is int and marker["world_size"] >= 1
             and marker.get("zero_stage") in (0, 1, 2, 3)
             and isinstance(marker.get("files", {}), dict))
    if not valid:
        raise CheckpointError(f"{path}: not a completion marker of step {step} (expected a JSON object "
                              "with step, world_size, zero_stage, files)")
    return marker


def _manifest(folder: Path) -> dict[str, int]:
    """Every file below `folder` (relative name -> bytes), the marker excepted."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def _check_manifest(folder: Path, files: dict[str, Any]) -> None:
    for name, size in files.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or type(size) is not int:
            raise CheckpointError(f"{folder / MARKER}: lists {name!r}: {size!r}, expected a file name "
                                  "inside the folder and its size")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the completion marker lists it)")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, the completion marker "
                                  f"recorded {size} (truncated or replaced)")


def _check_loadable(folder: Path) -> None:
    """Every `.pt` file opens as tensors and plain data (memory-mapped: the pickle is read, the
    tensor bytes are not), so truncated archives and unsafe pickles fail here, before DeepSpeed."""
    for path in sorted(folder.glob("*.pt")):
        try:
            safe_load(path, mmap=True)
        except Exception as err:  # any failure means DeepSpeed could not load it either
            raise CheckpointError(f"{path}: does not load as tensors and plain data "
                                  f"({_first_line(err)})") from None


def _check_layout(folder: Path) -> tuple[int, dict[str, Any]]:
    """Without a file list: every rank's files must be there. Returns (ranks, rank-0 states).

    Each process writes one optimizer-states file (`zero_pp_rank_<dp>_mp_rank_<mp>`); ZeRO-3 also
    one model-states file per rank. The data-parallel size comes from the rank-0 model states.
    """
    names = [name for name in RANK0_MODEL_STATES if (folder / name).is_file()]
    if not names:
        raise CheckpointError(f"{folder}: no {' or '.join(RANK0_MODEL_STATES)}")
    try:
        states = safe_load(folder / names[0], mmap=True)
        ranks, stage = int(states["dp_world_size"]), int(states["ds_config"]["zero_optimization"]["stage"])
    except Exception as err:  # unloadable, or not DeepSpeed's layout
        raise CheckpointError(f"{folder / names[0]}: not a DeepSpeed model-states file "
                              f"({_first_line(err)})") from None
    for rank in range(ranks):
        wanted = [f"*zero_pp_rank_{rank}_mp_rank_*optim_states.pt"]
        if stage == 3:
            wanted.append(f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        for pattern in wanted:
            if not any(folder.glob(pattern)):
                raise CheckpointError(f"{folder}: rank {rank} of {ranks} wrote no {pattern}")
    return len(list(folder.glob("*optim_states.pt"))), states


def _marker_from_files(folder: Path, step: int) -> dict[str, Any]:
    """The marker a complete folder would have had, rebuilt from its files (CheckpointError if
    they are not complete)."""
    _check_loadable(folder)
    world_size, states = _check_layout(folder)
    return {"step": step, "world_size": world_size,
            "zero_stage": int(states["ds_config"]["zero_optimization"]["stage"]),
            "code_version": states.get("code_version", "unknown"), "saved_at": None,
            "restored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": _manifest(folder), "config": states.get("config")}


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
    # The source's marker, less its file list (which names the source's files, not these).
    marker = {k: v for k, v in json.loads((src / MARKER).read_text()).items() if k != "files"}
    _write_atomic(tmp / MARKER, json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, dst)
    fsync_path(dst.parent)


def _remove_checkpoint(path: Path) -> None:
    """Marker first: a prune interrupted half-way leaves a folder `load` knows to be incomplete."""
    if not path.is_dir():
        return
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
