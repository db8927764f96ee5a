"""Checkpointer, stop signals and RNG state.

Unit tests drive the Checkpointer with a stand-in engine that writes one file per rank through a
DeepSpeed-style checkpoint engine (the folder protocol does not depend on what DeepSpeed writes);
the protocol tests run with synchronous and asynchronous saves (`checkpoint.async`). The
multi-process tests run the toy DeepSpeed job of tests/ckpt_worker.py on 2 gloo ranks; their oracle
is an uninterrupted synchronous run of the same job, whose losses, per-rank RNG draws and loader
positions an interrupted-and-resumed run, synchronous or asynchronous, must repeat.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import torch

from trainer import signals
from trainer.checkpoint import (CRASH_IN_SAVE_ENV, MARKER, Checkpointer, CheckpointError,
                                gather_client_state)
from trainer.rng import get_rng_state, seed_everything, set_rng_state


class TorchFiles:
    """DeepSpeed's TorchCheckpointEngine in miniature: torch.save at once."""

    def create(self, info):
        pass

    def save(self, state_dict, path):
        torch.save(state_dict, path)

    def commit(self, info):
        return True


class FakeEngine:
    """Writes what save_checkpoint is given through its `checkpoint_engine`, as DeepSpeed does
    (an async save swaps that attribute), so tests can see which tag was loaded."""

    def __init__(self, zero_stage: int = 0):
        self.loaded: list[str] = []
        self.zero_stage = zero_stage
        self.checkpoint_engine = TorchFiles()

    def zero_optimization_stage(self):
        return self.zero_stage

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters=False):
        assert save_latest is False  # `latest` is the Checkpointer's, written after the marker
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        self.checkpoint_engine.create(tag)
        self.checkpoint_engine.save(client_state, os.path.join(save_dir, tag, "state.pt"))
        self.checkpoint_engine.commit(tag)

    def load_checkpoint(self, load_dir, tag, load_module_strict=True):
        self.loaded.append(tag)
        return load_dir, torch.load(os.path.join(load_dir, tag, "state.pt"), weights_only=False)


def _save(ckpt, step):
    ckpt.save(FakeEngine(), step, {"step": step})
    ckpt.wait()


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_save(request):
    return request.param


def test_save_publishes_then_prunes(tmp_path, async_save):
    ckpt = Checkpointer(tmp_path, keep_last=2, async_save=async_save)
    assert ckpt.latest_step() is None and ckpt.load(FakeEngine()) is None
    for step in (10, 20, 30):
        _save(ckpt, step)
        assert (ckpt.root / "latest").read_text().strip() == str(step)
    assert ckpt.complete_steps() == [20, 30]
    assert not (ckpt.root / "10").exists()
    assert ckpt.info(30)["world_size"] == 1 and ckpt.info(30)["step"] == 30
    engine = FakeEngine()
    assert ckpt.load(engine)["step"] == 30 and engine.loaded == ["30"]


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, async_save):
    ckpt = Checkpointer(tmp_path, keep_last=3, async_save=async_save)
    _save(ckpt, 1)
    _save(ckpt, 2)
    # What crashes leave behind: DeepSpeed files of an unpublished save, a folder that lost its
    # marker in an interrupted prune, a temp `latest`; plus `latest` naming a folder that is gone.
    (ckpt.root / "3.partial").mkdir()
    (ckpt.root / "3.partial" / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 10)
    (ckpt.root / "0").mkdir()
    (ckpt.root / "latest.tmp.123").write_text("3")
    (ckpt.root / "latest_universal").write_text("3_universal.partial")
    unrelated = ckpt.root / "notes.txt"
    unrelated.write_text("user file")
    assert ckpt.latest_step() == 2
    engine = FakeEngine()
    assert ckpt.load(engine)["step"] == 2 and engine.loaded == ["2"]
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["1", "2", "latest", "notes.txt"]
    (ckpt.root / "latest").write_text("7\n")
    assert ckpt.latest_step() == 2


