"""A synthetic long-video task that can only be solved by looking: the colour of a brief "needle".

Each video is a few minutes of grey discs drifting and bouncing over a dark, slowly shifting
background; once, at a random time, a large coloured square (the needle) shows for a few seconds.
The question asks its colour. The four colours are balanced across videos and the options are
always listed in the same order, so the text alone carries no information (chance is 25%) while a
model that sees the needle frames, and keeps them through frame selection, can answer every item.
The needle lasts only a few sampled frames: uniform subsampling misses it some of the time, which
is the gap Δ-based keyframe selection is meant to close.

    from data.needle import NeedleConfig, write_needle_task
    write_needle_task("demo/videos", NeedleConfig(videos=48, seed=0), split="train")

writes `<out>/<split>/*.mp4`, `<out>/<split>_conversations.json` (LLaVA-Video form, for training)
and `<out>/<split>_mcq.json` (MLVU form: question, candidates, answer text, question_type, for
`mambamia convert` and `mambamia eval`), plus `<out>/<split>_truth.json` with each needle's time.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data.synthetic import write_video
from data.text import mcq_prompt, option_letter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 40, 40), "green": (40, 210, 60), "blue": (50, 90, 240), "yellow": (235, 225, 40),
}
QUESTION = "What colour is the square that appears briefly in the video?"
QUESTION_TYPE = "needle colour"


@dataclass(kw_only=True)
class NeedleConfig:
    videos: int = 48
    """Number of videos in the split; colours cycle so each appears videos/4 times."""
    duration_s: float = 120.0
    """Length of every video."""
    fps: float = 4.0
    """Frame rate of the rendered mp4 (extraction samples it at its own, lower rate)."""
    size: int = 64
    """Frame height and width in pixels (the tiny vision encoder resizes to its own input)."""
    needle_s: float = 4.0
    """How long the needle shows. A few extraction samples long: enough to be seen, short enough
    for uniform subsampling to miss it."""
    needle_side: float = 0.6
    """Side of the needle square as a fraction of the frame: large, so that even a tiny random
    vision encoder's patch features change clearly with its colour (1.0: the whole frame flashes
    the colour, the strongest signal; the demo uses it)."""
    distractors: int = 4
    """Grey discs moving in every frame, so consecutive frames always differ."""
    seed: int = 0


def _render(cfg: NeedleConfig, rng: np.random.Generator, colour: tuple[int, int, int],
            start_s: float) -> np.ndarray:
    """uint8 [T, H, W, 3] frames of one video."""
    n = int(round(cfg.duration_s * cfg.fps))
    size = cfg.size
    t = (np.arange(n) / cfg.fps).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # dark background whose brightness pattern drifts slowly (a moving sine grating, grey only)
    phase = rng.uniform(0, 2 * np.pi)
    base = 30 + 15 * np.sin(xx[None] / 9.0 + (t[:, None, None] * 0.3 + phase))  # [T, H, W]
    frames = np.repeat(base[..., None], 3, axis=-1)
    # grey discs bouncing off the borders: triangle-wave positions
    for _ in range(cfg.distractors):
        radius = rng.uniform(0.06, 0.12) * size
        pos0 = rng.uniform(radius, size - radius, 2)
        vel = rng.uniform(-0.15, 0.15, 2) * size  # pixels per second
        span = size - 2 * radius
        raw = (pos0 - radius)[None] + vel[None] * t[:, None]  # [T, 2]
        pos = radius + span - np.abs(np.mod(raw, 2 * span) - span)
        grey = rng.uniform(120, 220)
        inside = (yy[None] - pos[:, 0, None, None]) ** 2 + (xx[None] - pos[:, 1, None, None]) ** 2 < radius ** 2
        frames[inside] = grey
    # the needle: a large square of one saturated colour
    side = max(1, int(round(cfg.needle_side * size)))
    y0, x0 = rng.integers(0, size - side + 1, 2)
    shown = (t >= start_s) & (t < start_s + cfg.needle_s)
    frames[shown, y0:y0 + side, x0:x0 + side] = colour
    return np.clip(frames, 0, 255).astype(np.uint8)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _render_one(job: tuple[NeedleConfig, int, str, float, str]) -> None:
    cfg, index, colour, start, path = job
    # each video draws from its own stream, so the files do not depend on which worker made them
    rng = np.random.default_rng([cfg.seed, index])
    write_video(path, _render(cfg, rng, COLOURS[colour], start), cfg.fps)


def write_needle_task(out_dir: str | Path, cfg: NeedleConfig, *, split: str, workers: int = 2,
                      progress: bool = True) -> dict[str, Path]:
    """Render the split's videos (in `workers` processes) and its annotation files; returns their
    paths by role."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    out_dir = Path(out_dir)
    video_dir = out_dir / split
    video_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    names = list(COLOURS)
    colours = [names[i % len(names)] for i in range(cfg.videos)]
    rng.shuffle(colours)
    # keep the needle clear of both ends: first/last frames are always kept by the selector,
    # which would make the task trivial for every sampling strategy
    margin = 0.1 * cfg.duration_s
    starts = rng.uniform(margin, cfg.duration_s - margin - cfg.needle_s, cfg.videos).tolist()
    ids = [f"{split}_{i:04d}" for i in range(cfg.videos)]
    jobs = [(cfg, i, colours[i], starts[i], str(video_dir / f"{ids[i]}.mp4")) for i in range(cfg.videos)]
    import sys

    # off a terminal every redraw is a new log line: redraw rarely there
    bar = tqdm(total=cfg.videos, desc=f"render {split} videos", unit="video", disable=not progress,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_render_one, jobs):
                bar.update()
    else:
        for job in jobs:
            _render_one(job)
            bar.update()
    bar.close()
    prompt = mcq_prompt(QUESTION, names)
    conversations, mcq, truth = [], [], []
    for i, video_id in enumerate(ids):
        answer = names.index(colours[i])
        rel = f"{split}/{video_id}.mp4"
        conversations.append({"id": video_id, "video": rel, "conversations": [
            {"from": "human", "value": f"<video>\n{prompt}"},
            {"from": "gpt", "value": option_letter(answer)}]})
        mcq.append({"video": rel, "duration": cfg.duration_s, "question": QUESTION,
                    "candidates": names, "answer": colours[i], "question_type": QUESTION_TYPE,
                    "question_id": video_id})
        truth.append({"video_id": video_id, "colour": colours[i], "start_s": starts[i],
                      "end_s": starts[i] + cfg.needle_s})
    paths = {"videos": video_dir, "conversations": out_dir / f"{split}_conversations.json",
             "mcq": out_dir / f"{split}_mcq.json", "truth": out_dir / f"{split}_truth.json"}
    _write_json(paths["conversations"], conversations)
    _write_json(paths["mcq"], mcq)
    _write_json(paths["truth"], {"config": asdict(cfg), "videos": truth})
    return paths
