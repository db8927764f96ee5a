"""Property tests for the parsers that take untrusted bytes: npy headers, record JSON, annotation
files, index.json, tar headers. Each raises only its documented error type on any input, and what it accepts
means what it says (the npy header is checked against numpy's own reader, an accepted record's
text goes through templating without a surprise type, an accepted index stays inside its folder).

Budget: derandomized (the same examples on every run) and bounded by max_examples (200 each):
about 15-25 s on one CI core in all, inside the 60 s allowed.
"""
from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.annotations import FORMATS, AnnotationError, parse_file
from data.dataset import DatasetError, open_dataset
from data.records import BadRecord, _parse_meta, parse_npy_header
from data.shards import ShardWriter, write_index
from data.text import record_conversations, to_messages

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- npy header

_ODD = {"descr": ["'|O'", "'<U3'", "'<f3'", "[('a', '<f2')]", "'<f2' '<f4'", "b'<f2'", "'<M8[ns]'", "'f'"],
        "fortran_order": ["0", "1", "false", "None", "'False'"],
        "shape": ["(3)", "(02, 3)", "(-1, 2)", "(1_0, 2)", "(True, 2)", "(0x10, 2)", "[2, 3]", "(2, 3), 4",
                  "(18446744073709551616, 2)", "(2,, 3)"]}


def _tuple_literal(dims: list[int], spaced: bool) -> str:
    sep = ", " if spaced else ","
    return "(" + sep.join(map(str, dims)) + ("," if len(dims) == 1 else "") + ")"


@st.composite
def npy_files(draw) -> bytes:
    """An npy file's first bytes: a valid header (any order, dtype, shape, spacing, version) that
    half the time gets one or two mutations: an odd literal, a duplicate or extra key, a key
    removed, a wrong length or version; or raw text. Then some data."""
    if draw(st.integers(0, 7)) == 0:
        header = draw(st.text(alphabet="{}()[]':,\" <>|=fiuTrueFalsedescrshapeortn_0123456789\n", max_size=80))
        major, minor, off = draw(st.sampled_from([1, 2, 3])), 0, 0
    else:
        values = {"descr": repr(draw(st.sampled_from(["<f2", "<f4", "|i1", "<f8", "|b1", "<c8", ">f2", "<u2"]))),
                  "fortran_order": str(draw(st.booleans())),
                  "shape": _tuple_literal(draw(st.lists(st.integers(0, 5), max_size=4)), draw(st.booleans()))}
        entries = draw(st.permutations(list(values.items())))
        major, minor, off, quote = draw(st.sampled_from([1, 1, 2, 3])), 0, 0, "'"
        for mutation in draw(st.lists(st.integers(0, 7), max_size=2)) if draw(st.booleans()) else []:
            i = draw(st.integers(0, len(entries) - 1)) if entries else 0
            if mutation == 0 and entries:
                entries[i] = (entries[i][0], draw(st.sampled_from(_ODD[entries[i][0]])))
            elif mutation == 1 and entries:
                entries.insert(draw(st.integers(0, len(entries))), (entries[i][0], draw(st.sampled_from(
                    ["'<f4'", "True", "(1, 1, 1)", "'<f2'", "False", "(2, 3, 4)"]))))
            elif mutation == 2:
                entries.append(("extra", "1"))
            elif mutation == 3 and entries:
                del entries[i]
            elif mutation == 4:
                off = draw(st.sampled_from([-1, 1, 5000]))
            elif mutation == 5:
                major, minor = draw(st.sampled_from([(4, 0), (1, 1), (2, 1), (0, 0)]))
            elif mutation == 6:
                quote = '"'
        sep = draw(st.sampled_from([", ", ", ", ",", " , "]))
        tail = draw(st.sampled_from([", ", "", ","]))
        header = "{" + sep.join(f"{quote}{k}{quote}: {v}" for k, v in entries) + tail + "}"
    header += " " * draw(st.integers(0, 70)) + "\n"
    raw = header.encode("latin1", "replace")
    length = len(raw) + off
    size = (length % (1 << 16)).to_bytes(2, "little") if major == 1 else max(length, 0).to_bytes(4, "little")
    return b"\x93NUMPY" + bytes([major, minor]) + size + raw + bytes(64)


def _numpy_reads(probe: bytes):
    """(shape, fortran, dtype, header length) as numpy's reader sees the header, or None when it
    refuses it."""
    from numpy.lib import format as npf

    f = io.BytesIO(probe)
    try:
        version = npf.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None  # version 3 differs from 2 only in the header's text encoding
        reader = npf.read_array_header_1_0 if version == (1, 0) else npf.read_array_header_2_0
        return (*reader(f), f.tell())
    except (ValueError, SyntaxError, OverflowError):
        return None


