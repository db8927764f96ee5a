"""Random access to validated records inside tar shards, without unpickling anything.

A shard's tar headers are scanned once (header blocks only, data is skipped by seeking) into a
table of member offsets, so a record is read with positioned reads straight into its destination
buffer: the same copy `cat` makes, and no per-record tar parsing. The npy header is matched field
by field (never evaluated, never unpickled); object and structured dtypes are refused.

    reader = ShardReader()
    head = reader.head("shards/shard-r00000-000000.tar", 3)   # meta + npy layout, BadRecord if not
    reader.read_frames(head, frame_idx, out)                  # out: [len(frame_idx), P, D] tensor

Every way a record can be bad raises `BadRecord(reason, detail)`; the loader counts the reasons.
"""
from __future__ import annotations

import json
import math
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FEATURES_MEMBER = "features.npy"
META_MEMBER = "json"
REASONS = ("truncated", "missing_field", "json", "npy", "dtype", "shape", "nonfinite", "text")
_NPY_HEAD_PROBE = 4096
_READ_PIECE = 1 << 20  # even, so pieces split no float16


class BadRecord(Exception):
    """A record that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


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


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's grouping rule: key = path up to the first dot of the basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def scan_shard(path: str | Path) -> ShardTable:
    """Member offsets of a shard; a tar cut short ends the table where its headers stop."""
    path = str(path)
    records: list[tuple[str, dict[str, Member]]] = []
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.ReadError, EOFError):
        return ShardTable(path=path, file_size=os.path.getsize(path), records=[])
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.ReadError, EOFError):
                break  # a header cut in half: what came before is still usable
            if info is None:
                break
            if not info.isfile():
                continue
            key, ext = split_member_name(info.name)
            if not records or records[-1][0] != key:
                records.append((key, {}))
            records[-1][1][ext] = Member(offset=info.offset_data, size=info.size)
    return ShardTable(path=path, file_size=os.path.getsize(path), records=records)


@dataclass
class RecordHead:
    """What is known about a record before its feature data is read."""
    key: str
    meta: dict
    shape: tuple[int, int, int]
    """(frames, patches, dim) of the float16 feature array."""
    data_offset: int
    path: str


def _read_exact(fd: int, buf: memoryview, offset: int) -> int:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _parse_meta(raw: bytes, key: str) -> dict:
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRecord("json", f"{key}.json is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise BadRecord("json", f"{key}.json: expected an object, got {type(meta).__name__}")
    ts = meta.get("timestamps")
    if not isinstance(ts, list) or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in ts):
        raise BadRecord("missing_field", f"{key}.json 'timestamps': expected a list of finite numbers")
    if not isinstance(meta.get("conversations", []), list) or not isinstance(meta.get("qa", []), list):
        raise BadRecord("missing_field", f"{key}.json 'conversations'/'qa': expected lists")
    if "conversations" not in meta and "qa" not in meta:
        raise BadRecord("missing_field", f"{key}.json: neither 'conversations' nor 'qa'")
    return meta


_NPY_MAGIC = b"\x93NUMPY"
_NPY_DESCR = re.compile(r"""['"]descr['"]\s*:\s*['"]([<>|=]?[A-Za-z]+\d*)['"]""")
_NPY_FORTRAN = re.compile(r"""['"]fortran_order['"]\s*:\s*(True|False)""")
_NPY_SHAPE = re.compile(r"""['"]shape['"]\s*:\s*\(\s*((?:\d+\s*,\s*)*\d*)\s*\)""")


def _parse_npy_header(probe: bytes, key: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) from the first bytes of an npy member.

    The header is a Python dict literal; it is matched field by field instead of evaluated (numpy's
    reader uses ast.literal_eval, which CPython 3.11 can fail on nondeterministically in forked
    workers), and a descr other than a plain type code - a structured or object dtype - is refused.
    """
    where = f"{key}.{FEATURES_MEMBER}"
    if probe[:6] != _NPY_MAGIC or len(probe) < 10:
        raise BadRecord("npy", f"{where}: not an npy file")
    major = probe[6]
    if major == 1:
        start, length = 10, int.from_bytes(probe[8:10], "little")
    elif major in (2, 3) and len(probe) >= 12:
        start, length = 12, int.from_bytes(probe[8:12], "little")
    else:
        raise BadRecord("npy", f"{where}: npy version {major} unknown")
    if start + length > len(probe):
        raise BadRecord("npy", f"{where}: npy header of {length} bytes is cut short or too long")
    header = probe[start: start + length].decode("utf-8" if major == 3 else "latin1", "replace")
    descr, fortran, shape = _NPY_DESCR.search(header), _NPY_FORTRAN.search(header), _NPY_SHAPE.search(header)
    if descr is None or fortran is None or shape is None:
        raise BadRecord("npy", f"{where}: npy header {header.strip()!r} is not a plain array header")
    try:
        dtype = np.dtype(descr.group(1))
    except TypeError:
        raise BadRecord("npy", f"{where}: unknown dtype {descr.group(1)!r}") from None
    if dtype.hasobject:
        raise BadRecord("npy", f"{where}: object arrays need pickle, refused")
    if fortran.group(1) == "True":
        raise BadRecord("npy", f"{where}: Fortran order, expected C order")
    dims = tuple(int(d) for d in shape.group(1).replace(" ", "").split(",") if d)
    return dims, dtype, start + length


def all_finite(x: np.ndarray, chunk: int = _READ_PIECE // 2) -> bool:
    """No NaN or inf in a float16 array (any float16 view of its bits), in two integer max
    reductions per cache-sized chunk: float16 NaN/inf have all five exponent bits set, so their
    bits are 0x7C00-0x7FFF (positive) or 0xFC00-0xFFFF (negative), the top of the int16 and of the
    uint16 order. np.isfinite on float16 converts every element (about 15x slower)."""
    bits = x.reshape(-1).view(np.uint16)  # a no-copy view for contiguous input
    for start in range(0, bits.size, chunk):
        part = bits[start: start + chunk]
        if part.max() >= 0xFC00 or part.view(np.int16).max() >= 0x7C00:
            return False
    return True


class ShardReader:
    """Reads record heads and feature frames; caches shard tables and open files per process."""

    def __init__(self, *, num_patches: int | None = None, feature_dim: int | None = None,
                 check_finite: bool = True, max_open: int = 32):
        self.num_patches = num_patches
        self.feature_dim = feature_dim
        self.check_finite = check_finite
        self.max_open = max_open
        self._tables: dict[str, ShardTable] = {}
        self._stage = np.empty(_READ_PIECE // 2, dtype=np.uint16)  # pieces bound for other dtypes
        self._fds: OrderedDict[str, int] = OrderedDict()

    def table(self, path: str) -> ShardTable:
        if path not in self._tables:
            self._tables[path] = scan_shard(path)
        return self._tables[path]

    def _fd(self, path: str) -> int:
        if path in self._fds:
            self._fds.move_to_end(path)
            return self._fds[path]
        if len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        fd = os.open(path, os.O_RDONLY)
        # Records are read front to back within a batch: ask for aggressive read-ahead when the
        # shard is not cached (a no-op for cached pages).
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._fds[path] = fd
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _member(self, table: ShardTable, key: str, members: dict[str, Member], ext: str) -> Member:
        if ext not in members:
            raise BadRecord("missing_field", f"{table.path}: record {key} has no .{ext} member")
        m = members[ext]
        if m.offset + m.size > table.file_size:
            raise BadRecord("truncated", f"{table.path}: {key}.{ext} is cut short")
        return m

    def head(self, path: str, index: int) -> RecordHead:
        table = self.table(path)
        if index >= len(table.records):
            raise BadRecord("truncated", f"{path}: record {index} missing ({len(table.records)} in the tar)")
        key, members = table.records[index]
        fd = self._fd(path)
        m = self._member(table, key, members, META_MEMBER)
        meta = _parse_meta(os.pread(fd, m.size, m.offset), key)
        f = self._member(table, key, members, FEATURES_MEMBER)
        shape, dtype, header_len = _parse_npy_header(os.pread(fd, min(f.size, _NPY_HEAD_PROBE), f.offset), key)
        if dtype != np.dtype("<f2"):
            raise BadRecord("dtype", f"{key}.{FEATURES_MEMBER}: expected float16, got {dtype}")
        if len(shape) != 3 or min(shape) < 1:
            raise BadRecord("shape", f"{key}.{FEATURES_MEMBER}: expected [F, P, D], got {list(shape)}")
        if shape[0] != len(meta["timestamps"]):
            raise BadRecord("shape", f"{key}: {shape[0]} frames but {len(meta['timestamps'])} timestamps")
        for name, want, got in (("patches", self.num_patches, shape[1]), ("dim", self.feature_dim, shape[2])):
            if want is not None and got != want:
                raise BadRecord("shape", f"{key}.{FEATURES_MEMBER}: {name} {got}, expected {want}")
        if header_len + 2 * math.prod(shape) != f.size:
            raise BadRecord("npy", f"{key}.{FEATURES_MEMBER}: {f.size} bytes do not hold {list(shape)} float16")
        return RecordHead(key=key, meta=meta, shape=shape, data_offset=f.offset + header_len, path=path)

    def read_frames(self, head: RecordHead, frame_idx: np.ndarray, out: torch.Tensor) -> None:
        """Frames `frame_idx` (ascending) of the record into `out` [len(frame_idx), P, D].

        Runs of consecutive frames are read with positioned reads of about 1 MiB, each checked for
        NaN/inf right after it lands, while it is still in cache. A float16 `out` is filled in
        place; any other dtype gets each piece converted from a cache-sized float16 buffer (no
        record-sized staging memory to fault in).
        """
        if not out.is_contiguous():
            raise ValueError("read_frames: `out` must be contiguous")
        _, patches, dim = head.shape
        frame_bytes = 2 * patches * dim
        direct = out.dtype == torch.float16
        flat = out.numpy().reshape(-1).view(np.uint16) if direct else None
        target = None if direct else out.view(-1)
        fd = self._fd(head.path)
        start = 0
        while start < len(frame_idx):
            end = start + 1
            while end < len(frame_idx) and frame_idx[end] == frame_idx[end - 1] + 1:
                end += 1
            source = head.data_offset + int(frame_idx[start]) * frame_bytes
            for lo in range(start * frame_bytes, end * frame_bytes, _READ_PIECE):
                hi = min(lo + _READ_PIECE, end * frame_bytes)
                piece = flat[lo // 2: hi // 2] if direct else self._stage[: (hi - lo) // 2]
                if _read_exact(fd, memoryview(piece).cast("B"), source + lo - start * frame_bytes) != hi - lo:
                    raise BadRecord("truncated", f"{head.path}: {head.key} features end early")
                if self.check_finite and not all_finite(piece):
                    raise BadRecord("nonfinite", f"{head.path}: {head.key} features hold NaN or inf")
                if not direct:
                    target[lo // 2: hi // 2].copy_(torch.from_numpy(piece.view(np.float16)))
            start = end
