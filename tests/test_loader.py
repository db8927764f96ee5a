"""The streaming loader: exactly-once epochs over ranks x workers, sample-exact resume, mixtures,
bad records, and that the stock webdataset reader reads the shards.

Every record's features encode its identity (value = sample number + frame / 64) and its
timestamps are frame * 0.5, so a batch can be checked against the record it claims to hold.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from data.collate import uniform_frame_indices
from data.loader import VideoLoader, apportion
from data.shards import ShardWriter, write_index
from data.text import tokenize_conversation

P, D = 2, 4


def _features(i: int, frames: int) -> np.ndarray:
    return np.broadcast_to((i + np.arange(frames) / 64)[:, None, None], (frames, P, D)).astype(np.float16)


def _meta(key: str, frames: int, i: int) -> dict:
    return {"key": key, "video_id": key, "source": f"{key}.mp4", "timestamps": [f * 0.5 for f in range(frames)],
            "fps": 2.0, "duration": frames / 2, "encoder": "tiny", "layer": -2,
            "conversations": [[{"from": "human", "value": "<video>\nWhat is it?"},
                               {"from": "gpt", "value": f"number {i}"}]], "qa": []}


def _write_dataset(out, prefix: str, splits: list[tuple[int, int]], first: int = 0) -> list[str]:
    """Records from several writer ranks with different shard sizes: (count, max_samples) each."""
    keys, i = [], first
    for rank, (count, per_shard) in enumerate(splits):
        with ShardWriter(out, prefix=prefix, rank=rank, max_samples=per_shard) as w:
            for _ in range(count):
                key, frames = f"{prefix}{i:04d}", 2 + i % 5
                w.write(key, _features(i, frames), _meta(key, frames, i))
                keys.append(key)
                i += 1
    write_index(out)
    return keys


@pytest.fixture(scope="module")
def tok(tiny_assets):
    return AutoTokenizer.from_pretrained(str(tiny_assets["tokenizer"]))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    keys = _write_dataset(out, "a", [(7, 5), (6, 4), (10, 9)])  # shards of 5, 2, 4, 2, 9, 1 samples
    shard_sizes = [s["samples"] for s in json.loads((out / "index.json").read_text())["shards"]]
    assert sorted(shard_sizes) == [1, 2, 2, 4, 5, 9]
    return out, keys


def _run(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def _keys(batches):
    return [k for b in batches for k in b["keys"]]


def _check_batch_content(batch, tok, max_frames):
    for row, key in enumerate(batch["keys"]):
        i = int(key[1:])
        frames = 2 + i % 5
        idx = uniform_frame_indices(frames, max_frames)
        n = int(batch["frame_mask"][row].sum())
        assert n == len(idx) and not batch["frame_mask"][row, n:].any()
        feats = batch["features"][row]
        assert feats.dtype == torch.float16
        assert torch.equal(feats[:n, 0, 0], torch.tensor(i + idx / 64, dtype=torch.float16))
        assert torch.equal(batch["timestamps"][row, :n], torch.tensor(idx * 0.5, dtype=torch.float32))
        assert not feats[n:].any()
        ids, labels = tokenize_conversation(tok, _meta(key, frames, i)["conversations"][0], 512)
        t = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :t].tolist() == ids and batch["labels"][row, :t].tolist() == labels
        assert (batch["input_ids"][row, t:] == tok.pad_token_id).all() and (batch["labels"][row, t:] == -100).all()


def test_uniform_frame_indices():
    assert uniform_frame_indices(3, 4).tolist() == [0, 1, 2]
    assert uniform_frame_indices(6, 4).tolist() == [0, 2, 3, 5]  # centres 0.75, 2.25, 3.75, 5.25
    assert uniform_frame_indices(100, 2).tolist() == [25, 75]


def test_two_ranks_two_workers_each_sample_once(dataset, tok):
    path, keys = dataset  # 23 samples, global batch 6: the last one holds 5 (3 + 2)
    opts = dict(batch_size=3, seed=5, world_size=2, max_frames=4)
    epochs = []
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            loader = VideoLoader([path], tok, rank=rank, num_workers=2, **opts)
            loader.set_epoch(epoch)
            assert len(loader) == loader.batches_per_epoch == 4
            batches = _run(loader)
            for b in batches:
                _check_batch_content(b, tok, 4)
            per_rank.append(batches)
        assert [len(b) for b in per_rank] == [4, 4]
        seen = _keys(per_rank[0]) + _keys(per_rank[1])
        assert sorted(seen) == sorted(keys)
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    # Without workers the sequence is the same: order depends on (seed, epoch, rank) only.
    single = VideoLoader([path], tok, rank=1, num_workers=0, **opts)
    single.set_epoch(1)
    assert _keys(_run(single)) == _keys(per_rank[1])


def test_uneven_tail_pads_a_starved_rank(dataset, tok):
    path, keys = dataset  # 23 = 2 x 11 + 1: the last global batch has one sample for two ranks
    ranks = [VideoLoader([path], tok, rank=r, world_size=2, batch_size=11, seed=1) for r in (0, 1)]
    out = [_run(r) for r in ranks]
    assert [len(o) for o in out] == [2, 2]
    assert sorted(set(_keys(out[0]) + _keys(out[1]))) == sorted(keys)
    assert len(_keys(out[0]) + _keys(out[1])) == 24
    assert [r.repeats for r in ranks] == [0, 1]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        for name in ("input_ids", "attention_mask", "labels", "features", "frame_mask", "timestamps"):
            assert torch.equal(x[name], y[name]), name


def test_resume_same_world_size_is_sample_exact(dataset, tok):
    path, _ = dataset
    opts = dict(batch_size=2, seed=3, world_size=2, rank=1, max_frames=3, num_workers=2,
                features_dtype="float32")
    full = VideoLoader([path], tok, **opts)
    reference = _run(full) + _run(full, 3)  # epoch 0 (6 batches) and the start of epoch 1
    for k in (2, 6):  # mid-epoch (batches prefetched by the workers are not lost) and at the boundary
        first = VideoLoader([path], tok, **opts)
        head = _run(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = VideoLoader([path], tok, **opts)
        resumed.load_state_dict(state)
        rest = _run(resumed)
        if state["epoch"] == 0:
            rest += _run(resumed, 3)
            assert resumed.state_dict()["epoch"] == 1
        _assert_same_batches(head + rest[: len(reference) - k], reference)


def test_resume_at_another_world_size_skips_nothing(dataset, tok):
    path, keys = dataset
    old = [VideoLoader([path], tok, rank=r, world_size=2, batch_size=2, seed=9) for r in (0, 1)]
    before = [_run(o, 2) for o in old]  # 2 steps x 2 ranks x 2 = 8 samples consumed
    states = [o.state_dict() for o in old]
    new = [VideoLoader([path], tok, rank=r, world_size=3, batch_size=3, seed=9) for r in range(3)]
    for n in new:
        n.load_state_dict(states)
    after = [_run(n) for n in new]
    assert len({len(a) for a in after}) == 1  # equal batch counts on the new ranks too
    used = _keys(before[0]) + _keys(before[1]) + [k for a in after for k in _keys(a)]
    assert sorted(used) == sorted(keys) and all(n.repeats == 0 for n in new)
    # One rank's state alone gives the same continuation.
    alone = VideoLoader([path], tok, rank=0, world_size=3, batch_size=3, seed=9)
    alone.load_state_dict(states[1])
    assert _keys(_run(alone)) == _keys(after[0])
    with pytest.raises(ValueError, match="seed"):
        VideoLoader([path], tok, batch_size=2, seed=10).load_state_dict(states[0])


def test_mixture_proportions_and_resume(dataset, tok, tmp_path):
    path_a, keys_a = dataset
    keys_b = _write_dataset(tmp_path / "b", "b", [(5, 3)], first=100)
    assert apportion(40, [3.0, 1.0]) == [30, 10] and apportion(7, [1, 1, 1]) == [3, 2, 2]
    opts = dict(batch_size=4, seed=2, samples_per_epoch=40, max_frames=4)
    loader = VideoLoader([(path_a, 3.0), (tmp_path / "b", 1.0)], tok, **opts)
    epochs = [_keys(_run(loader)) for _ in range(3)]
    for seen in epochs:
        assert len(seen) == 40
        assert sum(k.startswith("a") for k in seen) == 30 and sum(k.startswith("b") for k in seen) == 10
    stream_a = [k for seen in epochs for k in seen if k.startswith("a")]
    stream_b = [k for seen in epochs for k in seen if k.startswith("b")]
    # Each source runs through its own epochs back to back: every block of its size is one pass.
    for stream, keys in ((stream_a, keys_a), (stream_b, keys_b)):
        for start in range(0, len(stream) - len(keys) + 1, len(keys)):
            assert sorted(stream[start: start + len(keys)]) == sorted(keys)
    first = VideoLoader([(path_a, 3.0), (tmp_path / "b", 1.0)], tok, **opts)
    first.set_epoch(1)
    head = _keys(_run(first, 4))
    resumed = VideoLoader([(path_a, 3.0), (tmp_path / "b", 1.0)], tok, num_workers=2, **opts)
    resumed.load_state_dict(first.state_dict())
    assert head + _keys(_run(resumed)) == epochs[1]


def _add(tar, name: str, payload: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _npy(array, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def test_bad_records_counted_by_reason_and_limit(tmp_path, tok):
    good = {f"g{i}": (_features(i, 3), _meta(f"g{i}", 3, i)) for i in range(4)}
    nan, inf = _features(1, 3), _features(2, 3)
    nan[1, 0, 0], inf[2, 1, 3] = np.nan, -np.inf
    no_ts = _meta("f", 3, 0)
    del no_ts["timestamps"]
    bad = [("nan", _npy(nan), _meta("nan", 3, 0), "nonfinite"),
           ("inf", _npy(inf), _meta("inf", 3, 0), "nonfinite"),
           ("f32", _npy(_features(0, 3).astype(np.float32)), _meta("f32", 3, 0), "dtype"),
           ("flat", _npy(np.zeros((3, 8), np.float16)), _meta("flat", 3, 0), "shape"),
           ("ts", _npy(_features(0, 3)), _meta("ts", 2, 0), "shape"),
           ("garbage", b"\x93NUMPY but not really", _meta("garbage", 3, 0), "npy"),
           ("pickled", _npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), _meta("pickled", 1, 0), "npy"),
           ("nojson", _npy(_features(0, 3)), None, "missing_field"),
           ("nots", _npy(_features(0, 3)), no_ts, "missing_field"),
           ("badjson", _npy(_features(0, 3)), b"{not json", "json"),
           ("noconv", _npy(_features(0, 3)), {**_meta("noconv", 3, 0), "conversations": []}, "text")]
    expected = {}
    with tarfile.open(tmp_path / "s-0.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for n, (key, features_bytes, meta, reason) in enumerate(bad):
            expected[reason] = expected.get(reason, 0) + 1
            _add(tar, f"{key}.features.npy", features_bytes)
            if meta is not None:
                _add(tar, f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode())
            if n < len(good):
                key, (f, m) = list(good.items())[n]
                _add(tar, f"{key}.features.npy", _npy(f))
                _add(tar, f"{key}.json", json.dumps(m).encode())
        _add(tar, "cut.json", json.dumps(_meta("cut", 3, 0)).encode())
        _add(tar, "cut.features.npy", _npy(_features(7, 3)))
    raw = (tmp_path / "s-0.tar").read_bytes()
    cut = raw.rfind(_npy(_features(7, 3))) + 150  # inside the last member's data
    (tmp_path / "s-0.tar").write_bytes(raw[:cut])
    expected["truncated"] = 2  # the cut record, and one that index.json lists but the tar lost
    samples = len(bad) + len(good) + 2
    (tmp_path / "index.json").write_text(json.dumps(
        {"shards": [{"name": "s-0.tar", "samples": samples, "bytes": len(raw), "sha256": ""}],
         "total_samples": samples}))
    loader = VideoLoader([tmp_path], tok, batch_size=3, bad_fraction_limit=1.0, num_workers=2)
    yielded = _keys(_run(loader))
    assert loader.bad_counts == expected
    assert loader.bad_counts_by_source == {str(tmp_path): expected}
    assert sum(loader.seen.values()) == samples
    # Every good record once, plus repeats standing in for batches whose records were all bad.
    assert set(yielded) == set(good) and len(yielded) == len(good) + loader.repeats
    strict = VideoLoader([tmp_path], tok, batch_size=3, bad_fraction_limit=0.2, bad_check_after=5)
    with pytest.raises(RuntimeError, match=f"data source {tmp_path}.*bad_fraction_limit=0.2"):
        _run(strict)


def test_stock_webdataset_reads_our_shards(dataset):
    import webdataset as wds

    path, keys = dataset
    index = json.loads((path / "index.json").read_text())
    urls = [str(path / s["name"]) for s in index["shards"]]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        i = int(key[1:])
        features = np.load(io.BytesIO(sample["features.npy"]), allow_pickle=False)
        assert features.dtype == np.float16 and np.array_equal(features, _features(i, 2 + i % 5))
        assert json.loads(sample["json"])["timestamps"] == [f * 0.5 for f in range(2 + i % 5)]
        seen.append(key)
    assert sorted(seen) == sorted(keys)


def test_zero_copy_views_match_copies(dataset, tok):
    path, _ = dataset
    opts = dict(batch_size=2, seed=4, max_frames=4, num_workers=2, prefetch_factor=1)
    copies = _run(VideoLoader([path], tok, **opts))
    views = VideoLoader([path], tok, zero_copy=True, **opts)
    n = 0
    for batch, ref in zip(views, copies):
        _assert_same_batches([batch], [ref])  # checked before the ring slot can be reused
        n += 1
    assert n == len(copies) == 12


def test_config_errors_and_sources(dataset, tok):
    from data.config import DataConfig

    path, _ = dataset
    cfg = DataConfig.from_dict({"sources": [{"path": str(path), "weight": 2.0}], "batch_size": 5,
                                "num_workers": 0})
    loader = VideoLoader.from_config(cfg, tok, rank=1, world_size=2)
    assert loader.batches_per_epoch == 3 and loader.rank == 1
    with pytest.raises(ValueError, match="unknown keys \\['batchsize'\\]"):
        DataConfig.from_dict({"sources": [{"path": str(path)}], "batchsize": 2})
    with pytest.raises(ValueError, match="features_dtype"):
        DataConfig(sources=[{"path": str(path)}], batch_size=2, features_dtype="int8")
    with pytest.raises(FileNotFoundError, match="index.json"):
        VideoLoader([path / "nowhere"], tok, batch_size=2)
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        VideoLoader([path], tok, batch_size=2, rank=2, world_size=2)


def test_buffer_pool_lends_a_buffer_again_only_once_unreferenced():
    from data.collate import BufferPool

    pool = BufferPool(size=2)
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    a = pool.empty((3, 4), torch.float16)
    first = ptr(a)
    del a
    b = pool.empty((3, 4), torch.float16)
    assert ptr(b) == first  # dropped: warm memory comes back
    row = b[1]
    arr = b.numpy()
    del b
    c = pool.empty((3, 4), torch.float16)
    assert ptr(c) != first  # a row view still holds the first buffer
    d = pool.empty((3, 4), torch.float16)  # both pooled buffers held: plain memory
    assert len({first, ptr(c), ptr(d)}) == 3
    del row, c
    assert ptr(pool.empty((3, 4), torch.float16)) not in (first, ptr(d))  # the numpy view holds it
    del arr
    assert ptr(pool.empty((3, 4), torch.float16)) == first
    assert pool.empty((5, 4), torch.float16).shape == (5, 4)  # a longer batch grows a free buffer


def test_zero_copy_slots_reused_but_never_under_a_kept_view(dataset, tok):
    path, _ = dataset
    opts = dict(batch_size=2, seed=4, max_frames=4, num_workers=2, prefetch_factor=1)
    copier = VideoLoader([path], tok, zero_copy=False, **opts)
    copies = [_run(copier), _run(copier)]
    loader = VideoLoader([path], tok, **opts)  # zero_copy is the default
    kept = []
    for epoch in range(2):  # the second iteration reuses the workers and the ring
        ptrs = []
        for n, batch in enumerate(loader):
            _assert_same_batches([batch], [copies[epoch][n]])
            ptrs.append(batch["features"].untyped_storage().data_ptr())
            if n == 1:
                kept.append((batch["features"][0], copies[epoch][1]["features"][0]))
            if n == 2:
                kept.append((batch["features"].numpy(), copies[epoch][2]["features"].numpy()))
        assert len(ptrs) == 12 and len(set(ptrs)) < 12  # slots are refilled...
        assert ptrs[1] not in ptrs[2:] and ptrs[2] not in ptrs[3:]  # ...but not under a kept view
    for view, reference in kept:  # still intact after another epoch through the same ring
        assert np.array_equal(np.asarray(view), np.asarray(reference))


def test_float32_features_are_the_stored_float16_values(dataset, tok):
    path, _ = dataset
    opts = dict(batch_size=3, seed=6, max_frames=4, num_workers=0)
    for b16, b32 in zip(_run(VideoLoader([path], tok, **opts)),
                        _run(VideoLoader([path], tok, features_dtype="float32", **opts))):
        _check_batch_content(b16, tok, 4)  # against the values each record was written with
        assert b32["features"].dtype == torch.float32 and torch.equal(b32["features"], b16["features"].float())


_GOOD_TURNS = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "That."}]


@pytest.mark.parametrize("change", [
    {"conversations": [["x"]]},
    {"conversations": [5]},
    {"conversations": [[{"from": ["human"], "value": "x"}, _GOOD_TURNS[1]]]},
    {"conversations": [[{"from": "human", "value": 5}, _GOOD_TURNS[1]]]},
    {"qa": ["s"]},
    {"qa": [{"options": ["a", "b"], "answer": 0}]},
    {"qa": [{"question": "q?", "options": "ab", "answer": 0}]},
    {"qa": [{"question": "q?", "options": ["a", "b"], "answer": True}]},
    {"conversations": [_GOOD_TURNS], "qa": [{"question": "q?", "options": ["a", 3], "answer": 0}]},
], ids=["str-turn", "int-conv", "list-role", "int-value", "str-qa", "no-question", "str-options",
        "bool-answer", "int-option"])
def test_one_malformed_record_is_skipped_named_and_counted(tmp_path, tok, caplog, change):
    """Malformed leaves of a record's metadata (issue 18.2): skipped with shard and key in the log,
    counted as `schema`, and the epoch goes on with every good record, at the default limit."""
    with ShardWriter(tmp_path, max_samples=4) as w:
        for i in range(7):
            key = f"k{i}"
            meta = {**_meta(key, 3, i), **(change if i == 3 else {})}
            w.write(key, _features(i, 3), meta)
    write_index(tmp_path)
    loader = VideoLoader([tmp_path], tok, batch_size=2, num_workers=0)
    with caplog.at_level("WARNING", logger="data.loader"):
        keys = _keys(_run(loader))
    assert sorted(set(keys)) == ["k0", "k1", "k2", "k4", "k5", "k6"]
    assert loader.bad_counts == {"schema": 1}
    named = [r.getMessage() for r in caplog.records if "k3" in r.getMessage()]
    assert len(named) == 1 and "shard-r00000-000000.tar" in named[0] and "schema" in named[0]
    assert _keys(_run(loader)) != []  # the next epoch too


def _edit_index(folder, edit):
    index = json.loads((folder / "index.json").read_text())
    edit(index)
    try:  # the index stays self-consistent: only its agreement with the shards is at stake
        index["total_samples"] = sum(s["samples"] for s in index["shards"])
    except TypeError:
        pass
    (folder / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("edit, match", [
    (lambda ix: ix["shards"][0].update(samples=ix["shards"][0]["samples"] - 1), "holds 3 records, the index says 2"),
    (lambda ix: ix["shards"].append(dict(ix["shards"][0])), "listed twice"),
    (lambda ix: ix["shards"][0].update(name="/etc/passwd"), "no absolute path"),
    (lambda ix: ix["shards"][0].update(name="../outside/shard.tar"), r"no '\.\.'"),
    (lambda ix: ix["shards"][0].update(samples="3"), "expected integers"),
    (lambda ix: ix.update(shards={"name": "x"}), "expected {'shards'"),
], ids=["count-below-tar", "listed-twice", "absolute", "escaping", "string-count", "not-a-list"])
def test_index_is_verified_against_the_shards(tmp_path, tok, edit, match):
    """index.json describing something other than its shards is a one-line error before training
    (issue 18.5), naming index.json; today the loader trained part of the data or twice over."""
    _write_dataset(tmp_path, "x", [(6, 3)])
    _edit_index(tmp_path, edit)
    with pytest.raises(ValueError, match=match) as err:
        VideoLoader([tmp_path], tok, batch_size=2, num_workers=0)
    assert type(err.value).__name__ == "DatasetError"
    assert "index.json" in str(err.value) and "\n" not in str(err.value)


def test_index_checksums_and_compressed_shards(tmp_path, tok):
    """A shard changed after indexing (same size, same records) is caught by
    data.verify_index=sha256, not by the default header scan; a compressed shard by the scan."""
    import gzip

    _write_dataset(tmp_path, "x", [(4, 2)])
    shard = tmp_path / json.loads((tmp_path / "index.json").read_text())["shards"][0]["name"]
    raw = bytearray(shard.read_bytes())
    raw[raw.index(b'"number 0"') + 8] = ord("9")  # a changed answer: same length, same tar layout
    shard.write_bytes(bytes(raw))
    assert len(_run(VideoLoader([tmp_path], tok, batch_size=2, num_workers=0))) == 2
    with pytest.raises(ValueError, match="differs from its sha256"):
        VideoLoader([tmp_path], tok, batch_size=2, num_workers=0, verify_index="sha256")
    shard.write_bytes(gzip.compress(bytes(raw)))
    _edit_index(tmp_path, lambda ix: ix["shards"][0].update(bytes=shard.stat().st_size))
    with pytest.raises(ValueError, match=r"compressed \(gzip\)"):
        VideoLoader([tmp_path], tok, batch_size=2, num_workers=0)


def _global_order(per_rank: list[list[dict]]) -> list[str]:
    """Keys in epoch-position order: rank r's i-th sample of a batch sits at r + W * i."""
    order = []
    for batches in zip(*per_rank):
        width = max(len(b["keys"]) for b in batches)
        order += [b["keys"][i] for i in range(width) for b in batches if i < len(b["keys"])]
    return order


