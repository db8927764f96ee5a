"""The slurm/*.sh launchers submitted with sbatch to a real one-node SLURM (.ci/setup_slurm.sh).

The jobs run the real `mambamia` commands on the tiny configs with 2 CPU ranks (gloo):
- a tiny stage 1 completes and exports, and stage 2 submitted with --dependency=afterok on it
  starts from that export;
- the same stage 1 sent SIGUSR1 (`scancel --signal=USR1 --batch`, what `--signal=B:USR1@N` does
  before a time limit) checkpoints, is requeued by the script, resumes from `latest` and ends with
  the losses of the uninterrupted run, step for step;
- a real error is not requeued; the attempt limit per checkpoint step stops a requeue loop;
- a 2-task job array converts a small set of mp4 files into shards and the last task writes an
  index.json that matches the shards on disk.
The jobs of one test are submitted together, so SLURM overlaps a requeue's wait with other work.
On failure the assertion message carries the job logs.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.test_train import make_tiny_root
from tests.utils.slurm_jobs import (REPO, SLURM, TERMINAL, cancel_submitted, job_env, job_info, logs,
                                    losses, rank_exits, sbatch, wait_done)

# A CPU allocation on the CI node: overrides the GPU defaults in the scripts' #SBATCH lines.
# --time=15: the scripts ask for SIGUSR1 600 s before the limit, which must not fall at the start.
CPU_RANKS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
             "--mem=4G", "--time=15"]
STEPS = 24  # long enough that the signal lands mid-run, short enough for CI
TRAIN_EXTRA = f"schedule.total_steps={STEPS} checkpoint.every_steps=0 validation.every_steps=0"

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(shutil.which("sbatch") is None,
                                 reason="sbatch not found (bash .ci/setup_slurm.sh installs SLURM)")]


@pytest.fixture(scope="module", autouse=True)
def cancel_leftovers():
    """A failed assertion must not leave jobs holding the node for the tests that follow."""
    yield
    cancel_submitted()


# ------------------------------------------------------------------------------------------------
# Training stages


@pytest.fixture(scope="module")
def stage_jobs(tiny_assets, tmp_path_factory):
    """Submit three jobs at once: B (stage 1, signalled), A (stage 1, reference), C (stage 2 after A)."""
    tmp = tmp_path_factory.mktemp("slurm_stages")
    tiny = make_tiny_root(tmp / "tiny", Path(tiny_assets["llm"]))
    stage1, stage2 = REPO / "configs/tiny/stage1.yaml", REPO / "configs/tiny/stage2.yaml"
    export_a = tiny / "exports" / "stage1"
    jobs: dict[str, dict] = {}

    def submit(name: str, script: str, *options: str, **env: str) -> None:
        log = tmp / f"{name}.log"
        job_id = sbatch(script, log, job_env(MAMBAMIA_TINY=str(tiny), **env), *CPU_RANKS, *options)
        jobs[name] = {"id": job_id, "log": log, "run_dir": Path(env["RUN_DIR"])}

    submit("interrupted", "stage1.sh", CONFIG=str(stage1), RUN_DIR=str(tmp / "b"), EXPORT_DIR="",
           EXTRA=TRAIN_EXTRA)
    submit("reference", "stage1.sh", CONFIG=str(stage1), RUN_DIR=str(tmp / "a"),
           EXPORT_DIR=str(export_a), EXTRA=TRAIN_EXTRA)
    submit("stage2", "stage2.sh", f"--dependency=afterok:{jobs['reference']['id']}",
           CONFIG=str(stage2), RUN_DIR=str(tmp / "c"), INIT_FROM=str(export_a), EXPORT_DIR="",
           EXTRA="schedule.total_steps=2 checkpoint.every_steps=0 validation.every_steps=0")
    every_log = [job["log"] for job in jobs.values()]

    # The early warning arrives while the job trains: once its first step is logged.
    b = jobs["interrupted"]
    metrics = b["run_dir"] / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):
        if time.monotonic() > deadline or job_info(b["id"])["JobState"] in TERMINAL:
            subprocess.run(["scancel", *(job["id"] for job in jobs.values())], timeout=30)
            pytest.fail(f"job {b['id']} never logged a training step\n{logs(*every_log)}")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", b["id"]], check=True, timeout=30)

    for job in jobs.values():
        job["info"] = wait_done(job["id"], every_log, timeout=600)
        job["text"] = job["log"].read_text(errors="replace")
    jobs["all_logs"] = logs(*every_log)
    jobs["export_a"] = export_a
    return jobs


def test_stage_completes_under_sbatch_and_exports(stage_jobs):
    a = stage_jobs["reference"]
    assert a["info"]["JobState"] == "COMPLETED" and a["info"]["ExitCode"] == "0:0", stage_jobs["all_logs"]
    assert a["info"]["Restarts"] == "0"
    assert "2 process(es)" in a["text"], a["text"]  # both ranks joined one gloo group
    assert sorted(losses(a["run_dir"])) == list(range(1, STEPS + 1))
    assert (a["run_dir"] / "checkpoints" / "latest").read_text().strip() == str(STEPS)
    export = Path(re.search(r"export \S+ -> (\S+)", a["text"]).group(1))
    assert (export / "mambamia.json").is_file() and (export / "llm").is_dir(), a["text"]


def test_signal_checkpoints_requeues_and_resumes_to_the_same_losses(stage_jobs):
    a, b = stage_jobs["reference"], stage_jobs["interrupted"]
    assert b["info"]["JobState"] == "COMPLETED", stage_jobs["all_logs"]
    assert int(b["info"]["Restarts"]) == 1, b["text"]
    assert "got SIGUSR1" in b["text"] and "requeueing job" in b["text"], b["text"]
    # Both ranks stopped on the request: each rank's own exit line (slurm/rank.sh) of the first
    # attempt says 85 (checkpointed, requeue me); the second attempt's say 0.
    exits = rank_exits(b["text"])
    assert sorted((rank, code) for rank, _, code, _ in exits[:2]) == [(0, 85), (1, 85)], b["text"]
    assert sorted((rank, code) for rank, _, code, _ in exits[2:]) == [(0, 0), (1, 0)], b["text"]
    resumed = re.search(r"resumed \S+ at step (\d+)", b["text"])
    assert resumed and 1 <= int(resumed.group(1)) < STEPS, b["text"]
    # The second attempt started from the checkpoint the first one wrote on the signal.
    assert re.search(rf"attempt 1, checkpoint step {resumed.group(1)},", b["text"]), b["text"]
    want, got = losses(a["run_dir"]), losses(b["run_dir"])
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), (step, got[step], want[step])


def test_stage2_waits_for_stage1_and_starts_from_its_export(stage_jobs):
    a, c = stage_jobs["reference"], stage_jobs["stage2"]
    assert c["info"]["JobState"] == "COMPLETED", stage_jobs["all_logs"]
    assert c["info"]["StartTime"] >= a["info"]["EndTime"]  # ISO timestamps sort as text
    assert sorted(losses(c["run_dir"])) == [1, 2]
    config = (c["run_dir"] / "config.yaml").read_text()
    assert f"init_from: {stage_jobs['export_a']}" in config, config


def test_real_error_is_not_requeued(tiny_assets, tmp_path):
    log = tmp_path / "bad.log"
    job_id = sbatch("stage1.sh", log, job_env(MAMBAMIA_TINY=str(tmp_path), RUN_DIR=str(tmp_path / "run"),
                                              CONFIG=str(REPO / "configs/tiny/stage1.yaml"),
                                              EXTRA="schedule.total_steps=not-a-number"), *CPU_RANKS)
    info = wait_done(job_id, [log], timeout=300)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text
    assert "schedule.total_steps" in text and "not requeued" in text, text


# ------------------------------------------------------------------------------------------------
# Requeue policy (no SLURM needed: the script's local mode with a stand-in that exits 85)


def run_stage_locally(tmp_path: Path, run_dir: Path, **env: str) -> subprocess.CompletedProcess:
    # A trainer preempted before it could save: every attempt ends at the same step.
    stand_in = tmp_path / "preempted_trainer.sh"
    stand_in.write_text("#!/bin/sh\nexit 85\n")
    stand_in.chmod(0o755)
    return subprocess.run(["bash", str(SLURM / "stage1.sh")], capture_output=True, text=True, timeout=60,
                          env=job_env(MAMBAMIA=str(stand_in), CONFIG=str(REPO / "configs/tiny/stage1.yaml"),
                                      RUN_DIR=str(run_dir), EXPORT_DIR="", NPROC="1", **env))


def test_attempts_at_the_same_step_are_counted_and_capped(tmp_path):
    run_dir = tmp_path / "run"
    for attempt in (1, 2):
        out = run_stage_locally(tmp_path, run_dir, MAX_ATTEMPTS="2")
        assert out.returncode == 85, out.stdout + out.stderr
        assert (run_dir / "slurm_attempts").read_text().split() == ["none", str(attempt)]
    out = run_stage_locally(tmp_path, run_dir, MAX_ATTEMPTS="2")
    assert out.returncode == 1 and "giving up: 2 attempts" in out.stdout, out.stdout + out.stderr
    # A newer checkpoint is progress: the count starts again.
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("7\n")
    out = run_stage_locally(tmp_path, run_dir, MAX_ATTEMPTS="2")
    assert out.returncode == 85, out.stdout + out.stderr
    assert (run_dir / "slurm_attempts").read_text().split() == ["7", "1"]


# ------------------------------------------------------------------------------------------------
# Conversion as a job array


def test_job_array_converts_videos_into_shards(tiny_assets, tmp_path):
    from data.synthetic import moving_square_frames, write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    annotations = []
    for i in range(4):
        write_video(videos / f"clip{i}.mp4", moving_square_frames(6, 32, 32, seed=i), fps=3)
        annotations.append({"video": f"clip{i}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": f"square {i}"}]})
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    out = tmp_path / "shards"
    log = tmp_path / "convert-*.log"
    job_id = sbatch("extract.sh", tmp_path / "convert-%a.log", job_env(), "--array=0-1", "--nodes=1",
                    "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G",
                    "--time=15",
                    args=("convert", "--annotations", str(tmp_path / "ann.json"), "--videos", str(videos),
                          "--encoder", str(tiny_assets["vision"]), "--fps", "2", "--max-frames", "4",
                          "--shard-samples", "1", "--no-progress", "--out", str(out)))
    for task in (0, 1):
        info = wait_done(f"{job_id}_{task}", [log], timeout=300)
        assert info["JobState"] == "COMPLETED", logs(log)
    text = logs(log)
    assert f"all 2 ranks done: writing {out}/index.json" in text, text

    index = json.loads((out / "index.json").read_text())
    tars = sorted(out.glob("*.tar"))
    # Both array tasks wrote their own shards, and the index describes exactly what is on disk.
    assert {re.search(r"-r(\d+)-", p.name).group(1) for p in tars} == {"00000", "00001"}
    assert sorted(s["name"] for s in index["shards"]) == [p.name for p in tars]
    seen = []
    for shard in index["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
        with tarfile.open(out / shard["name"]) as tar:
            names = tar.getnames()
            metas = [json.load(tar.extractfile(n)) for n in names if n.endswith(".json")]
        assert shard["samples"] == len(metas) == sum(n.endswith(".features.npy") for n in names)
        seen += [Path(m["source"]).name for m in metas]
    assert index["total_samples"] == 4 and sorted(seen) == [f"clip{i}.mp4" for i in range(4)]
