"""The training loop under DeepSpeed ZeRO-1, -2 and -3 on 2 CPU processes (gloo).

One torchrun launch per ZeRO stage runs the tiny stage-1 config (compressor + projector train, LLM
frozen) and, in the ZeRO-1 launch, a second run whose loss turns NaN. The ranks write what they
observed to a JSON file; the pytest side asserts on it, on metrics.jsonl and on the TensorBoard
events read back with EventAccumulator.

Run as a torchrun worker: `python -m torch.distributed.run --nproc_per_node 2 -m tests.test_train SPEC`.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_STAGE1 = str(REPO_ROOT / "configs" / "tiny" / "stage1.yaml")
FRAMES, PATCHES, DIM = 8, 16, 32  # trainer.tiny's SigLIP: 32x32 frames, 8x8 patches, width 32
COLOURS = ["red", "green", "blue", "yellow"]
STEPS = 10


def make_tiny_root(root: Path, llm_dir: Path, *, train: int = 16, val: int = 4) -> Path:
    """MAMBAMIA_TINY layout: llm/ and shards/{train,val}/ with a caption learnable from features."""
    from data.shards import ShardWriter, write_index

    root.mkdir(parents=True, exist_ok=True)
    (root / "llm").symlink_to(llm_dir, target_is_directory=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        out = root / "shards" / split
        with ShardWriter(out, max_samples=8) as writer:
            for i in range(count):
                colour = i % len(COLOURS)
                feats = rng.normal(0, 0.5, (FRAMES, PATCHES, DIM)).astype(np.float32)
                feats[:, :, colour] += 2.0  # the colour is visible in the features
                key = f"{split}_{i:03d}"
                meta = {"key": key, "video_id": key, "source": "synthetic",
                        "timestamps": [float(t) for t in range(FRAMES)], "fps": 1.0,
                        "duration": float(FRAMES), "encoder": "tiny-siglip", "layer": -2,
                        "conversations": [[
                            {"from": "human", "value": "<video>\nWhat colour is the shape?"},
                            {"from": "gpt", "value": f"The shape is {COLOURS[colour]}."}]],
                        "qa": []}
                writer.write(key, feats.astype(np.float16), meta)
        write_index(out)
    return root


# ------------------------------------------------------------------------------------------------
# Worker side (inside torchrun)


def _worker(spec_path: str) -> int:
    import torch
    import torch.distributed as dist

    import trainer.train as train
    from model.video_llm import VideoLLM

    spec = json.loads(Path(spec_path).read_text())
    captured: dict = {}
    build_model, build_engine = train.build_model, train.build_engine

    def capture_model(cfg):
        model = build_model(cfg)
        captured["initial"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model

    def capture_engine(model, cfg, **kw):
        captured["engine"], opt, sched = build_engine(model, cfg, **kw)
        return captured["engine"], opt, sched

    train.build_model, train.build_engine = capture_model, capture_engine
    report: dict = {}
    # Several runs in one process: a torchrun launch costs more than a tiny run.
    for run in spec["runs"]:
        rc = train.main([TINY_STAGE1, *run["overrides"]])
        report[run["name"]] = {"rc": rc, **_inspect(captured, torch, dist)}

    nan = spec["nan_run"]
    forward, calls = VideoLLM.forward, {"n": 0}

    def nan_after(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and calls["n"] > nan["after_calls"]:
            out = out._replace(loss=out.loss * float("nan"))
        return out

    VideoLLM.forward = nan_after
    report["nan"] = {"rc": train.main([TINY_STAGE1, *nan["overrides"]])}
    params = list(captured["engine"].module.parameters())
    report["nan"]["params_finite"] = _gathered(params, lambda ps: all(bool(torch.isfinite(p).all()) for p in ps))
    if dist.get_rank() == 0:
        Path(spec["report"]).write_text(json.dumps(report))
    dist.barrier()
    return 0


def _gathered(params, fn):
    """fn over full parameter values (ZeRO-3 keeps only a shard of each on every rank)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return fn(params)


