"""Train one stage of the curriculum on DeepSpeed.

    mambamia train configs/tiny/stage1.yaml                       # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 -m trainer.cli train configs/stage2.yaml run_dir=/scratch/s2

Order of `main`: config -> process group -> model -> loader -> engine -> resume -> loop, where one
loop iteration is: accumulate gradients over `accum` micro-batches -> one optimizer step (skipped by
DeepSpeed if the gradient norm is not finite) -> metrics -> maybe validation -> maybe checkpoint ->
stop signal check. Starting in a run folder that has a checkpoint resumes it: a damaged newest
checkpoint falls back to the previous complete one (one warning line); a config that changed since
the checkpoint is compared key by key, and what a resume can follow (learning rates, schedule,
logging, ...) is applied and listed in one line, what it cannot (model shapes, `trainable`, data
order, ...) refused in one line before anything is built.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import errors, pipeline, signals
from trainer.checkpoint import Checkpointer, gather_client_state, restore_rng
from trainer.config import ConfigError, RunConfig, load_config, resume_changes, save_config, to_yaml
from trainer.dist import DistInfo, init_distributed
from trainer.engine import (apply_optimizer_config, build_engine, grad_accumulation_steps,
                            quiet_known_warnings, resolve_precision)
from trainer.metrics import MetricsLogger, memory_gb, peak_with_source, train_flops_per_token
from trainer.profiling import StepProfiler
from trainer.rng import seed_everything
from trainer.wandb_log import open_wandb


_EXIT_CODES = """
exit codes (one line on stderr names the file or key for 2-5; trainer/errors.py):
  0   finished the stage
  1   unexpected error: a bug or a failing machine (traceback printed)
  2   usage or config: bad command line, config file, override or value, or a config change a
      resume cannot follow
  3   data: a dataset folder (index.json, shards) missing or malformed, or too many bad records
  4   checkpoint: checkpoints exist but none is usable (damaged, incomplete, unsafe files)
  5   diverged: more non-finite steps than max_nonfinite_steps
  85  checkpointed on SIGUSR1/SIGTERM: requeue the job
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mambamia train", description=__doc__ + _EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="stage YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: optimizer.lr=1e-4 ...")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (includes, overrides, ${ENV} and validation "
                             "applied) as YAML and exit 0 without training; a bad value exits 2")
    # Intermixed: the flag may come before, between or after the overrides.
    return parser.parse_intermixed_args(argv)


def build_model(cfg: RunConfig):
    """A fresh VideoLLM, or one whose weights come from the previous stage's export (`init_from`).

    With `init_from` the architecture still comes from this stage's `model` section (so a stage
    can switch on recomputation or keep more frames) and the LLM is read from `init_from/llm`.
    """
    from model.video_llm import VideoLLM, pretrained_folder

    from trainer.lora import ADAPTER_DIR, apply_lora

    if cfg.init_from is None:
        return apply_lora(VideoLLM.build(cfg.model), cfg.lora)
    folder = Path(cfg.init_from)
    if not folder.is_dir() and not cfg.init_from.startswith((".", "/", "~")):  # a hub id of an export
        try:
            folder = pretrained_folder(cfg.init_from)
        except FileNotFoundError as err:
            raise ConfigError(f"init_from: {err}") from None
    for name in ("llm", "compressor.safetensors", "projector.safetensors"):
        if not (folder / name).exists():
            raise ConfigError(f"init_from: {folder / name} is missing; expected a `mambamia export` folder")
    if (folder / ADAPTER_DIR).exists():  # llm/ there is the base the adapters were trained on
        raise ConfigError(f"init_from: {folder} keeps its LoRA adapters unmerged in {ADAPTER_DIR}/; "
                          "export the run without --keep-adapters to start a stage from it")
    model = VideoLLM.build(dataclasses.replace(cfg.model, llm_path=str(folder / "llm")))
    try:
        model.load_modules(folder)
    except (ValueError, RuntimeError) as err:  # shapes or the separator disagree with `model`
        detail = " ".join(str(err).split())[:500]
        raise ConfigError(f"init_from: {folder} does not fit this stage's model section: {detail}") from None
    return apply_lora(model, cfg.lora)


