"""The end-to-end demo: a long-video task learned by tiny models on a laptop CPU.

    mambamia demo                       # on 2 idle CPU cores well under 15 minutes; ./demo_out
    mambamia demo --quick --out /tmp/d  # a one-minute smoke run of every step (numbers meaningless)

What it does, each step through the same commands a cluster user runs:
 1. builds a tiny tokenizer, Qwen2 LLM and SigLIP vision encoder locally (`trainer.tiny`);
 2. renders the needle task (`data.needle`): two-minute mp4 videos of moving grey discs with one
    brief full-frame flash of colour, and the question "what colour was it?" (chance 25%);
 3. `mambamia convert`: decodes the videos, extracts SigLIP features, writes shards;
 4. `mambamia train` stage 1 (compressor + projector, LLM frozen), DeepSpeed ZeRO-3, 2 processes;
 5. `mambamia export`, then stage 2 (everything trains), interrupted by SIGUSR1 half-way (the
    trainer checkpoints and exits 85, as on a SLURM preemption) and started again (it resumes);
 6. `mambamia export` and `mambamia eval` on held-out videos: accuracy against chance, visual
    tokens per video, and how often frame selection kept a needle frame;
 7. the same stage 2 for two ablations started from the stage-1 export: uniform frame sampling
    instead of Δ-based selection, and average pooling instead of the Mamba spatial stage;
 8. a PNG of both stages' training curves, TensorBoard logs, and `demo_report.json`.

Every subprocess writes its output to `OUT/logs/`; the console shows one progress bar per step.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "tiny"


@dataclass(kw_only=True)
class DemoPlan:
    out: Path
    videos: int
    """Training videos (the held-out set is half as many)."""
    duration_s: float
    """Length of every video."""
    frames: int
    """Frames sampled per video by `mambamia convert`."""
    keyframes: int
    """Frames the compressor keeps (Δ-based or uniform): the visual token budget."""
    stage1_steps: int
    stage2_steps: int
    ablations: bool
    zero_stage: int
    seed: int

    @property
    def eval_videos(self) -> int:
        return max(4, self.videos // 2)


def _parse_args(argv: list[str]) -> DemoPlan:
    p = argparse.ArgumentParser(prog="mambamia demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--videos", type=int, default=None, help="training videos (default 64, quick 8)")
    p.add_argument("--steps", type=int, default=None,
                   help="stage-2 optimizer steps; stage 1 gets half (default 120, quick 6)")
    p.add_argument("--quick", action="store_true",
                   help="shortest run of every step: few short videos, a handful of steps")
    p.add_argument("--no-ablations", action="store_true", help="skip the uniform / avgpool runs")
    p.add_argument("--zero-stage", type=int, choices=[1, 2, 3], default=3,
                   help="DeepSpeed ZeRO stage of both training stages (default 3)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    videos = args.videos if args.videos is not None else (8 if args.quick else 64)
    steps = args.steps if args.steps is not None else (6 if args.quick else 120)
    if videos < 4 or steps < 2:
        p.error(f"--videos must be >= 4 and --steps >= 2, got {videos} and {steps}")
    return DemoPlan(out=Path(args.out).resolve(), videos=videos,
                    duration_s=30.0 if args.quick else 120.0, frames=8 if args.quick else 32,
                    keyframes=4 if args.quick else 8, stage1_steps=max(2, steps // 2),
                    stage2_steps=steps, ablations=not args.no_ablations,
                    zero_stage=args.zero_stage, seed=args.seed)


class StepFailed(RuntimeError):
    pass


# Off a terminal (CI logs, `| tee`) every redraw is a new line: redraw at most this often there.
LOG_REFRESH_S = 30.0


def _bar(desc: str, total: int | None, unit: str):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=f"{desc:<34}", unit=unit, dynamic_ncols=True, leave=True,
                mininterval=0.1 if tty else LOG_REFRESH_S,
                bar_format=None if total else "{desc} {elapsed} {postfix}")


def _tick(bar, n: int | None = None, postfix: str | None = None) -> None:
    """Update a bar's position/postfix and redraw it: always on a terminal, sparsely otherwise."""
    if n is not None:
        bar.n = n
    if postfix is not None:
        bar.set_postfix_str(postfix, refresh=False)
    now = time.time()
    if sys.stderr.isatty() or now - getattr(bar, "_demo_drawn", 0.0) >= LOG_REFRESH_S:
        bar._demo_drawn = now
        bar.refresh()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # one intra-op thread per process: the demo's training runs two processes on two cores
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _fail(desc: str, log: Path, why: str) -> StepFailed:
    tail = log.read_text(errors="replace").splitlines()[-25:] if log.is_file() else []
    return StepFailed(f"{desc}: {why}; see {log}\n" + "\n".join("    " + line for line in tail))


