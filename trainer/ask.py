"""Ask an exported model about one video file: decode, encode, compress, generate, print.

    mambamia ask EXPORT_DIR VIDEO "What colour is the square?" --encoder VISION_DIR
    mambamia ask demo_out/exports/stage2 clip.mp4 "What happens?" --encoder demo_out/vision \\
        --frames 32 --max-new-tokens 32 --explain why.png

The video is sampled as training sampled its videos: at the frame rate recorded in the export's
training.json (1 frame/s when unknown), at most `--frames` frames (default: the frames per video
training used), spread uniformly when the rate asks for more. The frames go through the vision
tower (`--encoder`, or EXPORT_DIR/vision when the export holds one) at the layer training used,
then through the export's compressor, projector and LLM; the answer is decoded greedily and
printed alone on stdout.

`--explain OUT.png` draws why the model saw what it saw: the Δ score of every sampled frame over
time, the frames the compressor kept, and thumbnails of the kept frames.

Errors (exit 1, one line): a missing or undecodable video, an empty question, an export missing
a part, a vision tower whose features do not fit the compressor.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXPORT_PARTS = ("mambamia.json", "llm/config.json", "compressor.safetensors", "projector.safetensors")


class AskError(ValueError):
    """Bad input to `mambamia ask`; the message is one line naming the file or argument."""


@dataclass(kw_only=True)
class Seen:
    """What the model was shown and what it made of it."""
    answer: str
    frames: np.ndarray
    """uint8 [F, H, W, 3]: the sampled frames."""
    timestamps: np.ndarray
    """[F] seconds."""
    scores: np.ndarray | None
    """[F] Δ score per sampled frame (None under uniform selection)."""
    kept: list[int]
    """Indices into the sampled frames that the compressor kept."""


def export_folder(name: str) -> Path:
    """EXPORT_DIR itself, or the snapshot of a hub repo holding an export (hub cache when offline)."""
    from model.video_llm import pretrained_folder

    if Path(name).is_dir() or name.startswith((".", "/", "~")):  # a path: check_export names it
        return Path(name)
    try:
        return pretrained_folder(name)
    except FileNotFoundError as err:
        raise AskError(str(err)) from None


def check_export(folder: Path) -> dict:
    """The export's training.json (or {}) after checking that every part is there."""
    if not folder.is_dir():
        raise AskError(f"{folder}: no such folder; expected a folder written by `mambamia export`")
    for part in EXPORT_PARTS:
        if not (folder / part).exists():
            raise AskError(f"{folder / part}: missing; expected a complete `mambamia export` folder "
                           f"({', '.join(EXPORT_PARTS)})")
    path = folder / "training.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise AskError(f"{path}: not valid JSON ({err})") from None


def decode(video: Path, fps: float, frames: int):
    from data.video import CorruptVideo, SamplingConfig, decode_video

    if not video.is_file():
        raise AskError(f"{video}: no such video file")
    try:
        return decode_video(video, SamplingConfig(fps=fps, max_frames=frames))
    except CorruptVideo as err:
        raise AskError(f"{video}: cannot decode the video ({' '.join(str(err).split())[:300]})") from None


def encoder_folder(args: argparse.Namespace, export: Path, features: dict) -> Path:
    if args.encoder is not None:
        folder = Path(args.encoder)
    elif (export / "vision").is_dir():
        folder = export / "vision"
    else:
        made = f" (training used features of {features.get('encoder')!r}, layer {features.get('layer')})" \
            if features else ""
        raise AskError(f"{export}: holds no vision tower; pass --encoder FOLDER{made}")
    if folder.is_dir() and not (folder / "config.json").is_file():  # anything else: a hub id
        raise AskError(f"{folder / 'config.json'}: missing; --encoder expects a SigLIP/CLIP folder or hub id")
    return folder


def load_encoder(folder: Path, features: dict, pool: int):
    from data.extract import EncoderConfig, FrameEncoder

    layer = features.get("layer") if isinstance(features.get("layer"), int) else -2
    try:
        encoder = FrameEncoder(EncoderConfig(path=str(folder), layer=layer, pool=pool))
    except (AttributeError, ValueError, OSError) as err:  # another kind of model, a bad layer
        raise AskError(f"{folder}: not a usable SigLIP/CLIP vision tower "
                       f"({' '.join(str(err).split())[:200]})") from None
    if features.get("encoder") not in (None, encoder.name):
        print(f"mambamia ask: note: training used features of {features['encoder']!r}, this is "
              f"{encoder.name!r}", file=sys.stderr)
    if features.get("patches") not in (None, encoder.patches_per_frame):
        raise AskError(f"{folder}: gives {encoder.patches_per_frame} patches per frame with --pool {pool}; "
                       f"training's features had {features['patches']} (match convert's --pool)")
    return encoder


