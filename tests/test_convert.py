"""Annotation parsers on hand-written fixtures, and `mambamia convert/extract` end to end on real mp4s."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from data.annotations import AnnotationError, parse_file
from data.cli import convert_main, extract_main, slurm_rank
from data.convert import make_key
from data.shards import completed_shards, shard_keys
from data.synthetic import moving_square_frames, truncated_copy, write_video
from data.video import SamplingConfig, decode_video

VFR_TIMES = [0.0, 0.1, 0.45, 0.5, 1.2, 1.3, 2.0, 2.6]


def _write(path, obj, jsonl=False):
    text = "".join(json.dumps(o) + "\n" for o in obj) if jsonl else json.dumps(obj, indent=1)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- annotation formats

def test_llava_conversations(tmp_path):
    path = _write(tmp_path / "llava.json", [
        {"id": "1", "video": "a/x.mp4", "conversations": [
            {"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "A circle moves."}]},
        {"id": "2", "video": "a/x.mp4", "conversations": [
            {"from": "user", "value": "Colour?"}, {"from": "assistant", "value": "Red."},
            {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Blue."}]},
        {"id": "3", "video": "b.mp4", "conversations": [
            {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Where? <video>"},
            {"from": "gpt", "value": "Left."}]},
    ])
    items = parse_file(path)
    assert [i.video for i in items] == ["a/x.mp4", "a/x.mp4", "b.mp4"]
    assert items[0].conversations == [[{"from": "human", "value": "<video>\nWhat happens?"},
                                       {"from": "gpt", "value": "A circle moves."}]]
    assert items[1].conversations[0][0] == {"from": "human", "value": "<video>\nColour?"}
    assert [t["from"] for t in items[1].conversations[0]] == ["human", "gpt", "human", "gpt"]
    assert items[2].conversations == [[{"from": "system", "value": "Be brief."},
                                       {"from": "human", "value": "Where? <video>"}, {"from": "gpt", "value": "Left."}]]


def test_videomme_flat_and_nested(tmp_path):
    row = {"video_id": "001", "duration": "short", "domain": "Knowledge", "videoID": "fFjv93ACGo8",
           "question_id": "001-1", "task_type": "Counting Problem", "question": "How many?",
           "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "C"}
    flat = parse_file(_write(tmp_path / "vm.jsonl", [row], jsonl=True), "videomme")
    nested = parse_file(_write(tmp_path / "vm2.json", [{
        "video_id": "001", "duration": "short", "videoID": "fFjv93ACGo8",
        "questions": [{k: row[k] for k in ("question_id", "task_type", "question", "options", "answer")},
                      {"question_id": "001-2", "task_type": "OCR", "question": "Text?",
                       "options": ["A. x", "B. y", "C. z", "D. w"], "answer": "A"}]}]))
    want = {"id": "001-1", "question": "How many?", "options": ["One.", "Two.", "Three.", "Four."],
            "answer": 2, "type": "Counting Problem", "duration_bucket": "short", "time_reference": None}
    assert flat[0].video == nested[0].video == "fFjv93ACGo8.mp4"
    assert flat[0].qa == [want]
    assert nested[0].qa[0] == want and nested[0].qa[1]["answer"] == 0


def test_videomme_parquet_as_published(tmp_path):
    """Video-MME's hub release is one Parquet file (options a list column); rows read from it
    parse exactly as the same rows written as JSONL, and a damaged file is a one-line error."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity",
             "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8",
             "question_id": f"001-{i}", "task_type": "Counting Problem", "question": f"How many {i}?",
             "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "ABCD"[i]} for i in range(3)]
    rows.append({**rows[0], "video_id": "602", "duration": "long", "videoID": "zzLongVid01",
                 "question_id": "602-1", "answer": "B"})
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups
    from_parquet = parse_file(path)  # auto-detected
    from_jsonl = parse_file(_write(tmp_path / "same.jsonl", rows, jsonl=True))
    assert [(i.video, i.qa) for i in from_parquet] == [(i.video, i.qa) for i in from_jsonl]
    assert [q["answer"] for i in from_parquet for q in i.qa] == [0, 1, 2, 1]
    assert from_parquet[-1].qa[0]["duration_bucket"] == "long"

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AnnotationError, match=r"^\S*bad\.parquet: not a readable Parquet file"):
        parse_file(bad)
    rows[1]["answer"] = "E"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(AnnotationError, match=r"parquet:row 1: field 'answer': expected a letter A-D"):
        parse_file(path)