def run_commands(desc: str, jobs: list[tuple[list[str], Path]]) -> None:
    """`mambamia ...` commands side by side in subprocesses (output to their logs), with an
    elapsed-time bar; every one must exit 0."""
    bar = _bar(desc, None, "s")
    procs = []
    for args, log in jobs:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], stdout=out,
                                          stderr=subprocess.STDOUT, env=_env(), cwd=REPO))
    bar._demo_drawn = time.time()  # tqdm drew it on creation
    while any(p.poll() is None for p in procs):
        _tick(bar)
        time.sleep(0.5)
    bar.close()
    for proc, (_, log) in zip(procs, jobs):
        if proc.returncode != 0:
            raise _fail(desc, log, f"exit code {proc.returncode}")


def run_command(desc: str, args: list[str], log: Path) -> None:
    run_commands(desc, [(args, log)])


def _last_step(metrics: Path) -> tuple[int, float | None]:
    from trainer.plots import curve, read_metrics

    if not metrics.is_file():
        return 0, None
    steps, losses = curve(read_metrics(metrics), "loss")
    return (steps[-1], losses[-1]) if steps else (0, None)


def launch_training(config: Path, overrides: list[str], log: Path, *, nproc: int = 2) -> list[subprocess.Popen]:
    """`mambamia train` as `nproc` processes of one gloo group, the environment torchrun would set.

    Launching the workers directly (not through torchrun) lets the demo signal each worker and
    read each worker's own exit code: torchrun neither forwards SIGUSR1 nor passes code 85 on.
    """
    from trainer.dist import free_port

    log.parent.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        env = _env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        out = open(log if rank == 0 else log.with_suffix(f".rank{rank}.log"), "a")
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", str(config), *overrides],
                                      stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO))
        out.close()
    return procs


def train(desc: str, config: Path, overrides: list[str], run_dir: Path, log: Path, total: int, *,
          interrupt_at: int | None = None) -> list[int]:
    """Run one stage to the end with a step bar; with `interrupt_at`, send SIGUSR1 to every worker
    once that step is logged and return the workers' exit codes instead of requiring 0."""
    procs = launch_training(config, [f"run_dir={run_dir}", *overrides], log)
    metrics = run_dir / "metrics.jsonl"
    bar = _bar(desc, total, "step")
    bar._demo_drawn = time.time()
    signalled = False
    try:
        while any(p.poll() is None for p in procs):
            step, loss = _last_step(metrics)
            _tick(bar, step, "" if loss is None else f"loss {loss:.3f}")
            if interrupt_at is not None and step >= interrupt_at and not signalled:
                for p in procs:
                    if p.poll() is None:
                        os.kill(p.pid, signal.SIGUSR1)
                signalled = True
                bar.set_postfix_str(f"SIGUSR1 sent at step {step}")
            if any(p.poll() not in (None, 0) for p in procs) and not signalled:
                time.sleep(3)  # give the peer a moment to notice before stopping it
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.2)
    finally:
        codes = [p.wait() for p in procs]
        bar.n = _last_step(metrics)[0]
        bar.close()
    if interrupt_at is not None:
        return codes
    if any(codes):
        raise _fail(desc, log, f"worker exit codes {codes}")
    return codes


