"""Random access to validated records inside tar shards, without unpickling anything.

A shard's tar headers are scanned once (header blocks only, data is skipped by seeking) into a
table of member offsets, so a record is read with positioned reads straight into its destination
buffer: the same copy `cat` makes, and no per-record tar parsing (data/shards.py: scan_shard). The
npy header is matched against numpy's grammar (never evaluated, never unpickled); object and
structured dtypes are refused.

    reader = ShardReader()
    head = reader.head("shards/shard-r00000-000000.tar", 3)   # meta + npy layout, BadRecord if not
    reader.read_frames(head, frame_idx, out)                  # out: [len(frame_idx), P, D] tensor

Every way a record can be bad raises `BadRecord(reason, detail)` carrying the shard and key; the
loader counts the reasons, eval stops on them. The checks, all before the bytes they guard are read:
the shard is a plain tar (a compressed one is refused, never inflated), a member lies inside the
file, the metadata member is at most MAX_META_BYTES and valid to its leaves (`check_meta`), the npy
header is exactly numpy's three-key dict, and the data size matches the shape it declares.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from data.shards import Member, ShardTable, scan_shard

FEATURES_MEMBER = "features.npy"
META_MEMBER = "json"
REASONS = ("shard", "truncated", "missing_field", "json", "schema", "npy", "dtype", "shape",
           "nonfinite", "text")
"""shard: not a plain tar (compressed, or no tar at all); schema: metadata of the wrong form below
the top level (a turn that is not an object, a qa item without its question, ...)."""
MAX_META_BYTES = 16 << 20
"""A record's JSON is a few KB; a larger member is refused before it is read."""
_NPY_HEAD_PROBE = 4096
_READ_PIECE = 1 << 20  # even, so pieces split no float16


class BadRecord(Exception):
    """A record that cannot be used; `reason` is one of REASONS, `where` names shard and key."""

    def __init__(self, reason: str, detail: str, *, shard: str | None = None, key: str | None = None):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.shard, self.key = reason, detail, shard, key

    @property
    def where(self) -> str:
        return f"{self.shard or '?'}: record {self.key!r}" if self.key is not None else str(self.shard or "?")

    def line(self) -> str:
        """One line for logs and error messages: shard, key, what is wrong, and the reason."""
        return f"{self.where}: {self.detail} ({self.reason})"


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
        raise BadRecord("json", f"{key}.json is not valid JSON ({e})") from None
    except RecursionError:
        raise BadRecord("json", f"{key}.json is nested too deeply") from None
    if not isinstance(meta, dict):
        raise BadRecord("json", f"{key}.json: expected an object, got {type(meta).__name__}")
    ts = meta.get("timestamps")
    if not isinstance(ts, list) or not all(_is_number(t) and math.isfinite(t) for t in ts):
        raise BadRecord("missing_field", f"{key}.json 'timestamps': expected a list of finite numbers")
    if not isinstance(meta.get("conversations", []), list) or not isinstance(meta.get("qa", []), list):
        raise BadRecord("missing_field", f"{key}.json 'conversations'/'qa': expected lists")
    if "conversations" not in meta and "qa" not in meta:
        raise BadRecord("missing_field", f"{key}.json: neither 'conversations' nor 'qa'")
    problem = check_meta(meta)
    if problem is not None:
        raise BadRecord("schema", problem)
    return meta


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_text(x) -> bool:
    return isinstance(x, str) and x.strip() != ""


def check_turn(turn) -> str | None:
    """What is wrong with one ShareGPT turn ({"from", "value"}, or {"role", "content"}), or None."""
    if not isinstance(turn, dict):
        return f"expected an object with 'from' and 'value', got {type(turn).__name__}"
    role, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
    if not isinstance(role, str) or not isinstance(value, str):
        return "expected a string 'from' and a string 'value'"
    return None