def _inspect(captured, torch, dist) -> dict:
    engine, initial = captured["engine"], captured["initial"]
    names = dict(engine.module.named_parameters())
    groups = {g: [n for n, _ in params] for g, params in engine.module.module_groups().items()}

    def compare(ps):
        same = {}
        for g, ns in groups.items():
            same[g] = [bool(torch.equal(names[n].detach().cpu(), initial[n].cpu())) for n in ns]
        return same

    same = _gathered(list(names.values()), compare)
    # Optimizer state: AdamW's exp_avg over this rank's partitions, summed over ranks.
    base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    state = torch.tensor([float(sum(s["exp_avg"].numel() for s in base.state.values() if "exp_avg" in s))])
    dist.all_reduce(state)

    def numel(group):
        return sum(getattr(names[n], "ds_numel", names[n].numel()) for n in groups[group])

    return {"llm_all_identical": all(same["llm"]),
            "compressor_any_changed": not all(same["compressor"]),
            "projector_any_changed": not all(same["projector"]),
            "trainable_requires_grad": all(names[n].requires_grad for g in ("compressor", "projector") for n in groups[g]),
            "llm_requires_grad": any(names[n].requires_grad for n in groups["llm"]),
            "optimizer_state_numel": state.item(),
            "numel": {g: numel(g) for g in groups}}


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))


# ------------------------------------------------------------------------------------------------
# pytest side