def _render(plan: DemoPlan, videos_dir: Path) -> dict[str, dict[str, Path]]:
    from data.needle import NeedleConfig, write_needle_task

    spacing = plan.duration_s / plan.frames
    # The needle spans about frames/keyframes sampled frames: uniform sampling then always keeps
    # one of them, a selector keeping frames at random keeps one most of the time. Shorter needles
    # (one sampled frame) were not learned in a few hundred steps by these tiny models: most
    # training videos then reach the LLM without the needle and the gradient is mostly noise.
    # The needle fills the whole frame: a 60% square among moving discs was linearly readable
    # from the needle frame's features, yet diluted among the other kept frames' tokens the tiny
    # models stayed at chance; a full-frame flash moves every patch and they start to pick it up.
    common = dict(duration_s=plan.duration_s, fps=2.0, size=64, needle_side=1.0,
                  needle_s=round(1.05 * spacing * plan.frames / plan.keyframes, 3))
    return {
        "train": write_needle_task(videos_dir, NeedleConfig(videos=plan.videos, seed=plan.seed, **common), split="train"),
        "eval": write_needle_task(videos_dir, NeedleConfig(videos=plan.eval_videos, seed=plan.seed + 1, **common), split="eval"),
    }


def _needle_kept(report: dict, shards: Path, truth_file: Path) -> float:
    """Fraction of held-out videos where the compressor kept at least one frame showing the needle."""
    from trainer.evaluate import iter_records

    truth = {v["video_id"]: v for v in json.loads(truth_file.read_text())["videos"]}
    hits = []
    for record in iter_records(shards, rank=0, world_size=1):
        t = truth[record.items[0].id]
        times = record.meta["timestamps"]
        kept = report["videos"][record.key]["kept_frames"]
        hits.append(any(t["start_s"] <= times[i] < t["end_s"] for i in kept))
    return sum(hits) / len(hits)


def _evaluate(name: str, export: Path, plan: DemoPlan, logs: Path, truth: Path) -> dict:
    shards = plan.out / "shards" / "val"
    out = plan.out / "eval" / f"{name}.json"
    run_command(f"eval {name}", ["eval", str(export), str(shards), "--out", str(out)], logs / f"eval_{name}.log")
    report = json.loads(out.read_text())
    return {"variant": name, "accuracy": report["accuracy"], "correct": report["correct"],
            "scored": report["scored"], "chance": report["chance"],
            "visual_tokens_mean": report["visual_tokens"]["mean"],
            "visual_tokens_max": report["visual_tokens"]["max"],
            "needle_frame_kept": _needle_kept(report, shards, truth), "report": str(out)}


