"""`mambamia train` interrupted every way a cluster interrupts it, then resumed; and the export.

The tiny stage-1 config (ZeRO-2, fp32, 2 gloo ranks forked by tests/ckpt_worker.launch) runs once
uninterrupted: that run is the oracle. A second run folder goes through: SIGKILL of rank 0 inside
the save of step 4 (steps 3-4 are lost, `latest` stays at 2) -> resume, SIGUSR1 to rank 0 only after
step 3 (both ranks checkpoint and exit 85) -> resume to the end. Its losses, read back from
metrics.jsonl, must equal the oracle's step for step. A copy of the oracle's step-4 checkpoint
resumed by ONE process continues at step 5. The oracle's final checkpoint, exported and loaded with
`VideoLLM.from_pretrained`, must give the logits the trained model gave in the training process.
That export then starts a 2-rank ZeRO-3 tiny stage 2 (LLM trainable): its checkpoint must hold
every rank's partition files, and its export must give that run's trained logits.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.ckpt_worker import launch
from trainer.checkpoint import CRASH_IN_SAVE_ENV, Checkpointer

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(REPO_ROOT / "configs" / "tiny" / "stage1.yaml")
STEPS = 6
COMMON = [f"schedule.total_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
          "validation.every_steps=0", "logging.tensorboard=false", "parallel.zero_stage=2"]
SIGNAL_ENV = "TEST_SIGNAL_AFTER_STEP"
LOGITS_ENV = "TEST_DUMP_LOGITS"
CONFIG_ENV = "TEST_CONFIG"
FROZEN_ENV = "TEST_DUMP_FROZEN"
STAGE2 = str(REPO_ROOT / "configs" / "tiny" / "stage2.yaml")
STAGE2_ZERO3 = ["schedule.total_steps=2", "checkpoint.every_steps=2", "validation.every_steps=0",
                "logging.tensorboard=false", "parallel.zero_stage=3"]


def _fixed_batch(tokenizer, dim: int = 32):
    from trainer.tiny import VIDEO_TOKEN

    g = torch.Generator().manual_seed(5)
    ids = tokenizer(f"{VIDEO_TOKEN}\nWhat colour is the shape?", return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "features": torch.randn(1, 8, 16, dim, generator=g),
            "frame_mask": torch.ones(1, 8, dtype=torch.bool)}


def _train(argv: list[str]) -> int:
    """A forked rank: `mambamia train` on the tiny config with RUN_DIR + overrides, instrumented."""
    import torch.distributed as dist

    import trainer.train as train

    run_dir, overrides = argv[0], argv[1:]
    captured = {}
    build_engine, train_step = train.build_engine, train.train_step
    signal_after = int(os.environ.get(SIGNAL_ENV, "0"))
    start = Checkpointer(run_dir).latest_step() or 0
    calls = {"n": start}

    def capture_engine(model, cfg, **kw):
        captured["engine"], opt, sched = build_engine(model, cfg, **kw)
        return captured["engine"], opt, sched

    def signalling_step(*args, **kwargs):
        result = train_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == signal_after and dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    train.build_engine, train.train_step = capture_engine, signalling_step
    rc = train.main([os.environ.get(CONFIG_ENV, CONFIG), f"run_dir={run_dir}", *overrides])
    if os.environ.get(LOGITS_ENV):
        # Every rank runs the forward: under ZeRO-3 it gathers parameters from all of them.
        module = captured["engine"].module
        module.eval()
        batch = _fixed_batch(module.tokenizer)
        with torch.no_grad():
            logits = module(**batch).logits
        if dist.get_rank() == 0:
            torch.save({"batch": batch, "logits": logits}, os.environ[LOGITS_ENV])
    if os.environ.get(FROZEN_ENV):  # the frozen weights as the trained engine holds them
        import deepspeed

        frozen = [(n, p) for n, p in captured["engine"].module.named_parameters() if not p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in frozen]):  # no-op below ZeRO-3
            weights = {n: p.detach().clone() for n, p in frozen}
        if dist.get_rank() == 0:
            torch.save(weights, os.environ[FROZEN_ENV])
    return rc


def _losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl; a step logged twice (redone after a kill) keeps the last."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def tiny_root(tiny_assets, tmp_path_factory):
    from tests.test_train import make_tiny_root

    return make_tiny_root(tmp_path_factory.mktemp("resume") / "tiny", Path(tiny_assets["llm"]))


@pytest.fixture(scope="module")
def oracle(tiny_root):
    run = tiny_root / "runs" / "oracle"
    env = {"MAMBAMIA_TINY": str(tiny_root), LOGITS_ENV: str(tiny_root / "logits.pt")}
    assert launch(run, 2, *COMMON, target=_train, env=env) == [0, 0]
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return run, losses


@pytest.fixture(scope="module")
def oracle_export(tiny_root, oracle):
    """The oracle exported where tiny stage 2's `init_from` looks for it."""
    from trainer.export import main as export_main

    out = tiny_root / "exports" / "stage1"
    assert export_main([str(oracle[0]), str(out)]) == 0
    return out