@FUZZ
@given(npy_files())
def test_npy_header_reads_as_numpy_reads_or_is_refused(probe):
    try:
        shape, dtype, header_len = parse_npy_header(probe)
    except BadRecord as e:
        assert e.reason == "npy"
        return
    if probe[6] == 3:
        return  # accepted; numpy's helpers read versions 1 and 2 only
    theirs = _numpy_reads(probe)
    assert theirs is not None, "accepted a header numpy refuses"
    assert (shape, False, dtype, header_len) == theirs


@FUZZ
@given(st.binary(max_size=200))
def test_npy_header_random_bytes(blob):
    for probe in (blob, b"\x93NUMPY" + blob):
        try:
            parse_npy_header(probe)
        except BadRecord as e:
            assert e.reason == "npy"


# ---------------------------------------------------------------- record JSON

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 30), st.floats(allow_nan=True),
                  st.text(max_size=12), st.sampled_from(["human", "gpt", "user", "system", "<video>", "A"]))
_KEYS = ["from", "value", "role", "content", "question", "options", "answer", "id", "type", "timestamps",
         "conversations", "qa", "duration_bucket", "x"]
_json_value = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5)), max_leaves=25)


_turn = st.fixed_dictionaries({}, optional={"from": st.sampled_from(["human", "gpt", "system"]) | _leaf,
                                            "value": st.text(max_size=8) | _leaf, "role": _leaf})
_qa_item = st.fixed_dictionaries({}, optional={
    "question": st.text(max_size=8) | _leaf, "options": st.lists(st.text(max_size=3) | _leaf, max_size=4) | _leaf,
    "answer": st.integers(-1, 4) | _leaf, "id": _leaf, "type": _leaf})


@st.composite
def record_metas(draw) -> dict:
    """Near-valid record metadata: the right keys holding turns and qa items of any shape."""
    meta = {"timestamps": draw(st.sampled_from([[0.0, 1.0], [0.0, 1.0], [], [float("nan")], "x", None]))}
    for key in draw(st.sets(st.sampled_from(["conversations", "qa"]), max_size=2)):
        inner = st.lists(_turn | _json_value, max_size=3) if key == "conversations" else _qa_item
        meta[key] = draw(st.lists(inner | _json_value, max_size=3) | _json_value)
    return meta


def _check_record(raw: bytes) -> None:
    try:
        meta = _parse_meta(raw, "k")
    except BadRecord as e:
        assert e.reason in ("json", "missing_field", "schema")
        return
    # Accepted: what the loader's text stage does with it raises only ValueError (a skipped record).
    try:
        for conversation in record_conversations(meta):
            to_messages(conversation)
    except ValueError:
        pass


@FUZZ
@given(record_metas())
def test_record_json_structures(meta):
    _check_record(json.dumps(meta).encode())


@FUZZ
@given(st.binary(max_size=300))
def test_record_json_random_bytes(blob):
    _check_record(blob)
    _check_record(b'{"timestamps": [], "qa": [' + blob + b"]}")


# ---------------------------------------------------------------- annotation files

@st.composite
def annotation_files(draw) -> tuple[str, bytes]:
    """(suffix, bytes): a JSON list or JSONL of near-valid records, or raw bytes, in some encoding."""
    record = st.dictionaries(st.sampled_from(["video", "conversations", "videoID", "question", "options",
                                              "answer", "candidates", "questions", "key", "qa", "uid",
                                              "question_id", "duration", "video_id"]), _json_value, max_size=6)
    kind = draw(st.sampled_from(["list", "jsonl", "raw"]))
    if kind == "raw":
        return ".jsonl", draw(st.binary(max_size=200))
    records = draw(st.lists(record | _json_value, max_size=4))
    text = json.dumps(records) if kind == "list" else "\n".join(json.dumps(r) for r in records)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(text)))
        text = text[:cut]
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "utf-16-le", "utf-8-sig"]))
    return (".json" if kind == "list" else ".jsonl"), text.encode(encoding, "surrogatepass")


@FUZZ
@given(annotation_files(), st.sampled_from(FORMATS))
def test_annotation_files_raise_only_annotation_errors(file, fmt):
    suffix, raw = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"ann{suffix}"
        path.write_bytes(raw)
        try:
            items = parse_file(path, fmt)
        except AnnotationError as e:
            assert "\n" not in str(e)
        else:
            assert all(isinstance(q["id"], str) and q["id"] for item in items for q in item.qa)
        skipped = []
        parse_file(path, fmt, on_error=skipped.append)  # with a handler nothing is raised at all


