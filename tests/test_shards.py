"""Shard writer and index: checked with tarfile, the `tar` binary, hashlib and stock webdataset."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from data.shards import ShardWriter, completed_shards, shard_keys, write_index


def _records(n, frames=3, patches=4, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        feats = rng.standard_normal((frames + i % 2, patches, dim)).astype(np.float16)
        meta = {"key": f"vid_{i:03d}", "video_id": f"v{i}", "timestamps": [0.5 * t for t in range(len(feats))],
                "conversations": [], "qa": []}
        out.append((f"vid_{i:03d}", feats, meta))
    return out


def _read_tar(path):
    """{key: {ext: bytes}} straight from tarfile, independent of our reader."""
    members = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return members


def test_rollover_index_and_stock_readers(tmp_path):
    records = _records(7)
    with ShardWriter(tmp_path, prefix="train", rank=3, max_samples=3) as w:
        for key, feats, meta in records:
            w.write(key, feats, meta)
    names = [p.name for p in completed_shards(tmp_path)]
    assert names == ["train-r00003-000000.tar", "train-r00003-000001.tar", "train-r00003-000002.tar"]
    assert not list(tmp_path.glob("*.partial"))

    index = write_index(tmp_path)
    on_disk = json.loads((tmp_path / "index.json").read_text())
    assert on_disk == index
    assert index["total_samples"] == 7
    for entry in index["shards"]:
        raw = (tmp_path / entry["name"]).read_bytes()
        assert entry["bytes"] == len(raw)
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
        assert entry["samples"] == len(_read_tar(tmp_path / entry["name"]))
    assert [e["samples"] for e in index["shards"]] == [3, 3, 1]

    expected = {key: (feats, meta) for key, feats, meta in records}
    got = {}
    for name in names:
        for key, parts in _read_tar(tmp_path / name).items():
            assert set(parts) == {"features.npy", "json"}
            got[key] = (np.load(io.BytesIO(parts["features.npy"]), allow_pickle=False),
                        json.loads(parts["json"]))
    assert got.keys() == expected.keys()
    for key, (feats, meta) in expected.items():
        assert got[key][0].dtype == np.float16
        np.testing.assert_array_equal(got[key][0], feats)
        assert got[key][1] == meta

    if shutil.which("tar"):
        listing = subprocess.run(["tar", "-tf", str(tmp_path / names[0])], check=True,
                                 capture_output=True, text=True).stdout.split()
        assert listing == [f"vid_00{i}.{ext}" for i in range(3) for ext in ("features.npy", "json")]

    import webdataset as wds

    urls = [str(tmp_path / n) for n in names]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None):
        seen[sample["__key__"]] = np.load(io.BytesIO(sample["features.npy"]), allow_pickle=False)
    assert seen.keys() == expected.keys()
    for key, arr in seen.items():
        np.testing.assert_array_equal(arr, expected[key][0])


def test_rerun_skips_complete_and_rewrites_partial(tmp_path):
    records = _records(5)
    # First run stopped by an exception while its second shard was open: that shard is completed
    # with the records it holds (issue 18.6: work is kept); a SIGKILL leaves a temporary file
    # behind, simulated here by planting one.
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path, rank=0, max_samples=2) as w:
            for i, (key, feats, meta) in enumerate(records):
                if i == 3:
                    raise KeyboardInterrupt
                w.write(key, feats, meta)
    assert [shard_keys(p) for p in completed_shards(tmp_path)] == [["vid_000", "vid_001"], ["vid_002"]]
    (tmp_path / "shard-r00000-000002.tar.partial").write_bytes(b"half a tar")
    first = (tmp_path / "shard-r00000-000000.tar").read_bytes()

    with ShardWriter(tmp_path, rank=0, max_samples=2) as w:
        assert w.done_keys == {"vid_000", "vid_001", "vid_002"}
        assert not (tmp_path / "shard-r00000-000002.tar.partial").exists()
        for key, feats, meta in records:
            if key not in w.done_keys:
                w.write(key, feats, meta)
    assert (tmp_path / "shard-r00000-000000.tar").read_bytes() == first
    assert [shard_keys(p) for p in completed_shards(tmp_path)] == [
        ["vid_000", "vid_001"], ["vid_002"], ["vid_003", "vid_004"]]
    assert write_index(tmp_path)["total_samples"] == 5


def test_failed_write_keeps_the_records_before_it(tmp_path, monkeypatch):
    """A write that fails half way (disk full) is undone, and the shard is completed with the
    whole records before it (issue 18.6), readable by the stock tarfile and indexed."""
    records = _records(3)
    with pytest.raises(OSError):
        with ShardWriter(tmp_path, rank=0, max_samples=10) as w:
            for i, (key, feats, meta) in enumerate(records):
                if i == 2:  # the third record's write stops after 700 bytes, once
                    real = w._file.write
                    monkeypatch.setattr(w._file, "write",
                                        lambda data: _half_then_enospc(real, data, monkeypatch, w._file))
                w.write(key, feats, meta)
    (shard,) = completed_shards(tmp_path)
    assert _read_tar(shard).keys() == {"vid_000", "vid_001"}
    assert write_index(tmp_path)["total_samples"] == 2


def _half_then_enospc(real_write, data, monkeypatch, file):
    real_write(data[:700])
    monkeypatch.setattr(file, "write", real_write)
    raise OSError(28, "No space left on device")


def test_damaged_complete_shard_is_set_aside_and_redone(tmp_path):
    """A complete shard cut short afterwards (issue 18.5): merge refuses to index it with a fresh
    checksum, and the rerun renames it aside and converts its records again."""
    records = _records(4)
    with ShardWriter(tmp_path, rank=0, max_samples=2) as w:
        for key, feats, meta in records:
            w.write(key, feats, meta)
    second = tmp_path / "shard-r00000-000001.tar"
    raw = second.read_bytes()
    second.write_bytes(raw[:1500])  # inside its second record
    with pytest.raises(RuntimeError, match="shard-r00000-000001.tar: .*not indexed"):
        write_index(tmp_path)
    assert not (tmp_path / "index.json").exists()
    with ShardWriter(tmp_path, rank=0, max_samples=2) as w:
        assert w.done_keys == {"vid_000", "vid_001"}
        for key, feats, meta in records:
            if key not in w.done_keys:
                w.write(key, feats, meta)
    assert (tmp_path / "shard-r00000-000001.tar.damaged").read_bytes() == raw[:1500]
    assert write_index(tmp_path)["total_samples"] == 4


def test_max_bytes_and_ranks_share_a_folder(tmp_path):
    records = _records(5, frames=10, patches=16, dim=32)  # 10-11 KiB of float16 per record
    limit = 40_000
    with ShardWriter(tmp_path, rank=0, max_bytes=limit) as w0, ShardWriter(tmp_path, rank=1) as w1:
        for i, (key, feats, meta) in enumerate(records):
            (w0 if i < 4 else w1).write(key, feats, meta)
    rank0 = [p for p in completed_shards(tmp_path) if "-r00000-" in p.name]
    assert all(p.stat().st_size <= limit for p in rank0)
    # 4 records of >10 KiB cannot share one 40 KB shard, but each shard holds at least two.
    assert [len(shard_keys(p)) for p in rank0] == [2, 2]
    assert sorted(k for p in completed_shards(tmp_path) for k in shard_keys(p)) == [r[0] for r in records]


def test_bad_input_errors(tmp_path):
    feats = np.zeros((2, 3, 4), np.float16)
    with ShardWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="shard key 'a.b'"):
            w.write("a.b", feats, {})
        with pytest.raises(ValueError, match="expected a float16"):
            w.write("a", feats.astype(np.float32), {})
        with pytest.raises(ValueError, match="expected a float16"):
            w.write("a", feats[0], {})
        with pytest.raises(ValueError, match="NaN or inf"):
            w.write("a", np.full((1, 1, 1), np.inf, np.float16), {})
        w.write("a", feats, {})
        with pytest.raises(ValueError, match="written twice"):
            w.write("a", feats, {})
    (tmp_path / "shard-r00009-000000.tar.partial").write_bytes(b"")
    with pytest.raises(RuntimeError, match="unfinished shards"):
        write_index(tmp_path)
    with pytest.raises(RuntimeError, match="no complete shards"):
        write_index(tmp_path / "empty")


def test_all_finite_bit_test_agrees_with_numpy_on_every_float16():
    """Oracle: np.isfinite, over all 65536 float16 bit patterns together, then each of the 2048
    NaN/inf patterns and every 16th finite one alone among finite values, at either end of a chunk."""
    from data.records import all_finite

    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(patterns)
    assert not finite.all() and finite.sum() == 63488  # 2 x 31 exponents x 1024 mantissas
    assert all_finite(patterns) is False and all_finite(patterns[finite]) is True
    base = np.linspace(-65504, 65504, 10).astype(np.float16)
    for bits in np.concatenate([np.flatnonzero(~finite), np.flatnonzero(finite)[::16]]):
        for where in (0, len(base) - 1):
            probe = base.copy()
            probe[where] = patterns[bits]
            assert all_finite(probe, chunk=4) == bool(finite[bits]), hex(bits)


# ---------------------------------------------------------------- eval reads through data/

def _qa_meta(key, frames):
    return {"key": key, "timestamps": [float(t) for t in range(frames)], "conversations": [],
            "qa": [{"id": f"{key}-q", "question": "Which?", "options": ["a", "b", "c"], "answer": 1}]}


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _hand_tar(folder, records):
    """A shard written member by member with tarfile (records may be broken on purpose) and an
    index.json that describes it: (key, npy bytes, meta) each."""
    folder.mkdir(exist_ok=True)
    shard = folder / "shard-r00000-000000.tar"
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, npy, meta in records:
            for name, payload in ((f"{key}.features.npy", npy), (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    _describe(folder, shard, len(records))
    return shard


def _describe(folder, shard, samples):
    (folder / "index.json").write_text(json.dumps({"shards": [
        {"name": shard.name, "samples": samples, "bytes": shard.stat().st_size}]}))


def _good(key, frames=2):
    return key, _npy(np.ones((frames, 2, 4), np.float16)), _qa_meta(key, frames)


def _huge_header_npy():
    """An npy whose header declares 2**42 float16 values (8 TiB) over a few bytes of data."""
    header = "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 1048576, 2097152), }"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(16)


@pytest.mark.parametrize("second, match", [
    ((lambda: ("nan", _npy(np.full((2, 2, 4), np.nan, np.float16)), _qa_meta("nan", 2))), r"record 'nan'.*NaN or inf"),
    ((lambda: ("i8", _npy(np.ones((2, 2, 4), np.int8)), _qa_meta("i8", 2))), r"record 'i8'.*expected float16"),
    ((lambda: ("f64", _npy(np.ones((2, 2, 4), np.float64)), _qa_meta("f64", 2))), r"record 'f64'.*expected float16"),
    ((lambda: ("huge", _huge_header_npy(), _qa_meta("huge", 2))), r"record 'huge'.*do not hold"),
], ids=["nan", "int8", "float64", "8TiB-header"])
def test_eval_refuses_what_the_loader_refuses(tmp_path, second, match):
    """Issue 18.3: eval's records pass the loader's checks; each failure is a one-line
    MalformedItem naming shard and record (they scored as a wrong 'A', or died on MemoryError)."""
    from trainer.evaluate import MalformedItem, iter_records

    _hand_tar(tmp_path / "ds", [_good("ok"), second()])
    with pytest.raises(MalformedItem, match=match) as err:
        list(iter_records(tmp_path / "ds"))
    assert "shard-r00000-000000.tar" in str(err.value) and "\n" not in str(err.value)


def test_eval_refuses_compressed_and_cut_shards(tmp_path):
    """A gzip 'tar' is refused from its magic number, never inflated; a tar cut inside its second
    record's header stops eval naming the lost record instead of dropping it (issue 18.3)."""
    import gzip

    from trainer.evaluate import MalformedItem, iter_records

    shard = _hand_tar(tmp_path / "ds", [_good("a"), _good("b", 3)])
    raw = shard.read_bytes()
    assert [r.key for r in iter_records(tmp_path / "ds")] == ["a", "b"]
    shard.write_bytes(raw[: raw.index(b"b.features.npy") + 100])  # inside b's first header
    _describe(tmp_path / "ds", shard, 2)
    with pytest.raises(MalformedItem, match=r"record '#1'.*missing \(1 in the tar"):
        list(iter_records(tmp_path / "ds"))
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w") as tar:
        info = tarfile.TarInfo("z.features.npy")
        info.size = 16 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    shard.write_bytes(gzip.compress(bomb.getvalue(), compresslevel=9))  # ~1000:1
    _describe(tmp_path / "ds", shard, 1)
    with pytest.raises(MalformedItem, match=r"compressed \(gzip\)"):
        list(iter_records(tmp_path / "ds"))