def test_mlvu_and_lvbench(tmp_path):
    mlvu = parse_file(_write(tmp_path / "1_plotQA.json", [
        {"video": "movie101_66.mp4", "duration": 246.0, "question": "What does he hold?",
         "candidates": ["a cup", "a book", "a phone", "a pen"], "answer": "a phone", "question_type": "plotQA"}]))
    assert mlvu[0].video == "movie101_66.mp4" and mlvu[0].duration == 246.0
    assert mlvu[0].qa[0]["options"] == ["a cup", "a book", "a phone", "a pen"]
    assert mlvu[0].qa[0]["answer"] == 2 and mlvu[0].qa[0]["type"] == "plotQA"

    lv = parse_file(_write(tmp_path / "video_info.meta.jsonl", [
        {"key": "hPdo", "type": "cartoon", "video_info": {"duration_minutes": 61.5},
         "qa": [{"uid": "7", "question": "Who enters first?\n(A) a cat\n(B) a dog\n(C) a bird\n(D) nobody",
                 "answer": "D", "question_type": ["entity recognition", "key information retrieval"],
                 "time_reference": "00:15-00:19"}]}], jsonl=True))
    assert lv[0].video == "hPdo.mp4" and lv[0].duration == pytest.approx(3690.0)
    assert lv[0].qa == [{"id": "7", "question": "Who enters first?", "options": ["a cat", "a dog", "a bird", "nobody"],
                         "answer": 3, "type": "entity recognition, key information retrieval",
                         "duration_bucket": None, "time_reference": "00:15-00:19"}]


@pytest.mark.parametrize("records, jsonl, fmt, pattern", [
    ([{"video": "x.mp4", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 3}]}],
     True, "auto", r"bad\.jsonl:line 1: field 'conversations\[1\]\.value': expected a string, got 3"),
    ([{"video": "x.mp4", "conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
     False, "auto", r"bad\.jsonl:record 0: field 'conversations\[1\]\.from'"),
    ([{"video": "x.mp4", "conversations": [{"from": "human", "value": "<video><image>"}, {"from": "gpt", "value": "b"}]}],
     True, "auto", r"line 1: field 'conversations\[0\]\.value': expected one <video>/<image> placeholder"),
    ([{"videoID": "v", "question": "q", "options": ["A. x", "C. y"], "answer": "A"}],
     True, "videomme", r"line 1: field 'options\[1\]': expected an option starting with 'B\.'"),
    ([{"videoID": "v", "question": "q", "options": ["A. x", "B. y"], "answer": "E"}],
     True, "videomme", r"line 1: field 'answer': expected a letter A-B"),
    ([{"video": "v.mp4", "question": "q", "candidates": ["x", "y"], "answer": "z"}],
     True, "mlvu", r"line 1: field 'answer'"),
    ([{"video": "v.mp4", "question": "q", "candidates": ["x", "y"], "answer": "x", "duration": float("nan")}],
     True, "mlvu", r"line 1: field 'duration': expected a finite number of seconds >= 0, got NaN"),
    ([{"key": "k", "qa": [{"question": "q\n(A) x\n(C) y", "answer": "A"}]}],
     True, "lvbench", r"line 1: field 'qa\[0\]\.question': expected option '\(B\)' next"),
    ([{"conversations": []}], True, "llava", r"line 1: field 'video': expected a str, got nothing"),
    ([{"videoID": "v", "questions": [{"question": "q", "options": ["A. x", "B. y"]}, {"options": ["A. x", "B. y"]}]}],
     False, "videomme", r"record 0: field 'questions\[1\]\.question': expected a str, got nothing"),
    ([{"video": "x.mp4", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>"}]}],
     True, "llava", r"line 1: field 'conversations\[1\]\.value': expected the <video>/<image> placeholder only in"),
    ([{"video": "x.mp4", "conversations": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "b"}]}],
     True, "llava", r"line 1: field 'conversations': expected a question and an answer after the system turn"),
])
def test_malformed_items_give_one_line_errors(tmp_path, records, jsonl, fmt, pattern):
    path = _write(tmp_path / "bad.jsonl", records, jsonl=jsonl)
    with pytest.raises(AnnotationError, match=pattern) as info:
        parse_file(path, fmt)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_bad_json_line(tmp_path):
    good = {"video": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "b.jsonl").write_text(json.dumps(good) + "\n\n{oops\n")
    with pytest.raises(AnnotationError, match=r"b\.jsonl:line 3: not valid JSON"):
        parse_file(tmp_path / "b.jsonl", "llava")