def check_qa_item(item) -> str | None:
    """What is wrong with one multiple-choice item (the form `mambamia convert` writes), or None:
    "field 'answer': expected ..."."""
    if not isinstance(item, dict):
        return f"expected an object, got {type(item).__name__}"
    if not _is_text(item.get("question")):
        return "field 'question': expected a non-empty string"
    options = item.get("options")
    if not isinstance(options, list) or not 2 <= len(options) <= 26 or not all(isinstance(o, str) for o in options):
        return "field 'options': expected a list of 2 to 26 strings"
    answer = item.get("answer")
    if answer is not None and not (isinstance(answer, int) and not isinstance(answer, bool)
                                   and 0 <= answer < len(options)):
        return f"field 'answer': expected null or an index below {len(options)}, got {str(answer)[:40]!r}"
    if item.get("id") is not None and not isinstance(item["id"], (str, int)):
        return "field 'id': expected a string"
    for name in ("type", "duration_bucket", "time_reference"):
        if item.get(name) is not None and not isinstance(item[name], str):
            return f"field {name!r}: expected a string or null"
    return None


def check_meta(meta: dict) -> str | None:
    """What is wrong below the top level of a record's metadata, or None: every conversation a
    list of turns, every qa item complete. Cheap (a walk over a few KB of parsed JSON), and it
    means nothing downstream meets a type it did not expect."""
    for i, conv in enumerate(meta.get("conversations", [])):
        if not isinstance(conv, list):
            return f"conversation {i}: expected a list of turns, got {type(conv).__name__}"
        for j, turn in enumerate(conv):
            problem = check_turn(turn)
            if problem is not None:
                return f"conversation {i} turn {j}: {problem}"
    for i, item in enumerate(meta.get("qa", [])):
        problem = check_qa_item(item)
        if problem is not None:
            item_id = item.get("id") if isinstance(item, dict) else None
            name = repr(str(item_id)[:80]) if isinstance(item_id, (str, int)) else f"#{i}"
            return f"qa item {name} {problem}"
    return None


_NPY_MAGIC = b"\x93NUMPY"
# numpy writes "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3, 4), }" padded with spaces
# and a newline, and reads it back with ast.literal_eval. Only that grammar is accepted here: a
# dict of exactly the three keys, each once (literal_eval would keep the last of duplicates, a
# first-match search the first), a plain type code, a bool, a tuple of decimal integers.
_NPY_ENTRY = re.compile(r"""\s*(?P<q>['"])(?P<name>[a-z_]+)(?P=q)\s*:\s*(?:"""
                        r"""(?P<sq>['"])(?P<str>[<>|=]?[a-z]\d{1,2})(?P=sq)"""
                        r"""|(?P<bool>True|False)"""
                        r"""|\((?P<tuple>\s*|(?:\s*(?:0|[1-9]\d*)\s*,)+(?:\s*(?:0|[1-9]\d*)\s*)?)\))\s*""")
_NPY_KEYS = {"descr", "fortran_order", "shape"}


def _npy_header_fields(header: str) -> dict | None:
    """The header dict's values (str, bool or tuple) when it is a plain array header, else None."""
    text = header.strip(" \n")
    if not (text.startswith("{") and text.endswith("}")):
        return None
    body, pos, fields = text[1:-1], 0, {}
    while (m := _NPY_ENTRY.match(body, pos)) is not None:
        if m["name"] in fields:
            return None
        if m["str"] is not None:
            fields[m["name"]] = m["str"]
        elif m["bool"] is not None:
            fields[m["name"]] = m["bool"] == "True"
        else:
            fields[m["name"]] = tuple(int(d) for d in m["tuple"].replace(" ", "").split(",") if d.strip())
        pos = m.end()
        if body.startswith(",", pos):
            pos += 1
        else:
            break
    if body[pos:].strip() or set(fields) != _NPY_KEYS:
        return None
    kinds = {"descr": str, "fortran_order": bool, "shape": tuple}
    return fields if all(isinstance(fields[k], t) for k, t in kinds.items()) else None


