"""The run configuration: one typed tree, loaded from YAML plus `key.sub=value` overrides.

    cfg = load_config("configs/tiny/stage1.yaml", ["optimizer.lr=3e-4", "run_dir=/tmp/run"])

Loading order: the YAML's `include:` files (relative to it, merged in order), the YAML itself, then
the overrides (each value parsed as a YAML scalar, so `x=3` is an int and `x=null` is None), then
`${NAME}` references in strings are replaced by environment variables. Only then is the merged
dictionary turned into dataclasses, so an unknown key or a wrong type anywhere - file or command line
- fails the same way, with the dotted key and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data.config import DataConfig, DataSource
from model.config import VideoLLMConfig


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 1e-4
    """Learning rate of every trainable group without an entry in `group_lr`."""
    group_lr: dict[str, float] = field(default_factory=dict)
    """Per module group (names from `VideoLLM.module_groups()`), e.g. {projector: 1e-3}."""
    weight_decay: float = 0.0
    """Applied to matrices only: norms, biases and SSM parameters (A_log, D, dt_bias) never decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 2.0
    """Global gradient-norm clip; 0 disables clipping."""


@dataclass(kw_only=True)
class ScheduleConfig:
    total_steps: int | None = None
    """Optimizer steps of this stage; give either this or `epochs`."""
    epochs: float | None = None
    """Passes over the training mixture; converted to steps from the loader's epoch length."""
    warmup_ratio: float = 0.03
    """Linear warm-up over this fraction of the steps, then cosine decay."""
    min_lr_ratio: float = 0.0
    """The cosine ends at lr * min_lr_ratio."""


