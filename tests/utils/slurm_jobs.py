"""Submit slurm/*.sh with sbatch and watch the jobs: shared by test_slurm.py and test_multinode.py.

`conf` selects the cluster: None = the one-node cluster of .ci/setup_slurm.sh (SLURM's default
config), a path = another controller (.ci/setup_slurm_multinode.sh's). Assertions read exit codes
from `scontrol show job` and from the ranks' own lines in the job log (slurm/rank.sh), never
srun's wording.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# Variables a job must not inherit from the pytest process: the scripts' own inputs, and a
# rendezvous an in-process test may have left in os.environ (the scripts pass MASTER_ADDR through).
_NOT_INHERITED = ("CONFIG", "RUN_DIR", "EXPORT_DIR", "INIT_FROM", "EXTRA", "MAX_ATTEMPTS",
                  "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_CONF")
# "[rank 1 on node2] exit code 85 at 02:10:30": slurm/rank.sh's last line for each rank.
RANK_EXIT = re.compile(r"\[rank (\d+) on (\S+)\] exit code (\d+) at (\d\d:\d\d:\d\d)")

_submitted: list[tuple[str, str | None]] = []


def job_env(conf: str | None = None, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if conf is not None:
        env["SLURM_CONF"] = conf
    env.update(overrides)
    return env


def _slurm_env(conf: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    if conf is not None:
        env["SLURM_CONF"] = conf
    return env


def sbatch(script: str, log: Path, env: dict[str, str], *options: str, args: tuple[str, ...] = ()) -> str:
    out = subprocess.run(["sbatch", "--parsable", f"--output={log}", f"--error={log}", *options,
                          str(SLURM / script), *args],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"sbatch {script} failed: {out.stderr}"
    job_id = out.stdout.strip().split(";")[0]
    _submitted.append((job_id, env.get("SLURM_CONF")))
    return job_id


def cancel(*job_ids: str, conf: str | None = None) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], env=_slurm_env(conf), capture_output=True, timeout=30)


def cancel_submitted() -> None:
    """Cancel every job submitted so far (a failed test must not hold nodes for the next ones)."""
    confs = {conf for _, conf in _submitted}
    for conf in confs:
        cancel(*(job for job, c in _submitted if c == conf), conf=conf)
    _submitted.clear()


def job_info(job_id: str, conf: str | None = None) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=_slurm_env(conf),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def logs(*paths: Path) -> str:
    parts = []
    for path in paths:
        for p in sorted(path.parent.glob(path.name)):
            parts.append(f"----- {p}\n{p.read_text(errors='replace')[-6000:]}")
    return "\n".join(parts) or "(no job log written)"


def wait_done(job_id: str, log_paths: list[Path], timeout: float, conf: str | None = None) -> dict[str, str]:
    """Poll until the job reaches a terminal state; on timeout cancel it and fail with its logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id, conf)
        if info["JobState"] in TERMINAL:
            return info
        if info.get("Reason") == "DependencyNeverSatisfied":  # the job it waits for failed
            break
        time.sleep(1)
    cancel(job_id, conf=conf)
    pytest.fail(f"job {job_id} did not finish ({info['JobState']}, reason {info.get('Reason')}, "
                f"timeout {timeout:.0f} s)\n{logs(*log_paths)}")


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss as metrics.jsonl last recorded it."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def rank_exits(text: str) -> list[tuple[int, str, int, str]]:
    """(rank, host, exit code, HH:MM:SS) of every rank exit in a log, in order."""
    return [(int(r), host, int(code), at) for r, host, code, at in RANK_EXIT.findall(text)]
