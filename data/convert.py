"""The conversion driver: per-video items -> features (decoded + encoded, or loaded) -> shards.

Each rank takes a deterministic slice of the videos (sorted by key, every world_size-th one), skips
the videos already in its complete shards, and writes the rest with its own ShardWriter. A video
that fails (undecodable, missing, bad feature file) is recorded in `failures-rNNNNN.jsonl`
({"file", "reason", ...}) and skipped; every rank ends with `summary-rNNNNN.json` and a printed
summary line. The index is written by `merge` once all ranks are done.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
from tqdm import tqdm

from data.annotations import VideoItem
from data.shards import ShardWriter, write_index
from data.video import CorruptVideo, DecodedVideo, SamplingConfig, decode_video

if TYPE_CHECKING:  # torch is imported only when a vision encoder is actually used
    from data.extract import EncoderConfig

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
FEATURE_EXTS = (".npy", ".safetensors", ".pt")


@dataclass(kw_only=True)
class ConvertConfig:
    out_dir: str
    videos_root: str | None = None
    """Folder the annotations' video paths are relative to (features are extracted on the fly)."""
    features_root: str | None = None
    """Folder of per-video feature files <video path without extension>.{npy,safetensors,pt}."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    encoder: EncoderConfig | None = None
    """Needed with videos_root."""
    encoder_name: str = "unknown"
    """Recorded as `encoder` for feature files (extracted elsewhere)."""
    layer: int = -2
    """Recorded as `layer` for feature files."""
    prefix: str = "shard"
    shard_samples: int = 1000
    shard_bytes: int = 1 << 30
    rank: int = 0
    world_size: int = 1
    decode_workers: int = 2
    """Threads decoding videos / reading feature files ahead of the encoder."""
    run_id: str | None = None
    """Shared by the ranks of one launch (the SLURM job id): a merging rank 0 waits for summaries
    carrying it, so summaries left by an earlier run are not mistaken for finished ranks."""

    def __post_init__(self):
        if (self.videos_root is None) == (self.features_root is None):
            raise ValueError("convert: give exactly one of videos_root (extract) or features_root (feature files)")
        if self.videos_root is not None and self.encoder is None:
            raise ValueError("convert: videos_root needs an encoder (--encoder FOLDER)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"convert: rank {self.rank} outside world size {self.world_size}")
        if self.decode_workers < 1:
            raise ValueError(f"convert: decode_workers must be >= 1, got {self.decode_workers}")


@dataclass(kw_only=True)
class Summary:
    rank: int
    world_size: int
    run_id: str | None = None
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    """Videos already in complete shards of an earlier run."""
    samples: int = 0
    """Conversations + questions in the records written."""
    bytes: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    """Stopped early on request (SIGUSR1/SIGTERM): the shards written so far are complete."""
    capped: int = 0
    """Videos the requested fps would give more than max_frames frames: max_frames spread evenly."""
    merged: int = 0
    """Videos with fewer frames than sample times: several times fell on one source frame."""

    def line(self, who: str | None = None) -> str:
        who = who or f"rank {self.rank}/{self.world_size}"
        return (f"{who}: ok {self.ok}, failed {self.failed}, "
                f"skipped {self.skipped} (already done), samples {self.samples}, "
                f"bytes {self.bytes} ({self.bytes / 1e6:.1f} MB), time {self.seconds:.1f} s")

    def sampling_line(self, sampling: SamplingConfig) -> str:
        """What the frame sampling did in this run, in one line."""
        at_rate = self.ok - self.capped
        return (f"frames: {at_rate} video(s) at the requested {sampling.fps:g} fps (up to "
                f"{sampling.max_frames} frames: {sampling.max_frames / sampling.fps:.1f} s); {self.capped} "
                f"longer one(s) got {sampling.max_frames} frames spread evenly over the video; "
                f"{self.merged} got fewer frames than sample times (a source with fewer frames per "
                "second than asked: each source frame kept once)")


class ItemFailed(Exception):
    """This video cannot be converted; the message is the reason written to the failures file."""

    def __init__(self, file: str, reason: str):
        super().__init__(reason)
        self.file = file


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def make_key(video: str) -> str:
    """A shard key for a video path: readable, webdataset-safe, unique (a hash of the full path)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(video)[0]).strip("_")[-60:] or "video"
    return f"{stem}-{hashlib.sha1(video.encode('utf-8')).hexdigest()[:10]}"