def endless(loader) -> Iterator[dict]:
    """Batches across epoch boundaries; the loader advances its own epoch at the end of one."""
    while True:
        yield from loader


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The model's inputs on `device`; features in the engine's compute dtype."""
    out = {k: batch[k].to(device, non_blocking=True)
           for k in ("input_ids", "attention_mask", "labels", "frame_mask")}
    out["features"] = batch["features"].to(device, dtype=dtype, non_blocking=True)
    if "cu_seqlens" in batch:  # a packed batch (data.pack_sequences): one row, sample boundaries
        out["cu_seqlens"] = batch["cu_seqlens"].to(device, non_blocking=True)
    return out


@dataclasses.dataclass(kw_only=True)
class StepResult:
    loss: float
    """Mean over micro-batches and ranks."""
    grad_norm: float
    skipped: bool
    """DeepSpeed found the gradient norm non-finite and did not update (nor advance the lr)."""
    tokens: int
    """LLM positions over all ranks: text plus spliced visual tokens."""
    visual_tokens: int
    samples: int
    patch_tokens: int
    """Frame patches the compressor read over all ranks (its FLOPs scale with these)."""
    data_wait_s: float
    keys: list[str]
    """Sample keys of this rank's micro-batches (for the non-finite report)."""


def train_step(engine, batches: Iterator[dict], accum: int, info: DistInfo, dtype: torch.dtype) -> StepResult:
    skipped_before = engine.skipped_steps
    # [loss sum, tokens, visual tokens, samples, patches]: one all-reduce for the whole step.
    totals = torch.zeros(5, dtype=torch.float64, device=info.device)
    wait, keys = 0.0, []
    engine.train()
    for _ in range(accum):
        t0 = time.perf_counter()
        batch = next_batch(batches)
        wait += time.perf_counter() - t0
        keys += batch["keys"]
        inputs = to_device(batch, info.device, dtype)
        out = engine(**inputs)
        engine.backward(out.loss)
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        batch_size = inputs["frame_mask"].shape[0]  # samples, also when packed into one row
        spliced = out.attention_mask.sum()
        # Each sample's one <video> token is replaced by its visual tokens.
        visual = spliced - inputs["attention_mask"].sum() + batch_size
        patches = inputs["frame_mask"].sum() * inputs["features"].shape[2]
        totals += torch.stack([out.loss.detach().double(), spliced.double(), visual.double(),
                               torch.tensor(float(batch_size), dtype=torch.float64, device=info.device),
                               patches.double()])
    dist.all_reduce(totals)
    norm = engine.get_global_grad_norm()
    return StepResult(loss=totals[0].item() / (accum * info.world_size),
                      grad_norm=float(norm) if norm is not None else float("nan"),
                      skipped=engine.skipped_steps != skipped_before,
                      tokens=int(totals[1].item()), visual_tokens=int(totals[2].item()),
                      samples=int(totals[3].item()), patch_tokens=int(totals[4].item()),
                      data_wait_s=wait, keys=keys)


def validation_loss(engine, cfg: RunConfig, tokenizer, info: DistInfo, dtype: torch.dtype) -> dict[str, float]:
    """`val/loss` over the held-out samples in the answer forms the training mixture teaches,
    and `val/loss_open` / `val/loss_mc` per form (trainer/validation.py); all ranks call it."""
    from trainer.validation import mismatch_note, validation_scalars

    scalars = validation_scalars(engine, cfg, tokenizer, info.rank, info.world_size, info.device, dtype)
    note = mismatch_note(cfg, scalars)
    if note and info.is_main:
        print(f"[train] {note}", flush=True)
    return scalars


def total_steps_of(cfg: RunConfig, loader, accum: int) -> int:
    if cfg.schedule.total_steps is not None:
        return cfg.schedule.total_steps
    return max(1, math.ceil(cfg.schedule.epochs * loader.batches_per_epoch / accum))