def parse_npy_header(probe: bytes, key: str = "array") -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) from the first bytes of an npy member; BadRecord("npy") if
    it is not a plain C-order array header numpy would read the same way.

    The header is matched against numpy's grammar instead of evaluated (numpy's reader uses
    ast.literal_eval, which CPython 3.11 can fail on nondeterministically in forked workers), and
    a descr other than a plain type code - a structured or object dtype - is refused.
    """
    where = f"{key}.{FEATURES_MEMBER}"
    if probe[:6] != _NPY_MAGIC or len(probe) < 10:
        raise BadRecord("npy", f"{where}: not an npy file")
    major, minor = probe[6], probe[7]
    if major == 1 and minor == 0:
        start, length = 10, int.from_bytes(probe[8:10], "little")
    elif major in (2, 3) and minor == 0 and len(probe) >= 12:
        start, length = 12, int.from_bytes(probe[8:12], "little")
    else:
        raise BadRecord("npy", f"{where}: npy version {major}.{minor} unknown")
    if start + length > len(probe):
        raise BadRecord("npy", f"{where}: npy header of {length} bytes is cut short or too long")
    try:
        header = probe[start: start + length].decode("utf-8" if major == 3 else "latin1")
    except UnicodeDecodeError:
        raise BadRecord("npy", f"{where}: npy header is not UTF-8") from None
    fields = _npy_header_fields(header)
    if fields is None:
        raise BadRecord("npy", f"{where}: npy header {header.strip()[:120]!r} is not a plain array header")
    try:
        dtype = np.dtype(fields["descr"])
    except TypeError:
        raise BadRecord("npy", f"{where}: unknown dtype {fields['descr']!r}") from None
    if fields["fortran_order"]:
        raise BadRecord("npy", f"{where}: Fortran order, expected C order")
    return fields["shape"], dtype, start + length


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
                 check_finite: bool = True, max_open: int = 32, tables: dict[str, ShardTable] | None = None):
        self.num_patches = num_patches
        self.feature_dim = feature_dim
        self.check_finite = check_finite
        self.max_open = max_open
        self._tables: dict[str, ShardTable] = dict(tables or {})  # scanned already (data.dataset)
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
            raise BadRecord("missing_field", f"no .{ext} member")
        m = members[ext]
        if m.offset + m.size > table.file_size:
            raise BadRecord("truncated", f"{key}.{ext} is cut short")
        return m

    def head(self, path: str, index: int) -> RecordHead:
        """Record `index` of the shard, its metadata and npy layout checked; BadRecord if not."""
        table = self.table(path)
        if index >= len(table.records):
            reason = "shard" if table.unreadable else "truncated"
            raise BadRecord(reason, f"record {index} missing ({len(table.records)} in the tar"
                                    + (f"; {table.problem})" if table.problem else ")"),
                            shard=path, key=f"#{index}")
        key = table.records[index][0]
        try:
            return self._head(table, index)
        except BadRecord as e:
            e.shard, e.key = path, key
            raise

    def _head(self, table: ShardTable, index: int) -> RecordHead:
        key, members = table.records[index]
        fd = self._fd(table.path)
        m = self._member(table, key, members, META_MEMBER)
        if m.size > MAX_META_BYTES:
            raise BadRecord("json", f"{key}.json is {m.size} bytes, above the {MAX_META_BYTES} limit")
        meta = _parse_meta(os.pread(fd, m.size, m.offset), key)
        f = self._member(table, key, members, FEATURES_MEMBER)
        shape, dtype, header_len = parse_npy_header(os.pread(fd, min(f.size, _NPY_HEAD_PROBE), f.offset), key)
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
        return RecordHead(key=key, meta=meta, shape=shape, data_offset=f.offset + header_len, path=table.path)

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
                    raise BadRecord("truncated", "features end early", shard=head.path, key=head.key)
                if self.check_finite and not all_finite(piece):
                    raise BadRecord("nonfinite", "features hold NaN or inf", shard=head.path, key=head.key)
                if not direct:
                    target[lo // 2: hi // 2].copy_(torch.from_numpy(piece.view(np.float16)))
            start = end

    def read_features(self, head: RecordHead) -> np.ndarray:
        """The record's whole float16 [F, P, D] array (checked as `read_frames` checks it)."""
        out = torch.empty(head.shape, dtype=torch.float16)
        self.read_frames(head, np.arange(head.shape[0]), out)
        return out.numpy()