# ---------------------------------------------------------------- end to end on real videos

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    videos = root / "videos"
    (videos / "sub").mkdir(parents=True)
    frames = {}
    for i in range(3):
        frames[f"sub/c{i}.mp4"] = moving_square_frames(10 + 2 * i, 32, 32, seed=i)
        write_video(videos / f"sub/c{i}.mp4", frames[f"sub/c{i}.mp4"], 4)
    frames["vfr.mp4"] = moving_square_frames(len(VFR_TIMES), 48, 64, seed=9)
    write_video(videos / "vfr.mp4", frames["vfr.mp4"], 4, timestamps=VFR_TIMES)
    long_frames = moving_square_frames(80, 32, 32, seed=7)
    write_video(videos / "long.mp4", long_frames, 8)
    truncated_copy(videos / "long.mp4", videos / "broken.mp4", keep=0.5)
    (videos / "long.mp4").unlink()
    conv = lambda q, a: [{"from": "human", "value": f"<video>\n{q}"}, {"from": "gpt", "value": a}]
    llava = _write(root / "llava.json", [
        {"video": "sub/c0.mp4", "conversations": conv("What moves?", "A square.")},
        {"video": "sub/c0.mp4", "conversations": conv("Colour?", "Red.")},
        {"video": "sub/c1.mp4", "conversations": conv("Describe.", "A square moving.")},
        {"video": "sub/c2.mp4", "conversations": conv("Describe.", "A square.")},
        {"video": "broken.mp4", "conversations": conv("Describe.", "Nothing.")},
        {"video": "absent.mp4", "conversations": conv("Describe.", "Nothing.")},
    ])
    mlvu = _write(root / "mlvu.json", [
        {"video": "vfr.mp4", "duration": 2.85, "question": "Which shape?", "candidates": ["square", "circle"],
         "answer": "square", "question_type": "plotQA"},
        {"video": "sub/c0.mp4", "duration": 2.5, "question": "How many squares?", "candidates": ["1", "2"],
         "answer": "1", "question_type": "count"},
    ])
    return {"root": root, "videos": videos, "llava": llava, "mlvu": mlvu, "frames": frames}


def _records(out_dir):
    """{key: (features, meta)} read with tarfile from every shard listed in index.json."""
    index = json.loads((out_dir / "index.json").read_text())
    records = {}
    for entry in index["shards"]:
        with tarfile.open(out_dir / entry["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, raw in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                feats = np.load(io.BytesIO(members[f"{key}.features.npy"]), allow_pickle=False)
                records[key] = (feats, json.loads(raw))
    return index, records


def _check_index(out_dir, index):
    for entry in index["shards"]:
        raw = (out_dir / entry["name"]).read_bytes()
        assert entry["bytes"] == len(raw) and entry["sha256"] == hashlib.sha256(raw).hexdigest()
        with tarfile.open(out_dir / entry["name"]) as tar:
            assert entry["samples"] == len({m.name.split(".")[0] for m in tar.getmembers()})
    assert index["total_samples"] == sum(e["samples"] for e in index["shards"])


def test_convert_videos_end_to_end(dataset, tiny_assets, capsys):
    out = dataset["root"] / "out"
    argv = ["--annotations", str(dataset["llava"]), str(dataset["mlvu"]), "--videos", str(dataset["videos"]),
            "--encoder", str(tiny_assets["vision"]), "--fps", "2", "--max-frames", "4",
            "--shard-samples", "2", "--out", str(out), "--merge", "--no-progress"]
    assert convert_main(argv) == 0
    printed = capsys.readouterr().out
    assert "ok 4, failed 2" in printed and "samples 6" in printed

    failures = [json.loads(line) for line in (out / "failures-r00000.jsonl").read_text().splitlines()]
    reasons = {f["video"]: f["reason"] for f in failures}
    assert reasons.keys() == {"broken.mp4", "absent.mp4"}
    assert reasons["absent.mp4"].startswith("missing video")
    assert reasons["broken.mp4"].startswith("undecodable video")
    assert all(f["file"].endswith(f["video"]) for f in failures)

    index, records = _records(out)
    _check_index(out, index)
    assert [e["samples"] for e in index["shards"]] == [2, 2]
    by_video = {meta["video_id"]: (feats, meta) for feats, meta in records.values()}
    assert set(by_video) == {"sub/c0", "sub/c1", "sub/c2", "vfr"}
    for key, (feats, meta) in records.items():
        assert key == meta["key"] == make_key(meta["video_id"] + ".mp4")
        assert feats.dtype == np.float16 and feats.shape == (len(meta["timestamps"]), 16, 32)
        assert meta["encoder"] == tiny_assets["vision"].name and meta["layer"] == -2

    # c0: 2.5 s at 2 fps -> ceil(5) = 5 > 4 frames: 4 uniform targets on the 4 fps grid
    c0 = by_video["sub/c0"][1]
    grid = np.arange(10) / 4
    want = grid[np.unique([np.argmin(np.abs(grid - t)) for t in np.linspace(0, 2.5, 4, endpoint=False)])]
    np.testing.assert_allclose(c0["timestamps"], want, atol=1e-3)
    assert c0["duration"] == pytest.approx(2.5, abs=1e-3)
    assert [c[0]["value"] for c in c0["conversations"]] == ["<video>\nWhat moves?", "<video>\nColour?"]
    assert c0["qa"][0]["answer"] == 0 and c0["qa"][0]["options"] == ["1", "2"]

    # VFR: timestamps are written frames nearest to the targets over the real duration
    vfr_feats, vfr = by_video["vfr"]
    duration = VFR_TIMES[-1] + 0.25
    targets = np.linspace(0, duration, 4, endpoint=False)  # ceil(2.85 x 2) = 6 > 4
    want = np.array(VFR_TIMES)[np.unique([np.argmin(np.abs(np.array(VFR_TIMES) - t)) for t in targets])]
    np.testing.assert_allclose(vfr["timestamps"], want, atol=1e-3)

    # independent oracle: decode again, transformers' processor + model, hidden state -2
    from transformers import AutoImageProcessor, AutoModel

    frames = decode_video(dataset["videos"] / "vfr.mp4", SamplingConfig(fps=2, max_frames=4, backend="pyav")).frames
    pixels = AutoImageProcessor.from_pretrained(tiny_assets["vision"])(images=list(frames), return_tensors="pt")
    with torch.no_grad():
        ref = AutoModel.from_pretrained(tiny_assets["vision"])(
            pixel_values=pixels["pixel_values"], output_hidden_states=True).hidden_states[-2].numpy()
    np.testing.assert_allclose(vfr_feats.astype(np.float32), ref, atol=0.02, rtol=0.01)

    # stock webdataset reads the converted shards
    import webdataset as wds

    urls = [str(out / e["name"]) for e in index["shards"]]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None)]
    assert sorted(keys) == sorted(records)