def lr_by_group(optimizer) -> dict[str, float]:
    """`lr/<group>` per trainable module group (its decay and no-decay halves share the lr)."""
    out = {}
    for i, group in enumerate(optimizer.param_groups):
        out.setdefault(f"lr/{group.get('name', str(i)).removesuffix('.no_decay')}", group["lr"])
    return out


def bad_sample_counts(loader, info: DistInfo) -> dict[str, float]:
    """Bad records skipped so far, summed over ranks (collective)."""
    per_rank = [None] * info.world_size
    dist.all_gather_object(per_rank, loader.bad_counts)
    out: dict[str, float] = {"bad_samples/total": 0.0}
    for counts in per_rank:
        for reason, n in counts.items():
            out[f"bad_samples/{reason}"] = out.get(f"bad_samples/{reason}", 0.0) + n
            out["bad_samples/total"] += n
    return out


def save(ckpt: Checkpointer, engine, step: int, loader, cfg: RunConfig, nonfinite: int) -> None:
    state = gather_client_state(step=step, epoch=loader.epoch, loader_state=loader.state_dict(),
                                config=dataclasses.asdict(cfg), nonfinite_steps=nonfinite)
    ckpt.save(engine, step, state)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    # ConfigError is also raised after start-up (batch sizes vs world size, init_from, a resume).
    if args.print_config:
        return errors.run_reporting("mambamia train", lambda: _print_config(args))
    return errors.run_reporting("mambamia train", lambda: run(load_config(args.config, args.overrides)))


def _print_config(args: argparse.Namespace) -> int:
    print(to_yaml(load_config(args.config, args.overrides)), end="", flush=True)
    return 0


def open_loader(data_cfg, tokenizer, rank: int, world_size: int, what: str):
    """The VideoLoader of `data_cfg`; a dataset folder it cannot open is a DataError naming it."""
    from data.loader import VideoLoader
    from data.records import BadRecord

    try:
        return VideoLoader.from_config(data_cfg, tokenizer, rank=rank, world_size=world_size)
    except (OSError, ValueError, BadRecord) as err:
        raise errors.DataError(f"{what}: {errors.one_line(err)}") from None


def next_batch(batches: Iterator[dict]) -> dict:
    """The next training batch; the loader's own stop (too many bad records, unreadable shards)
    is a DataError, its message naming the source and shard. Other errors (bugs) keep their
    traceback."""
    from data.records import BadRecord

    try:
        return next(batches)
    except (OSError, BadRecord) as err:
        raise errors.DataError(f"training data: {errors.one_line(err)}") from err
    except (ValueError, RuntimeError) as err:
        if not _raised_in_data_package(err):
            raise
        raise errors.DataError(f"training data: {errors.one_line(err)}") from err


def _raised_in_data_package(err: BaseException) -> bool:
    """Whether the innermost frame of `err` is in data/ (for an error a DataLoader re-raises, the
    worker's traceback, which it keeps in the message)."""
    import data

    in_message = re.findall(r'File "([^"]+)"', str(err))
    frames = traceback.extract_tb(err.__traceback__)
    innermost = in_message[-1] if in_message else (frames[-1].filename if frames else None)
    package = Path(data.__file__).resolve().parent
    return innermost is not None and Path(innermost).resolve().is_relative_to(package)


def resume(ckpt: Checkpointer, point: dict, changes: list[str], engine, scheduler, loader,
           cfg: RunConfig, info: DistInfo) -> tuple[int, int]:
    """Load checkpoint `point` into the engine, the loader and the generators; apply an optimizer
    or schedule change. Returns (step, non-finite steps so far)."""
    client = ckpt.load_point(engine, point)
    step = client["step"]
    if any(change.startswith(("optimizer.", "schedule.")) for change in changes):
        apply_optimizer_config(scheduler, cfg)
        if info.is_main:
            rates = {k: f"{v:.3g}" for k, v in lr_by_group(scheduler.optimizer).items()}
            print(f"[train] optimizer and schedule follow the new config from step {step}: {rates}",
                  flush=True)
    states = client["loader_states"]
    try:
        loader.load_state_dict(states[info.rank] if len(states) == info.world_size else states)
    except ValueError as err:  # the datasets changed since the checkpoint (sizes, version)
        raise errors.DataError(f"resume of checkpoint {step}: {errors.one_line(err)}") from None
    restore_rng(client)
    if info.is_main:
        print(f"[train] resumed {ckpt.root.parent} at step {step} (epoch {loader.epoch})", flush=True)
    return step, client.get("nonfinite_steps", 0)


