"""Real H.264 mp4 files for tests and the demo, written with PyAV (no ffmpeg binary needed).

    write_video("a.mp4", frames, fps=4)                          # constant frame rate
    write_video("b.mp4", frames, fps=4, timestamps=[0, .1, .5])  # variable frame rate
    truncated_copy("a.mp4", "a_cut.mp4", keep=0.5)               # index intact, data cut
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

# Millisecond presentation times: fine enough for any variable-frame-rate schedule a test writes.
_TIME_BASE = Fraction(1, 1000)


def write_video(path: str | Path, frames: np.ndarray, fps: float,
                timestamps: list[float] | np.ndarray | None = None, *, crf: int = 18,
                gop: int | None = None) -> Path:
    """Encode uint8 frames [T, H, W, 3] (H, W even) as H.264 in an mp4.

    Without `timestamps` frame i is shown at i / fps. With them each frame gets that presentation
    time in seconds (strictly increasing, millisecond resolution), which makes a variable-frame-rate
    file; `fps` then only sets the nominal rate and the last frame's display duration.
    `gop` sets the keyframe interval in frames (x264's default, 250, otherwise).
    The index (moov) is written before the data ("faststart") so that a truncated copy still opens
    and announces its full duration, like a partially downloaded file does.
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video {path}: expected uint8 frames [T, H, W, 3], "
                         f"got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t == 0 or h % 2 or w % 2:
        raise ValueError(f"write_video {path}: need >= 1 frame and even height/width (yuv420p), got {frames.shape}")
    if timestamps is None:
        pts = [round(i / fps / _TIME_BASE) for i in range(t)]
    else:
        pts = [round(float(s) / _TIME_BASE) for s in timestamps]
        if len(pts) != t or any(b <= a for a, b in zip(pts, pts[1:])) or pts[0] < 0:
            raise ValueError(f"write_video {path}: timestamps must be {t} non-negative, strictly "
                             "increasing seconds (millisecond resolution)")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial.mp4")
    with av.open(str(tmp), "w", options={"movflags": "faststart"}) as container:
        # No B-frames: with reordering, the mp4 muxer under-reports a variable-frame-rate stream's
        # duration, and every decoder would then disagree with the timestamps written here.
        # With a gop, keyframes come exactly every `gop` frames: no extra ones at scene changes.
        options = {"crf": str(crf), "bf": "0", **({"g": str(gop), "sc_threshold": "0"} if gop else {})}
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000), options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = _TIME_BASE
        for frame_rgb, p in zip(frames, pts):
            frame = av.VideoFrame.from_ndarray(frame_rgb, format="rgb24")
            frame.pts, frame.time_base = p, _TIME_BASE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def truncated_copy(src: str | Path, dst: str | Path, keep: float = 0.5) -> Path:
    """Copy the first `keep` fraction of the bytes of `src`: a download cut short."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


def moving_square_frames(n: int, height: int = 32, width: int = 32, *, seed: int = 0) -> np.ndarray:
    """uint8 [n, H, W, 3]: a coloured square moving over a flat background, distinct per frame.

    Compresses well (a few KB per second of video) yet every frame differs, so a test can tell
    which frame a decoder returned: the square's path repeats, the background brightens steadily.
    """
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 64, size=3, dtype=np.uint8)
    colour = rng.integers(160, 256, size=3, dtype=np.uint8)
    side = max(2, min(height, width) // 4)
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i] = background + np.uint8(i * 96 // n)
        y = (i * 3) % (height - side)
        x = (i * 5) % (width - side)
        frames[i, y:y + side, x:x + side] = colour
    return frames