def _summary_lines(plan: DemoPlan, results: list[dict], interruption: dict, paths: dict[str, str],
                   seconds: float) -> list[str]:
    lines = ["", "=" * 78, f"MambaMia demo finished in {seconds / 60:.1f} min", "",
             f"task: {plan.videos} training / {plan.eval_videos} held-out videos of {plan.duration_s:.0f} s, "
             f"{plan.frames} frames sampled, {plan.keyframes} kept; question: the needle's colour", "",
             f"{'variant':<22}{'accuracy':>10}{'chance':>8}{'tokens/video':>14}{'needle kept':>13}"]
    for r in results:
        tokens = f"{r['visual_tokens_mean']:.0f} (max {r['visual_tokens_max']})"
        lines.append(f"{r['variant']:<22}{100 * r['accuracy']:>9.1f}%{100 * r['chance']:>7.0f}%"
                     f"{tokens:>14}{100 * r['needle_frame_kept']:>12.0f}%")
    lines += ["", f"stage 2: SIGUSR1 after step {interruption['sent_after_step']} -> checkpoint at step "
              f"{interruption['checkpoint_step']}, workers exited {interruption['exit_codes']} -> resumed "
              f"to step {interruption['resumed_to']}"]
    lines += ["", "what ran: tiny tokenizer/LLM/SigLIP built locally -> needle videos rendered -> "
              f"mambamia convert -> stage 1 (ZeRO-{plan.zero_stage}, 2 processes) -> export -> stage 2 interrupted by "
              "SIGUSR1, resumed -> export -> eval" + (" -> ablations (both stages each)" if plan.ablations else ""), ""]
    lines += [f"  {name:<22}{path}" for name, path in paths.items()]
    lines += ["", "your own videos through the same steps: mambamia tiny WORKSPACE --videos DIR --train "
              "train.json --test test.json (README: Your own videos, tiny scale)"]
    lines.append("=" * 78)
    return lines


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _stage2_with_interruption(plan: DemoPlan, common: list[str], logs: Path) -> dict:
    """Stage 2 stopped by SIGUSR1 half-way, then started again in the same folder."""
    from trainer.signals import REQUEUE_EXIT_CODE

    run_dir = plan.out / "runs" / "stage2"
    over = [*common, f"schedule.total_steps={plan.stage2_steps}"]
    stop_at = max(1, plan.stage2_steps // 2)
    codes = train("train stage 2 (until SIGUSR1)", CONFIGS / "stage2.yaml", over, run_dir,
                  logs / "train_stage2.log", plan.stage2_steps, interrupt_at=stop_at)
    if codes != [REQUEUE_EXIT_CODE] * len(codes):
        raise _fail("train stage 2", logs / "train_stage2.log",
                    f"expected every worker to checkpoint and exit {REQUEUE_EXIT_CODE} on SIGUSR1, got {codes}")
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip()) \
        if (run_dir / "checkpoints" / "latest").is_file() else None
    train("train stage 2 (resumed)", CONFIGS / "stage2.yaml", over, run_dir,
          logs / "train_stage2_resumed.log", plan.stage2_steps)
    return {"signal": "SIGUSR1", "sent_after_step": stop_at, "exit_codes": codes,
            "checkpoint_step": stopped, "resumed_to": _last_step(run_dir / "metrics.jsonl")[0]}


def _train_variant(name: str, plan: DemoPlan, common: list[str], logs: Path) -> Path:
    """An ablation through the same two stages as MambaMia (no interruption); returns its export."""
    root = plan.out / "ablations" / name
    train(f"{name}: stage 1", CONFIGS / "stage1.yaml", [*common, f"schedule.total_steps={plan.stage1_steps}"],
          root / "runs" / "stage1", logs / f"{name}_stage1.log", plan.stage1_steps)
    run_command(f"{name}: export stage 1", ["export", str(root / "runs" / "stage1"), str(root / "exports" / "stage1")],
                logs / f"{name}_export_stage1.log")
    train(f"{name}: stage 2", CONFIGS / "stage2.yaml",
          [*common, f"schedule.total_steps={plan.stage2_steps}", f"init_from={root / 'exports' / 'stage1'}"],
          root / "runs" / "stage2", logs / f"{name}_stage2.log", plan.stage2_steps)
    run_command(f"{name}: export stage 2", ["export", str(root / "runs" / "stage2"), str(root / "exports" / "stage2")],
                logs / f"{name}_export_stage2.log")
    return root / "exports" / "stage2"