GROUPED = dict(group_by_length=True, group_size=8, group_tokens_per_frame=1000.0, max_frames=8)
"""Frames dominate the length estimate (1000 tokens each against ~60 of metadata), so each group
of 8 positions must come out sorted by frame count, which every key encodes (2 + i % 5)."""


def test_length_grouping_sorts_each_group_and_keeps_every_sample_once(dataset, tok):
    path, keys = dataset
    loader = VideoLoader([path], tok, batch_size=4, seed=6, **GROUPED)
    epochs = [_keys(_run(loader)) for _ in range(2)]
    plain = VideoLoader([path], tok, batch_size=4, seed=6, max_frames=8)
    for epoch, seen in enumerate(epochs):
        assert sorted(seen) == sorted(keys)
        frames = [2 + int(k[1:]) % 5 for k in seen]
        for first in range(0, len(seen), 8):
            assert frames[first: first + 8] == sorted(frames[first: first + 8])
        # The groups hold the same samples as the ungrouped order's groups: only reordered within.
        plain.set_epoch(epoch)
        ungrouped = _keys(_run(plain))
        for first in range(0, len(seen), 8):
            assert sorted(seen[first: first + 8]) == sorted(ungrouped[first: first + 8])
    assert epochs[0] != epochs[1]


def test_length_grouping_order_is_the_same_at_every_world_size(dataset, tok):
    path, keys = dataset
    orders = []
    for world, batch, workers in ((1, 5, 0), (2, 3, 2), (3, 2, 1)):
        per_rank = []
        for rank in range(world):
            loader = VideoLoader([path], tok, rank=rank, world_size=world, batch_size=batch, seed=8,
                                 num_workers=workers, **GROUPED)
            loader.set_epoch(1)
            per_rank.append(_run(loader))
        orders.append(_global_order(per_rank))
    assert orders[0] == orders[1] == orders[2] and sorted(orders[0]) == sorted(keys)


