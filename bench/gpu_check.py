"""The one prepared command for a lent GPU machine (torch and triton only, no network).

    bash scripts/build_gpu_wheels.sh          # here, once: the wheels that travel, into .whl/
    python -m bench.gpu_check                 # there, from the repository root, .whl/ carried along
    python -m bench.gpu_check --dry-run       # anywhere: the plan, with every step's command checked

Steps, each a subprocess with its own time limit inside an overall deadline (--budget-s, default
450 s: under 8 minutes on an H100/H200):
  install       pip install --no-index --find-links .whl: mamba-ssm (built without CUDA),
                deepspeed, transformers, einops, pytest and their dependencies
  gpu_tests     the `gpu`-marked tests (tests/test_ssd_gpu.py): fused vs reference on CUDA
  kernel_tests  tests/kernel_cases.py on CUDA (MAMBAMIA_KERNEL_DEVICE=cuda, MAMBAMIA_KERNELS=fused):
                fused vs reference vs a float64 oracle, the mutation check, fused training
  bench_ssd     bench/bench_ssd.py --device cuda, SSD section: our dispatch vs the kernel vs the
                PyTorch reference at long lengths
  bench_train   bench/bench_train.py --device cuda: a ~0.5B Qwen2-shaped model, bf16, ZeRO-2 and
                ZeRO-3 vs plain eager, tokens/s and MFU (target ZeRO-3 >= 0.85x of eager)
Without CUDA it fails at once (exit 2), it never skips. The last line is one JSON object: per step
its exit code, seconds and the step's own last JSON line (or its output's tail when it failed).

--dry-run (CPU): prints the plan, checks every file a step runs exists, collects the test steps
(pytest --collect-only), parses bench_train's arguments, runs bench_ssd --help, and says whether
the wheels are there; exit 0 when the plan is sound.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the GPU machine lacks (ENVIRONMENT.md); pip resolves their dependencies from the same folder.
WHEEL_REQUIREMENTS = ["mamba-ssm", "deepspeed", "transformers", "einops", "pytest", "webdataset", "jinja2",
                      "pyyaml", "safetensors"]


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    """Repository files the step runs (checked by --dry-run)."""


def plan(args) -> list[Step]:
    py = sys.executable
    pytest_cmd = [py, "-m", "pytest", "-o", "addopts=", "-q", "-rfE", "-p", "no:cacheprovider"]
    return [
        Step("install", [py, "-m", "pip", "install", "--no-index", "--find-links", str(args.wheels),
                         *WHEEL_REQUIREMENTS], 120),
        Step("gpu_tests", pytest_cmd + ["tests/test_ssd_gpu.py", "-m", "gpu"], 150,
             files=["tests/test_ssd_gpu.py"]),
        Step("kernel_tests", pytest_cmd + ["tests/kernel_cases.py"], 180,
             env={"MAMBAMIA_KERNEL_DEVICE": "cuda", "MAMBAMIA_KERNELS": "fused"},
             files=["tests/kernel_cases.py", "tests/support/triton_cpu.py"]),
        Step("bench_ssd", [py, "bench/bench_ssd.py", "--device", "cuda", "--skip", "mixer,compressor",
                           "--lengths", "4096,16384,65536", "--heads", "48", "--headdim", "64",
                           "--d-state", "128", "--chunk-size", "256", "--naive-max-len", "4096"], 120,
             files=["bench/bench_ssd.py"]),
        # Qwen2-0.5B's shape with its full vocabulary: 0.49B parameters.
        Step("bench_train", [py, "bench/bench_train.py", "--device", "cuda", "--rounds", "2", "--steps", "4",
                             "--llm-vocab", "151936"],
             240, files=["bench/bench_train.py", "configs/tiny/stage2.yaml"]),
    ]


def _env(step: Step) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            **step.env}


def _text(data: bytes | str | None) -> str:
    """A timed-out child's captured output (bytes even with text=True, in some Python versions)."""
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_step(step: Step, remaining_s: float, log_dir: Path) -> dict:
    limit = max(1, int(min(step.timeout_s, remaining_s)))
    print(f"[gpu_check] {step.name}: {' '.join(step.command)} (limit {limit} s)", flush=True)
    started = time.monotonic()
    try:
        result = subprocess.run(step.command, cwd=REPO_ROOT, env=_env(step), capture_output=True, text=True,
                                timeout=limit)
        rc, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as err:
        rc, output = 124, _text(err.stdout) + _text(err.stderr) + f"\n[gpu_check] killed after {limit} s"
    seconds = round(time.monotonic() - started, 1)
    (log_dir / f"{step.name}.log").write_text(output)
    summary = {"rc": rc, "seconds": seconds}
    if step.name.endswith("tests"):
        tail = [line for line in output.strip().splitlines() if line.strip()]
        summary["summary"] = tail[-1] if tail else ""
    else:
        summary["result"] = _last_json(output)
    if rc != 0:
        summary["tail"] = output[-3000:]
    print(f"[gpu_check] {step.name}: exit {rc} after {seconds} s", flush=True)
    return summary