def run_demo(plan: DemoPlan) -> dict:
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from trainer.plots import plot_runs
    from trainer.tiny import build_llm, build_tokenizer, build_vision_encoder, warm_up_llm

    start = time.time()
    out, logs = plan.out, plan.out / "logs"
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MAMBAMIA_TINY"] = str(out)  # the tiny configs find llm/, shards/, exports/ there
    tqdm.write(f"[demo] output folder: {out}")
    hf_logging.disable_progress_bar()  # one bar per demo step, not one per saved file

    bar = _bar("build tiny tokenizer, LLM, SigLIP", 3, "model")
    tokenizer = build_tokenizer(out / "tokenizer")
    bar.update()
    build_llm(out / "llm", tokenizer, seed=plan.seed)
    # A real run starts from a pretrained LLM: a short text warm-up teaches the tiny one the chat
    # template, so that stage 1 (LLM frozen) has an LLM the visual tokens can steer.
    warm_up_llm(out / "llm", steps=10 if plan.stage2_steps < 20 else 60, seed=plan.seed)
    bar.update()
    build_vision_encoder(out / "vision", seed=plan.seed)
    bar.update()
    bar.close()

    tasks = _render(plan, out / "videos")
    convert = ["convert", "--videos", str(out / "videos"), "--encoder", str(out / "vision"),
               "--fps", f"{plan.frames / plan.duration_s:.6f}", "--max-frames", str(plan.frames), "--merge"]
    run_commands("convert videos -> feature shards", [
        ([*convert, "--annotations", str(tasks["train"]["conversations"]), "--out", str(out / "shards" / "train")],
         logs / "convert_train.log"),
        ([*convert, "--annotations", str(tasks["eval"]["mcq"]), "--out", str(out / "shards" / "val")],
         logs / "convert_val.log")])

    # the freshly initialised compressor and projector learn at 10x the LLM's rate: at one shared
    # rate (3e-3) stage 2 learned the answer format but not the answer
    common = [f"data.max_frames={plan.frames}", f"model.compressor.keyframes={plan.keyframes}", "optimizer.lr=1e-3",
              "optimizer.group_lr.compressor=1e-2", "optimizer.group_lr.projector=1e-2",
              f"parallel.zero_stage={plan.zero_stage}", f"seed={plan.seed}", "logging.progress_bar=false",
              f"validation.every_steps={plan.stage2_steps // 4 if plan.stage2_steps >= 8 else 0}",
              f"checkpoint.every_steps={10 * plan.stage2_steps}"]
    train("train stage 1", CONFIGS / "stage1.yaml", [*common, f"schedule.total_steps={plan.stage1_steps}"],
          out / "runs" / "stage1", logs / "train_stage1.log", plan.stage1_steps)
    run_command("export stage 1", ["export", str(out / "runs" / "stage1"), str(out / "exports" / "stage1")],
                logs / "export_stage1.log")
    interruption = _stage2_with_interruption(plan, common, logs)
    run_command("export stage 2", ["export", str(out / "runs" / "stage2"), str(out / "exports" / "stage2")],
                logs / "export_stage2.log")
    truth = tasks["eval"]["truth"]
    results = [_evaluate("mambamia", out / "exports" / "stage2", plan, logs, truth)]
    if plan.ablations:
        for name, change in (("uniform_sampling", "model.compressor.frame_selection=uniform"),
                             ("avgpool", "model.compressor.kind=avgpool")):
            export = _train_variant(name, plan, [*common, change], logs)
            results.append(_evaluate(name, export, plan, logs, truth))

    stage2 = "stage 2 (all trainable)"
    png = plot_runs({"stage 1 (LLM frozen)": out / "runs" / "stage1", stage2: out / "runs" / "stage2"},
                    out / "plots" / "training_curves.png",
                    events={stage2: [(interruption["checkpoint_step"], "SIGUSR1: checkpoint, exit 85, resume")]})
    paths = {"shards": str(out / "shards"), "runs": str(out / "runs"), "exports": str(out / "exports"),
             "eval reports": str(out / "eval"), "training curves": str(png),
             "tensorboard": f"tensorboard --logdir {out / 'runs'}", "logs": str(logs),
             "demo report": str(out / "demo_report.json")}
    seconds = time.time() - start
    report = {"plan": {**asdict(plan), "out": str(plan.out), "eval_videos": plan.eval_videos},
              "results": results, "interruption": interruption, "paths": paths, "seconds": round(seconds, 1)}
    _write_json(out / "demo_report.json", report)
    print("\n".join(_summary_lines(plan, results, interruption, paths, seconds)))
    return report


def main(argv: list[str]) -> int:
    plan = _parse_args(argv)
    try:
        run_demo(plan)
    except StepFailed as err:
        print(f"\n[demo] failed: {err}", file=sys.stderr)
        return 1
    return 0
