"""Decoding videos into frames sampled by timestamp, with decord first and PyAV as the fallback.

Frames are chosen by presentation time, never by index, so variable-frame-rate files are sampled
at the times asked for; the timestamps returned are those of the frames actually decoded. The
sampling rule is the official MambaMia one (paper.md §1.6): one frame every 1/fps seconds, unless
that exceeds `max_frames`, in which case exactly `max_frames` frames spread uniformly over the
video.

    video = decode_video("clip.mp4", SamplingConfig(fps=1.0, max_frames=32))
    video.frames        # uint8 [N, H, W, 3]
    video.timestamps    # float64 [N], seconds from the start of the stream
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BACKENDS = ("auto", "decord", "pyav")


@dataclass(kw_only=True)
class SamplingConfig:
    fps: float = 1.0
    """Frames per second to sample."""
    max_frames: int = 32
    """Upper bound on frames per video; longer videos are sampled uniformly with this many frames."""
    min_decoded_fraction: float = 0.9
    """A decode whose frames end before this fraction of the container's duration is a short read
    (a truncated file whose index survived), reported as corrupt."""
    backend: str = "auto"
    """'auto' (decord, PyAV when decord is missing or fails on the file), 'decord' or 'pyav'."""
    short_side: int | None = None
    """Resize while decoding so the shorter side is at most this (aspect kept): bounds the memory
    of decoded 4K frames waiting for the encoder, which resizes to its own input anyway."""
    seek_gap_s: float = 3.0
    """PyAV seeks instead of decoding through gaps longer than this between sampled times (doubled
    for the rest of a file whenever a seek lands before frames already decoded: sparse keyframes)."""

    def __post_init__(self):
        if not self.fps > 0:
            raise ValueError(f"sampling fps: expected > 0, got {self.fps}")
        if self.max_frames < 1:
            raise ValueError(f"sampling max_frames: expected >= 1, got {self.max_frames}")
        if not 0 < self.min_decoded_fraction <= 1:
            raise ValueError(f"sampling min_decoded_fraction: expected in (0, 1], got {self.min_decoded_fraction}")
        if self.short_side is not None and self.short_side < 2:
            raise ValueError(f"sampling short_side: expected >= 2 or None, got {self.short_side}")
        if not self.seek_gap_s > 0:
            raise ValueError(f"sampling seek_gap_s: expected > 0, got {self.seek_gap_s}")
        if self.backend not in BACKENDS:
            raise ValueError(f"sampling backend: expected one of {BACKENDS}, got {self.backend!r}")


@dataclass(kw_only=True)
class DecodedVideo:
    frames: np.ndarray  # uint8 [N, H, W, 3]
    timestamps: np.ndarray  # float64 [N], seconds
    duration: float  # seconds, from the container
    backend: str
    targets: int = 0
    """Sample times asked for (`sample_timestamps`): more than len(frames) when several fell on
    the same source frame (a source with fewer frames per second than asked)."""
    capped: bool = False
    """The rate asked for more than max_frames: max_frames were spread over the whole video."""


class CorruptVideo(Exception):
    """The file cannot be decoded (missing, unreadable, truncated, no video stream)."""


# A sample closer to the end of the video than this fraction of the sampling interval is the
# rounding of a rate typed with a few decimals (120 s x 1.066667 fps = 128.00004 frames), not a
# frame the user asked for: it is not counted, so 128 frames at the requested rate fit the cap.
_END_SLACK = 1e-3


def frames_wanted(duration: float, fps: float) -> int:
    """Frames at `fps` over `duration` seconds: one at 0, 1/fps, ... before the end."""
    if duration <= 0:
        return 1
    return max(1, math.ceil(duration * fps - _END_SLACK))


def sample_timestamps(duration: float, fps: float, max_frames: int) -> np.ndarray:
    """Target times in seconds: every 1/fps, or `max_frames` uniform ones when fps asks for more."""
    if duration <= 0:
        return np.zeros(1)
    wanted = frames_wanted(duration, fps)
    if wanted <= max_frames:
        return np.arange(wanted) / fps
    return np.linspace(0.0, duration, max_frames, endpoint=False)


def output_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(height, width) after shrinking the shorter side to `short_side`; never enlarges."""
    if short_side is None or min(height, width) <= short_side:
        return height, width
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def nearest_frames(frame_times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the frame closest in time to each target (ties go to the earlier frame), unique."""
    right = np.clip(np.searchsorted(frame_times, targets, side="left"), 1, len(frame_times) - 1)
    left = right - 1
    if len(frame_times) == 1:
        return np.zeros(1, dtype=np.int64)
    pick_left = (targets - frame_times[left]) <= (frame_times[right] - targets)
    return np.unique(np.where(pick_left, left, right))


def decode_video(path: str | Path, config: SamplingConfig) -> DecodedVideo:
    """Decode the sampled frames of one video; raises CorruptVideo with the reason on failure."""
    path = Path(path)
    if not path.is_file():
        raise CorruptVideo(f"no such file: {path}")
    reasons = []
    if config.backend in ("auto", "decord"):
        try:
            return _decode_decord(path, config)
        except ImportError as err:
            if config.backend == "decord":
                raise CorruptVideo(f"decord is not installed: {err}") from err
        except Exception as err:  # decord raises its own DECORDError, RuntimeError, ...
            reasons.append(f"decord: {_one_line(err)}")
            if config.backend == "decord":
                raise CorruptVideo(reasons[0]) from err
    try:
        return _decode_pyav(path, config)
    except CorruptVideo as err:
        raise CorruptVideo("; ".join(reasons + [f"pyav: {err}"])) from err
    except Exception as err:  # av.error.* for damaged streams
        raise CorruptVideo("; ".join(reasons + [f"pyav: {_one_line(err)}"])) from err


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]


def _decode_decord(path: Path, config: SamplingConfig) -> DecodedVideo:
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    if config.short_side is not None:
        height, width = reader[0].shape[:2] if len(reader) else (0, 0)
        out_h, out_w = output_size(height, width, config.short_side)
        if (out_h, out_w) != (height, width):
            reader = decord.VideoReader(str(path), num_threads=1, width=out_w, height=out_h)
    n = len(reader)
    if n == 0:
        raise CorruptVideo("no frames")
    spans = reader.get_frame_timestamp(np.arange(n))  # [n, 2] start/end seconds, from the index
    starts = spans[:, 0].astype(np.float64)
    duration = float(spans[-1, 1])
    targets = sample_timestamps(duration, config.fps, config.max_frames)
    indices = nearest_frames(starts, targets)
    # decord reads through the index; a file whose data was cut makes get_batch raise, which the
    # caller turns into a PyAV retry (and PyAV's short-read check).
    frames = reader.get_batch(indices.tolist()).asnumpy()
    return DecodedVideo(frames=frames, timestamps=starts[indices], duration=duration, backend="decord",
                        targets=len(targets), capped=frames_wanted(duration, config.fps) > config.max_frames)


def _decode_pyav(path: Path, config: SamplingConfig) -> DecodedVideo:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise CorruptVideo("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        duration = _container_duration(container, stream)
        if duration is None:
            raise CorruptVideo("container reports no duration")
        targets = sample_timestamps(duration, config.fps, config.max_frames)
        size = output_size(stream.codec_context.height, stream.codec_context.width, config.short_side)
        sampler = _NearestFrameSampler(container, stream, config.seek_gap_s, size)
        frames, times = sampler.sample(targets)
        decoded_end = sampler.decoded_end(duration)
    if not frames:
        raise CorruptVideo("no frames decoded")
    if decoded_end < config.min_decoded_fraction * duration:
        raise CorruptVideo(f"short read: frames end at {decoded_end:.2f}s of a {duration:.2f}s container")
    return DecodedVideo(frames=np.stack(frames), timestamps=np.asarray(times), duration=duration,
                        backend="pyav", targets=len(targets),
                        capped=frames_wanted(duration, config.fps) > config.max_frames)


def _container_duration(container, stream) -> float | None:
    # Muxers disagree on which one to fill in, and with B-frames in a variable-frame-rate mp4 the
    # stream's can fall short of its last frame: take the longer of the two.
    known = []
    if stream.duration is not None:
        known.append(float(stream.duration * stream.time_base))
    if container.duration is not None:
        known.append(container.duration / 1_000_000)  # AV_TIME_BASE
    return max(known) if known else None


class _NearestFrameSampler:
    """Walks a PyAV stream forward keeping, for each target time, the frame nearest to it.

    Same choice as `nearest_frames` (ties go to the earlier frame). When the next target lies more
    than `seek_gap` seconds ahead, it seeks to the keyframe before it instead of decoding the
    frames in between, so an hour-long video sampled at a few dozen times decodes a few GOPs per
    target, not every frame. Only chosen frames are converted to RGB.
    """

    def __init__(self, container, stream, seek_gap: float, size: tuple[int, int]):
        self.container, self.stream, self.seek_gap = container, stream, seek_gap
        self.height, self.width = size
        self.start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        self.decoder = container.decode(stream)
        self.prev, self.prev_t = None, None
        self.step = 0.0  # display time of the last frame, from its predecessor without a seek between
        self.after_seek = False

    def _next(self):
        """The next frame later than every frame seen so far, with its time; None at the end."""
        backtracked = False
        for frame in self.decoder:
            if frame.pts is None:
                continue
            t = float(frame.pts * frame.time_base) - self.start
            if self.prev_t is not None and t <= self.prev_t:
                # The seek landed on a keyframe we had passed: keyframes are sparser than the gap
                # between targets, so seeking re-decodes frames. Ask for longer gaps from now on.
                if self.after_seek and not backtracked:
                    self.seek_gap *= 2
                    backtracked = True
                continue
            return frame, t
        return None

    def _advance(self, frame, t) -> None:
        if self.prev_t is not None and not self.after_seek:
            self.step = t - self.prev_t
        self.prev, self.prev_t, self.after_seek = frame, t, False

    def _seek(self, t: float) -> None:
        pts = int((t + self.start) / self.stream.time_base)
        self.container.seek(pts, stream=self.stream, backward=True)
        self.decoder = self.container.decode(self.stream)
        self.after_seek = True

    def sample(self, targets: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
        frames, times = [], []

        def take(frame, t):
            if not times or times[-1] != t:
                frames.append(frame.to_ndarray(format="rgb24", width=self.width, height=self.height))
                times.append(t)

        j = 0
        while j < len(targets):
            if self.prev_t is not None and targets[j] - self.prev_t > self.seek_gap:
                self._seek(targets[j])
            got = self._next()
            if got is None:
                break
            frame, t = got
            while j < len(targets) and t >= targets[j]:
                keep_prev = self.prev is not None and targets[j] - self.prev_t <= t - targets[j]
                take(*((self.prev, self.prev_t) if keep_prev else (frame, t)))
                j += 1
            self._advance(frame, t)
        if j < len(targets) and self.prev is not None:
            take(self.prev, self.prev_t)  # targets past the last frame get the last frame
        return frames, times

    def decoded_end(self, duration: float) -> float:
        """Where the decodable frames end: decode on to the last frame (seeking near the end first)."""
        if self.prev_t is not None and duration - self.prev_t > self.seek_gap:
            self._seek(duration - self.seek_gap)
        while (got := self._next()) is not None:
            self._advance(*got)
        return 0.0 if self.prev_t is None else self.prev_t + self.step