def test_save_of_existing_step_is_skipped(tmp_path, async_save):
    ckpt = Checkpointer(tmp_path, async_save=async_save)
    _save(ckpt, 5)
    before = (ckpt.root / "5" / MARKER).read_text()
    ckpt.save(FakeEngine(), 5, {"step": -1})
    ckpt.wait()
    assert (ckpt.root / "5" / MARKER).read_text() == before
    assert torch.load(ckpt.root / "5" / "state.pt", weights_only=False)["step"] == 5


def test_step_folder_not_named_by_latest_is_replaced(tmp_path, async_save):
    ckpt = Checkpointer(tmp_path, async_save=async_save)
    _save(ckpt, 2)
    _save(ckpt, 4)
    # A crash between publishing 4 and updating `latest`: the run resumes at 2 and reaches 4 again.
    (ckpt.root / "latest").write_text("2\n")
    assert ckpt.latest_step() == 2
    ckpt.save(FakeEngine(), 4, {"step": 44})
    ckpt.wait()
    assert ckpt.latest_step() == 4
    assert torch.load(ckpt.root / "4" / "state.pt", weights_only=False)["step"] == 44


def test_resume_across_zero3_boundary_is_a_clear_error(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(FakeEngine(zero_stage=2), 3, {"step": 3})
    with pytest.raises(RuntimeError, match="saved under ZeRO-2, this run uses ZeRO-3"):
        ckpt.load(FakeEngine(zero_stage=3))


class GatedSave:
    """torch.save that waits for `gate` (in the background writer only: the snapshot engine never
    calls it in the training thread), or fails with `error` when one is set."""

    def __init__(self, monkeypatch):
        self.gate, self.error, self._real = threading.Event(), None, torch.save
        monkeypatch.setattr(torch, "save", self)

    def __call__(self, *args, **kwargs):
        assert self.gate.wait(30), "the test never opened the gate"
        if self.error is not None:
            raise self.error
        return self._real(*args, **kwargs)


def test_async_save_writes_the_state_of_the_save_call_in_the_background(tmp_path, monkeypatch):
    writes = GatedSave(monkeypatch)
    ckpt, engine = Checkpointer(tmp_path, keep_last=2, async_save=True), FakeEngine()
    weights = torch.zeros(4)
    writes.gate.set()
    ckpt.save(engine, 1, {"step": 1, "w": weights})
    ckpt.wait()
    writes.gate.clear()
    weights += 1
    ckpt.save(engine, 2, {"step": 2, "w": weights, "nested": [{"w": weights[1:]}]})
    # Returned before anything was written: the previous checkpoint is still the one to resume.
    assert ckpt.in_flight() and ckpt.latest_step() == 1 and (ckpt.root / "2.partial").is_dir()
    weights += 1  # training goes on; the file must hold the state at the save call
    # A second save waits for the first: it cannot start (no 3.partial) until the write ends.
    third = threading.Thread(target=ckpt.save, args=(engine, 3, {"step": 3, "w": weights}))
    third.start()
    time.sleep(0.3)
    assert third.is_alive() and not (ckpt.root / "3.partial").exists() and ckpt.latest_step() == 1
    writes.gate.set()
    third.join(30)
    ckpt.wait()
    assert ckpt.complete_steps() == [2, 3] and ckpt.latest_step() == 3 and not ckpt.in_flight()
    saved = torch.load(ckpt.root / "2" / "state.pt", weights_only=True)
    assert torch.equal(saved["w"], torch.ones(4)) and torch.equal(saved["nested"][0]["w"], torch.ones(3))
    assert torch.equal(torch.load(ckpt.root / "3" / "state.pt", weights_only=True)["w"], torch.full((4,), 2.0))
    assert ckpt.info(3)["async"] is True and ckpt.verify(3)["step"] == 3


def test_snapshot_shares_no_memory_with_the_live_state():
    from collections import OrderedDict, namedtuple

    from trainer.async_checkpoint import HostBuffers, snapshot

    Pair = namedtuple("Pair", "a b")
    flat = torch.nn.Parameter(torch.arange(6.0))
    live = OrderedDict(view=flat[2:4], param=flat, pair=Pair(torch.ones(2), 3), opts={"lr": [0.1]})
    live._metadata = {"": {"version": 1}}
    copied = snapshot(live, HostBuffers())
    with torch.no_grad():
        flat.add_(100)  # the optimizer steps on after the snapshot
    live["opts"]["lr"][0] = 0.2
    assert torch.equal(copied["view"], torch.tensor([2.0, 3.0])) and copied["view"].numel() == 2
    assert torch.equal(copied["param"], torch.arange(6.0)) and not copied["param"].requires_grad
    assert isinstance(copied["pair"], Pair) and copied["pair"].b == 3
    assert copied["opts"]["lr"] == [0.1] and copied._metadata == {"": {"version": 1}}


def test_async_save_that_fails_keeps_previous_checkpoint(tmp_path, monkeypatch):
    writes = GatedSave(monkeypatch)
    writes.gate.set()
    ckpt = Checkpointer(tmp_path, async_save=True)
    _save(ckpt, 1)
    writes.error = OSError(28, "No space left on device")
    ckpt.save(FakeEngine(), 2, {"step": 2})
    with pytest.raises(CheckpointError, match="asynchronous save failed on rank 0") as err:
        ckpt.wait()
    assert "No space left" in str(err.value) and "\n" not in str(err.value)
    assert ckpt.latest_step() == 1 and ckpt.complete_steps() == [1]
    writes.error = None
    assert ckpt.load(FakeEngine())["step"] == 1 and not (ckpt.root / "2.partial").exists()


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=0)


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip(tmp_path):
    seed_everything(123)
    _draws()
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()
    torch.save(get_rng_state(), tmp_path / "rng.pt")
    expected = _draws() + (random.gauss(0, 1), float(np.random.randn()))
    seed_everything(7)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() + (random.gauss(0, 1), float(np.random.randn())) == expected
    with pytest.raises(ValueError, match="numpy"):
        set_rng_state({"python": None, "torch": None, "cuda": []})


