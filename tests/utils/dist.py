"""Launch a script or module under torchrun with N CPU processes (gloo) on a free port.

    result = run_torchrun("tests.test_train", [str(spec)], nproc=2, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr

A launch costs 15-30 s of wall time on a 2-core machine, so tests group their checks into as few
launches as they can. The child processes run from the repository root with one intra-op thread
each and DeepSpeed on its CPU accelerator.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from trainer.dist import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_torchrun(script_or_module: str, args: list[str], *, nproc: int = 2,
                 env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`script_or_module` ending in `.py` is a path; anything else is run with `-m`."""
    target = [script_or_module] if script_or_module.endswith(".py") else ["-m", script_or_module]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target, *args]
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                 "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                 **(env or {})}
    try:
        return subprocess.run(cmd, cwd=REPO_ROOT, env=child_env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        # Keep what the ranks printed: a hang is only debuggable from its last lines.
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        raise AssertionError(f"torchrun {script_or_module} timed out after {timeout} s; output tail:\n"
                             f"{out[-4000:]}") from None
