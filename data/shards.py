"""Writing feature shards and the dataset index, and scanning a shard's tar headers (format:
../shared/DESIGN.md, "The shard format").

A shard is a plain POSIX tar holding, per video, `<key>.features.npy` (float16 [F, P, D]) and
`<key>.json` (the record metadata). Each rank writes its own shards with deterministic names,
`<prefix>-r<rank>-<n>.tar`, always first under a temporary name that is renamed once the tar is
complete and synced. A rerun after a kill therefore finds two kinds of files: complete shards
(their keys are skipped) and at most one temporary partial shard per rank (deleted and rewritten).

    with ShardWriter("out", rank=0, max_samples=500) as writer:
        for key, features, meta in records:
            if key not in writer.done_keys:
                writer.write(key, features, meta)
    write_index("out")   # once every rank has finished

`scan_shard` reads a tar's headers only (the readers' table of member offsets) and says whether the
tar is complete: a compressed file, a garbled or cut header, a member past the end of the file or
missing end-of-archive blocks make it incomplete, and `write_index` refuses to index such a shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
INDEX_NAME = "index.json"
INDEX_VERSION = 1
TEMP_SUFFIX = ".partial"
DAMAGED_SUFFIX = ".damaged"
FEATURES_EXT = "features.npy"
META_EXT = "json"

# webdataset splits a member name at the first dot of its basename to find the key, and a slash
# would make the key a directory path: keys are restricted so the stock reader groups members right.
# The ustar header holds 100-byte names: the key plus ".features.npy" must fit.
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-r(?P<rank>\d{5})-(?P<n>\d{6})\.tar$")
_TAR_BLOCK = 512
_COMPRESSION_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
                      (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4"))


def shard_name(prefix: str, rank: int, n: int) -> str:
    return f"{prefix}-r{rank:05d}-{n:06d}.tar"


def check_key(key: str) -> None:
    if not _KEY_RE.match(key):
        raise ValueError(f"shard key {key!r}: expected 1-80 letters, digits, '_' or '-' "
                         "(webdataset splits keys at dots and slashes)")


def completed_shards(out_dir: str | Path, *, prefix: str | None = None,
                     rank: int | None = None) -> list[Path]:
    """Complete shards in `out_dir`, sorted by name, optionally only one prefix and/or rank."""
    found = []
    for path in sorted(Path(out_dir).glob("*.tar")):
        m = _SHARD_RE.match(path.name)
        if m is None:
            continue
        if prefix is not None and m["prefix"] != prefix:
            continue
        if rank is not None and int(m["rank"]) != rank:
            continue
        found.append(path)
    return found


@dataclass(frozen=True)
class Member:
    offset: int
    size: int


@dataclass
class ShardTable:
    path: str
    file_size: int
    records: list[tuple[str, dict[str, Member]]]
    """(key, {extension: member}) in tar order; the i-th record of the index is records[i]."""
    problem: str | None = None
    """Why the tar is not complete (cut short, damaged header, compressed); None when it ends with
    its end-of-archive blocks after intact members."""
    unreadable: bool = False
    """Not a plain tar at all (compressed, or no tar header): no record can be read from it."""


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's grouping rule: key = path up to the first dot of the basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def compression_of(magic: bytes) -> str | None:
    """The compressor whose magic number starts `magic`, or None."""
    return next((name for sig, name in _COMPRESSION_MAGIC if magic.startswith(sig)), None)


def scan_shard(path: str | Path) -> ShardTable:
    """Member offsets of a shard, and whether it is complete.

    A tar cut short or damaged ends the table where its headers stop (what came before is still
    usable) and sets `problem`; a compressed file is refused from its magic number, unread. Plain
    ustar headers of regular files (what ShardWriter and webdataset write) are read directly, about
    4x faster than tarfile; any other header (pax, GNU long names, links, a bad checksum) hands the
    whole file to tarfile, which reads every format and says what is wrong.
    """
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        kind = compression_of(f.read(8))
        if kind is not None:
            return ShardTable(path, size, [], f"compressed ({kind}); expected a plain tar", unreadable=True)
        fast = _scan_ustar(f.fileno(), size)
        if fast is not None:
            return ShardTable(path=path, file_size=size, records=fast[0], problem=fast[1])
        f.seek(0)
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, EOFError, ValueError, UnicodeError) as e:
            return ShardTable(path, size, [], f"not a tar ({e})", unreadable=True)
        with tar:
            records, problem = _scan_members(tar, f, size)
    return ShardTable(path=path, file_size=size, records=records, problem=problem)


_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES without GNU sparse files
_WINDOW = 1 << 16
_ZERO_BLOCK = bytes(_TAR_BLOCK)


def _octal(field: bytes) -> int:
    """A numeric header field as tarfile reads it (up to the first NUL, spaces stripped)."""
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _scan_ustar(fd: int, size: int) -> tuple[list[tuple[str, dict[str, Member]]], str | None] | None:
    """(records, problem) read straight from plain ustar headers; None for anything else."""
    records: list[tuple[str, dict[str, Member]]] = []
    offset, window, window_at, problem = 0, b"", 0, None
    while True:
        if not window_at <= offset <= window_at + len(window) - 2 * _TAR_BLOCK:
            window, window_at = os.pread(fd, _WINDOW, offset), offset  # headers and small members
        block = window[offset - window_at: offset - window_at + _TAR_BLOCK]
        if len(block) < _TAR_BLOCK:
            if not records:
                return None  # an empty or tiny file: tarfile says what it is
            return records, problem or f"cut short at byte {offset}: no end-of-archive blocks"
        if block == _ZERO_BLOCK:
            end = window[offset - window_at + _TAR_BLOCK: offset - window_at + 2 * _TAR_BLOCK]
            return records, problem or (None if end == _ZERO_BLOCK else
                                        f"no end-of-archive blocks at byte {offset} (cut short or damaged)")
        try:
            if _octal(block[148:156]) != sum(block[:148]) + 8 * 32 + sum(block[156:]):
                return None
            flag, member_size = block[156:157], _octal(block[124:136])
            name = block[:100].split(b"\0", 1)[0]
            # POSIX ustar only: GNU headers ("ustar  ") keep times where ustar keeps the prefix
            prefix = block[345:500].split(b"\0", 1)[0] if block[257:265] == b"ustar\x0000" else b""
            name = (prefix + b"/" + name if prefix else name).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        if flag not in _REGULAR and (flag != b"5" or member_size):
            return None
        if flag in _REGULAR:
            if offset + _TAR_BLOCK + member_size > size:
                problem = problem or f"member {name} is cut short"
            key, ext = split_member_name(name)
            if not records or records[-1][0] != key:
                records.append((key, {}))
            records[-1][1][ext] = Member(offset=offset + _TAR_BLOCK, size=member_size)
        offset += _TAR_BLOCK + -(-member_size // _TAR_BLOCK) * _TAR_BLOCK


def _scan_members(tar: tarfile.TarFile, f, size: int) -> tuple[list[tuple[str, dict[str, Member]]], str | None]:
    records: list[tuple[str, dict[str, Member]]] = []
    problem = None
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, EOFError, ValueError, UnicodeError) as e:
            return records, problem or f"damaged or cut short after byte {tar.offset} ({e})"
        if info is None:
            # tarfile stops silently at a zero block, a garbled header or the end of the file:
            # only the two zero blocks tar writes at the end mean the archive is whole.
            f.seek(tar.offset)
            if f.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
                problem = problem or f"no end-of-archive blocks at byte {tar.offset} (cut short or damaged)"
            return records, problem
        if not info.isfile() or info.issparse():
            continue
        if info.offset_data + info.size > size:
            problem = problem or f"member {info.name} is cut short"
        key, ext = split_member_name(info.name)
        if not records or records[-1][0] != key:
            records.append((key, {}))
        records[-1][1][ext] = Member(offset=info.offset_data, size=info.size)


def shard_problem(table: ShardTable) -> str | None:
    """Why a shard is not a complete one (as ShardWriter finishes them), or None."""
    if table.problem is not None:
        return table.problem
    for key, members in table.records:
        if set(members) != {FEATURES_EXT, META_EXT}:
            return f"record {key!r} has members {sorted(members)}, expected {[FEATURES_EXT, META_EXT]}"
    return None


def shard_keys(path: str | Path) -> list[str]:
    """Sample keys of a shard in order, read from the tar headers only (data blocks are skipped)."""
    return [key for key, _ in scan_shard(path).records]


def _tar_member_bytes(payload_size: int) -> int:
    blocks = -(-payload_size // _TAR_BLOCK)
    return _TAR_BLOCK + blocks * _TAR_BLOCK  # header + padded data (no PAX headers: names are ASCII)


def _tar_file_bytes(members_bytes: int) -> int:
    """Final file size: members, two zero end blocks, then padding to tarfile's 10 KiB record."""
    return -(-(members_bytes + 2 * _TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _member(name: str, payload: bytes) -> bytes:
    """One ustar member as tarfile writes it: header block, data, zero padding to a block."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    info.mtime = 0  # identical inputs give byte-identical shards (and checksums)
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + payload + bytes(-len(payload) % _TAR_BLOCK)


def encode_features(features: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(features), allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes records into size-bounded tar shards for one rank; resumable after a kill.

    On entry, stale temporary shards of this (prefix, rank) are removed and the keys of its complete
    shards are collected in `done_keys` (a complete shard found damaged is renamed aside and its
    videos redone); new shards continue the numbering after the last complete one. A record goes
    to the file in one write, undone (truncated) if that write fails, so the open shard only ever
    holds whole records: on exit, clean or by an exception, it is completed and renamed, and the
    work in it is kept. Only a kill leaves a temporary shard, which the rerun rewrites.
    """

    def __init__(self, out_dir: str | Path, *, prefix: str = "shard", rank: int = 0,
                 max_samples: int = 1000, max_bytes: int = 1 << 30):
        if rank < 0:
            raise ValueError(f"ShardWriter rank: expected >= 0, got {rank}")
        if max_samples < 1 or max_bytes < 1:
            raise ValueError(f"ShardWriter: max_samples and max_bytes must be >= 1, "
                             f"got {max_samples} and {max_bytes}")
        if not prefix or "/" in prefix:
            raise ValueError(f"ShardWriter prefix: expected a plain file-name prefix, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.rank = rank
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.done_keys: set[str] = set()
        self.written: list[Path] = []  # shards completed by this writer (not earlier runs)
        self.set_aside: list[Path] = []  # damaged complete shards renamed on entry
        self.samples_written = 0
        self.bytes_written = 0
        self._next_n = 0
        self._file = None
        self._tmp_path: Path | None = None
        self._count = 0
        self._size = 0
        self._keys_in_open: set[str] = set()

    def __enter__(self) -> ShardWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        pattern = shard_name(self.prefix, self.rank, 0).replace("000000", "*") + TEMP_SUFFIX
        for stale in self.out_dir.glob(pattern):
            stale.unlink()
        for path in completed_shards(self.out_dir, prefix=self.prefix, rank=self.rank):
            self._next_n = max(self._next_n, int(_SHARD_RE.match(path.name)["n"]) + 1)
            table = scan_shard(path)
            problem = shard_problem(table)
            if problem is not None:
                # Damaged after it was completed (a disk, a copy cut short): its records are not
                # done. Set it aside, never delete it, and convert its videos again.
                aside = path.with_name(path.name + DAMAGED_SUFFIX)
                os.replace(path, aside)
                self.set_aside.append(aside)
                log.warning("%s: %s; renamed to %s, its videos will be converted again", path, problem, aside.name)
                continue
            self.done_keys.update(key for key, _ in table.records)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._finish_shard()
            return
        try:  # keep what was converted before the error: the open shard holds whole records
            self._finish_shard()
        except OSError as err:  # e.g. the disk is full: nothing sound to keep
            log.warning("%s: could not complete the open shard after an error (%s); discarded",
                        self._tmp_path, err)
            self._abort_shard()

    def write(self, key: str, features: np.ndarray, meta: dict) -> None:
        check_key(key)
        if key in self.done_keys or key in self._keys_in_open:
            raise ValueError(f"shard key {key!r} written twice by rank {self.rank}")
        if not isinstance(features, np.ndarray) or features.dtype != np.float16 or features.ndim != 3:
            got = (f"{features.dtype} array of shape {features.shape}"
                   if isinstance(features, np.ndarray) else type(features).__name__)
            raise ValueError(f"record {key!r} features: expected a float16 [F, P, D] array, got {got}")
        if not np.isfinite(features).all():
            raise ValueError(f"record {key!r} features: contain NaN or inf")
        npy = encode_features(features)
        meta_bytes = json.dumps(meta, ensure_ascii=False, allow_nan=False).encode("utf-8")
        record_bytes = _tar_member_bytes(len(npy)) + _tar_member_bytes(len(meta_bytes))
        if self._file is not None and self._count and _tar_file_bytes(self._size + record_bytes) > self.max_bytes:
            self._finish_shard()
        if self._file is None:
            self._open_shard()
        record = _member(f"{key}.{FEATURES_EXT}", npy) + _member(f"{key}.{META_EXT}", meta_bytes)
        start = self._file.tell()
        try:
            self._file.write(record)
        except BaseException:
            self._file.truncate(start)  # the shard ends after its last whole record again
            self._file.seek(start)
            raise
        self._keys_in_open.add(key)
        self._count += 1
        self._size += record_bytes
        if self._count >= self.max_samples:
            self._finish_shard()

    def _open_shard(self) -> None:
        final = self.out_dir / shard_name(self.prefix, self.rank, self._next_n)
        self._tmp_path = final.with_name(final.name + TEMP_SUFFIX)
        self._file = open(self._tmp_path, "wb")
        self._count = 0
        self._size = 0
        self._keys_in_open = set()

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        end = self._file.tell()
        self._file.write(bytes(_tar_file_bytes(end) - end))  # the two zero end blocks + padding
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._tmp_path.with_name(self._tmp_path.name[: -len(TEMP_SUFFIX)])
        os.replace(self._tmp_path, final)
        self.written.append(final)
        self.done_keys |= self._keys_in_open
        self.samples_written += self._count
        self.bytes_written += final.stat().st_size
        self._next_n += 1
        self._file = self._tmp_path = None

    def _abort_shard(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._tmp_path.unlink(missing_ok=True)
        self._file = self._tmp_path = None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks (the checksum index.json records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_index(out_dir: str | Path, *, progress: bool = False) -> dict:
    """Scan the complete shards of `out_dir` and write `index.json` atomically; returns the index.

    Run once every rank has finished: a leftover temporary shard means a rank is still writing (or
    was killed and not rerun), so it is an error rather than silently missing data.
    """
    out_dir = Path(out_dir)
    partial = sorted(p.name for p in out_dir.glob("*.tar" + TEMP_SUFFIX))
    if partial:
        raise RuntimeError(f"{out_dir}: unfinished shards {partial[:3]}: rerun the ranks that "
                           "wrote them before merging")
    shards, seen = [], {}
    paths = completed_shards(out_dir)
    if progress:  # checksumming terabytes of shards takes a while
        from tqdm import tqdm

        paths = tqdm(paths, desc="index shards", unit="shard")
    for path in paths:
        table = scan_shard(path)
        problem = shard_problem(table)
        if problem is not None:
            raise RuntimeError(f"{path}: {problem}; not indexed. Rerun the convert rank that wrote it "
                               f"(it sets the shard aside as {path.name}{DAMAGED_SUFFIX} and converts "
                               "its videos again), then merge")
        keys = [key for key, _ in table.records]
        for key in keys:
            if key in seen:
                raise RuntimeError(f"{out_dir}: key {key!r} is in both {seen[key]} and {path.name}")
            seen[key] = path.name
        shards.append({"name": path.name, "samples": len(keys), "bytes": path.stat().st_size,
                       "sha256": file_sha256(path)})
    if not shards:
        raise RuntimeError(f"{out_dir}: no complete shards (*-rNNNNN-NNNNNN.tar) to index")
    index = {
        "version": INDEX_VERSION,
        "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "members": [FEATURES_EXT, META_EXT],
    }
    tmp = out_dir / (INDEX_NAME + TEMP_SUFFIX)
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / INDEX_NAME)
    return index