def test_client_state_single_process():
    seed_everything(0)
    state = gather_client_state(step=4, epoch=1, loader_state={"position": 9}, config={"a": 1},
                                stage="s1")
    assert state["loader_states"] == [{"position": 9}] and len(state["rng_states"]) == 1
    assert state["step"] == 4 and state["epoch"] == 1 and state["stage"] == "s1"
    assert state["world_size"] == 1 and state["code_version"]
    # The captured state is the one in force when gathering: restoring it repeats the next draw.
    nxt = torch.rand(1)
    set_rng_state(state["rng_states"][0])
    assert torch.equal(torch.rand(1), nxt)


def test_stop_signal_sets_flag():
    previous = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        signals.install()
        signals.clear()
        assert not signals.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received() == signal.SIGTERM and signals.should_stop()
        signals.clear()
        assert not signals.should_stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        signals.clear()
    assert signals.REQUEUE_EXIT_CODE == 85


# --------------------------------------------------------------------------- 2-rank DeepSpeed runs
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-2 run of 8 steps (checkpoints every 2, keeps 6 and 8), which
    also leaves its trained weights in final.pt."""
    from tests.ckpt_worker import launch, read_log

    run = tmp_path_factory.mktemp("reference")
    final = str(run / "final.pt")
    assert launch(run, 2, "--tag", "ref", "--steps", "8", "--dump-final", final) == [0, 0]
    return run, read_log(run, "ref")


def _assert_same_steps(log, ref, steps, *, world=2):
    assert sorted(log) == list(steps)
    for s in steps:
        assert log[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-6, rel=0), s
        assert log[s]["draws"] == ref[s]["draws"][:world], s  # each rank's RNG stream restored
        assert log[s]["positions"] == [s] * world, s  # each rank's loader state restored


@pytest.mark.parametrize("mode", [[], ["--async-save"]], ids=["sync", "async"])
def test_signal_on_one_rank_stops_both_then_resume_matches(reference, tmp_path, mode):
    """(A SIGKILL inside a save is exercised on the real trainer in tests/test_resume.py.)"""
    from tests.ckpt_worker import launch, read_log

    _, ref = reference
    ckpt = Checkpointer(tmp_path)
    # Only rank 0 gets SIGUSR1 after step 3: both ranks must agree to save at 3 and exit 85,
    # and (async) only once step 3 is published: no later wait could publish it.
    assert launch(tmp_path, 2, "--tag", "a", "--steps", "8", "--signal-at", "3", *mode) == [85, 85]
    assert ckpt.latest_step() == 3 and ckpt.verify(3)["world_size"] == 2
    assert sorted(p.name for p in (ckpt.root / "3").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert launch(tmp_path, 2, "--tag", "b", "--steps", "8", *mode) == [0, 0]
    assert ckpt.complete_steps() == [6, 8]
    _assert_same_steps(read_log(tmp_path, "a"), ref, range(1, 4))
    _assert_same_steps(read_log(tmp_path, "b"), ref, range(4, 9))


def test_sigkill_during_background_write_then_resume_matches(reference, tmp_path):
    """Async: rank 0 is SIGKILLed in its background write of step 4, after its first file, while
    training has moved on; `latest` stays at 2, and the resumed async run repeats the oracle."""
    from tests.ckpt_worker import launch, read_log

    _, ref = reference
    ckpt = Checkpointer(tmp_path)
    codes = launch(tmp_path, 2, "--tag", "a", "--steps", "8", "--async-save", env={CRASH_IN_SAVE_ENV: "4"})
    assert codes[0] == -signal.SIGKILL
    assert ckpt.latest_step() == 2 and (ckpt.root / "4.partial").is_dir() and not (ckpt.root / "4").exists()
    assert launch(tmp_path, 2, "--tag", "b", "--steps", "8", "--async-save") == [0, 0]
    assert ckpt.complete_steps() == [6, 8] and not (ckpt.root / "4.partial").exists()
    _assert_same_steps(read_log(tmp_path, "b"), ref, range(3, 9))
    for step in (6, 8):
        assert ckpt.verify(step)["async"] is True


def test_two_rank_checkpoint_resumes_on_one_rank(reference, tmp_path):
    from tests.ckpt_worker import launch, read_log

    ref_dir, ref = reference
    ckpt = Checkpointer(tmp_path)
    ckpt.root.mkdir()
    shutil.copytree(ref_dir / "checkpoints" / "6", ckpt.root / "6")
    (ckpt.root / "latest").write_text("6\n")
    # One rank with 2 micro-batches per step sees the same global batch as 2 ranks with one each;
    # it also switches from ZeRO-2 to ZeRO-1, which the same universal conversion handles.
    assert launch(tmp_path, 1, "--tag", "one", "--steps", "8", "--zero", "1") == [0]
    log = read_log(tmp_path, "one")
    assert sorted(log) == [7, 8]
    for s in (7, 8):
        assert log[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-6, rel=0)
        assert log[s]["draws"] == ref[s]["draws"][:1] and log[s]["positions"] == [s]
    assert (ckpt.info(8)["world_size"], ckpt.info(8)["zero_stage"]) == (1, 1)
    assert json.loads((ckpt.root / "6" / MARKER).read_text())["world_size"] == 2


def test_consolidated_weights_equal_trained_weights(reference):
    from trainer.export import consolidated_state_dict

    run, _ = reference
    weights = consolidated_state_dict(run / "checkpoints" / "8")
    trained = torch.load(run / "final.pt", weights_only=True)
    # The frozen layer is not in the optimizer partitions: it must come back from the module state.
    assert sorted(weights) == sorted(trained) and "frozen.weight" in weights
    for name, value in trained.items():
        assert torch.equal(weights[name], value), name


# --------------------------------------------------------------------------- damaged and unsafe files
class _Payload:
    """Unpickling this runs code: it writes `path` (what an attacker's checkpoint would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def _copy_steps(ref_dir, run, steps, latest):
    root = run / "checkpoints"
    root.mkdir(parents=True)
    for step in steps:
        shutil.copytree(ref_dir / "checkpoints" / str(step), root / str(step))
    (root / "latest").write_text(f"{latest}\n")
    return Checkpointer(run)


def _plant_payload(folder, marker_file):
    """Replace the rank-0 model states by a code-running pickle; the completion marker is updated
    to its size, so only the refusal to unpickle code stands between the file and a load."""
    path = folder / "mp_rank_00_model_states.pt"
    torch.save({"module": _Payload(marker_file)}, path)
    marker = json.loads((folder / MARKER).read_text())
    marker["files"][path.name] = path.stat().st_size
    (folder / MARKER).write_text(json.dumps(marker))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGES = {
    "truncated_optim": lambda f: _truncate(f / "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "missing_optim": lambda f: (f / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(),
    "missing_model": lambda f: (f / "mp_rank_00_model_states.pt").unlink(),
    "corrupt_marker": lambda f: (f / MARKER).write_bytes(b"\x00{\"step\": 8, garbage"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_with_one_warning(reference, tmp_path, caplog, damage):
    ref_dir, _ = reference
    ckpt = _copy_steps(ref_dir, tmp_path, (6, 8), latest=8)
    DAMAGES[damage](ckpt.root / "8")
    with caplog.at_level("WARNING", logger="trainer.checkpoint"):
        assert ckpt.resume_point()["step"] == 6
    skipped = [r.getMessage() for r in caplog.records if "checkpoint 8 is not usable" in r.getMessage()]
    assert len(skipped) == 1 and "\n" not in skipped[0]
    assert (ckpt.root / "8").is_dir()  # kept for inspection; only a later prune removes it
    # Every checkpoint damaged: one line, never a silent fresh start over them.
    _truncate(ckpt.root / "6" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint among steps \[8, 6\]") as err:
        ckpt.resume_point()
    assert "\n" not in str(err.value)


def test_checkpoint_without_marker_is_kept_if_its_files_are_complete(reference, tmp_path):
    ref_dir, _ = reference
    ckpt = _copy_steps(ref_dir, tmp_path, (6, 8), latest=8)
    (ckpt.root / "8" / MARKER).unlink()
    # 6 lost its marker and a rank's optimizer file: what an interrupted prune leaves.
    (ckpt.root / "6" / MARKER).unlink()
    (ckpt.root / "6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    point = ckpt.resume_point()
    assert (point["step"], point["world_size"], point["zero_stage"]) == (8, 2, 2)
    assert (ckpt.root / "8" / MARKER).is_file() and ckpt.verify(8)["step"] == 8
    assert not (ckpt.root / "6").exists()


def test_unsafe_pickle_never_runs_on_resume_export_or_in_deepspeed(reference, tmp_path, capsys):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from trainer.checkpoint import weights_only_loads
    from trainer.export import main as export_main

    ref_dir, _ = reference
    ran = tmp_path / "payload_ran"
    ckpt = _copy_steps(ref_dir, tmp_path / "run", (8,), latest=8)
    _plant_payload(ckpt.root / "8", ran)
    with pytest.raises(CheckpointError, match="does not load as tensors and plain data"):
        ckpt.load(FakeEngine(zero_stage=2))
    capsys.readouterr()
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out")]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mp_rank_00_model_states.pt" in err
    # DeepSpeed's own loader asks for weights_only=False; inside weights_only_loads it is refused.
    with weights_only_loads(), pytest.raises(Exception):
        TorchCheckpointEngine().load(str(ckpt.root / "8" / "mp_rank_00_model_states.pt"))
    assert not ran.exists() and not (tmp_path / "out").exists()


def test_deepspeed_resumes_from_previous_checkpoint_when_newest_is_truncated(reference, tmp_path):
    from tests.ckpt_worker import launch, read_log

    ref_dir, ref = reference
    ckpt = _copy_steps(ref_dir, tmp_path, (6, 8), latest=8)
    _truncate(ckpt.root / "8" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert launch(tmp_path, 2, "--tag", "fb", "--steps", "8") == [0, 0]
    _assert_same_steps(read_log(tmp_path, "fb"), ref, range(7, 9))
    assert ckpt.latest_step() == 8 and ckpt.verify(8)["step"] == 8
