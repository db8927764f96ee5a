"""Run config loading, the derived DeepSpeed config, the schedule and the optimizer groups.

All single-process and fast: nothing here launches DeepSpeed.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from trainer.config import ConfigError, RunConfig, load_config, save_config
from trainer.engine import build_ds_config, freeze, lr_factor, param_groups, warmup_steps

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ENV = {"MAMBAMIA_TINY": "/tiny", "MAMBAMIA_MODELS": "/models", "MAMBAMIA_DATA": "/data"}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _minimal(**extra) -> dict:
    return {"run_dir": "r", "stage": "s", "trainable": ["projector"],
            "model": {"llm_path": "/llm"}, "data": {"sources": [{"path": "/shards"}], "batch_size": 1},
            "schedule": {"total_steps": 10}, **extra}


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("stage*.yaml")), ids=lambda p: p.stem)
def test_every_stage_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert cfg.model.llm_path.startswith(("/tiny/", "/models/"))
    assert all(src.path.startswith(("/tiny/", "/data/")) for src in cfg.data.sources)
    # The saved resolved config is itself a loadable config giving the same tree.
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_curriculum_freezes_llm_only_in_stage1_and_grows_frames():
    stages = [load_config(CONFIGS / f"stage{i}.yaml") for i in (1, 2, 3)]
    assert "llm" not in stages[0].trainable and stages[0].init_from is None
    assert "llm" in stages[1].trainable and "llm" in stages[2].trainable
    assert stages[1].init_from and stages[2].init_from
    assert stages[0].data.max_frames < stages[1].data.max_frames < stages[2].data.max_frames
    vicuna = load_config(CONFIGS / "stage1_vicuna.yaml")
    assert "vicuna" in vicuna.model.llm_path and vicuna.model.compressor.input_dim == 1024
    # The include chain keeps everything the Vicuna file does not mention.
    assert vicuna.optimizer == stages[0].optimizer and vicuna.trainable == stages[0].trainable


def test_overrides_are_typed_yaml_scalars(tmp_path):
    path = _write(tmp_path, "c.yaml", _minimal())
    cfg = load_config(path, ["optimizer.lr=3e-4", "parallel.zero_stage=3", "init_from=null",
                             "model.compressor.k=4", "data.sources.0.weight=2",
                             "optimizer.group_lr.projector=0.5", "trainable=[projector, llm]"])
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.parallel.zero_stage == 3 and cfg.init_from is None
    assert cfg.model.compressor.k == 4 and cfg.data.sources[0].weight == 2.0
    assert cfg.optimizer.group_lr == {"projector": 0.5} and cfg.trainable == ["projector", "llm"]


def test_includes_merge_maps_and_replace_lists(tmp_path):
    _write(tmp_path, "base.yaml", _minimal(optimizer={"lr": 1.0, "eps": 0.5}, trainable=["llm"]))
    top = _write(tmp_path, "top.yaml", {"include": ["base.yaml"], "optimizer": {"lr": 2.0},
                                        "trainable": ["projector"]})
    cfg = load_config(top)
    assert (cfg.optimizer.lr, cfg.optimizer.eps, cfg.trainable) == (2.0, 0.5, ["projector"])


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1", "optimizer.lrr: unknown key; allowed keys: ['betas', 'eps'"),
    ("parallel.zero_stage=4", "parallel.zero_stage: expected one of [1, 2, 3], got 4"),
    ("parallel.precision=fp16", "parallel.precision: expected one of ['auto', 'bf16', 'fp32']"),
    ("data.batch_size=two", "data.batch_size: expected an integer, got 'two'"),
    ("logging.tensorboard=1", "logging.tensorboard: expected true or false, got 1"),
    ("model.compressor.kind=lstm", "model.compressor: CompressorConfig.kind: expected one of ['mambamia'"),
    ("data.sources.3.weight=1", "data.sources.3: expected a list index below 1"),
    ("optimizer.group_lr.llm=1", "optimizer.group_lr.llm: not in trainable ['projector']"),
    ("schedule.epochs=1", "schedule: give exactly one of total_steps and epochs"),
    ("parallel.offload_params=cpu", "parallel.offload_params: needs parallel.zero_stage=3"),
    ("optimizer.lr", "override 'optimizer.lr': expected key.sub=value"),
    ("data.batch_size=0", "data: data.batch_size: expected >= 1, got 0"),
    ("data.pack_sequences=true parallel.pipeline_stages=2",
     "data.pack_sequences: the pipeline stages take padded batches"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    path = _write(tmp_path, "c.yaml", _minimal())
    with pytest.raises(ConfigError) as err:
        load_config(path, override.split(" "))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_and_unset_env_and_missing_file(tmp_path, monkeypatch):
    data = _minimal()
    del data["stage"]
    with pytest.raises(ConfigError, match=r"^stage: required key is missing"):
        load_config(_write(tmp_path, "a.yaml", data))
    monkeypatch.delenv("MAMBAMIA_TINY")
    with pytest.raises(ConfigError, match=r"model\.llm_path: environment variable MAMBAMIA_TINY is not set"):
        load_config(CONFIGS / "tiny" / "stage1.yaml")
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------
# DeepSpeed config


def _cfg(tmp_path, *overrides) -> RunConfig:
    return load_config(_write(tmp_path, "c.yaml", _minimal()), list(overrides))


@pytest.mark.parametrize("zero", [1, 2, 3])
@pytest.mark.parametrize("world, micro, global_batch", [(1, 1, 1), (2, 2, 8), (8, 4, 96)])
def test_ds_config_batch_invariant_and_stage(tmp_path, zero, world, micro, global_batch):
    cfg = _cfg(tmp_path, f"parallel.zero_stage={zero}", f"data.batch_size={micro}",
               f"parallel.global_batch_size={global_batch}", "optimizer.grad_clip=0.5")
    ds = build_ds_config(cfg, world)
    accum = ds["gradient_accumulation_steps"]
    assert ds["train_batch_size"] == global_batch == ds["train_micro_batch_size_per_gpu"] * accum * world
    assert accum == global_batch // (micro * world)
    assert ds["zero_optimization"]["stage"] == zero
    assert ds["gradient_clipping"] == 0.5
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_ds_config_precision_and_offload(tmp_path):
    cfg = _cfg(tmp_path, "parallel.zero_stage=3", "parallel.offload_optimizer=cpu",
               "parallel.offload_params=cpu")
    assert build_ds_config(cfg, 1, on_cuda=True)["bf16"]["enabled"] is True
    cpu = build_ds_config(cfg, 1, on_cuda=False)
    assert cpu["bf16"]["enabled"] is False and cpu["fp16"]["enabled"] is False
    assert cpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    pinned = _cfg(tmp_path, "parallel.precision=bf16")
    assert build_ds_config(pinned, 1, on_cuda=False)["bf16"]["enabled"] is True


def test_ds_config_rejects_indivisible_batch(tmp_path):
    cfg = _cfg(tmp_path, "data.batch_size=2", "parallel.global_batch_size=6")
    with pytest.raises(ConfigError, match=r"parallel\.global_batch_size: 6 is not a multiple of .* 2 x 2"):
        build_ds_config(cfg, 2)


# ---------------------------------------------------------------------------------------------
# Schedule and optimizer groups


def test_lr_schedule_matches_closed_form():
    total, warm, floor = 100, 10, 0.1
    assert [lr_factor(s, total, warm, floor) for s in range(warm)] == pytest.approx(
        [(s + 1) / warm for s in range(warm)])
    for step in (10, 35, 55, 80, 99, 150):
        t = min(1.0, (step - warm) / (total - warm))
        assert lr_factor(step, total, warm, floor) == pytest.approx(floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2)
    assert lr_factor(10, total, warm, floor) == pytest.approx(1.0)
    assert lr_factor(100, total, warm, floor) == pytest.approx(floor)


def test_warmup_steps_rounds_up(tmp_path):
    cfg = _cfg(tmp_path, "schedule.warmup_ratio=0.03")
    assert warmup_steps(cfg, 100) == 3 and warmup_steps(cfg, 10) == 1


class _Mixerish(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.D = nn.Parameter(torch.ones(2, 4))  # a matrix that must still not decay
        self.D._no_weight_decay = True
        self.query = nn.Parameter(torch.zeros(8))


class _StandIn(nn.Module):
    """A VideoLLM-shaped module: three groups, a tied weight inside the LLM group."""

    def __init__(self):
        super().__init__()
        self.llm = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
        self.llm[1].weight = self.llm[0].weight
        self.compressor = _Mixerish()
        self.projector = nn.Linear(8, 8)

    def module_groups(self):
        return {name: list(getattr(self, name).named_parameters(prefix=name))
                for name in ("llm", "compressor", "projector")}


def test_freeze_and_param_groups(tmp_path):
    cfg = _cfg(tmp_path, "trainable=[compressor, projector]", "optimizer.lr=0.1",
               "optimizer.group_lr={projector: 0.5}", "optimizer.weight_decay=0.2")
    model = _StandIn()
    freeze(model, cfg.trainable)
    assert not any(p.requires_grad for p in model.llm.parameters())
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"compressor", "compressor.no_decay", "projector", "projector.no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    got = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert got["compressor"] == ["compressor.in_proj.weight"]
    assert got["compressor.no_decay"] == sorted(["compressor.in_proj.bias", "compressor.norm.weight",
                                                 "compressor.norm.bias", "compressor.D", "compressor.query"])
    assert got["projector"] == ["projector.weight"] and got["projector.no_decay"] == ["projector.bias"]
    assert [groups[k]["lr"] for k in ("compressor", "projector")] == [0.1, 0.5]
    assert groups["compressor"]["weight_decay"] == 0.2 and groups["projector.no_decay"]["weight_decay"] == 0.0
    # Every trainable parameter in exactly one group, no frozen one anywhere.
    listed = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_tied_llm_weight_listed_once_and_unknown_group(tmp_path):
    cfg = _cfg(tmp_path, "trainable=[llm]")
    model = _StandIn()
    freeze(model, cfg.trainable)
    params = [p for g in param_groups(model, cfg) for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == 1
    with pytest.raises(ConfigError, match=r"trainable: unknown module group\(s\) \['vision'\]; allowed: \['compressor', 'llm', 'projector'\]"):
        freeze(model, ["vision"])


# ---------------------------------------------------------------------------------------------
# Value ranges (issue 18.9): each refused at load with one line naming the key


@pytest.mark.parametrize("override, key", [
    ("data.sources=[{path: /a, weight: .nan}, {path: /b, weight: 1}]", "data.sources[0].weight"),
    ("data.seed=-1", "data.seed"),
    ("data.bad_check_after=-5", "data.bad_check_after"),
])
def test_nonsense_data_values_are_refused_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "c.yaml", _minimal()), [override])
    assert f"{key}: expected " in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, key", [
    (["optimizer.lr=-1e-4"], "optimizer.lr"),
    (["optimizer.lr=.nan"], "optimizer.lr"),
    (["optimizer.lr=nan"], "optimizer.lr"),
    (["optimizer.lr=.inf"], "optimizer.lr"),
    (["optimizer.group_lr={projector: -1}"], "optimizer.group_lr.projector"),
    (["optimizer.betas=[0.9, 1.0]"], "optimizer.betas.1"),
    (["optimizer.betas=[-0.1, 0.999]"], "optimizer.betas.0"),
    (["optimizer.eps=0"], "optimizer.eps"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
    (["optimizer.grad_clip=.nan"], "optimizer.grad_clip"),
    (["schedule.total_steps=null", "schedule.epochs=0"], "schedule.epochs"),
    (["schedule.total_steps=null", "schedule.epochs=-2"], "schedule.epochs"),
    (["schedule.warmup_ratio=.nan"], "schedule.warmup_ratio"),
    (["schedule.min_lr_ratio=1.5"], "schedule.min_lr_ratio"),
    (["logging.every_steps=0"], "logging.every_steps"),
    (["validation.max_batches=-1"], "validation.max_batches"),
    (["validation.every_steps=-1"], "validation.every_steps"),
    (["validation.sources=[{path: /v, weight: .nan}]"], "validation.sources.0.weight"),
    (["checkpoint.every_steps=-3"], "checkpoint.every_steps"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["max_nonfinite_steps=-1"], "max_nonfinite_steps"),
])
def test_nonsense_values_are_refused_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "c.yaml", _minimal()), overrides)
    assert str(err.value).startswith(f"{key}: expected ") and "\n" not in str(err.value)


def test_edge_values_that_make_sense_load(tmp_path):
    cfg = load_config(_write(tmp_path, "c.yaml", _minimal()), [
        "optimizer.lr=0", "optimizer.betas=[0.0, 0.0]", "optimizer.grad_clip=0", "logging.every_steps=1",
        "validation.max_batches=0", "schedule.min_lr_ratio=1", "schedule.warmup_ratio=0"])
    assert cfg.optimizer.lr == 0.0 and cfg.validation.max_batches == 0


# ---------------------------------------------------------------------------------------------
# Resuming with a changed config (issue 18.7)


def _saved(tmp_path, *overrides) -> dict:
    import dataclasses

    return dataclasses.asdict(_cfg(tmp_path, *overrides))


def test_resume_lists_changes_it_can_follow(tmp_path):
    from trainer.config import resume_changes

    saved = _saved(tmp_path, "parallel.zero_stage=1")
    assert resume_changes(saved, _cfg(tmp_path, "parallel.zero_stage=1")) == []
    changes = resume_changes(saved, _cfg(tmp_path, "optimizer.lr=1e-9", "schedule.total_steps=20",
                                         "parallel.zero_stage=2", "model.gradient_checkpointing=true"))
    assert changes == ["model.gradient_checkpointing False -> True", "optimizer.lr 0.0001 -> 1e-09",
                       "parallel.zero_stage 1 -> 2", "schedule.total_steps 10 -> 20"]
    # A key the checkpoint's config does not have (added to the schema since) is not a change.
    del saved["optimizer"]["eps"]
    assert resume_changes(saved, _cfg(tmp_path, "parallel.zero_stage=1", "optimizer.eps=1e-6")) == []


@pytest.mark.parametrize("overrides, named", [
    (["model.compressor.hidden_size=64"], "model.compressor.hidden_size 1024 -> 64"),
    (["trainable=[projector, llm]"], "trainable ['projector'] -> ['projector', 'llm']"),
    (["parallel.zero_stage=3"], "parallel.zero_stage 2 -> 3"),
    (["data.seed=5"], "data.seed 0 -> 5"),
    (["parallel.precision=bf16"], "parallel.precision 'auto' -> 'bf16'"),
    (["seed=3", "optimizer.lr=1"], "seed 0 -> 3"),
])
def test_resume_refuses_what_it_cannot_follow_in_one_line(tmp_path, overrides, named):
    from trainer.config import resume_changes

    with pytest.raises(ConfigError) as err:
        resume_changes(_saved(tmp_path), _cfg(tmp_path, *overrides))
    message = str(err.value)
    assert message.startswith("resume: ") and named in message and "\n" not in message
    assert "optimizer.lr" not in message  # honoured changes are not refused