def group_items(items: list[VideoItem]) -> dict[str, VideoItem]:
    """key -> one item per video: its conversations and questions from every file merged.

    A question id used twice is refused here, naming both places: eval keys its predictions by id
    and would otherwise stop on it three commands later."""
    owner: dict[str, str] = {}
    for item in items:
        for q in item.qa:
            if q["id"] in owner:
                raise ValueError(f"question id {q['id']!r} is used twice: {owner[q['id']]} and {item.where}")
            owner[q["id"]] = item.where
    grouped: dict[str, VideoItem] = {}
    for item in items:
        video = os.path.normpath(item.video)  # "./a.mp4" and "a.mp4" are one video
        key = make_key(video)
        if key in grouped:
            grouped[key].merge(item)
        else:
            grouped[key] = VideoItem(video=video, where=item.where, conversations=list(item.conversations),
                                     qa=list(item.qa), duration=item.duration)
    return grouped


def rank_slice(keys: list[str], rank: int, world_size: int) -> list[str]:
    return sorted(keys)[rank::world_size]


def outside_root(video: str) -> str | None:
    """Why the annotation's video path does not name a file inside the root, or None. Checked on
    the path as written: symlinks inside the root, placed there by its owner, are followed."""
    if "\0" in video:
        return "contains a NUL byte"
    norm = os.path.normpath(video)
    if os.path.isabs(norm):
        return "is an absolute path; expected a path relative to the root"
    if norm in (".", "..") or norm.startswith("../"):
        return "leads outside the root ('..')"
    return None


def resolve(root: Path, video: str, exts: tuple[str, ...]) -> Path | None:
    """The file for `video` under root: as named, or with its extension replaced by one of exts."""
    named = root / video
    if named.suffix.lower() in exts and _readable(named):
        return named
    stem = named.with_suffix("") if named.suffix.lower() in VIDEO_EXTS + FEATURE_EXTS else named
    for ext in exts:
        candidate = stem.with_name(stem.name + ext)
        if _readable(candidate):
            return candidate
    return None


def _readable(path: Path) -> bool:
    # Not is_file(): a named pipe or device streaming a video is a valid input.
    return path.exists() and not path.is_dir()


