"""Weights & Biases logging (trainer/wandb_log.py) with the real package, offline.

The scalars MetricsLogger gives TensorBoard and W&B are read back from both (W&B's offline
`.wandb` file decoded here with its protobuf schema): the same steps, keys and values; the run's
config is the resolved config; a second logger on the same run folder (a resume) continues the
same run id with the config in effect. Nothing leaves the machine (WANDB_MODE=offline).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb", reason="W&B logging needs wandb: pip install 'mambamia[wandb]'")

from trainer.config import ConfigError, load_config  # noqa: E402
from trainer.metrics import MetricsLogger  # noqa: E402
from trainer.wandb_log import RUN_ID_FILE, open_wandb  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage1.yaml")
_BLOCK = 32768  # the LevelDB log layout W&B writes: 32 KiB blocks of 7-byte-headed chunks


def read_wandb_records(path: Path) -> list:
    """Every record of a `.wandb` file (header ':W&B', then LevelDB-log chunks of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL chunk, or the LAST of FIRST/MIDDLE.../LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_folder: Path) -> dict[int, dict[str, float]]:
    out = {}
    for rec in read_wandb_records(next(run_folder.glob("run-*.wandb"))):
        if rec.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            out[int(items.pop("_step"))] = {k: v for k, v in items.items() if not k.startswith("_")}
    return out


def wandb_config(run_folder: Path) -> dict:
    config = {}
    for rec in read_wandb_records(next(run_folder.glob("run-*.wandb"))):
        if rec.WhichOneof("record_type") == "config":
            config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.config.update})
    return config


def tensorboard_scalars(folder: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            out.setdefault(event.step, {})[tag] = event.value
    return out


def _scalars(step: int) -> dict[str, float]:
    return {"loss": 2.0 / step, "lr/llm": 1e-4 * step, "visual_tokens_per_sample": 20.0 + step,
            "time/data_wait_frac": 0.01 * step, "bad_samples/total": float(step // 2), "grad_norm": 0.5}


def _run(cfg, run_dir: Path, steps: range) -> None:
    metrics = MetricsLogger(run_dir, enabled=True, start_step=steps[0] - 1, total_steps=4,
                            progress_bar=False, wandb=open_wandb(cfg, run_dir, is_main=True))
    for step in steps:
        metrics.log(step, _scalars(step))
    metrics.close()


def test_same_scalars_as_tensorboard_config_and_run_id_kept_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MAMBAMIA_TINY", str(tmp_path))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    wb = ["logging.wandb.enabled=true", "logging.wandb.project=tests", "logging.wandb.tags=[tiny,ci]"]
    cfg = load_config(CONFIG, [f"run_dir={run_dir}", *wb])
    _run(cfg, run_dir, range(1, 3))
    resumed = load_config(CONFIG, [f"run_dir={run_dir}", *wb, "optimizer.lr=0.5"])
    _run(resumed, run_dir, range(3, 5))

    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    history = {**wandb_history(folders[0]), **wandb_history(folders[1])}
    board = tensorboard_scalars(run_dir / "tensorboard")
    assert sorted(history) == sorted(board) == [1, 2, 3, 4]
    for step, logged in board.items():
        assert sorted(history[step]) == sorted(logged) == sorted(_scalars(step))
        for key, value in logged.items():  # TensorBoard keeps float32
            assert history[step][key] == pytest.approx(value, rel=1e-6), (step, key)
            assert history[step][key] == _scalars(step)[key]
    first, second = wandb_config(folders[0]), wandb_config(folders[1])
    assert first["optimizer"]["lr"] == cfg.optimizer.lr
    assert second["optimizer"]["lr"] == 0.5
    assert first["run_dir"] == str(run_dir) and first["stage"] == cfg.stage
    runs = [r.run for r in read_wandb_records(next(folders[0].glob("run-*.wandb")))
            if r.WhichOneof("record_type") == "run"]
    assert runs[0].run_id == run_id and runs[0].display_name == cfg.stage
    assert list(runs[0].tags) == ["tiny", "ci"] and runs[0].project == "tests"


def test_off_by_default_rank0_only_and_missing_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAMIA_TINY", str(tmp_path))
    cfg = load_config(CONFIG)
    assert open_wandb(cfg, tmp_path, is_main=True) is None
    on = load_config(CONFIG, ["logging.wandb.enabled=true"])
    assert open_wandb(on, tmp_path, is_main=False) is None
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ConfigError, match=r"logging.wandb.enabled: needs wandb.*pip install"):
        open_wandb(on, tmp_path, is_main=True)
    assert not (tmp_path / RUN_ID_FILE).exists()
