"""The profiler switch (`profiling.steps`, `profiling.wall_clock_breakdown`) and MFU for any device.

Oracles: the Chrome trace format (a JSON object whose `traceEvents` hold the operators the
profiled code ran, steps marked `ProfilerStep#<n>`), the vendors' data sheets for peak FLOP/s, and
the run's own world size for tokens/s per device.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.metrics import peak_for_name, peak_with_source
from trainer.profiling import StepProfiler


def _trace_events(path: Path) -> list[dict]:
    trace = json.loads(path.read_text())
    assert isinstance(trace, dict) and isinstance(trace["traceEvents"], list)
    return trace["traceEvents"]


def _step_marks(events: list[dict]) -> list[str]:
    return sorted({e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")})


def test_profiler_records_exactly_the_chosen_steps(tmp_path):
    profiler = StepProfiler(tmp_path, [2, 3], rank=1)
    layer = torch.nn.Linear(8, 8)
    for step in range(1, 6):
        profiler.step_begins(step)
        if step == 4:
            torch.cumsum(torch.ones(3), 0)  # an operator only step 4 runs: must not be traced
        layer(torch.randn(4, 8)).sum().backward()
        profiler.step_ended(step)
    profiler.close()
    traces = list((tmp_path / "profile").iterdir())
    # tensorboard_trace_handler's layout: <worker>.<time>.pt.trace.json, the rank in the worker name.
    assert traces == [profiler.trace] and traces[0].name.endswith(".pt.trace.json")
    assert "_rank1." in traces[0].name
    events = _trace_events(traces[0])
    names = {e.get("name") for e in events}
    assert _step_marks(events) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert "aten::addmm" in names and "aten::cumsum" not in names


def test_profiler_of_a_run_resumed_past_its_steps_writes_nothing(tmp_path):
    profiler = StepProfiler(tmp_path, [2, 3], rank=0)
    for step in (5, 6):
        profiler.step_begins(step)
        profiler.step_ended(step)
    profiler.close()
    assert profiler.trace is None and not (tmp_path / "profile").exists()


def test_peak_flops_table_override_and_cpu():
    # Data sheets, dense: H100 SXM / H200 989 TFLOP/s bf16, A100 312, A10 125, H100 PCIe 756.
    assert peak_for_name("NVIDIA H100 80GB HBM3", "bf16")[0] == 989e12
    assert peak_for_name("NVIDIA H200", "bf16")[0] == 989e12
    assert peak_for_name("NVIDIA H100 PCIe", "bf16")[0] == 756e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB", "fp32")[0] == 156e12  # TF32
    assert peak_for_name("NVIDIA A10", "bf16")[0] == 125e12
    # Never a wrong neighbour: an A10G is not an A10 or an A100; unknown names say what to set.
    for name in ("NVIDIA A10G", "Tesla T4"):
        peak, why = peak_for_name(name, "bf16")
        assert peak is None and name in why and "logging.peak_tflops" in why
    # The config's override wins everywhere; on a CPU without one, MFU is off and the reason given.
    assert peak_with_source(torch.device("cpu"), "fp32", 2.5) == (2.5e12, "logging.peak_tflops")
    peak, why = peak_with_source(torch.device("cpu"), "fp32")
    assert peak is None and "not reported on cpu" in why and "\n" not in why


def test_wall_clock_breakdown_reaches_the_deepspeed_config(monkeypatch):
    from trainer.config import load_config
    from trainer.engine import build_ds_config

    monkeypatch.setenv("MAMBAMIA_TINY", "/nonexistent")
    config = str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage1.yaml")
    for flag in (False, True):
        cfg = load_config(config, [f"profiling.wall_clock_breakdown={str(flag).lower()}"])
        assert build_ds_config(cfg, 1)["wall_clock_breakdown"] is flag


@pytest.mark.slow
def test_profiled_tiny_run_writes_a_chrome_trace_and_reports_mfu(tiny_assets, tmp_path):
    from tests.ckpt_worker import launch
    from tests.test_train import _train_in_run_dir, make_tiny_root

    root = make_tiny_root(tmp_path / "tiny", Path(tiny_assets["llm"]), train=8, val=2)
    run = tmp_path / "run"
    overrides = ["schedule.total_steps=3", "checkpoint.every_steps=0", "validation.every_steps=0",
                 "logging.tensorboard=false", "profiling.steps=[2,3]", "logging.peak_tflops=0.5",
                 "checkpoint.async=true", "profiling.wall_clock_breakdown=true"]
    assert launch(run, 1, *overrides, target=_train_in_run_dir, env={"MAMBAMIA_TINY": str(root)}) == [0]
    traces = sorted((run / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1 and "_rank0." in traces[0].name
    events = _trace_events(traces[0])
    assert _step_marks(events) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert any(e.get("name") == "aten::mm" or e.get("name") == "aten::addmm" for e in events)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for row in steps:  # one process: per device equals the total
        assert row["throughput/tokens_per_s_per_device"] == pytest.approx(row["throughput/tokens_per_s"])
        assert 0 < row["mfu"] < 1
    log = next(run.glob("rank0.*.out")).read_text()
    assert log.count("MFU against 0.5 TFLOP/s per device (logging.peak_tflops)") == 1
    # The async final save was published before the run exited.
    assert (run / "checkpoints" / "latest").read_text().strip() == "3"