def check_resume(point: dict | None, cfg: RunConfig, info: DistInfo) -> list[str]:
    """The config changes since the checkpoint `point` (raises ConfigError for those a resume
    cannot follow); [] on a fresh run."""
    if point is None:
        return []
    if not isinstance(point.get("config"), dict):
        if info.is_main:
            print(f"[train] checkpoint {point['step']} records no config (saved by an older version): "
                  "config changes cannot be checked", flush=True)
        return []
    changes = resume_changes(point["config"], cfg)
    if changes and info.is_main:
        print(f"[train] resuming checkpoint {point['step']} with a changed config, applied: "
              f"{', '.join(changes)}", flush=True)
    return changes


def run(cfg: RunConfig) -> int:
    """Train `cfg`'s stage to its last step (resuming the run folder if it has a checkpoint)."""
    quiet_known_warnings()
    info = init_distributed()
    stages = cfg.parallel.pipeline_stages
    # Under a pipeline the data splits over replicas (world / stages), not over processes.
    replica, replicas = ((info.rank, info.world_size) if stages == 1
                         else pipeline.data_parallel_layout(info.rank, info.world_size, stages))
    accum = grad_accumulation_steps(cfg, replicas)
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    info.check_shared_folder(run_dir)  # every host must see the checkpoints the others write
    # A LoRA run's checkpoints hold what trains; the frozen base is reloaded by build_model.
    ckpt = Checkpointer(run_dir, keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save,
                        exclude_frozen=cfg.lora.enabled)
    # Decided before anything is built, so that a refused config change costs nothing and
    # config.yaml only ever records values in effect.
    point = ckpt.resume_point()
    changes = check_resume(point, cfg, info)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        print(f"[train] resolved config of stage {cfg.stage}:\n{to_yaml(cfg)}", flush=True)

    # Same seed on every rank while building, so every rank starts from identical weights.
    seed_everything(cfg.seed)
    model = build_model(cfg)
    loader = open_loader(cfg.data, model.tokenizer, replica, replicas, "data")
    if cfg.validation.sources:  # opened once here so that a missing folder stops the run now
        open_loader(dataclasses.replace(cfg.data, sources=cfg.validation.sources, samples_per_epoch=None),
                    model.tokenizer, replica, replicas, "validation.sources")
    total_steps = total_steps_of(cfg, loader, accum)
    build = build_engine if stages == 1 else pipeline.build_pipeline_engine
    engine, optimizer, scheduler = build(model, cfg, world_size=info.world_size, total_steps=total_steps,
                                         on_cuda=info.on_cuda)
    dtype = torch.bfloat16 if resolve_precision(cfg, info.on_cuda) == "bf16" else torch.float32
    seed_everything(cfg.seed + info.rank)  # independent dropout noise per rank from here on

    step, nonfinite = 0, 0
    if point is not None:
        step, nonfinite = resume(ckpt, point, changes, engine, scheduler, loader, cfg, info)
    signals.install()

    metrics = MetricsLogger(run_dir, enabled=info.is_main, start_step=step, total_steps=total_steps,
                            tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar,
                            wandb=open_wandb(cfg, run_dir, is_main=info.is_main))
    llm_cfg = model.llm.config
    numel = {name: sum(getattr(p, "ds_numel", p.numel()) for _, p in params)
             for name, params in model.module_groups().items()}
    peak, peak_source = peak_with_source(info.device, resolve_precision(cfg, info.on_cuda),
                                         cfg.logging.peak_tflops)
    metrics.write(f"[train] {peak_source}" if peak is None
                  else f"[train] MFU against {peak / 1e12:.4g} TFLOP/s per device ({peak_source})")
    profiler = StepProfiler(run_dir, cfg.profiling.steps, rank=info.rank)
    batches = endless(loader)
    if stages > 1:
        pipeline_steps = pipeline.PipelineSteps(engine, batches, info.device, dtype)
    saved_step = step if point is not None else None
    try:
        while step < total_steps:
            profiler.step_begins(step + 1)
            started = time.perf_counter()
            result = (train_step(engine, batches, accum, info, dtype) if stages == 1
                      else pipeline_steps(info))
            step += 1
            elapsed = time.perf_counter() - started
            profiler.step_ended(step)
            if result.skipped:
                nonfinite += 1
                all_keys = [None] * info.world_size
                dist.all_gather_object(all_keys, result.keys)
                message = (f"step {step}: non-finite loss {result.loss} or gradient norm "
                           f"{result.grad_norm}, update skipped ({nonfinite} so far, limit "
                           f"{cfg.max_nonfinite_steps}); sample keys {sum(all_keys, [])}")
                metrics.write(f"[train] {message}")
                if nonfinite > cfg.max_nonfinite_steps:
                    if info.is_main:
                        print(f"mambamia train: stopping: {message}", file=sys.stderr, flush=True)
                    ckpt.wait()
                    return errors.DIVERGED
            if step % cfg.logging.every_steps == 0 or step == total_steps:
                scalars = {"loss": result.loss, "grad_norm": result.grad_norm,
                           **lr_by_group(optimizer),
                           "throughput/tokens_per_s": result.tokens / elapsed,
                           "throughput/tokens_per_s_per_device": result.tokens / elapsed / info.world_size,
                           "throughput/samples_per_s": result.samples / elapsed,
                           "visual_tokens_per_sample": result.visual_tokens / result.samples,
                           "time/step_s": elapsed, "time/data_wait_frac": result.data_wait_s / elapsed,
                           "nonfinite_steps": float(nonfinite), **bad_sample_counts(loader, info),
                           **memory_gb(info.device)}
                if peak is not None:
                    # The LLM (and the small projector) run over the spliced sequence, the
                    # compressor over every frame patch; its short-range mixing has no quadratic term.
                    seq = result.tokens / result.samples
                    flops = (train_flops_per_token(numel["llm"] + numel["projector"], llm_cfg.num_hidden_layers,
                                                   llm_cfg.hidden_size, seq) * result.tokens
                             + train_flops_per_token(numel["compressor"], 0, 0, 0) * result.patch_tokens)
                    scalars["mfu"] = flops / elapsed / (peak * info.world_size)
                metrics.log(step, scalars)
            metrics.progress(1, result.loss, result.samples / elapsed)

            every = cfg.validation.every_steps
            if cfg.validation.sources and (step == total_steps or (every and step % every == 0)):
                val = validation_loss(engine, cfg, model.tokenizer, info, dtype)
                if val:
                    metrics.log(step, val)
                    metrics.write(f"[train] step {step}: validation " + ", ".join(
                        f"{k.removeprefix('val/')} {v:.4f}" for k, v in val.items()))
            every = cfg.checkpoint.every_steps
            if step == total_steps or (every and step % every == 0):
                save(ckpt, engine, step, loader, cfg, nonfinite)
                saved_step = step
            if signals.should_stop():
                if saved_step != step:
                    save(ckpt, engine, step, loader, cfg, nonfinite)
                ckpt.wait()  # with checkpoint.async: exit 85 only once the save is durable
                metrics.write(f"[train] stop signal: checkpointed step {step}, exiting for requeue")
                return signals.REQUEUE_EXIT_CODE
        ckpt.wait()
        metrics.write(f"[train] stage {cfg.stage} finished at step {step}")
        return 0
    finally:
        profiler.close()
        metrics.close()


if __name__ == "__main__":
    sys.exit(main())