def load_feature_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(features [F, P, D], timestamps [F] or None) from .npy, .safetensors or .pt, without pickle.

    .safetensors / .pt hold either one tensor or a dict with "features" (and optional "timestamps").
    """
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    import torch  # safetensors through torch too: numpy has no bfloat16

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    tensors = {"features": obj} if isinstance(obj, torch.Tensor) else obj
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"expected a tensor or a dict of tensors, got {type(obj).__name__}")
    # float64 timestamps of an hour-long video need their precision: only bfloat16 is widened.
    tensors = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in tensors.items()}
    if "features" not in tensors:
        if len(tensors) != 1:
            raise ValueError(f"expected one tensor or a 'features' entry, got keys {sorted(tensors)}")
        tensors = {"features": next(iter(tensors.values()))}
    ts = tensors.get("timestamps")
    return np.asarray(tensors["features"]), None if ts is None else np.asarray(ts, dtype=np.float64)


def check_features(features: np.ndarray, timestamps: np.ndarray | None) -> np.ndarray:
    if not isinstance(features, np.ndarray) or features.ndim != 3 or features.dtype.kind != "f":
        raise ValueError(f"expected a float [frames, patches, dim] array, got "
                         f"{getattr(features, 'dtype', type(features).__name__)} {getattr(features, 'shape', '')}")
    if 0 in features.shape:
        raise ValueError(f"empty features of shape {features.shape}")
    features = features.astype(np.float16)
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or inf (or overflow float16)")
    if timestamps is not None and timestamps.shape != (features.shape[0],):
        raise ValueError(f"timestamps of shape {timestamps.shape} for {features.shape[0]} frames")
    return features


class Converter:
    """Turns one VideoItem into (features, meta); owns the vision encoder when extracting."""

    def __init__(self, config: ConvertConfig):
        self.config = config
        self.encoder = None
        if config.videos_root is not None:
            from data.extract import FrameEncoder

            self.encoder = FrameEncoder(config.encoder)

    def prepare(self, item: VideoItem):
        """Runs in a worker thread: decode the video or read the feature file."""
        cfg = self.config
        root = Path(cfg.videos_root or cfg.features_root)
        problem = outside_root(item.video)
        if problem is not None:
            raise ItemFailed(item.video, f"refused: the path {problem}")
        try:
            return self._prepare(root, item)
        except OSError as err:  # a name too long for the file system, a permission, an I/O error
            raise ItemFailed(str(root / item.video), f"cannot read: {_one_line(err)}") from None

    def _prepare(self, root: Path, item: VideoItem):
        cfg = self.config
        exts = VIDEO_EXTS if cfg.videos_root is not None else FEATURE_EXTS
        path = resolve(root, item.video, exts)
        if path is None:
            raise ItemFailed(str(root / item.video), f"missing {'video' if cfg.videos_root else 'feature file'}")
        if cfg.videos_root is not None:
            try:
                return path, decode_video(path, cfg.sampling)
            except CorruptVideo as err:
                raise ItemFailed(str(path), f"undecodable video: {err}") from None
        try:
            features, timestamps = load_feature_file(path)
            return path, (check_features(features, timestamps), timestamps)
        except Exception as err:  # numpy / safetensors / torch each raise their own types
            raise ItemFailed(str(path), f"bad feature file: {_one_line(err)}") from None

    def finish(self, key: str, item: VideoItem, path: Path, prepared) -> tuple[np.ndarray, dict]:
        """Runs in the main thread (the encoder is not shared between threads)."""
        cfg = self.config
        if cfg.videos_root is not None:
            features = self.encoder(prepared.frames)
            timestamps, duration = prepared.timestamps, prepared.duration
            encoder, layer = self.encoder.name, cfg.encoder.layer
            fps = cfg.sampling.max_frames / duration if prepared.capped else cfg.sampling.fps
        else:
            features, timestamps = prepared
            fps = cfg.sampling.fps
            if timestamps is None:
                timestamps = np.arange(len(features)) / fps
            duration = item.duration if item.duration is not None else float(timestamps[-1]) + 1 / fps
            encoder, layer = cfg.encoder_name, cfg.layer
        meta = {"key": key, "video_id": os.path.splitext(item.video)[0], "source": str(path),
                "timestamps": [round(float(t), 6) for t in timestamps], "fps": float(fps),
                "duration": float(duration), "encoder": encoder, "layer": layer,
                "conversations": item.conversations, "qa": item.qa}
        return features, meta


def _prefetch(fn: Callable, work: list, workers: int) -> Iterator:
    """fn(x) for each x in order, computed up to `2 * workers` items ahead in threads.

    Yields (x, result, error) so one failure does not stop the stream.
    """
    def call(x):
        try:
            return fn(x), None
        except ItemFailed as err:
            return None, err

    with ThreadPoolExecutor(workers) as pool:
        pending = []
        for x in work:
            pending.append((x, pool.submit(call, x)))
            if len(pending) > 2 * workers:
                x0, fut = pending.pop(0)
                yield (x0, *fut.result())
        for x0, fut in pending:
            yield (x0, *fut.result())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")  # ranks may write the same file
    tmp.write_text(text)
    os.replace(tmp, path)


def check_layout(out_dir: Path, prefix: str, world_size: int) -> None:
    """Pin the world size of a prefix's shards: rank slices depend on it, so a rerun with another
    world size would convert some videos twice (in two ranks' shards) instead of resuming."""
    path = out_dir / f"layout-{prefix}.json"
    if path.exists():
        recorded = json.loads(path.read_text()).get("world_size")
        if recorded != world_size:
            raise ValueError(f"{path}: these shards were written by {recorded} ranks, this run has "
                             f"{world_size}; rerun with --world-size {recorded} or use a new --out/--prefix")
        return
    _write_atomic(path, json.dumps({"prefix": prefix, "world_size": world_size}) + "\n")


def summary_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f"summary-r{rank:05d}.json"


class FailureLog:
    """This rank's failures file, one JSON line appended and flushed per failed video, so an
    unexpected error later in the run loses none of them. Each run starts it afresh: a rerun
    retries every video that failed before."""

    def __init__(self, path: Path, earlier: list[dict]):
        self.file = open(path, "w", encoding="utf-8")
        for entry in earlier:
            self.add(entry)

    def add(self, entry: dict) -> None:
        self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.file.flush()

    def __enter__(self) -> FailureLog:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def convert(items: dict[str, VideoItem], config: ConvertConfig, *, progress: bool = True,
            failures: list[dict] | None = None, should_stop: Callable[[], bool] | None = None) -> Summary:
    """Convert this rank's share of `items` (key -> item) into shards; returns the summary.

    `failures` may carry problems found before (skipped annotation records); they are counted and
    written to this rank's failures file with the rest, as they happen. When `should_stop()` turns
    true the loop ends before the next video and the open shard is completed, so a rerun redoes
    nothing; an unexpected error completes the open shard too (ShardWriter) before it propagates.
    """
    start = time.time()
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_layout(out_dir, config.prefix, config.world_size)
    summary_path(out_dir, config.rank).unlink(missing_ok=True)
    failures = list(failures or [])
    summary = Summary(rank=config.rank, world_size=config.world_size, run_id=config.run_id, failed=len(failures))
    keys = rank_slice(list(items), config.rank, config.world_size)
    with FailureLog(out_dir / f"failures-r{config.rank:05d}.jsonl", failures) as failure_log, \
            ShardWriter(out_dir, prefix=config.prefix, rank=config.rank,
                        max_samples=config.shard_samples, max_bytes=config.shard_bytes) as writer:
        todo = [k for k in keys if k not in writer.done_keys]
        summary.skipped = len(keys) - len(todo)
        bar = tqdm(total=len(todo), desc=f"convert rank {config.rank}", unit="video", disable=not progress)
        try:
            _convert_todo(items, todo, config, writer, failure_log, summary, bar, should_stop)
        finally:
            bar.close()
    summary.bytes = writer.bytes_written
    summary.seconds = round(time.time() - start, 3)
    _write_atomic(summary_path(out_dir, config.rank), json.dumps(asdict(summary), indent=1))
    return summary


def _convert_todo(items: dict[str, VideoItem], todo: list[str], config: ConvertConfig, writer: ShardWriter,
                  failure_log: FailureLog, summary: Summary, bar, should_stop: Callable[[], bool] | None) -> None:
    if not todo:
        return
    converter = Converter(config)
    for key, prepared, error in _prefetch(lambda k: converter.prepare(items[k]), todo, config.decode_workers):
        if should_stop is not None and should_stop():
            summary.interrupted = True
            break
        item = items[key]
        if error is None:
            try:
                features, meta = converter.finish(key, item, *prepared)
                writer.write(key, features, meta)
            except ValueError as err:  # e.g. the encoder refusing a frame size
                error = ItemFailed(str(prepared[0]), _one_line(err))
        if error is not None:
            failure_log.add({"file": error.file, "reason": str(error), "key": key,
                             "video": item.video, "annotation": item.where})
            summary.failed += 1
        else:
            summary.ok += 1
            summary.samples += len(item.conversations) + len(item.qa)
            decoded = prepared[1]
            if isinstance(decoded, DecodedVideo):
                summary.capped += decoded.capped
                summary.merged += len(decoded.timestamps) < decoded.targets
        bar.update(1)
        bar.set_postfix(failed=summary.failed)


def merge(out_dir: str | Path, *, world_size: int | None = None, wait_s: float = 0.0,
          run_id: str | None = None, since: float | None = None, progress: bool = False) -> dict:
    """Write index.json once every rank has finished.

    With world_size given, first waits up to `wait_s` for every rank's summary of this run: the
    one carrying `run_id`, or without a run id, one written after `since`.
    """
    out_dir = Path(out_dir)
    if world_size is not None:
        deadline = time.time() + wait_s
        while True:
            missing = [r for r in range(world_size)
                       if not _finished(summary_path(out_dir, r), run_id, since)]
            if not missing:
                break
            if time.time() >= deadline:
                raise RuntimeError(f"{out_dir}: ranks {missing[:8]} have not finished this run (no "
                                   f"summary-rNNNNN.json); run `mambamia convert --merge-only {out_dir}` later")
            time.sleep(min(2.0, max(0.05, deadline - time.time())))
    return write_index(out_dir, progress=progress)


def total_summary(out_dir: str | Path) -> Summary | None:
    """The sum of every rank's last summary in `out_dir` (None when there is none)."""
    parts = []
    for path in sorted(Path(out_dir).glob("summary-r*.json")):
        try:
            parts.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    if not parts:
        return None
    total = Summary(rank=0, world_size=len(parts))
    for part in parts:
        for name in ("ok", "failed", "skipped", "samples", "bytes"):
            setattr(total, name, getattr(total, name) + int(part.get(name, 0)))
        total.seconds = max(total.seconds, float(part.get("seconds", 0.0)))
    return total


def _finished(path: Path, run_id: str | None, since: float | None) -> bool:
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if run_id is not None:
        return summary.get("run_id") == run_id
    return since is None or path.stat().st_mtime >= since