def _logits_of(export: Path, dumped: dict) -> torch.Tensor:
    from model.video_llm import VideoLLM

    model = VideoLLM.from_pretrained(export).eval()
    with torch.no_grad():
        return model(**dumped["batch"]).logits


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["checkpoint.async=true"]], ids=["sync", "async"])
def test_kill_and_signal_then_resume_match_uninterrupted_run(tiny_root, oracle, mode):
    """With checkpoint.async the SIGKILL hits rank 0's background write of step 4, and the exit 85
    must come only after step 3 is published."""
    _, expected = oracle
    run = tiny_root / "runs" / f"interrupted_{'async' if mode else 'sync'}"
    env = {"MAMBAMIA_TINY": str(tiny_root)}
    ckpt = Checkpointer(run)
    codes = launch(run, 2, *COMMON, *mode, target=_train, env={**env, CRASH_IN_SAVE_ENV: "4"})
    assert codes[0] == -signal.SIGKILL
    assert ckpt.latest_step() == 2 and (ckpt.root / "4.partial").is_dir()
    assert launch(run, 2, *COMMON, *mode, target=_train, env={**env, SIGNAL_ENV: "3"}) == [85, 85]
    assert ckpt.latest_step() == 3 and not (ckpt.root / "4.partial").exists()
    assert launch(run, 2, *COMMON, *mode, target=_train, env=env) == [0, 0]
    assert ckpt.latest_step() == STEPS
    losses = _losses(run)
    assert sorted(losses) == sorted(expected)
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, abs=1e-6, rel=0), step
    # The client state (RNG, loader, config) holds only tensors and plain data: it loads weights-only.
    client = torch.load(ckpt.root / str(STEPS) / "mp_rank_00_model_states.pt", weights_only=True)
    assert client["step"] == STEPS and len(client["loader_states"]) == 2
    assert len(client["rng_states"]) == 2 and client["config"]["run_dir"] == str(run)


@pytest.mark.slow
def test_two_rank_checkpoint_continues_on_one_rank(tiny_root, oracle):
    oracle_run, expected = oracle
    run = tiny_root / "runs" / "one_rank"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(oracle_run / "checkpoints" / "4", run / "checkpoints" / "4")
    (run / "checkpoints" / "latest").write_text("4\n")
    assert launch(run, 1, *COMMON, target=_train, env={"MAMBAMIA_TINY": str(tiny_root)}) == [0]
    losses = _losses(run)
    assert sorted(losses) == [5, 6]
    # Same weights, optimizer state and global batch: the losses follow the 2-rank run's. Not to
    # 1e-6: one rank splits the same 4 samples into micro-batches differently, and the loss is a
    # mean per micro-batch (measured: 6e-4 relative at step 5, 3e-6 at step 6).
    for step in (5, 6):
        assert losses[step] == pytest.approx(expected[step], rel=5e-3), step
    assert Checkpointer(run).info(STEPS)["world_size"] == 1


@pytest.mark.slow
def test_export_loads_without_deepspeed_and_gives_trained_logits(tiny_root, oracle, oracle_export,
                                                                  tmp_path):
    from trainer.export import main as export_main

    oracle_run, _ = oracle
    assert sorted(p.name for p in oracle_export.iterdir()) == [
        "README.md", "compressor.safetensors", "llm", "mambamia.json", "projector.safetensors",
        "training.json"]
    from trainer.config import load_config
    from trainer.model_card import CARD, _front_matter

    card = _front_matter(oracle_export / CARD)
    assert card["mambamia"]["base_llm"] == load_config(oracle_run / "config.yaml").model.llm_path
    assert [s["steps"] for s in card["mambamia"]["stages"]] == [STEPS]
    dumped = torch.load(tiny_root / "logits.pt", weights_only=False)
    torch.testing.assert_close(_logits_of(oracle_export, dumped), dumped["logits"], atol=1e-6, rtol=0)
    assert export_main([str(oracle_run), str(tmp_path / "x"), "--step", "5"]) == 4