def test_length_grouping_resume_is_sample_exact(dataset, tok):
    path, keys = dataset
    opts = dict(batch_size=2, seed=3, world_size=2, rank=0, num_workers=2, **GROUPED)
    full = VideoLoader([path], tok, **opts)
    reference = _run(full) + _run(full, 2)
    first = VideoLoader([path], tok, **opts)
    head = _run(first, 3)
    resumed = VideoLoader([path], tok, **opts)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    _assert_same_batches(head + _run(resumed) + _run(resumed, 2), reference)
    # At another world size: the two old ranks' states, nothing skipped or repeated.
    old = [VideoLoader([path], tok, **{**opts, "rank": r}) for r in (0, 1)]
    before = [_run(o, 2) for o in old]
    new = [VideoLoader([path], tok, **{**opts, "rank": r, "world_size": 3, "batch_size": 3}) for r in range(3)]
    for n in new:
        n.load_state_dict([o.state_dict() for o in old])
    used = [k for b in before for k in _keys(b)] + [k for n in new for k in _keys(_run(n))]
    assert sorted(used) == sorted(keys)
    # A state saved without grouping would continue a different order: refused.
    with pytest.raises(ValueError, match="length_groups"):
        VideoLoader([path], tok, **opts).load_state_dict(
            VideoLoader([path], tok, batch_size=2, seed=3, world_size=2, max_frames=8).state_dict())