def dry_run(args, steps: list[Step]) -> int:
    """Check the plan on any machine (see module doc); one JSON line, exit 0 when sound."""
    problems, checks = [], {}
    for step in steps:
        for name in step.files:
            if not (REPO_ROOT / name).is_file():
                problems.append(f"{step.name}: {name} is missing")
    for step in steps:
        if step.name.endswith("tests"):
            cmd = step.command + ["--collect-only"]
            env = {k: v for k, v in _env(step).items() if k != "MAMBAMIA_KERNEL_DEVICE"}
        elif step.name == "bench_ssd":
            cmd, env = [sys.executable, "bench/bench_ssd.py", "--help"], _env(step)
        else:
            continue
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        checks[step.name] = result.returncode
        # pytest exits 5 when it collected nothing, 0 otherwise; kernel cases need triton to import.
        if result.returncode != 0 and not (step.name == "kernel_tests" and _kernels_missing()):
            problems.append(f"{step.name}: `{' '.join(cmd)}` exited {result.returncode}: "
                            f"{(result.stdout + result.stderr).strip().splitlines()[-1:]}")
    sys.path.insert(0, str(REPO_ROOT))
    from bench.bench_train import parse_args as bench_train_args

    bench_train_args(next(s for s in steps if s.name == "bench_train").command[2:])
    wheels = sorted(p.name for p in Path(args.wheels).glob("*.whl")) if Path(args.wheels).is_dir() else []
    for step in steps:
        print(f"[gpu_check] would run {step.name} (limit {step.timeout_s} s): {' '.join(step.command)}"
              + (f"  env {step.env}" if step.env else ""))
    report = {"dry_run": True, "steps": [s.name for s in steps], "checks": checks, "problems": problems,
              "wheels": len(wheels), "wheels_note": "" if wheels else
              f"{args.wheels} has no wheels: run `bash scripts/build_gpu_wheels.sh` and carry the folder",
              "ok": not problems}
    print(json.dumps(report))
    return 0 if not problems else 1


def _kernels_missing() -> bool:
    return any(importlib.util.find_spec(n) is None for n in ("triton", "mamba_ssm", "einops"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="check the plan on any machine; run nothing on a GPU")
    parser.add_argument("--wheels", default=str(REPO_ROOT / ".whl"), help="folder of the wheels that travel")
    parser.add_argument("--budget-s", type=float, default=450.0, help="overall deadline for all steps")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out (e.g. install)")
    parser.add_argument("--log-dir", default=None, help="where each step's full output goes (default: $OUT or a temp folder)")
    args = parser.parse_args(argv)
    skip = set(args.skip.split(",")) - {""}
    steps = [s for s in plan(args) if s.name not in skip]
    if args.dry_run:
        return dry_run(args, steps)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: FAILED: torch sees no CUDA device; this check only runs on a GPU machine "
              "(use --dry-run elsewhere)", file=sys.stderr)
        print(json.dumps({"ok": False, "error": "no CUDA device"}))
        return 2
    if "install" not in skip and not any(Path(args.wheels).glob("*.whl")):
        print(f"gpu_check: FAILED: no wheels in {args.wheels}; build them with `bash scripts/build_gpu_wheels.sh` "
              "and carry the folder (or --skip install when the packages are installed)", file=sys.stderr)
        print(json.dumps({"ok": False, "error": f"no wheels in {args.wheels}"}))
        return 2
    log_dir = Path(args.log_dir or os.environ.get("OUT") or "gpu_check_logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    results = {}
    for step in steps:
        remaining = deadline - time.monotonic()
        if remaining < 5:
            results[step.name] = {"rc": 124, "seconds": 0.0, "tail": "not started: the overall budget ran out"}
            continue
        results[step.name] = run_step(step, remaining, log_dir)
        if step.name == "install" and results[step.name]["rc"] != 0:
            break  # nothing after it can run
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": results,
              "ok": len(results) == len(steps) and all(r["rc"] == 0 for r in results.values())}
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
