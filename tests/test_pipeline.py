"""Pipeline parallelism (trainer/pipeline.py) on CPU with gloo.

Oracles: the unsplit VideoLLM trained with plain torch AdamW in this process (same weights, same
micro-batches), a brute-force search over stage boundaries, and the VideoLLM's own forward for the
layer sequence run in one process. Three launches: 2 stages (killed after step 3), its resume, and
2 stages x 2 data-parallel replicas.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pipeline_worker import EPS, LR, batch_seed, make_batch, model_config
from trainer.config import ConfigError
from trainer.dist import free_port

WORKER = Path(__file__).with_name("pipeline_worker.py")
STEPS, MICRO_BATCHES = 4, 2


def launch(nproc: int, out: Path, llm, *args: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "--", str(WORKER), str(out), str(llm),
           "--micro-batches", str(MICRO_BATCHES), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def reference(llm, *, dp: int, steps: int):
    """Plain torch: per step, the mean loss over dp x micro-batches, one AdamW step.
    Returns (losses by step, parameters after step 1, the trained model)."""
    from model.video_llm import VideoLLM

    torch.manual_seed(0)
    model = VideoLLM.build(model_config(str(llm)))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, weight_decay=0.0)
    losses, after_first = {}, None
    for step in range(steps):
        opt.zero_grad()
        total = 0.0
        for replica, micro in itertools.product(range(dp), range(MICRO_BATCHES)):
            loss = model(**make_batch(model.tokenizer, batch_seed(step, replica, micro))).loss
            (loss / (dp * MICRO_BATCHES)).backward()
            total += loss.item() / (dp * MICRO_BATCHES)
        opt.step()
        losses[step + 1] = total
        if step == 0:
            after_first = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, after_first, model


def assert_params_match(out: Path, expected: dict[str, torch.Tensor], ranks: list[int]) -> None:
    got: dict[str, torch.Tensor] = {}
    for rank in ranks:
        got.update(torch.load(out / f"params_{rank}.pt"))
    assert set(got) == set(expected)  # every parameter lives on some stage
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=2e-5, msg=name)


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


# ------------------------------------------------------------------------------- one process
def test_layout_errors():
    from trainer.pipeline import check_layout

    check_layout(stages=2, world_size=4, zero_stage=1, decoder_layers=2)
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        check_layout(stages=2, world_size=3, zero_stage=1, decoder_layers=2)
    with pytest.raises(ConfigError, match="only 2 decoder layers"):
        check_layout(stages=5, world_size=5, zero_stage=0, decoder_layers=2)
    with pytest.raises(ConfigError, match="zero_stage: 2 cannot be combined"):
        check_layout(stages=2, world_size=2, zero_stage=2, decoder_layers=2)
    with pytest.raises(ConfigError, match="zero_stage: 3"):
        check_layout(stages=2, world_size=2, zero_stage=3, decoder_layers=8)


@pytest.mark.parametrize("costs,stages", [([7, 5, 3, 9, 1, 4, 6, 2], 3), ([100, 1, 1, 1, 1, 1, 50], 2),
                                          ([1, 1, 5, 5, 5, 5, 1, 1], 6), ([3, 3, 2, 8, 2, 3], 4)])
def test_partition_is_the_best_contiguous_split(costs, stages):
    from trainer.pipeline import partition

    parts = partition(costs, stages)
    assert parts[0] == 0 and parts[-1] == len(costs) and len(parts) == stages + 1
    assert parts[1] >= 2 and parts[-2] <= len(costs) - 2  # front and head layer pairs stay whole
    assert all(a < b for a, b in zip(parts, parts[1:]))
    # Brute force over every boundary set that keeps the pairs whole.
    best = min(max(sum(costs[a:b]) for a, b in zip((0, *cut), (*cut, len(costs))))
               for cut in itertools.combinations(range(2, len(costs) - 1), stages - 1))
    assert max(sum(costs[a:b]) for a, b in zip(parts, parts[1:])) == best


def test_layers_in_sequence_equal_the_model(tiny_assets):
    """The pipeline layers chained in one process give VideoLLM.forward's loss and gradients;
    the bucket padding is invisible to the loss."""
    from model.video_llm import VideoLLM
    from trainer.pipeline import build_layers, causal_lm_loss

    torch.manual_seed(0)
    model = VideoLLM.build(model_config(str(tiny_assets["llm"])))
    batch = make_batch(model.tokenizer, 7)
    expected = model(**batch)
    ref_grads = torch.autograd.grad(expected.loss, list(model.parameters()))
    layers = [layer if isinstance(layer, torch.nn.Module) else layer.build()
              for layer in build_layers(model, bucket=16)]
    x = (batch["features"], batch["frame_mask"].long(), batch["input_ids"],
         batch["attention_mask"], batch["labels"])
    for layer in layers:
        x = layer(x)
    loss = causal_lm_loss(x)
    assert x[0].shape[1] % 16 == 0 and x[0].shape[1] >= expected.logits.shape[1]
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x[0][:, : expected.logits.shape[1]], expected.logits, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- launches
@pytest.fixture(scope="module")
def ref2(tiny_assets):
    return reference(tiny_assets["llm"], dp=1, steps=STEPS)


@pytest.mark.slow
def test_two_stages_match_plain_torch_then_resume_after_sigkill_and_export(tiny_assets, ref2, tmp_path):
    from model.video_llm import VideoLLM
    from trainer.pipeline import pipeline_state_dict

    ref_losses, ref_first, ref_model = ref2
    out = tmp_path / "pp2"
    # Checkpoint at step 2, SIGKILL of every rank after step 3.
    proc = launch(2, out, tiny_assets["llm"], "--steps", str(STEPS), "--save-at", "2", "--kill-at", "3")
    assert proc.returncode != 0
    losses = {int(k): v for k, v in json.loads((out / "losses.json").read_text()).items()}
    assert sorted(losses) == [1, 2, 3]
    for step, loss in losses.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5), step
    assert_params_match(out, ref_first, ranks=[0, 1])

    # The resumed run continues from step 2 with the losses of the uninterrupted sequence.
    (out / "losses.json").unlink()
    check(launch(2, out, tiny_assets["llm"], "--steps", str(STEPS), "--resume"))
    resumed = {int(k): v for k, v in json.loads((out / "losses.json").read_text()).items()}
    assert sorted(resumed) == [3, 4]
    assert resumed[3] == losses[3]  # bit-identical replay of the step the kill interrupted
    assert resumed[4] == pytest.approx(ref_losses[4], rel=1e-5)

    # Export the step-4 checkpoint to the save_pretrained layout; it loads without DeepSpeed and
    # gives the pipeline's logits (and the reference model's).
    model = VideoLLM.build(model_config(str(tiny_assets["llm"])))
    model.load_state_dict(pipeline_state_dict(out / "run" / "checkpoints" / "4", model), strict=True)
    model.save_pretrained(tmp_path / "export")
    loaded = VideoLLM.from_pretrained(tmp_path / "export")
    batch = make_batch(loaded.tokenizer, 0)
    with torch.no_grad():
        logits = loaded(**batch).logits
        ref_logits = ref_model(**batch).logits
    pipe_logits = torch.load(out / "pipeline_logits.pt")
    torch.testing.assert_close(pipe_logits[:, : logits.shape[1]], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_two_stages_by_two_replicas_match_plain_torch(tiny_assets, tmp_path):
    ref_losses, ref_first, _ = reference(tiny_assets["llm"], dp=2, steps=3)
    out = tmp_path / "pp2x2"
    check(launch(4, out, tiny_assets["llm"], "--steps", "3", "--checkpointing"))
    losses = {int(k): v for k, v in json.loads((out / "losses.json").read_text()).items()}
    for step, loss in losses.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5), step
    # Ranks 0 and 2 are stage 0 and stage 1 of replica 0 (DeepSpeed's pipe-major topology).
    assert_params_match(out, ref_first, ranks=[0, 2])


# ------------------------------------------------------------------------------- mambamia train
TINY_STAGE1 = str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage1.yaml")
TRAIN_OVERRIDES = ["parallel.pipeline_stages=2", "parallel.zero_stage=1",
                   "trainable=[compressor,projector,llm]", "optimizer.group_lr={}",
                   "validation.sources=[]", "schedule.total_steps=4", "checkpoint.every_steps=2",
                   "checkpoint.keep_last=3", "logging.tensorboard=false"]


def _train(argv: list[str]) -> int:
    """A forked rank of `mambamia train` on the tiny stage-1 config in run folder argv[0]."""
    import trainer.train as train

    return train.main([TINY_STAGE1, f"run_dir={argv[0]}", *argv[1:]])


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_mambamia_train_pipeline_resumes_after_sigkill_and_exports(tiny_assets, tmp_path):
    """The trainer's own loop on a 2-stage pipeline: rank 0 SIGKILLed inside the save of step 4,
    the resumed run replays steps 3-4 with the same losses, and `mambamia export` writes a folder
    that `VideoLLM.from_pretrained` loads with the checkpoint's weights."""
    import signal

    from model.video_llm import VideoLLM
    from tests.ckpt_worker import launch as fork_launch
    from tests.test_train import make_tiny_root
    from trainer.checkpoint import CRASH_IN_SAVE_ENV, Checkpointer
    from trainer.export import main as export_main

    root = make_tiny_root(tmp_path / "tiny", Path(tiny_assets["llm"]))
    run, env = root / "runs" / "pp", {"MAMBAMIA_TINY": str(root)}
    codes = fork_launch(run, 2, *TRAIN_OVERRIDES, target=_train, env={**env, CRASH_IN_SAVE_ENV: "4"})
    assert codes[0] == -signal.SIGKILL
    assert Checkpointer(run).latest_step() == 2
    before = _losses(run)
    assert sorted(before) == [1, 2, 3, 4]
    assert fork_launch(run, 2, *TRAIN_OVERRIDES, target=_train, env=env) == [0, 0]
    after = _losses(run)
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], rel=1e-6, abs=0), step
    assert Checkpointer(run).latest_step() == 4

    assert export_main([str(run), str(tmp_path / "export")]) == 0
    loaded = VideoLLM.from_pretrained(tmp_path / "export")
    saved = torch.load(run / "checkpoints" / "4" / "layer_02-model_states.pt", weights_only=True)
    torch.testing.assert_close(loaded.llm.model.layers[0].mlp.up_proj.weight,
                               saved["layer.mlp.up_proj.weight"], rtol=0, atol=0)