def test_packed_batches_hold_the_padded_batches_samples(dataset, tok):
    path, _ = dataset
    opts = dict(batch_size=3, seed=2, max_frames=4, num_workers=2)
    padded = _run(VideoLoader([path], tok, **opts))
    packed = _run(VideoLoader([path], tok, pack_sequences=True, **opts))
    assert len(packed) == len(padded)
    for p, q in zip(packed, padded):
        assert p["keys"] == q["keys"] and p["input_ids"].shape[0] == 1
        lengths = q["attention_mask"].sum(1)
        assert p["cu_seqlens"].tolist() == [0] + torch.cumsum(lengths, 0).tolist()
        valid = q["attention_mask"].bool()
        assert torch.equal(p["input_ids"][0], q["input_ids"][valid])
        assert torch.equal(p["labels"][0], q["labels"][valid])
        assert bool(p["attention_mask"].all())
        for name in ("features", "frame_mask", "timestamps"):
            assert torch.equal(p[name], q[name]), name


def test_length_estimate_follows_frames_and_text_not_timestamps(tmp_path):
    """Source.lengths against an oracle computed from what was written: kept frames x tokens per
    frame + the metadata's bytes without its timestamps / 4 (timestamps grow with the frames)."""
    from data.loader import Source

    specs = [(2, 10), (30, 10), (2, 2000), (30, 2000), (60, 10), (60, 2000)]  # (frames, answer chars)
    oracle = []
    with ShardWriter(tmp_path, prefix="l", max_samples=4) as w:
        for i, (frames, chars) in enumerate(specs):
            meta = _meta(f"l{i}", frames, i)
            meta["conversations"][0][1]["value"] = "x" * chars
            w.write(f"l{i}", _features(i, frames), meta)
            text = json.dumps({k: v for k, v in meta.items() if k != "timestamps"}).encode()
            oracle.append(min(frames, 40) * 10.0 + len(text) / 4)
    write_index(tmp_path)
    got = Source(tmp_path, 1.0).lengths(max_frames=40, tokens_per_frame=10.0)
    assert got == pytest.approx(oracle, abs=20)  # ~8 bytes of timestamp formatting per frame apart
    assert list(np.argsort(got)) == list(np.argsort(oracle))