def test_convert_verify_checks_index_checksums_and_records(tmp_path, capsys):
    """`mambamia convert --verify OUT` (issue 18.5's full check): 0 on a sound folder; a byte
    changed after indexing is a one-line error (exit 2); a record whose metadata is wrong is named."""
    from data.cli import convert_main

    with ShardWriter(tmp_path / "good", max_samples=2) as w:
        for key, feats, meta in _records(3):
            w.write(key, feats, meta)
    write_index(tmp_path / "good")
    assert convert_main(["--verify", str(tmp_path / "good")]) == 0
    assert "0 record(s) with bad" in capsys.readouterr().out
    records = _records(3)
    records[1][2]["qa"] = [{"question": "q?", "options": ["a", "b"], "answer": 5}]
    with ShardWriter(tmp_path, max_samples=10) as w:
        for key, feats, meta in records:
            w.write(key, feats, meta)
    write_index(tmp_path)
    assert convert_main(["--verify", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "3 records" in out and "1 record(s) with bad" in out
    assert err.strip().splitlines() == [f"bad record: {tmp_path / 'shard-r00000-000000.tar'}: record 'vid_001': "
                                        "qa item #0 field 'answer': expected null or an index below 2, got '5' (schema)"]
    shard = tmp_path / "shard-r00000-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[raw.index(b'"q?"') + 1] = ord("Q")
    shard.write_bytes(bytes(raw))
    assert convert_main(["--verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs from its sha256" in err