@dataclass(kw_only=True)
class ParallelConfig:
    zero_stage: Literal[1, 2, 3] = 2
    global_batch_size: int = 1
    """Samples per optimizer step over all processes: data.batch_size (the micro-batch) x gradient
    accumulation x data-parallel processes; the accumulation is derived from it."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`auto` = bf16 on CUDA, fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    """Parameter offload needs ZeRO-3 (DeepSpeed's rule)."""
    pipeline_stages: int = 1
    """Pipeline-parallel stages (trainer/pipeline.py); processes = stages x data-parallel replicas,
    ZeRO-1 at most."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0: only at the end and on a stop signal)."""
    keep_last: int = 2
    async_save: bool = field(default=False, metadata={"yaml_key": "async"})
    """YAML key `async` (`async_save` also accepted). Take a host-memory snapshot at the save step
    and write the files in background threads while training goes on (trainer/async_checkpoint.py).
    Same crash safety: a checkpoint is published only when every rank's files are on disk, a
    second save waits for the first, a stop signal exits only once the save is durable. Costs
    host memory for one copy of each rank's checkpoint share."""


@dataclass(kw_only=True)
class ValidationConfig:
    sources: list[DataSource] = field(default_factory=list)
    """Held-out dataset folders; empty disables validation."""
    every_steps: int = 0
    """Validation loss every N steps (0: only at the end of the stage)."""
    max_batches: int = 0
    """Cap on validation batches per process (0: the whole held-out set)."""


@dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases beside TensorBoard (trainer/wandb_log.py; `pip install mambamia[wandb]`):
    the same scalars, the resolved config, and one run id per run folder (stored in
    RUN_DIR/wandb_run_id), so a resumed run continues the same W&B run. WANDB_MODE=offline keeps
    everything on the machine (sync later with `wandb sync RUN_DIR/wandb`)."""
    enabled: bool = False
    project: str = "mambamia"
    run_name: str | None = None
    """Display name; unset: the stage name."""
    tags: list[str] = field(default_factory=list)
    entity: str | None = None
    """Team or user; unset: the logged-in account's default."""


@dataclass(kw_only=True)
class LoraConfig:
    """Low-rank adapters on the LLM (trainer/lora.py, peft; `pip install mambamia[lora]`). With
    `enabled`, `trainable` must name `llm`, which then trains through its adapters only: the base
    weights stay frozen and get no optimizer state. `mambamia export` merges the adapters into the
    exported LLM (or keeps them beside it with --keep-adapters)."""
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    """The adapter's output is scaled by alpha / rank."""
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names (last component) of the LLM's linear layers that get adapters; Qwen2/LLaMA names by default."""


@dataclass(kw_only=True)
class LoggingConfig:
    every_steps: int = 1
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True
    peak_tflops: float | None = None
    """Dense peak TFLOP/s of one device in the training precision, for MFU; unset: looked up from
    the GPU's name (trainer/metrics.py), and MFU is left out, saying why once, where unknown."""


@dataclass(kw_only=True)
class ProfilingConfig:
    steps: list[int] = field(default_factory=list)
    """[start, end]: record a torch.profiler trace of optimizer steps start..end (inclusive, counted
    from 1) on every rank into RUN_DIR/profile/ (TensorBoard profile plugin / Chrome trace
    layout); empty: off."""
    wall_clock_breakdown: bool = False
    """DeepSpeed's per-step forward/backward/step timers, printed by DeepSpeed."""


@dataclass(kw_only=True)
class RunConfig:
    run_dir: str
    """Holds checkpoints/, latest, tensorboard/, metrics.jsonl and config.yaml; resumed if present."""
    stage: str
    """A name for logs (stage1_alignment, ...)."""
    seed: int = 0
    model: VideoLLMConfig
    init_from: str | None = None
    """The previous stage's export folder (`mambamia export`): its LLM (init_from/llm, which then
    replaces model.llm_path), compressor and projector weights go into the architecture this
    stage's `model` section describes."""
    trainable: list[str]
    """Module groups that train; every other group is frozen and gets no optimizer state."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Train the LLM through low-rank adapters instead of all its weights (off by default)."""
    max_nonfinite_steps: int = 3
    """Steps with a non-finite loss or gradient norm that are skipped before the run stops."""
    data: DataConfig
    """The training mixture and loader (data/config.py); `data.batch_size` is the micro-batch and
    `data.seed` alone fixes the sample order (independent of `seed`, which fixes initialisation)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)

    def validate(self) -> None:
        """Value ranges and checks that span several fields; types were checked while building."""
        _check_ranges(self)
        if not self.trainable:
            raise ConfigError("trainable: expected at least one module group, got []")
        if self.lora.enabled and "llm" not in self.trainable:
            raise ConfigError(f"lora.enabled: the LLM trains through its adapters only when trainable "
                              f"names llm, got {self.trainable}")
        if self.lora.enabled and not self.lora.target_modules:
            raise ConfigError("lora.target_modules: expected at least one module name, got []")
        if self.lora.enabled and self.parallel.pipeline_stages > 1:
            raise ConfigError("lora.enabled: not implemented for parallel.pipeline_stages > 1")
        if self.data.pack_sequences and self.parallel.pipeline_stages > 1:
            raise ConfigError("data.pack_sequences: the pipeline stages take padded batches; "
                              "use it with parallel.pipeline_stages=1")
        for name in self.optimizer.group_lr:
            if name not in self.trainable:
                raise ConfigError(f"optimizer.group_lr.{name}: not in trainable {self.trainable}")
        if (self.schedule.total_steps is None) == (self.schedule.epochs is None):
            raise ConfigError("schedule: give exactly one of total_steps and epochs")
        if len(self.optimizer.betas) != 2:
            raise ConfigError(f"optimizer.betas: expected two numbers, got {self.optimizer.betas}")
        if self.parallel.pipeline_stages > 1 and self.parallel.zero_stage > 1:
            raise ConfigError(f"parallel.zero_stage: {self.parallel.zero_stage} cannot be combined with "
                              "parallel.pipeline_stages > 1 (DeepSpeed's pipeline allows ZeRO-0/1 only)")
        if self.parallel.pipeline_stages > 1 and self.validation.sources:
            raise ConfigError("validation.sources: validation is not implemented for "
                              "parallel.pipeline_stages > 1")
        if self.parallel.offload_params != "none" and self.parallel.zero_stage != 3:
            raise ConfigError("parallel.offload_params: needs parallel.zero_stage=3")
        steps = self.profiling.steps
        if steps and not (len(steps) == 2 and 1 <= steps[0] <= steps[1]):
            raise ConfigError(f"profiling.steps: expected [start, end] with 1 <= start <= end, got {steps}")


def _in_range(value: float | None, low: float, high: float, *, low_open: bool = False,
              high_open: bool = False) -> bool:
    """`value` finite and within [low, high] (an end excluded when open); None passes (unset)."""
    if value is None:
        return True
    return (math.isfinite(value) and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high))


def _check_ranges(cfg: RunConfig) -> None:
    """Every number of the trainer's sections in its meaningful range, NaN and inf refused.

    (key, value, low, high, low_open, high_open, what is expected); model.* and data.* check
    their own fields in their dataclasses.
    """
    inf = math.inf
    opt, sch = cfg.optimizer, cfg.schedule
    checks = [
        ("max_nonfinite_steps", cfg.max_nonfinite_steps, 0, inf, False, False, ">= 0"),
        ("optimizer.lr", opt.lr, 0, inf, False, True, "a finite number >= 0"),
        ("optimizer.weight_decay", opt.weight_decay, 0, inf, False, True, "a finite number >= 0"),
        ("optimizer.eps", opt.eps, 0, inf, True, True, "a finite number > 0"),
        ("optimizer.grad_clip", opt.grad_clip, 0, inf, False, True, "a finite number >= 0 (0: off)"),
        *((f"optimizer.betas.{i}", b, 0, 1, False, True, "in [0, 1)") for i, b in enumerate(opt.betas)),
        *((f"optimizer.group_lr.{k}", v, 0, inf, False, True, "a finite number >= 0")
          for k, v in opt.group_lr.items()),
        ("schedule.total_steps", sch.total_steps, 1, inf, False, False, ">= 1"),
        ("schedule.epochs", sch.epochs, 0, inf, True, True, "a finite number > 0"),
        ("schedule.warmup_ratio", sch.warmup_ratio, 0, 1, False, True, "in [0, 1)"),
        ("schedule.min_lr_ratio", sch.min_lr_ratio, 0, 1, False, False, "in [0, 1]"),
        ("parallel.global_batch_size", cfg.parallel.global_batch_size, 1, inf, False, False, ">= 1"),
        ("parallel.pipeline_stages", cfg.parallel.pipeline_stages, 1, inf, False, False, ">= 1"),
        ("checkpoint.every_steps", cfg.checkpoint.every_steps, 0, inf, False, False, ">= 0 (0: at the end only)"),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last, 1, inf, False, False, ">= 1"),
        ("validation.every_steps", cfg.validation.every_steps, 0, inf, False, False, ">= 0 (0: at the end only)"),
        ("validation.max_batches", cfg.validation.max_batches, 0, inf, False, False, ">= 0 (0: all)"),
        *((f"validation.sources.{i}.weight", src.weight, 0, inf, False, True, "a finite number >= 0")
          for i, src in enumerate(cfg.validation.sources)),
        ("logging.every_steps", cfg.logging.every_steps, 1, inf, False, False, ">= 1"),
        ("lora.rank", cfg.lora.rank, 1, inf, False, False, ">= 1"),
        ("lora.alpha", cfg.lora.alpha, 0, inf, True, True, "a finite number > 0"),
        ("lora.dropout", cfg.lora.dropout, 0, 1, False, True, "in [0, 1)"),
        ("logging.peak_tflops", cfg.logging.peak_tflops, 0, inf, True, True, "a finite number > 0 (unset: from the GPU)"),
    ]
    for key, value, low, high, low_open, high_open, expected in checks:
        if not _in_range(value, low, high, low_open=low_open, high_open=high_open):
            raise ConfigError(f"{key}: expected {expected}, got {value}")


# ------------------------------------------------------------------------------------------------
# Loading


def load_config(yaml_path: str | Path, overrides: list[str] = ()) -> RunConfig:
    raw = _read_with_includes(Path(yaml_path), seen=())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    raw = _expand_env(raw, "")
    cfg = build(RunConfig, raw, "")
    cfg.validate()
    return cfg


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config; a temporary name then a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)


def _read_with_includes(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle through {[str(p) for p in seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, _read_with_includes(path.parent / inc, seen + (path,)))
    return _deep_merge(merged, data)


def _deep_merge(base: dict, top: dict) -> dict:
    """Mappings merge key by key; anything else (lists included) is replaced by the top value."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {key}: {where} is a {type(node).__name__}, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {where}: expected a list index below {len(node)}")
    return int(part)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(node: Any, where: str) -> Any:
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{where}.{i}") for i, v in enumerate(node)]
    if isinstance(node, str):
        def lookup(match: re.Match) -> str:
            if match.group(1) not in os.environ:
                raise ConfigError(f"{where}: environment variable {match.group(1)} is not set")
            return os.environ[match.group(1)]
        return _ENV_REF.sub(lookup, node)
    return node


