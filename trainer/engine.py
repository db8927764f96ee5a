"""Everything between a built VideoLLM and a DeepSpeed engine: freezing, optimizer groups, the
learning-rate schedule and the DeepSpeed config derived from the run config.

Order matters and is fixed here: freeze first (so frozen parameters never reach the optimizer and
get no optimizer state under any ZeRO stage), then build the client AdamW over the trainable
groups only, then hand model + optimizer + scheduler to `deepspeed.initialize`, which partitions
whatever ZeRO stage the config asks for.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from trainer.config import ConfigError, RunConfig

# DeepSpeed prints its own step log every `steps_per_print` steps; our metrics replace it.
_NEVER = 1 << 62


def resolve_precision(cfg: RunConfig, on_cuda: bool) -> str:
    """bf16 on CUDA and fp32 on CPU unless the config pins one (CPU bf16 matmuls are slow)."""
    if cfg.parallel.precision != "auto":
        return cfg.parallel.precision
    return "bf16" if on_cuda else "fp32"


def grad_accumulation_steps(cfg: RunConfig, world_size: int) -> int:
    """global batch = micro-batch x accumulation x data-parallel processes, solved for accumulation."""
    micro, global_batch = cfg.data.batch_size, cfg.parallel.global_batch_size
    if global_batch % (micro * world_size):
        raise ConfigError(
            f"parallel.global_batch_size: {global_batch} is not a multiple of "
            f"data.batch_size x data-parallel processes = {micro} x {world_size}")
    return global_batch // (micro * world_size)


def build_ds_config(cfg: RunConfig, world_size: int, *, on_cuda: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict for this run; pure, so it is unit-tested without launching."""
    par, micro = cfg.parallel, cfg.data.batch_size
    accum = grad_accumulation_steps(cfg, world_size)
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if par.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    if par.zero_stage == 3:
        # Our export consolidates from the checkpoint files, so no 16-bit copy is gathered at save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds = {
        "train_batch_size": par.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": resolve_precision(cfg, on_cuda) == "bf16"},
        "fp16": {"enabled": False},
        # The client optimizer is torch AdamW: no DeepSpeed op is JIT-built (ENVIRONMENT.md), and
        # with offload DeepSpeed would otherwise insist on its compiled CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _NEVER,
        # DeepSpeed's forward/backward/step timers, printed by DeepSpeed every step when asked for.
        "wall_clock_breakdown": cfg.profiling.wall_clock_breakdown,
    }
    assert ds["train_batch_size"] == micro * accum * world_size
    return ds


def freeze(model: nn.Module, trainable: list[str]) -> None:
    """requires_grad only on the parameters of the trainable groups of `model.module_groups()`
    (group name -> [(parameter name, parameter)])."""
    groups = model.module_groups()
    unknown = [name for name in trainable if name not in groups]
    if unknown:
        raise ConfigError(f"trainable: unknown module group(s) {unknown}; allowed: {sorted(groups)}")
    model.requires_grad_(False)
    for name in trainable:
        for _, param in groups[name]:
            param.requires_grad_(True)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Vectors are norms, biases, the learned query and the frame separator; the SSM's A_log, D and
    # dt_bias are marked by the mixer itself because D can be a matrix [H, P].
    return param.ndim < 2 or name.endswith(".bias") or getattr(param, "_no_weight_decay", False)


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """AdamW groups: per trainable module group, one with weight decay and one without.

    Call after `freeze`. Each group carries a `name` ("projector", "projector.no_decay") that the
    metrics use for its learning rate.
    """
    groups = model.module_groups()
    seen: set[int] = set()
    out = []
    for group_name in cfg.trainable:
        lr = cfg.optimizer.group_lr.get(group_name, cfg.optimizer.lr)
        decay, no_decay = [], []
        for name, param in groups[group_name]:
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if _no_decay(name, param) else decay).append(param)
        for suffix, params, wd in (("", decay, cfg.optimizer.weight_decay), (".no_decay", no_decay, 0.0)):
            if params:
                out.append({"params": params, "lr": lr, "weight_decay": wd, "name": group_name + suffix})
    if not out:
        raise ConfigError(f"trainable: groups {cfg.trainable} hold no parameters")
    return out


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then half a cosine down to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(cfg: RunConfig, total_steps: int) -> int:
    return math.ceil(cfg.schedule.warmup_ratio * total_steps)


def quiet_known_warnings() -> None:
    """Silence, at their source, warnings a training log would otherwise repeat every step.

    DeepSpeed 0.19's ZeRO communication calls `torch.distributed.all_gather_into_tensor` and
    `reduce_scatter_tensor`, which torch 2.13 deprecates in favour of `*_single`: the old names
    forward to the new functions, so nothing changes for us, yet each warning came back dozens of
    times per log (other libraries reset the warning registry). Only that message, category and
    module are filtered; any other deprecation still shows.
    """
    warnings.filterwarnings(
        "ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")


def skip_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op on CPU (~80 s) that gloo does not need.

    The function is looked up on the module at call time, so it must be patched on the module
    object itself (`import deepspeed.comm.torch as m` would bind the package attribute instead).
    """
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def build_optimizer(groups: list[dict], cfg: RunConfig, *, total_steps: int, on_cuda: bool):
    """The client AdamW over `groups` and its warmup + cosine LambdaLR: (optimizer, scheduler)."""
    optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps,
                                  fused=on_cuda)
    warmup = warmup_steps(cfg, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.schedule.min_lr_ratio))
    return optimizer, scheduler


def apply_optimizer_config(scheduler, cfg: RunConfig) -> None:
    """Make a restored optimizer and schedule follow `cfg`'s optimizer and schedule sections.

    Loading a checkpoint restores every param group's lr, betas, eps and weight decay and the
    scheduler's base rates as they were saved, over what the new config built; a resume that
    changed them must put the new values back. The current lr is the new base rate times the
    (possibly changed) schedule at the restored step, as LambdaLR computes it.
    """
    for i, group in enumerate(scheduler.optimizer.param_groups):
        name = group["name"].removesuffix(".no_decay")
        lr = cfg.optimizer.group_lr.get(name, cfg.optimizer.lr)
        decay = 0.0 if group["name"].endswith(".no_decay") else cfg.optimizer.weight_decay
        group.update(initial_lr=lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps,
                     weight_decay=decay, lr=lr * scheduler.lr_lambdas[i](scheduler.last_epoch))
        scheduler.base_lrs[i] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def build_engine(model: nn.Module, cfg: RunConfig, *, world_size: int, total_steps: int,
                 on_cuda: bool):
    """Freeze, group, schedule and wrap: returns (engine, optimizer, lr_scheduler)."""
    import deepspeed

    freeze(model, cfg.trainable)
    if cfg.lora.enabled:  # the llm group trains through its adapters only
        from trainer.lora import freeze_base_llm

        freeze_base_llm(model)
    optimizer, scheduler = build_optimizer(param_groups(model, cfg), cfg, total_steps=total_steps,
                                           on_cuda=on_cuda)
    if not on_cuda:
        skip_shm_build()
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=build_ds_config(cfg, world_size, on_cuda=on_cuda))
    return engine, optimizer, scheduler
