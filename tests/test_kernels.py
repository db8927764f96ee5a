"""The kernel switch (model/kernels.py), and mamba_ssm's real kernels through our call sites on CPU.

The `kernels`-marked tests launch tests/kernel_cases.py in processes of their own (Triton's
interpreter must be switched on before triton is imported, and its patches must not reach other
tests), grouped into three launches. They need triton and a mamba-ssm built without CUDA, and skip
saying how to install them when either is missing:

    pip install triton einops
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps mamba-ssm
    python -m pytest -m kernels          # about 2 minutes on one core
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

from model import kernels
from tests.support import triton_cpu

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_kernels(monkeypatch):
    """The switch as a new process sees it (MAMBAMIA_KERNELS unset), restored afterwards."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.reset()
    yield monkeypatch
    kernels.reset()


def test_mode_is_read_from_the_environment_once(fresh_kernels):
    assert kernels.mode() == "auto"
    kernels.reset()
    fresh_kernels.setenv(kernels.ENV_VAR, " Reference ")
    assert kernels.mode() == "reference"
    fresh_kernels.setenv(kernels.ENV_VAR, "fused")  # read once: a later change does not apply
    assert kernels.mode() == "reference"
    with kernels.use("fused"):
        assert kernels.mode() == "fused"
    assert kernels.mode() == "reference"


def test_bad_mode_is_a_one_line_error(fresh_kernels):
    fresh_kernels.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"MAMBAMIA_KERNELS='fast': expected one of auto, reference, fused") as err:
        kernels.mode()
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="kernels.use"):
        with kernels.use("cuda"):
            pass


def test_auto_and_reference_choose_pytorch_on_cpu_and_log_once(fresh_kernels, caplog):
    x = torch.zeros(2, 3)
    with caplog.at_level("INFO", logger="model.kernels"):
        for mode in ("auto", "reference"):
            with kernels.use(mode):
                for _ in range(3):
                    assert kernels.kernel_for(kernels.SSD_SCAN, x) is None
                    assert kernels.kernel_for(kernels.GATED_NORM, x) is None
                    assert kernels.split_conv1d_kernel(x) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and len(set(lines)) == 6, lines  # one line per piece and mode
    assert all("PyTorch path" in line for line in lines)


def test_fused_refuses_float64_in_one_line(fresh_kernels):
    fresh_kernels.setitem(kernels._loaded, kernels.SSD_SCAN, (lambda *a, **k: None, ""))
    with kernels.use("fused"), pytest.raises(RuntimeError, match="float32/float16/bfloat16") as err:
        kernels.kernel_for(kernels.SSD_SCAN, torch.zeros(1, dtype=torch.float64))
    assert "\n" not in str(err.value)


def test_fused_mixer_without_causal_conv1d_falls_back_to_the_other_kernels(fresh_kernels):
    fresh_kernels.setitem(kernels._loaded, kernels.SPLIT_CONV1D, (None, kernels.NO_CAUSAL_CONV1D))
    with kernels.use("fused"):
        assert kernels.split_conv1d_kernel(torch.zeros(1)) is None
    fresh_kernels.setitem(kernels._loaded, kernels.SPLIT_CONV1D, (None, "mamba_ssm's Triton kernels, which do not import"))
    with kernels.use("fused"), pytest.raises(RuntimeError, match="mixer conv1d .* needs mamba_ssm"):
        kernels.split_conv1d_kernel(torch.zeros(1))


def _run_cases(selection: str, report_dir: Path) -> None:
    """tests/kernel_cases.py cases matching `selection` (pytest -k) in a fresh interpreter process.
    Whether they ran is read from the JUnit report (counts), not from pytest's console wording."""
    env = {**os.environ, "TRITON_INTERPRET": "1", kernels.ENV_VAR: "fused", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    junit = report_dir / "cases.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/kernel_cases.py", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
           "-k", selection, f"--junitxml={junit}"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"kernel cases '{selection}' failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    ran, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert ran > 0 and skipped == 0, f"kernel cases '{selection}': {ran} collected, {skipped} skipped"


_MISSING = triton_cpu.missing()


@pytest.mark.kernels
@pytest.mark.skipif(_MISSING is not None, reason=f"kernel tests need Triton's interpreter: {_MISSING}")
@pytest.mark.parametrize("selection", [
    "ssd_scan or gated_norm or broken_call_site",  # the scan and the norm; the mutation check
    "bidirectional_mixer",  # both fused mixer paths, both norm orders
    "trains_a_tiny_compressor",  # MAMBAMIA_KERNELS=fused training vs reference
], ids=["scan-norm-mutation", "mixer", "compressor-training"])
def test_kernel_cases_under_triton_interpreter(selection, tmp_path):
    _run_cases(selection, tmp_path)


def test_gpu_check_dry_run_checks_its_plan_and_the_real_run_refuses_cpu(tmp_path):
    """`python -m bench.gpu_check --dry-run` passes on a CPU machine; without --dry-run it fails
    (exit 2), never skips, when there is no CUDA device."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench.gpu_check", "--wheels", str(tmp_path)]
    dry = subprocess.run(cmd + ["--dry-run"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    report = json.loads(dry.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["problems"] == [] and report["wheels"] == 0
    assert report["steps"] == ["install", "gpu_tests", "kernel_tests", "bench_ssd", "bench_train"]
    real = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert real.returncode == 2 and json.loads(real.stdout.strip().splitlines()[-1])["ok"] is False


def test_bench_train_prints_its_ratio_on_cpu():
    """The smallest bench_train run: one tiny config, one round of one step per side."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "bench/bench_train.py", "--configs", "configs/tiny/stage1.yaml", "--rounds", "1",
           "--steps", "1", "--warmup", "0"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    (row,) = report["rows"]
    assert row["framework_tokens_per_s"] > 0 and row["bare_tokens_per_s"] > 0
    assert abs(row["ratio"] - row["framework_tokens_per_s"] / row["bare_tokens_per_s"]) < 2e-3


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_the_command_line_shows_the_kernel_choice_once_on_the_first_rank(rank, shown):
    """`mambamia` configures logging so the INFO line naming each kernel path reaches the log
    (Python drops INFO without a handler), on rank 0 only, once however often it is asked."""
    code = ("from trainer.cli import configure_logging; configure_logging()\n"
            "import torch; from model import kernels\n"
            "for _ in range(3): kernels.kernel_for(kernels.SSD_SCAN, torch.zeros(1))\n")
    env = {**os.environ, "RANK": rank, kernels.ENV_VAR: "reference"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[model.kernels]")]
    assert len(lines) == (1 if shown else 0), result.stderr