def ask(args: argparse.Namespace) -> Seen:
    export, video = export_folder(args.export_dir), Path(args.video)
    question = args.question.strip()
    if not question:
        raise AskError("the question is empty; expected text, e.g. \"What colour is the square?\"")
    record = check_export(export)
    features = record.get("features") or {}
    frames = args.frames or record.get("max_frames") or 32
    fps = args.fps or features.get("fps") or 1.0
    decoded = decode(video, float(fps), int(frames))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout and stderr carry the answer and our own lines only
    encoder = load_encoder(encoder_folder(args, export, features), features, args.pool)

    from data.text import VIDEO_TOKEN
    from model.video_llm import VideoLLM
    from trainer.evaluate import ModelQA

    model = VideoLLM.from_pretrained(export)
    feats = encoder(decoded.frames)
    if feats.shape[-1] != model.config.compressor.input_dim:
        raise AskError(f"{encoder.config.path}: gives {feats.shape[-1]}-wide features; the export's compressor "
                       f"reads {model.config.compressor.input_dim}-wide ones (pass the --encoder training used)")
    qa = ModelQA(model, model.tokenizer, max_frames=None, max_new_tokens=args.max_new_tokens)
    answer = qa.generate(f"{VIDEO_TOKEN}\n{question}", feats)
    import torch

    dtype = next(model.compressor.parameters()).dtype
    with torch.no_grad():  # the same compressor pass generate made, for its scores and kept frames
        out = model.compressor(torch.from_numpy(feats).to(dtype).unsqueeze(0),
                               torch.ones(1, len(feats), dtype=torch.bool))
    scores = out.scores[0]
    return Seen(answer=answer, frames=decoded.frames, timestamps=np.asarray(decoded.timestamps, dtype=np.float64),
                scores=None if scores is None else scores.float().cpu().numpy(), kept=out.kept[0].tolist())


def explain(seen: Seen, question: str, out: Path, max_thumbs: int = 16) -> Path:
    """PNG: Δ score per sampled frame over time with the kept frames marked, and their thumbnails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.plots import save_figure

    kept = seen.kept[:max_thumbs]
    cols = max(1, len(kept))
    fig = plt.figure(figsize=(max(8.0, 1.3 * cols), 5.2))
    grid = fig.add_gridspec(2, cols, height_ratios=[2.2, 1.0])
    ax = fig.add_subplot(grid[0, :])
    t = seen.timestamps
    if seen.scores is not None:
        ax.plot(t, seen.scores, "o-", color="tab:blue", ms=3, lw=1, label="Δ score of each sampled frame")
        ax.plot(t[seen.kept], seen.scores[seen.kept], "o", color="tab:red", ms=7, label="kept")
        ax.set_ylabel("Δ score")
    else:
        ax.plot(t[seen.kept], np.ones(len(seen.kept)), "o", color="tab:red", ms=7, label="kept (uniform selection: no Δ)")
        ax.set_yticks([])
    for i in seen.kept:
        ax.axvline(t[i], color="tab:red", alpha=0.25, lw=1)
    ax.set_xlabel("time in the video (s)")
    ax.legend(loc="best", fontsize=8, framealpha=0.6)
    ax.set_title(f"Q: {question[:90]}\nA: {seen.answer[:90]}", fontsize=9, loc="left")
    for c, i in enumerate(kept):
        thumb = fig.add_subplot(grid[1, c])
        thumb.imshow(seen.frames[i])
        thumb.set_title(f"{t[i]:.1f} s", fontsize=8)
        thumb.axis("off")
    return save_figure(fig, out)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mambamia ask", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", help="folder written by `mambamia export` (or a hub id of one)")
    p.add_argument("video", help="a video file (mp4, mkv, webm, ...)")
    p.add_argument("question", help="the question, in quotes")
    p.add_argument("--encoder", default=None, help="vision tower folder or hub id (default: EXPORT_DIR/vision)")
    p.add_argument("--pool", type=int, default=1, help="patch-grid pooling, as convert's --pool (default 1)")
    p.add_argument("--frames", type=int, default=None, help="frames sampled at most (default: training's)")
    p.add_argument("--fps", type=float, default=None, help="sampling rate (default: training's, else 1)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--explain", default=None, metavar="OUT.png",
                   help="also draw the Δ score over time, the kept frames and their thumbnails")
    args = p.parse_args(argv)
    if args.pool < 1:
        p.error(f"--pool: expected >= 1, got {args.pool}")
    if args.frames is not None and args.frames < 1:
        p.error(f"--frames: expected >= 1, got {args.frames}")
    if args.fps is not None and not args.fps > 0:
        p.error(f"--fps: expected > 0, got {args.fps}")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens: expected >= 1, got {args.max_new_tokens}")
    return args


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    try:
        seen = ask(args)
    except (AskError, FileNotFoundError) as err:
        print(f"mambamia ask: {err}", file=sys.stderr)
        return 1
    print(seen.answer)
    if not seen.answer:
        print("mambamia ask: note: the answer is empty (the model ended its turn at once)", file=sys.stderr)
    if args.explain:
        path = explain(seen, args.question.strip(), Path(args.explain))
        print(f"mambamia ask: kept frames at {', '.join(f'{seen.timestamps[i]:.1f}' for i in seen.kept)} s; "
              f"picture: {path}", file=sys.stderr)
    return 0
