"""The lmms-eval plugin (trainer/lmms.py) run by the real `python -m lmms_eval`, offline.

A task is defined here (YAML + utils.py + a local JSON dataset) over needle videos rendered here;
the same videos and questions go through `mambamia convert` into shards scored by `mambamia eval`.
The oracle is `mambamia eval`: the command's generated answers must equal eval's item by item (so the
accuracies agree), and the plugin's option log-likelihoods must equal eval's. lmms-eval is an optional extra
(`pip install 'mambamia[lmms]'`); without it these tests skip.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional extra: pip install 'mambamia[lmms]')")

REPO_ROOT = Path(__file__).resolve().parents[1]
FPS, FRAMES, MAX_NEW = 1, 8, 4
TASK = "needle_mambamia"

# lmms-eval 0.7.3 turns every loglikelihood result into a string before its multiple_choice scoring
# reads it (api/instance.py unwrap_generation_output), so a multiple_choice task fails for every
# model there; the command is run on a generated-answer task, and `loglikelihood` is checked by
# handing the plugin lmms-eval's own Instance objects.
TASK_YAML = f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{{data}}"}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW}
  until: ["<|im_end|>"]
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

# the letter is read with mambamia eval's own rule, so the two runs differ only in how they reach
# the answer (the video decoded and encoded by the plugin, or features read from shards)
TASK_UTILS = """\
from trainer.evaluate import parse_letter


def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc):
    return doc["prompt"]


def process_results(doc, results):
    return {"acc": float(parse_letter(results[0], doc["options"]) == doc["answer"])}
"""


@pytest.fixture(scope="module")
def needle(tiny_assets, tmp_path_factory):
    """A random tiny export, 4 rendered needle videos, their shards and an lmms-eval task on them."""
    from data.needle import NeedleConfig, write_needle_task
    from data.text import mcq_prompt
    from tests.utils.exports import tiny_text_export
    from trainer.cli import main as cli

    root = tmp_path_factory.mktemp("lmms")
    tiny_text_export(tiny_assets["llm"], root / "export", keyframes=4)
    paths = write_needle_task(root / "videos", NeedleConfig(videos=4, duration_s=12.0, fps=2.0, size=32,
                                                            needle_s=3.0), split="test", workers=1, progress=False)
    assert cli(["convert", "--annotations", str(paths["mcq"]), "--videos", str(root / "videos"), "--encoder",
                str(tiny_assets["vision"]), "--fps", str(FPS), "--max-frames", str(FRAMES),
                "--out", str(root / "shards"), "--merge"]) == 0
    docs = []
    for item in json.loads(Path(paths["mcq"]).read_text()):
        docs.append({"id": item["question_id"], "video": str(root / "videos" / item["video"]),
                     "prompt": mcq_prompt(item["question"], item["candidates"]), "options": item["candidates"],
                     "answer": item["candidates"].index(item["answer"])})
    task_dir = root / "task"
    task_dir.mkdir()
    (task_dir / "data.json").write_text(json.dumps(docs))
    (task_dir / f"{TASK}.yaml").write_text(TASK_YAML.replace("{data}", str(task_dir / "data.json")))
    (task_dir / "utils.py").write_text(TASK_UTILS)
    return {"root": root, "docs": docs, "task_dir": task_dir}


def _offline_env(tmp_path: Path) -> dict:
    """Nothing leaves the machine; the datasets cache of the task's JSON stays in the test's folder."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"), "PYTHONPATH": str(REPO_ROOT)}


def _samples(out_dir: Path, proc: subprocess.CompletedProcess) -> list[dict]:
    files = sorted(out_dir.rglob(f"*samples_{TASK}*.jsonl"))
    assert proc.returncode == 0 and files, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def _eval_report(needle, out: Path, *extra: str) -> dict:
    from trainer.evaluate import main as eval_main

    assert eval_main([str(needle["root"] / "export"), str(needle["root"] / "shards"), "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_lmms_eval_command_agrees_with_mambamia_eval(needle, tiny_assets, tmp_path):
    report = _eval_report(needle, tmp_path / "eval.json", "--method", "generate", "--max-new-tokens", str(MAX_NEW))
    out_dir = tmp_path / "lmms_out"
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "mambamia", "--model_args",
         f"pretrained={needle['root'] / 'export'},encoder={tiny_assets['vision']},fps={FPS},frames={FRAMES}",
         "--tasks", TASK, "--include_path", str(needle["task_dir"]), "--batch_size", "1", "--device", "cpu",
         "--output_path", str(out_dir), "--log_samples"],
        env=_offline_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    # lmms-eval exits 0 after an error too: the sample log is what says it ran
    samples = {needle["docs"][s["doc_id"]]["id"]: s for s in _samples(out_dir, proc)}
    preds = {p["id"]: p for p in report["predictions"]}
    assert sorted(samples) == sorted(preds) and len(preds) == 4
    for item_id, sample in samples.items():
        assert sample["filtered_resps"] == preds[item_id]["output"] != "", item_id
        assert sample["acc"] == float(preds[item_id]["correct"])
    assert sum(s["acc"] for s in samples.values()) / len(samples) == pytest.approx(report["accuracy"])


def test_loglikelihood_scores_options_as_mambamia_eval(needle, tiny_assets, tmp_path):
    """lmms-eval's multiple-choice requests (one per option letter, continuation = the letter):
    the plugin's values are eval's letter log-likelihoods negated, so lmms-eval's argmin is eval's pick."""
    from lmms_eval.api.instance import Instance

    from trainer.lmms import MambaMia

    report = _eval_report(needle, tmp_path / "eval.json")
    model = MambaMia(pretrained=str(needle["root"] / "export"), encoder=str(tiny_assets["vision"]), fps=FPS,
                     frames=FRAMES, device="cpu")
    docs = needle["docs"]
    model.task_dict = {TASK: {"test": docs}}
    requests = [Instance(request_type="loglikelihood", idx=i, metadata={"task": TASK, "doc_id": d, "repeats": 1},
                         arguments=(docs[d]["prompt"], letter, lambda doc: [doc["video"]], d, TASK, "test"))
                for d in range(len(docs)) for i, letter in enumerate("ABCD")]
    values = model.loglikelihood(requests)
    preds = {p["id"]: p for p in report["predictions"]}
    for d, doc in enumerate(docs):
        nll = [v for v, _ in values[4 * d:4 * d + 4]]
        assert [-v for v in nll] == pytest.approx(preds[doc["id"]]["scores"], abs=1e-4)
        assert int(min(range(4), key=nll.__getitem__)) == preds[doc["id"]]["predicted"]
    with pytest.raises(ValueError, match="unknown --model_args"):
        MambaMia(pretrained=str(needle["root"] / "export"), encoder=str(tiny_assets["vision"]), frame=8)