# ------------------------------------------------------------------------------------------------
# Typed construction: dict -> dataclass, checking every field against its annotation.


def build(cls: type, raw: Any, where: str) -> Any:
    """Turn a plain mapping into `cls`, recursively; errors name the dotted key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or '<root>'}: expected a mapping for {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    raw = _rename_yaml_keys(cls, raw, where)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown key; allowed keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required key is missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or '<root>'}: {err}") from None


def _rename_yaml_keys(cls: type, raw: dict, where: str) -> dict:
    """Fields whose YAML key is a Python keyword (`async`) declare it as metadata `yaml_key`; both
    spellings are accepted, not together."""
    out = dict(raw)
    for f in dataclasses.fields(cls):
        key = f.metadata.get("yaml_key")
        if key is None or key not in out:
            continue
        if f.name in out:
            raise ConfigError(f"{_join(where, key)}: given twice, also as {f.name}; keep one")
        out[f.name] = out.pop(key)
    return out


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args or type(value) is bool and not any(a is value for a in args):
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}.{i}") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{where}.{i}") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(key_tp, k, f"{where}.{k}"): _coerce(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        # YAML reads `1e-4` (no dot) as a string and `3` as an int: both are fine floats here.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# ------------------------------------------------------------------------------------------------
# Resuming with a changed config

# What a resume cannot take from a new config, by dotted key prefix, and why. The checkpoint holds
# weights, optimizer state and a loader position built under the saved values.
_REFUSED_ON_RESUME = {
    "model.": "the checkpoint holds the weights and optimizer state of the saved model",
    "trainable": "frozen groups have no optimizer state in the checkpoint",
    "lora.": "the checkpoint holds the adapters (and their optimizer state) of the saved LoRA setup",
    "init_from": "the checkpoint's weights replace whatever init_from would load",
    "seed": "it only fixes the initial weights, which the checkpoint replaces",
    "parallel.precision": "the optimizer state is laid out for the saved precision",
    "parallel.offload_": "the optimizer state is laid out for the saved offload setting",
    "parallel.pipeline_stages": "the checkpoint is split by the saved pipeline stages",
    "data.sources": "the saved loader position is a place in the saved mixture's sample order",
    "data.seed": "the saved loader position is a place in the saved seed's sample order",
    "data.samples_per_epoch": "the saved loader position is a place in the saved epoch length's order",
}
# Exceptions to the refused prefixes: these change cost, not results.
_HONOURED_ON_RESUME = ("model.gradient_checkpointing", "model.compressor.gradient_checkpointing",
                       "model.attn_implementation")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def resume_changes(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """`key old -> new` for every value of `cfg` that differs from the config a checkpoint was
    saved with (`saved`, the checkpoint's `dataclasses.asdict` of its RunConfig).

    Raises ConfigError, one line listing every change a resume cannot honour and why. A key the
    saved config lacks (added to the schema since) is not a change. A ZeRO stage change is
    honoured (through DeepSpeed's universal checkpoint) unless it crosses ZeRO-3, whose files are
    split differently.
    """
    old, new = _flatten(saved), _flatten(dataclasses.asdict(cfg))
    changes, refused = [], []
    for key in sorted(set(old) & set(new)):
        if old[key] == new[key]:
            continue
        change = f"{key} {_short(old[key])} -> {_short(new[key])}"
        changes.append(change)
        reason = next((why for prefix, why in _REFUSED_ON_RESUME.items() if key.startswith(prefix)), None)
        if key == "parallel.zero_stage" and (old[key] == 3) != (new[key] == 3):
            reason = "ZeRO-3 splits every rank's files differently from stages 1-2"
        if reason is not None and key not in _HONOURED_ON_RESUME:
            refused.append(f"{change} ({reason})")
    if refused:
        raise ConfigError(f"resume: this config differs from the checkpoint's where a resume cannot "
                          f"follow: {'; '.join(refused)}. Resume with the saved values, or start a new "
                          "run_dir (init_from an export of this run)")
    return changes