def test_rerun_after_kill_skips_complete_shards(dataset, tiny_assets, capsys):
    out = dataset["root"] / "rerun"
    argv = ["--annotations", str(dataset["llava"]), "--videos", str(dataset["videos"]),
            "--encoder", str(tiny_assets["vision"]), "--fps", "1", "--max-frames", "2",
            "--shard-samples", "1", "--out", str(out), "--no-progress"]
    assert convert_main(argv) == 0
    shards = sorted(out.glob("*.tar"))
    assert len(shards) == 3
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    # The state a SIGKILL leaves: the last shard never renamed, its temporary file half written.
    last = shards[-1]
    last.rename(last.with_name(last.name + ".partial"))
    with open(last.with_name(last.name + ".partial"), "r+b") as f:
        f.truncate(700)
    capsys.readouterr()
    assert convert_main(argv + ["--merge"]) == 0
    assert "ok 1, failed 2, skipped 2 (already done)" in capsys.readouterr().out
    assert not list(out.glob("*.partial"))
    for p in shards[:-1]:  # complete shards untouched
        assert (p.stat().st_mtime_ns, p.read_bytes()) == before[p.name]
    assert last.read_bytes() == before[last.name][1]  # rewritten identically
    index, records = _records(out)
    _check_index(out, index)
    assert len(records) == 3