ZERO_STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def launched(tiny_assets, tmp_path_factory):
    """One 2-process launch: the tiny stage-1 run under ZeRO-1, -2 and -3, then the NaN run."""
    from tests.utils.dist import run_torchrun

    tmp = tmp_path_factory.mktemp("train")
    root = make_tiny_root(tmp / "tiny", Path(tiny_assets["llm"]))
    common = [f"schedule.total_steps={STEPS}", "checkpoint.every_steps=0",
              "optimizer.lr=1e-2", "optimizer.group_lr.projector=5e-3"]
    spec = {"report": str(tmp / "report.json"),
            "runs": [{"name": f"zero{z}", "overrides": [f"run_dir={tmp / f'zero{z}'}",
                                                        f"parallel.zero_stage={z}", *common]}
                     for z in ZERO_STAGES],
            # 2 ranks x batch 2 = the global batch of 4: one forward per rank per step, so the
            # loss is NaN from step 3 on; a limit of 1 skips step 3 and stops at step 4.
            "nan_run": {"after_calls": 2, "overrides": [
                f"run_dir={tmp / 'nan'}", "parallel.zero_stage=2", "schedule.total_steps=8",
                "checkpoint.every_steps=0", "max_nonfinite_steps=1"]}}
    (tmp / "spec.json").write_text(json.dumps(spec))
    result = run_torchrun("tests.test_train", [str(tmp / "spec.json")], nproc=2,
                          env={"MAMBAMIA_TINY": str(root)}, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return {"report": json.loads((tmp / "report.json").read_text()), "stderr": result.stderr,
            "stdout": result.stdout, "tmp": tmp}


def _expected_lr(step: int, base: float, total: int, warmup_ratio: float) -> float:
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("zero", ZERO_STAGES)
def test_stage1_trains_compressor_and_projector_only(launched, zero):
    report, run_dir = launched["report"][f"zero{zero}"], launched["tmp"] / f"zero{zero}"
    assert report["rc"] == 0
    # Stage 1: the LLM is bit-identical after training, compressor and projector moved.
    assert report["llm_all_identical"] and not report["llm_requires_grad"]
    assert report["compressor_any_changed"] and report["projector_any_changed"]
    assert report["trainable_requires_grad"]
    numel = report["numel"]
    trainable = numel["compressor"] + numel["projector"]
    # Frozen parameters have no optimizer state: exp_avg covers the trainable ones (plus ZeRO's
    # alignment padding), nowhere near the LLM's size.
    assert trainable <= report["optimizer_state_numel"] < trainable + numel["llm"] // 2
    losses = [r["loss"] for r in _rows(run_dir) if "loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    # The frozen random LLM caps what stage 1 can learn (the visual prefix is all that moves):
    # from ln(vocab) ~ 5.95 at init the loss settles near 5.8 within a few steps.
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == str(STEPS)


@pytest.mark.slow
def test_tensorboard_tags_hold_sensible_values(launched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = launched["tmp"] / "zero2"
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"loss", "grad_norm", "lr/compressor", "lr/projector", "throughput/tokens_per_s",
            "throughput/samples_per_s", "visual_tokens_per_sample", "time/step_s",
            "time/data_wait_frac", "bad_samples/total", "memory/max_rss_gb", "nonfinite_steps", "val/loss"}
    assert want <= tags, want - tags
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in want}
    assert len(scalars["lr/compressor"]) == STEPS
    assert sorted(scalars["loss"]) == list(range(1, STEPS + 1))
    # TensorBoard holds the same numbers as metrics.jsonl (float32).
    for r in _rows(run_dir):
        if "loss" in r:
            assert scalars["loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
    # Learning rate after `step` optimizer steps: warm-up then cosine, closed form.
    # Each module group keeps its own base lr through DeepSpeed's optimizer wrapper.
    for tag, base in (("lr/compressor", 1e-2), ("lr/projector", 5e-3)):
        for step, lr in scalars[tag].items():
            assert lr == pytest.approx(_expected_lr(step, base, STEPS, 0.125), rel=1e-5, abs=1e-9)
    # 8 frames, the TAA keeps 4, each 16 patches / k=4 -> 4 tokens + 1 separator.
    assert set(scalars["visual_tokens_per_sample"].values()) == {4 * (PATCHES // 4 + 1)}
    for step, rate in scalars["throughput/samples_per_s"].items():
        # a global batch of 4 samples per step, each with 20 visual tokens plus its text
        assert rate * scalars["time/step_s"][step] == pytest.approx(4, rel=1e-4)
        assert scalars["throughput/tokens_per_s"][step] > rate * 20
    assert all(0 <= v <= 1 for v in scalars["time/data_wait_frac"].values())
    assert all(v > 0 and math.isfinite(v) for v in scalars["grad_norm"].values())
    assert set(scalars["bad_samples/total"].values()) == {0} and set(scalars["nonfinite_steps"].values()) == {0}
    assert sorted(scalars["val/loss"]) == [4, 8, 10]
    assert all(0 < v < 20 for v in scalars["val/loss"].values())
    assert all(0 < v < 100 for v in scalars["memory/max_rss_gb"].values())


@pytest.mark.slow
def test_logs_hold_no_known_harmless_warnings(launched):
    """Issue 17.5: torch's deprecation of the collectives DeepSpeed calls (filtered at its source)
    and ZeRO-3's warning about model outputs it cannot see into (ours: now NamedTuples)."""
    output = launched["stdout"] + launched["stderr"]
    assert "[WARNING] [utils.py" not in output and "unknown inputs or outputs type" not in output
    assert "c10d_logger" not in output  # where torch's deprecation warnings point


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop_the_run(launched):
    # NaN loss from step 3 on: step 3 skipped and counted, step 4 passes the limit of 1 -> exit 5
    # naming the step and the batch's keys, with parameters intact and nothing saved.
    report, run_dir = launched["report"]["nan"], launched["tmp"] / "nan"
    assert report["rc"] == 5 and report["params_finite"]  # 5: diverged (trainer/errors.py)
    assert "step 4: non-finite loss nan" in launched["stderr"]
    assert "sample keys ['train_" in launched["stderr"]
    assert [r["nonfinite_steps"] for r in _rows(run_dir) if "loss" in r] == [0, 0, 1]
    checkpoints = run_dir / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.glob("[0-9]*"))


def test_init_from_loads_the_previous_stage_export_into_this_stage_model(tiny_assets, tmp_path, monkeypatch):
    """Stage N+1 = stage N's export weights inside stage N+1's architecture flags."""
    import torch

    from model.video_llm import VideoLLM
    from trainer.config import load_config
    from trainer.train import build_model

    monkeypatch.setenv("MAMBAMIA_TINY", str(tmp_path))
    (tmp_path / "llm").symlink_to(Path(tiny_assets["llm"]), target_is_directory=True)
    stage1 = load_config(TINY_STAGE1)
    torch.manual_seed(1)
    exported = VideoLLM.build(stage1.model)
    exported.save_pretrained(tmp_path / "exports" / "stage1")
    stage2 = load_config(REPO_ROOT / "configs" / "tiny" / "stage2.yaml")
    assert stage2.init_from == str(tmp_path / "exports" / "stage1")
    torch.manual_seed(2)  # a different fresh init, so equality can only come from the export
    model = build_model(stage2)
    want, got = exported.state_dict(), model.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)
    # Stage 2's own recomputation flag, not the export's (transformers 5 renamed the attribute).
    assert getattr(model.llm, "is_activation_checkpointing", None) or model.llm.is_gradient_checkpointing

    from trainer.config import ConfigError

    wider = load_config(REPO_ROOT / "configs" / "tiny" / "stage2.yaml", ["model.compressor.hidden_size=48"])
    with pytest.raises(ConfigError, match=r"^init_from: .*stage1 does not fit this stage's model section: ") as err:
        build_model(wider)
    assert "\n" not in str(err.value)


def test_config_errors_exit_2_with_one_line(capsys, monkeypatch):
    from trainer.train import main

    monkeypatch.setenv("MAMBAMIA_TINY", "/nonexistent")
    assert main([TINY_STAGE1, "parallel.zero_stage=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mambamia train: parallel.zero_stage: expected one of [1, 2, 3], got 5"
    # Nonsense values are refused at load, before anything runs (issue 18.9).
    assert main([TINY_STAGE1, "optimizer.lr=.nan"]) == 2
    assert capsys.readouterr().err.strip() == "mambamia train: optimizer.lr: expected a finite number >= 0, got nan"


def test_help_documents_exit_codes(capsys):
    from trainer.export import main as export_main
    from trainer.train import main

    for command in (main, export_main):
        with pytest.raises(SystemExit) as exited:
            command(["--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert "exit codes" in text and "4 " in text and "unexpected error" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(f"  {code} " in text for code in (0, 1, 2, 3, 4, 5, 85))


def _train_in_run_dir(argv: list[str]) -> int:
    """A forked rank (tests.ckpt_worker.launch): `mambamia train` of the tiny stage 1 in RUN_DIR."""
    from trainer.train import main

    return main([TINY_STAGE1, f"run_dir={argv[0]}", *argv[1:]])


def test_missing_index_is_a_one_line_data_error(tiny_assets, tmp_path):
    """Issue 18.10: exit 3 and one line naming the file, not the loader's traceback."""
    from tests.ckpt_worker import launch

    root = make_tiny_root(tmp_path / "tiny", Path(tiny_assets["llm"]), train=4, val=2)
    (root / "shards" / "train" / "index.json").unlink()
    run = tmp_path / "run"
    assert launch(run, 1, "logging.tensorboard=false", target=_train_in_run_dir,
                  env={"MAMBAMIA_TINY": str(root)}) == [3]
    log = next(run.glob("rank0.*.out")).read_text()
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if line.startswith("mambamia train:")]
    assert len(errors) == 1, log[-2000:]
    assert errors[0].startswith(f"mambamia train: data: {root}/shards/train/index.json: ")


def test_loader_stops_are_data_errors_and_bugs_keep_their_traceback():
    from data.records import BadRecord
    from trainer.errors import DataError
    from trainer.train import next_batch

    def failing(err):
        raise err
        yield

    with pytest.raises(DataError, match="^training data: "):
        next_batch(failing(BadRecord("npy", "truncated header", shard="s.tar", key="k")))
    with pytest.raises(DataError, match="^training data: "):
        next_batch(failing(FileNotFoundError("shards/a.tar: gone")))
    # A RuntimeError raised outside data/ (here: in this test) is a bug, not bad data.
    with pytest.raises(RuntimeError, match="^a bug$"):
        next_batch(failing(RuntimeError("a bug")))
