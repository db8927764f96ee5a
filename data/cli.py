"""`mambamia convert` and `mambamia extract`: argument parsing around data.convert.

Rank and world size come from --rank/--world-size, else from SLURM (SLURM_PROCID/SLURM_NTASKS,
times SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT for job arrays), else 0/1. SIGUSR1/SIGTERM stop
a rank between videos with its shards complete (exit 85, as the trainer), ready to be requeued.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from data.annotations import FORMATS, AnnotationError, VideoItem, parse_file
from data.convert import VIDEO_EXTS, ConvertConfig, convert, group_items, make_key, merge, total_summary
from data.video import BACKENDS, SamplingConfig

CONVERT_EXAMPLES = """\
examples:
  # LLaVA-Video conversations + videos, features extracted on the fly (SigLIP, layer -2, 2x2 pool)
  mambamia convert --annotations llava_video_0_30s.json --videos /data/videos \\
      --encoder /models/siglip-so400m --pool 2 --fps 1 --max-frames 64 --out /shards/llava --merge

  # Video-MME questions (its hub Parquet file; JSON/JSONL also read) over per-video feature
  # files extracted elsewhere (<videoID>.npy); Parquet needs pip install 'mambamia[parquet]'
  mambamia convert --annotations videomme/test-00000-of-00001.parquet --features /feats/videomme \\
      --encoder-name siglip-so400m --fps 1 --out /shards/videomme --merge

  # 8 SLURM tasks (rank/world size from SLURM_PROCID/SLURM_NTASKS), then one merge step
  srun -n 8 mambamia convert --annotations mlvu/*.json --videos /data/mlvu --encoder ENC --out OUT
  mambamia convert --merge-only OUT

  # check a dataset folder (copied, or old) against its index: counts, checksums, every record
  mambamia convert --verify OUT

A rerun after a kill skips the videos in complete shards and rewrites the unfinished one (and sets
aside, as NAME.tar.damaged, a complete shard found cut short, converting its videos again). A video
that cannot be converted (missing, undecodable, a path outside --videos/--features, a name the file
system refuses) is a line in OUT/failures-rNNNNN.jsonl, appended as it happens, and the run goes on.
Questions without an id (MLVU) get "<file>:<record or line>" as their id, with a warning.

Exit codes:
  0   done (some failures allowed; see the failures file)
  1   nothing could be converted (every video of this slice failed)
  2   bad arguments, annotations or shards: one line on stderr naming the file, row and field
      (--skip-bad-annotations logs bad annotation records and files as failures instead)
  85  stopped by SIGUSR1/SIGTERM with its shards complete: rerun to continue
"""

# Exit code of a rank that stopped early on SIGUSR1/SIGTERM with its shards complete: the trainer's
# requeue code, so slurm/ treats conversion and training alike.
STOPPED_EXIT_CODE = 85

EXTRACT_EXAMPLES = """\
examples:
  # every video under /data/raw (recursively) -> feature shards with no annotations
  mambamia extract /data/raw --encoder /models/siglip-so400m --layer -2 --pool 2 --out /shards/raw --merge

  # a list of video paths (relative to /data/raw), 4-way job array
  sbatch --array=0-3 --wrap "mambamia extract /data/raw --list todo.txt --encoder ENC --out OUT"
  mambamia extract --merge-only OUT

Reruns, failures and exit codes work as for `mambamia convert` (see its --help).
"""


def slurm_rank() -> tuple[int, int]:
    """(rank, world size) from the SLURM environment; (0, 1) outside SLURM."""
    env = os.environ
    rank, world = int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_NTASKS", 1))
    if "SLURM_ARRAY_TASK_ID" in env:
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        hi = int(env.get("SLURM_ARRAY_TASK_MAX", env["SLURM_ARRAY_TASK_ID"]))
        count = int(env.get("SLURM_ARRAY_TASK_COUNT", hi - lo + 1))
        rank += (int(env["SLURM_ARRAY_TASK_ID"]) - lo) * world
        world *= count
    return rank, world


def _usable_cpus() -> int:
    # Under SLURM the task's CPU set, not the node's core count.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _common_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("frames")
    g.add_argument("--fps", type=float, default=1.0, help="frames per second to sample (default 1)")
    g.add_argument("--max-frames", type=int, default=32,
                   help="at most this many frames per video, spread uniformly when fps asks for more (default 32)")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="video decoder: decord with PyAV fallback (auto), or only one of them")
    g.add_argument("--decode-short-side", type=int, metavar="PIXELS",
                   help="shrink frames while decoding so the shorter side is at most PIXELS (saves memory "
                        "on 4K sources; the encoder resizes to its input either way). Default: full size")
    g = parser.add_argument_group("vision encoder")
    g.add_argument("--encoder", help="SigLIP/CLIP vision model (with preprocessor_config.json): a local folder or "
                   "a hub id, e.g. google/siglip2-so400m-patch16-384")
    g.add_argument("--layer", type=int, default=-2, help="hidden state to keep (default -2)")
    g.add_argument("--pool", type=int, default=1, help="average-pool the patch grid by this factor (default 1)")
    g.add_argument("--batch-size", type=int, default=32, help="frames per encoder forward (default 32)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    g = parser.add_argument_group("output")
    g.add_argument("--out", help="output folder for shards, index.json, failures and summaries")
    g.add_argument("--prefix", default="shard", help="shard file-name prefix (default 'shard')")
    g.add_argument("--shard-samples", type=int, default=1000, help="videos per shard at most (default 1000)")
    g.add_argument("--shard-bytes", type=int, default=1 << 30, help="bytes per shard at most (default 1 GiB)")
    g.add_argument("--decode-workers", type=int, default=min(8, _usable_cpus()),
                   help="threads decoding ahead of the encoder (default: the CPUs this process may use, at most 8)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = parser.add_argument_group("distribution")
    g.add_argument("--rank", type=int, help="this process's slice (default: SLURM_PROCID / array task, else 0)")
    g.add_argument("--world-size", type=int, help="number of slices (default: SLURM_NTASKS x array size, else 1)")
    g.add_argument("--merge", action="store_true",
                   help="after converting, rank 0 waits for every rank's summary and writes index.json")
    g.add_argument("--merge-wait", type=float, default=3600.0, help="seconds rank 0 waits for the others (default 3600)")
    g.add_argument("--run-id", help="id shared by the ranks of one launch, so --merge ignores summaries of "
                                    "earlier runs (default: SLURM_ARRAY_JOB_ID or SLURM_JOB_ID)")
    g.add_argument("--merge-only", metavar="OUT", help="only write OUT/index.json from its complete shards")
    g.add_argument("--verify", metavar="OUT",
                   help="only check OUT/index.json against its shards (names, sample counts, sha256) and read "
                        "every record's metadata and npy header: exit 0 if all hold, 2 naming what does not")


class _StopOnSignals:
    """SIGUSR1 (time limit near) / SIGTERM (preemption) ask the conversion to stop between videos."""

    def __enter__(self):
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return lambda: self.requested

    def _handle(self, signum, frame):
        self.requested = True
        print(f"got {signal.Signals(signum).name}: finishing the open shard, then stopping", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _rank(args) -> tuple[int, int]:
    if args.rank is None and args.world_size is None:
        return slurm_rank()
    return (args.rank or 0), (args.world_size or 1)


def _run(args, items: dict[str, VideoItem], *, videos_root: str | None, features_root: str | None,
         failures: list[dict]) -> int:
    rank, world = _rank(args)
    run_id = args.run_id or os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    started = time.time()
    encoder = None
    if args.encoder:
        from data.extract import EncoderConfig  # imports torch, which feature files do not need

        encoder = EncoderConfig(path=args.encoder, layer=args.layer, pool=args.pool,
                                batch_size=args.batch_size, device=args.device)
    config = ConvertConfig(
        out_dir=args.out, videos_root=videos_root, features_root=features_root,
        sampling=SamplingConfig(fps=args.fps, max_frames=args.max_frames, backend=args.backend,
                                short_side=args.decode_short_side),
        encoder=encoder,
        encoder_name=getattr(args, "encoder_name", None) or (Path(args.encoder).name if args.encoder else "unknown"),
        layer=args.layer, prefix=args.prefix, shard_samples=args.shard_samples, shard_bytes=args.shard_bytes,
        rank=rank, world_size=world, decode_workers=args.decode_workers, run_id=run_id)
    with _StopOnSignals() as stop_requested:
        summary = convert(items, config, progress=not args.no_progress, failures=failures,
                          should_stop=stop_requested)
    print(summary.line())
    if videos_root is not None and summary.ok:
        print(summary.sampling_line(config.sampling))
    if summary.failed:
        print(f"failures: {Path(args.out) / f'failures-r{rank:05d}.jsonl'}")
    if summary.interrupted:
        print(f"stopped on request: shards so far are complete; rerun to continue (exit {STOPPED_EXIT_CODE})")
        return STOPPED_EXIT_CODE
    if args.merge and rank == 0:
        index = merge(args.out, world_size=world, wait_s=args.merge_wait, run_id=run_id, since=started,
                      progress=not args.no_progress)
        _print_index(args.out, index)
    # Some failures are expected in any large dataset; only a slice with nothing converted, in this
    # run or an earlier one, is an error.
    return 1 if summary.ok + summary.skipped == 0 and summary.failed > 0 else 0


def _merge_only(prog: str, out: str, progress: bool) -> int:
    try:
        index = merge(out, progress=progress)
    except RuntimeError as err:
        return _fail(prog, str(err))
    _print_index(out, index)
    return 0


def _verify_only(prog: str, out: str) -> int:
    """Every check the loader makes before reading features, plus the checksums: a full read."""
    from data.dataset import DatasetError, open_dataset  # imports torch (data.records)
    from data.records import BadRecord

    try:
        dataset = open_dataset(out, verify="sha256")
    except DatasetError as err:
        return _fail(prog, str(err))
    reader, bad = dataset.reader(), 0
    for shard in dataset.shards:
        for i in range(shard.samples):
            try:
                reader.head(shard.path, i)
            except BadRecord as err:
                bad += 1
                print(f"bad record: {err.line()}", file=sys.stderr)
    reader.close()
    print(f"{Path(out) / 'index.json'}: {len(dataset.shards)} shards, {dataset.size} records; names, sample "
          f"counts and sha256 match the shards; {bad} record(s) with bad metadata or npy header")
    return 2 if bad else 0


def _print_index(out: str, index: dict) -> None:
    total = total_summary(out)
    if total is not None and total.world_size > 1:
        print(total.line(f"all {total.world_size} ranks (last runs)"))
    print(f"index: {Path(out) / 'index.json'}: {len(index['shards'])} shards, "
          f"{index['total_samples']} videos, {index['total_bytes'] / 1e6:.1f} MB")


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def convert_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mambamia convert", epilog=CONVERT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn annotation files (LLaVA-Video/ShareGPT conversations, or LVBench / MLVU / "
                    "Video-MME multiple-choice questions) plus their videos or per-video feature files "
                    "into WebDataset shards of float16 frame features, one record per video.")
    g = parser.add_argument_group("inputs")
    g.add_argument("--annotations", nargs="+", metavar="FILE", help="JSON, JSONL or Parquet annotation files")
    g.add_argument("--format", choices=FORMATS, default="auto", help="annotation format (default: from the fields)")
    g.add_argument("--videos", metavar="DIR", help="root the annotations' video paths are relative to")
    g.add_argument("--features", metavar="DIR",
                   help="root of per-video feature files <video without extension>.{npy,safetensors,pt}")
    g.add_argument("--encoder-name", help="encoder recorded for feature files (default: --encoder's folder name)")
    g.add_argument("--skip-bad-annotations", action="store_true",
                   help="log malformed annotation records to the failures file instead of stopping")
    _common_args(parser)
    args = parser.parse_args(argv)
    if args.merge_only:
        return _merge_only(parser.prog, args.merge_only, not args.no_progress)
    if args.verify:
        return _verify_only(parser.prog, args.verify)
    if not args.annotations or not args.out or (args.videos is None) == (args.features is None):
        return _fail(parser.prog, "need --annotations, --out and exactly one of --videos / --features "
                                  "(or --merge-only OUT)")
    if args.videos and not args.encoder:
        return _fail(parser.prog, "--videos needs --encoder FOLDER to extract features")
    failures: list[dict] = []

    def skip(err: AnnotationError) -> None:
        failures.append({"file": str(err).split(":", 1)[0], "reason": str(err)})

    try:
        items = [it for path in args.annotations
                 for it in parse_file(path, args.format, skip if args.skip_bad_annotations else None)]
    except AnnotationError as err:
        return _fail(parser.prog, str(err))
    try:
        return _run(args, group_items(items), videos_root=args.videos, features_root=args.features,
                    failures=failures)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        return _fail(parser.prog, " ".join(str(err).split()))


def find_videos(root: Path, list_file: str | None) -> list[str]:
    """Video paths relative to root: those listed in list_file, or every video file under root."""
    if list_file:
        lines = Path(list_file).read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.suffix.lower() in VIDEO_EXTS and p.is_file())


def extract_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mambamia extract", epilog=EXTRACT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Decode every video under VIDEO_DIR (or those in --list), encode the sampled frames "
                    "with a vision encoder (a local folder or a hub id) and write feature shards (records "
                    "without annotations).")
    parser.add_argument("videos", nargs="?", metavar="VIDEO_DIR", help="folder of videos (searched recursively)")
    parser.add_argument("--list", metavar="FILE", help="text file of video paths relative to VIDEO_DIR, one per line")
    _common_args(parser)
    args = parser.parse_args(argv)
    if args.merge_only:
        return _merge_only(parser.prog, args.merge_only, not args.no_progress)
    if args.verify:
        return _verify_only(parser.prog, args.verify)
    if not args.videos or not args.out or not args.encoder:
        return _fail(parser.prog, "need VIDEO_DIR, --out and --encoder (or --merge-only OUT)")
    root = Path(args.videos)
    if not root.is_dir():
        return _fail(parser.prog, f"{root}: not a folder")
    videos = find_videos(root, args.list)
    if not videos:
        return _fail(parser.prog, f"{args.list or root}: no videos ({', '.join(VIDEO_EXTS)})")
    items = {make_key(v): VideoItem(video=v, where=v) for v in videos}
    try:
        return _run(args, items, videos_root=str(root), features_root=None, failures=[])
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        return _fail(parser.prog, " ".join(str(err).split()))