def test_feature_files_ranks_and_merge(tmp_path, capsys):
    feats_dir = tmp_path / "feats"
    feats_dir.mkdir()
    rng = np.random.default_rng(0)
    arrays = {v: rng.standard_normal((3 + i, 4, 8)).astype(np.float32) for i, v in enumerate("abcde")}
    np.save(feats_dir / "a.npy", arrays["a"])
    from safetensors.numpy import save_file

    save_file({"features": arrays["b"], "timestamps": np.array([0.0, 2.0, 4.5, 7.0])}, str(feats_dir / "b.safetensors"))
    torch.save(torch.from_numpy(arrays["c"]), feats_dir / "c.pt")
    torch.save({"features": torch.from_numpy(arrays["d"]).bfloat16(),
                "timestamps": torch.tensor([3599.123456, 3600.5, 3601.75, 3602.0, 3603.0625, 3604.0], dtype=torch.float64)},
               feats_dir / "d.pt")
    np.save(feats_dir / "e.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)  # needs pickle
    np.save(feats_dir / "f.npy", np.zeros((4, 8), np.float32))  # wrong rank
    rows = [{"videoID": v, "question": f"Q {v}?", "options": ["A. yes", "B. no"], "answer": "B",
             "duration": "short", "task_type": "t"} for v in "abcdefg"]
    ann = _write(tmp_path / "vm.jsonl", rows, jsonl=True)
    out = tmp_path / "out"
    base = ["--annotations", str(ann), "--features", str(feats_dir), "--fps", "0.5", "--out", str(out),
            "--encoder-name", "siglip-test", "--no-progress", "--world-size", "2"]
    assert convert_main(base + ["--rank", "1", "--run-id", "old"]) == 0
    # rank 1's summary belongs to another run: rank 0 does not take it for this run's
    assert convert_main(base + ["--rank", "0", "--merge", "--merge-wait", "0.2", "--run-id", "new"]) == 2
    assert "ranks [1] have not finished" in capsys.readouterr().err
    assert convert_main(base + ["--rank", "1", "--run-id", "new"]) == 0
    capsys.readouterr()
    assert convert_main(base + ["--rank", "0", "--merge", "--merge-wait", "5", "--run-id", "new"]) == 0
    # both ranks' last runs found their videos done (rank 0 converted before its failed merge)
    assert "all 2 ranks (last runs): ok 0, failed 3, skipped 4" in capsys.readouterr().out
    index, records = _records(out)
    _check_index(out, index)
    assert {n["name"].split("-")[1] for n in index["shards"]} == {"r00000", "r00001"}
    by_video = {meta["video_id"]: (f, meta) for f, meta in records.values()}
    assert set(by_video) == {"a", "b", "c", "d"}
    for v in "abcd":
        f, meta = by_video[v]
        src = torch.from_numpy(arrays[v]).bfloat16().float().numpy() if v == "d" else arrays[v]
        np.testing.assert_array_equal(f, src.astype(np.float16))
        assert meta["encoder"] == "siglip-test" and meta["qa"][0]["answer"] == 1
    assert by_video["b"][1]["timestamps"] == [0.0, 2.0, 4.5, 7.0]
    assert by_video["a"][1]["timestamps"] == [0.0, 2.0, 4.0]  # no timestamps stored: frame i at i / fps
    assert by_video["d"][1]["timestamps"] == [3599.123456, 3600.5, 3601.75, 3602.0, 3603.0625, 3604.0]
    failures = [json.loads(line) for r in (0, 1)
                for line in (out / f"failures-r{r:05d}.jsonl").read_text().splitlines()]
    reasons = {f["video"]: f["reason"] for f in failures}
    assert reasons.keys() == {"e.mp4", "f.mp4", "g.mp4"}
    assert reasons["e.mp4"].startswith("bad feature file") and "pickle" in reasons["e.mp4"].lower()
    assert reasons["f.mp4"].startswith("bad feature file: expected a float [frames, patches, dim]")
    assert reasons["g.mp4"].startswith("missing feature file")
    assert {f["annotation"] for f in failures} == {f"{ann}:line {i}" for i in (5, 6, 7)}

    # the rank slices depend on the world size: resuming with another one is refused
    assert convert_main(base[:-1] + ["3", "--rank", "0"]) == 2
    assert "written by 2 ranks, this run has 3" in capsys.readouterr().err

    # merge-only recomputes the same index; nothing convertible at all -> exit code 1
    (out / "index.json").unlink()
    assert convert_main(["--merge-only", str(out)]) == 0
    assert json.loads((out / "index.json").read_text()) == index
    ann2 = _write(tmp_path / "none.jsonl", rows[5:], jsonl=True)
    assert convert_main(["--annotations", str(ann2), "--features", str(feats_dir), "--out",
                         str(tmp_path / "out2"), "--no-progress"]) == 1


def test_cli_errors_and_help(tmp_path, capsys, monkeypatch):
    bad = _write(tmp_path / "bad.json", [{"video": 3, "conversations": []}])
    assert convert_main(["--annotations", str(bad), "--features", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.json:record 0: field 'video'" in err
    assert convert_main(["--annotations", str(bad), "--out", str(tmp_path / "o")]) == 2
    # skipping bad records: logged as failures; with nothing left to convert the exit code is 1
    assert convert_main(["--annotations", str(bad), "--features", str(tmp_path), "--out", str(tmp_path / "o"),
                         "--skip-bad-annotations", "--no-progress"]) == 1
    logged = json.loads((tmp_path / "o" / "failures-r00000.jsonl").read_text())
    assert logged["file"] == str(bad) and "record 0: field 'video'" in logged["reason"]
    assert convert_main(["--merge-only", str(tmp_path / "empty")]) == 2
    for main in (convert_main, extract_main):
        with pytest.raises(SystemExit) as info:
            main(["--help"])
        assert info.value.code == 0
        assert "examples:" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert slurm_rank() == (1, 2)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert slurm_rank() == (2 * 2 + 1, 6)


def test_extract_command(dataset, tiny_assets, capsys):
    out = dataset["root"] / "extracted"
    assert extract_main([str(dataset["videos"]), "--encoder", str(tiny_assets["vision"]), "--fps", "1",
                         "--max-frames", "3", "--pool", "2", "--out", str(out), "--merge", "--no-progress"]) == 0
    assert "ok 4, failed 1" in capsys.readouterr().out
    index, records = _records(out)
    _check_index(out, index)
    assert sorted(m["video_id"] for _, m in records.values()) == ["sub/c0", "sub/c1", "sub/c2", "vfr"]
    for feats, meta in records.values():
        assert feats.shape == (len(meta["timestamps"]), 4, 32)  # 4x4 patches pooled 2x2
        assert meta["conversations"] == [] and meta["qa"] == []


def _run_blocked_at_d(tmp_path):
    """A real `mambamia convert` subprocess stuck mid-run: shard 0 (a, b) complete, shard 1 open
    with c, and the read of d blocked on a FIFO until the test writes to it."""
    feats = tmp_path / "feats"
    feats.mkdir()
    arrays = {v: np.full((2, 3, 4), i, np.float16) for i, v in enumerate("abcde")}
    for v in "abce":
        np.save(feats / f"{v}.npy", arrays[v])
    os.mkfifo(feats / "d.npy")
    ann = _write(tmp_path / "mlvu.json", [{"video": f"{v}.mp4", "question": "q", "candidates": ["x", "y"],
                                           "answer": "x"} for v in "abcde"])
    out = tmp_path / "out"
    args = ["--annotations", str(ann), "--features", str(feats), "--out", str(out), "--shard-samples", "2",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "convert", *args, "--decode-workers", "1"],
                            cwd=os.path.dirname(os.path.dirname(__file__)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not ((out / "shard-r00000-000000.tar").exists() and (out / "shard-r00000-000001.tar.partial").exists()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    return proc, out, feats, arrays, args


def _replace_fifo(feats, array):
    (feats / "d.npy").unlink()
    np.save(feats / "d.npy", array)


def test_sigkill_mid_run_then_rerun(tmp_path):
    proc, out, feats, arrays, args = _run_blocked_at_d(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "index.json").exists()
    first = (out / "shard-r00000-000000.tar").stat().st_mtime_ns
    _replace_fifo(feats, arrays["d"])

    assert convert_main(args + ["--merge"]) == 0
    assert (out / "shard-r00000-000000.tar").stat().st_mtime_ns == first
    assert not list(out.glob("*.partial"))
    index, records = _records(out)
    _check_index(out, index)
    assert [e["samples"] for e in index["shards"]] == [2, 2, 1]
    got = {m["video_id"]: f for f, m in records.values()}
    assert got.keys() == set("abcde")
    for v, f in got.items():
        np.testing.assert_array_equal(f, arrays[v])


def test_sigterm_stops_between_videos_with_shards_complete(tmp_path):
    """SIGTERM (what slurm/ forwards on preemption): the open shard is completed, exit code 85."""
    proc, out, feats, arrays, args = _run_blocked_at_d(tmp_path)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    npy = io.BytesIO()
    np.save(npy, arrays["d"])
    with open(feats / "d.npy", "wb") as fifo:  # unblock the reader; d arrives after the stop request
        fifo.write(npy.getvalue())
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 85
    assert "stopped on request" in stdout.decode()
    assert not list(out.glob("*.partial"))
    assert [len(shard_keys(p)) for p in completed_shards(out)] == [2, 1]  # a, b | c
    assert json.loads((out / "summary-r00000.json").read_text())["interrupted"] is True

    _replace_fifo(feats, arrays["d"])
    assert convert_main(args + ["--merge"]) == 0
    index, records = _records(out)
    _check_index(out, index)
    assert [e["samples"] for e in index["shards"]] == [2, 1, 2]
    assert {m["video_id"] for _, m in records.values()} == set("abcde")


# ---------------------------------------------------------------- bad input where it enters (issue 18, 17)

def _feature_files(folder, names, frames=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        np.save(folder / f"{name}.npy", np.full((frames, 4, 8), i + 1, np.float32))


def _failures(out):
    return [json.loads(line) for line in (out / "failures-r00000.jsonl").read_text().splitlines()]


def test_paths_outside_the_root_are_refused_per_item(tmp_path, capsys):
    """Issue 18.4: '../outside/x', an absolute path and a Video-MME videoID leading out of the
    root are failures with a one-line reason; nothing outside the root is read into a shard."""
    _feature_files(tmp_path / "feats", ["a"])
    _feature_files(tmp_path / "outside", ["x", "y"])
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    llava = _write(tmp_path / "llava.json", [
        {"video": "a.mp4", "conversations": conv},
        {"video": "../outside/x.mp4", "conversations": conv},
        {"video": "sub/../../outside/x.mp4", "conversations": conv},
        {"video": str(tmp_path / "outside" / "y.mp4"), "conversations": conv}])
    vmme = _write(tmp_path / "vm.jsonl", [{"videoID": "../outside/y", "question": "q?", "options": ["A. x", "B. y"],
                                           "answer": "A", "question_id": "q1"}], jsonl=True)
    out = tmp_path / "out"
    assert convert_main(["--annotations", str(llava), str(vmme), "--features", str(tmp_path / "feats"),
                         "--out", str(out), "--merge", "--no-progress"]) == 0
    assert "ok 1, failed 3" in capsys.readouterr().out  # the two '../outside/x' spellings are one video
    reasons = {f["video"]: f["reason"] for f in _failures(out)}
    assert reasons == {"../outside/x.mp4": "refused: the path leads outside the root ('..')",
                       "../outside/y.mp4": "refused: the path leads outside the root ('..')",
                       str(tmp_path / "outside" / "y.mp4"): "refused: the path is an absolute path; "
                                                            "expected a path relative to the root"}
    _, records = _records(out)
    assert [meta["video_id"] for _, meta in records.values()] == ["a"]


def test_os_error_is_a_failure_and_work_is_kept(tmp_path, capsys, monkeypatch):
    """Issue 18.6: a 300-character video name (ENAMETOOLONG) is a failure line and the run goes on;
    an unexpected error later completes the open shard and leaves the failures written so far;
    the rerun converts only what is left."""
    import data.convert

    names = ["w", "x", "y", "z"]  # keys sort after the long name's: it fails first
    _feature_files(tmp_path / "feats", names)
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    long_name = "a" * 300 + ".mp4"
    videos = [long_name, *(f"{n}.mp4" for n in names)]
    ann = _write(tmp_path / "ann.json", [{"video": v, "conversations": conv} for v in videos])
    argv = ["--annotations", str(ann), "--features", str(tmp_path / "feats"), "--out", str(tmp_path / "out"),
            "--no-progress", "--decode-workers", "1"]
    real_finish = data.convert.Converter.finish
    order = sorted(make_key(v) for v in videos)
    third_ok = [k for k in order if not k.startswith("a" * 60)][2]

    def finish(self, key, *rest):
        if key == third_ok:
            raise RuntimeError("unexpected")
        return real_finish(self, key, *rest)

    monkeypatch.setattr(data.convert.Converter, "finish", finish)
    assert convert_main(argv) == 2
    assert capsys.readouterr().err == "mambamia convert: error: unexpected\n"
    kept = [k for p in completed_shards(tmp_path / "out") for k in shard_keys(p)]
    assert len(kept) == 2 and not list((tmp_path / "out").glob("*.partial"))
    assert [f["video"] for f in _failures(tmp_path / "out")] == [long_name]
    assert "File name too long" in _failures(tmp_path / "out")[0]["reason"]
    monkeypatch.setattr(data.convert.Converter, "finish", real_finish)
    capsys.readouterr()
    assert convert_main(argv + ["--merge"]) == 0
    assert "ok 2, failed 1, skipped 2 (already done)" in capsys.readouterr().out
    assert [f["video"] for f in _failures(tmp_path / "out")] == [long_name]
    assert json.loads((tmp_path / "out" / "index.json").read_text())["total_samples"] == 4


def test_annotation_text_encodings_nesting_and_skippable_json_errors(tmp_path):
    """Issue 18.10: UTF-16 with a BOM reads as UTF-8 does; without one it is a one-line error;
    JSON nested 100k deep is a one-line error (a whole file) or a skippable line (JSONL); a JSONL
    syntax error reaches --skip-bad-annotations' handler instead of stopping the run."""
    rows = [{"video": "é.mp4", "conversations": [{"from": "human", "value": "ça?"}, {"from": "gpt", "value": "oui"}]}]
    text = json.dumps(rows, ensure_ascii=False)
    (tmp_path / "u8.json").write_text(text, encoding="utf-8")
    (tmp_path / "u16.json").write_bytes(text.encode("utf-16"))  # with its BOM
    (tmp_path / "u16le.json").write_bytes(text.encode("utf-16-le"))  # without
    assert [i.conversations for i in parse_file(tmp_path / "u16.json")] == \
        [i.conversations for i in parse_file(tmp_path / "u8.json")]
    with pytest.raises(AnnotationError, match=r"u16le\.json: not UTF-8 text") as err:
        parse_file(tmp_path / "u16le.json")
    assert "\n" not in str(err.value)
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AnnotationError, match=r"deep\.json: not valid JSON \(nested too deeply\)"):
        parse_file(tmp_path / "deep.json")
    good = json.dumps(rows[0])
    (tmp_path / "mixed.jsonl").write_text("\n".join([good, "{oops", '{"a": ' * 100_000, "[1, 2]", good]) + "\n")
    skipped = []
    items = parse_file(tmp_path / "mixed.jsonl", on_error=skipped.append)
    assert len(items) == 2
    assert [str(e).split(": ", 1)[0] for e in skipped] == [f"{tmp_path / 'mixed.jsonl'}:line {n}" for n in (2, 3, 4)]
    assert all("\n" not in str(e) for e in skipped)
    skipped.clear()
    assert parse_file(tmp_path / "deep.json", on_error=skipped.append) == [] and len(skipped) == 1


def test_mlvu_without_question_ids_gets_stable_ids_eval_accepts(tmp_path, caplog):
    """Issue 17.1: MLVU records carry no question_id; convert derives one from file and row, says
    so once per file, and the shards pass eval's reader (it crashed there, three commands later).
    An id given twice is refused at convert with both places named."""
    from trainer.evaluate import iter_records

    rows = [{"video": f"{v}.mp4", "question": f"Which {i}?", "candidates": ["x", "y"], "answer": "y",
             "question_type": "plotQA"} for i, v in enumerate("aab")]
    ann = _write(tmp_path / "1_plotQA.json", rows)
    with caplog.at_level("WARNING", logger="data.annotations"):
        items = parse_file(ann)
    assert [q["id"] for it in items for q in it.qa] == [f"1_plotQA.json:record {i}" for i in range(3)]
    assert items[0].qa[0].keys() == {"id", "question", "options", "answer", "type", "duration_bucket", "time_reference"}
    assert sum("3 question(s) without an id" in r.getMessage() for r in caplog.records) == 1
    _feature_files(tmp_path / "feats", ["a", "b"])
    out = tmp_path / "out"
    assert convert_main(["--annotations", str(ann), "--features", str(tmp_path / "feats"), "--out", str(out),
                         "--merge", "--no-progress"]) == 0
    ids = sorted(item.id for record in iter_records(out) for item in record.items)
    assert ids == [f"1_plotQA.json:record {i}" for i in range(3)]
    dup = _write(tmp_path / "dup.jsonl", [{**r, "question_id": "same"} for r in rows[:2]], jsonl=True)
    assert convert_main(["--annotations", str(dup), "--features", str(tmp_path / "feats"),
                         "--out", str(tmp_path / "out2"), "--no-progress"]) == 2


def test_fps_with_decimals_keeps_the_rate_and_says_so(dataset, tiny_assets, capsys):
    """Issue 17.4: 2.5 s x 1.6000001 fps is 4.00000025 frames: 4 at the requested rate fit
    --max-frames 4 (it fell back to even spacing before), the record's fps is the one asked for,
    and one line per run says what the sampling did."""
    ann = _write(dataset["root"] / "c0.json", [{"video": "sub/c0.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A square."}]}])
    out = dataset["root"] / "fps"
    assert convert_main(["--annotations", str(ann), "--videos", str(dataset["videos"]), "--encoder",
                         str(tiny_assets["vision"]), "--fps", "1.6000001", "--max-frames", "4", "--out", str(out),
                         "--merge", "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("frames:")]
    assert lines == ["frames: 1 video(s) at the requested 1.6 fps (up to 4 frames: 2.5 s); 0 longer one(s) got "
                     "4 frames spread evenly over the video; 0 got fewer frames than sample times (a source with "
                     "fewer frames per second than asked: each source frame kept once)"]
    (_, meta), = _records(out)[1].values()
    assert meta["fps"] == 1.6000001 and len(meta["timestamps"]) == 4