@pytest.mark.slow
def test_zero3_stage2_checkpoint_holds_every_rank_and_exports_trained_logits(tiny_root, oracle_export,
                                                                            tmp_path, capsys):
    from trainer.export import main as export_main

    run = tiny_root / "runs" / "stage2_zero3"
    env = {"MAMBAMIA_TINY": str(tiny_root), CONFIG_ENV: STAGE2,
           LOGITS_ENV: str(tiny_root / "logits_stage2.pt")}
    assert launch(run, 2, *STAGE2_ZERO3, target=_train, env=env) == [0, 0]
    ckpt = Checkpointer(run)
    assert ckpt.latest_step() == 2 and (ckpt.info(2)["world_size"], ckpt.info(2)["zero_stage"]) == (2, 3)
    # ZeRO-3 gives each rank a slice of every parameter: a checkpoint is complete only with all.
    held = sorted(p.name for p in (ckpt.root / "2").glob("*_states.pt"))
    assert held == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
                    for r in range(2) for kind in ("model", "optim")]
    out = tmp_path / "stage2"
    assert export_main([str(run), str(out)]) == 0
    dumped = torch.load(tiny_root / "logits_stage2.pt", weights_only=False)
    logits = _logits_of(out, dumped)
    torch.testing.assert_close(logits, dumped["logits"], atol=1e-6, rtol=0)
    # The LLM trained (it started from the stage-1 export), so the oracle's logits differ.
    stage1 = torch.load(tiny_root / "logits.pt", weights_only=False)["logits"]
    assert (logits - stage1).abs().max() > 1e-3
    # A partition missing (rank 1's model states) is refused with a message naming the file.
    (ckpt.root / "2" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    capsys.readouterr()
    assert export_main([str(run), str(tmp_path / "broken")]) == 4
    assert "zero_pp_rank_1_mp_rank_00_model_states.pt" in capsys.readouterr().err
    assert not (tmp_path / "broken").exists()


def _copy_checkpoint(oracle_run: Path, run: Path, step: int) -> Checkpointer:
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(oracle_run / "checkpoints" / str(step), run / "checkpoints" / str(step))
    (run / "checkpoints" / "latest").write_text(f"{step}\n")
    return Checkpointer(run)


def _error_lines(run: Path) -> list[str]:
    log = "".join(p.read_text() for p in run.glob("rank0.*.out"))
    assert "Traceback" not in log, log[-3000:]
    return [line for line in log.splitlines() if line.startswith("mambamia train:")]


@pytest.mark.slow
def test_unsafe_model_states_never_run_on_resume_or_export(tiny_root, oracle, tmp_path, capsys):
    """Issue 18.1: a model-states file replaced by a pickle that runs code (its size written into
    the marker, so only the weights-only load stands in the way)."""
    from tests.test_checkpoint import _plant_payload
    from trainer.export import main as export_main

    run, ran = tiny_root / "runs" / "unsafe", tmp_path / "payload_ran"
    ckpt = _copy_checkpoint(oracle[0], run, 4)
    _plant_payload(ckpt.root / "4", ran)
    capsys.readouterr()
    assert export_main([str(run), str(tmp_path / "out")]) == 4
    assert capsys.readouterr().err.count("\n") == 1
    assert launch(run, 1, *COMMON, target=_train, env={"MAMBAMIA_TINY": str(tiny_root)}) == [4]
    errors = _error_lines(run)
    assert len(errors) == 1 and "mp_rank_00_model_states.pt" in errors[0]
    assert not ran.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_resume_applies_a_new_learning_rate_and_refuses_a_new_model(tiny_root, oracle):
    """Issue 18.7: lr 0 from step 4 on leaves the trained weights exactly as checkpoint 4 holds
    them (the old code trained on at the saved rate); a changed model is refused in one line and
    config.yaml keeps saying what is in effect."""
    from trainer.config import load_config
    from trainer.export import consolidated_state_dict

    oracle_run, _ = oracle
    run = tiny_root / "runs" / "new_lr"
    _copy_checkpoint(oracle_run, run, 4)
    env = {"MAMBAMIA_TINY": str(tiny_root)}
    zero_lr = ["optimizer.lr=0", "optimizer.group_lr.projector=0"]
    assert launch(run, 1, *COMMON, *zero_lr, target=_train, env=env) == [0]
    before = consolidated_state_dict(oracle_run / "checkpoints" / "4")
    after = consolidated_state_dict(run / "checkpoints" / str(STEPS))
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr/compressor"] for r in rows if "loss" in r] == [0.0, 0.0]
    assert load_config(run / "config.yaml").optimizer.lr == 0.0

    refused = launch(run, 1, *COMMON, *zero_lr, "model.compressor.hidden_size=48",
                     "trainable=[projector]", target=_train, env=env)
    assert refused == [2]
    errors = _error_lines(run)
    assert len(errors) == 1
    assert "model.compressor.hidden_size 32 -> 48" in errors[0] and "trainable" in errors[0]
    saved = load_config(run / "config.yaml")
    assert saved.model.compressor.hidden_size == 32 and saved.optimizer.lr == 0.0