# ---------------------------------------------------------------- index.json

_NAMES = ["shard-r00000-000000.tar", "../shard-r00000-000000.tar", "/etc/hostname", "", "missing.tar",
          "./shard-r00000-000000.tar", "sub/../shard-r00000-000000.tar", "a\\b.tar", "x\x00.tar"]


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_index")
    with ShardWriter(folder) as w:
        for i in range(3):
            w.write(f"k{i}", np.zeros((1, 2, 2), np.float16), {"timestamps": [0.0], "conversations": []})
    index = write_index(folder)
    (folder / "index.json").unlink()
    return folder, index


@st.composite
def indexes(draw, real: dict) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=120))
    entry = st.fixed_dictionaries({}, optional={
        "name": st.sampled_from(_NAMES) | _leaf, "samples": st.sampled_from([3, 2, 4, 0, -1, "3", 3.0, True]),
        "bytes": st.sampled_from([real["shards"][0]["bytes"], 0, -5, None]),
        "sha256": st.sampled_from([real["shards"][0]["sha256"], "0" * 64, 5, None])})
    shards = draw(st.lists(entry, max_size=3) | _json_value)
    index = {"shards": shards} if draw(st.booleans()) else draw(_json_value)
    return json.dumps(index).encode()


@FUZZ
@given(st.data())
def test_index_json_raises_only_dataset_errors(one_shard, data):
    folder, real = one_shard
    raw = data.draw(indexes(real))
    (folder / "index.json").write_bytes(raw)
    for verify in ("none", "counts", "sha256"):
        try:
            dataset = open_dataset(folder, verify=verify)
        except DatasetError as e:
            assert "\n" not in str(e)
            continue
        names = [s.name for s in dataset.shards]
        assert len(set(names)) == len(names)
        for s in dataset.shards:
            assert Path(s.path).resolve().parent == folder.resolve()
            if verify != "none":
                assert s.samples == 3


def test_npy_header_with_a_duplicate_key_is_refused():
    """Issue 18.10: numpy keeps the last of duplicate keys; a first-match reader kept the first and
    read a different shape from the same bytes. Such a header is refused."""
    header = "{'descr': '<f2', 'fortran_order': False, 'shape': (1, 1, 1), 'shape': (2, 3, 4), }"
    header += " " * (-(11 + len(header)) % 64) + "\n"
    probe = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
    assert _numpy_reads(probe)[0] == (2, 3, 4)
    with pytest.raises(BadRecord, match="not a plain array header"):
        parse_npy_header(probe)


# ---------------------------------------------------------------- tar headers

@st.composite
def tar_files(draw) -> bytes:
    """Tars as tarfile writes them (ustar, GNU or pax; files, a directory, a symlink; long and
    non-ASCII names), then maybe cut short or with a byte changed."""
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for i in range(draw(st.integers(0, 5))):
            kind = draw(st.sampled_from(["file", "file", "file", "dir", "link"]))
            name = draw(st.sampled_from([f"k{i}.json", f"k{i}.features.npy", f"d/k{i}.json", "x" * 120 + ".json",
                                         f"é{i}.json", "p/" * 60 + "k.json"]))
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "k0.json"
            payload = bytes(draw(st.integers(0, 1500))) if kind == "file" else b""
            info.size = len(payload)
            try:
                tar.addfile(info, io.BytesIO(payload))
            except ValueError:  # a name ustar cannot hold
                continue
    raw = bytearray(buf.getvalue())
    change = draw(st.sampled_from(["none", "none", "cut", "byte"]))
    if change == "cut" and raw:
        del raw[draw(st.integers(0, len(raw) - 1)):]
    elif change == "byte" and raw:
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@FUZZ
@given(tar_files())
def test_direct_ustar_scan_agrees_with_tarfile(raw):
    """The direct header reader (data/shards.py) either hands a file to tarfile or finds the same
    members and the same verdict on completeness as the tarfile path."""
    from data.shards import _scan_members, _scan_ustar

    with tempfile.TemporaryFile() as f:
        f.write(raw)
        f.flush()
        fast = _scan_ustar(f.fileno(), len(raw))
        if fast is None:
            return
        f.seek(0)
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError:
            raise AssertionError("read directly a file tarfile cannot open") from None
        with tar:
            records, problem = _scan_members(tar, f, len(raw))
    assert fast[0] == records
    assert (fast[1] is None) == (problem is None), (fast[1], problem)
