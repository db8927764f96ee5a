"""bench/bench_method.py end to end in its --quick form, and its synthetic tasks against their
definitions (the planted frames hold the pattern, the answers are balanced)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_method.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_method", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_method"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["needle", "order", "count"])
def test_tasks_plant_their_patterns_where_they_say(task):
    bm = _bench()
    spec = bm.Spec()
    pat = bm.Patterns(spec, 0)
    rng = np.random.default_rng(0)
    answers = []
    for _ in range(200):
        x, _, options, answer, where = bm.make_video(task, spec, pat, 40, rng)
        assert x.shape == (40, spec.patches, spec.dim)
        # The planted frames stand out from the scene: far larger deviation from the median frame.
        dev = np.abs(x - np.median(x, axis=0, keepdims=True)).max(axis=(1, 2))
        quiet = np.delete(dev, where)
        assert dev[where].min() > quiet.max()
        if task == "count":
            assert len(where) == answer + 1
        if task == "order":
            first = x[where[0]] - np.median(x, axis=0)
            # the first planted frame carries the event named by the answer
            assert np.abs(first - pat.events[answer]).mean() < np.abs(first).mean()
        answers.append(answer)
    counts = np.bincount(answers, minlength=len(options))
    assert counts.min() > 200 / len(options) * 0.6  # every answer is common: text alone is chance


def test_layout_needle_classes_share_their_mean_and_differ_by_position():
    """The layout needle's classes are the same parts rotated across the frame's patches: a mean
    over the group (what average pooling keeps) is identical for every class, to rounding, while
    the patches themselves tell the classes apart; the answer names the rotation."""
    bm = _bench()
    spec = bm.Spec(needle_kind="layout")
    pat = bm.Patterns(spec, 3)
    scene_rng = np.random.default_rng(5)
    means, frames = [], []
    for answer in range(4):
        # Same scene and noise for every class: draw the video until this answer comes up.
        while True:
            rng = np.random.default_rng(scene_rng.integers(1 << 30))
            state = rng.bit_generator.state
            x, _, options, got, where = bm.make_video("needle", spec, pat, 12, rng)
            if got == answer:
                break
        rng.bit_generator.state = state
        clean = bm.scene(spec, 12, rng)  # the same draws without the planted frame
        planted = x[where[0]] - clean[where[0]]
        for p in range(spec.patches):  # patch p shows part (p - answer) mod patches
            np.testing.assert_allclose(planted[p], pat.parts[(p - answer) % spec.patches],
                                       atol=1e-5)
        means.append(planted.mean(0))
        frames.append(planted)
    for m in means[1:]:
        np.testing.assert_allclose(m, means[0], atol=1e-5)
    for f in frames[1:]:
        assert np.abs(f - frames[0]).max() > 1.0


def test_quick_mode_runs_end_to_end(tmp_path, capsys):
    bm = _bench()
    assert bm.main(["--quick", "--out", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary["bench"] == "method"
    assert set(summary["accuracy_at_longest"]["needle"]) == {"mambamia", "avgpool"}
    assert Path(summary["plot"]).stat().st_size > 1000
    report = json.loads((tmp_path / "bench_method_quick.json").read_text())
    assert len(report["runs"]) == 2 * 2  # variants x seeds
    for run in report["runs"]:
        assert all(0.0 <= run["results"]["32"][t]["accuracy"] <= 1.0
                   for t in ("needle", "order", "count"))


def test_curriculum_trains_short_videos_first_then_every_length(monkeypatch):
    """Recipe.short_first of the steps see the shortest length only; the rest draw from all."""
    import torch

    bm = _bench()
    seen = []
    monkeypatch.setattr(bm, "batch_of", lambda tok, videos: {"x": torch.tensor(float(len(videos[0][0])))})
    monkeypatch.setattr(bm, "make_video", lambda task, spec, pat, frames, rng: (np.zeros(frames),) * 5)

    class Model(torch.nn.Module):
        tokenizer = None

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2, 2))

        def module_groups(self):
            return {"llm": [("w", self.w)]}

        def forward(self, x):
            seen.append(int(x))
            return type("Out", (), {"loss": (self.w * x).sum()})()

    recipe = bm.Recipe(steps=40, short_first=0.5, tasks=("needle",))
    bm.train(Model(), bm.Spec(), recipe, None, [64, 256, 1024], np.random.default_rng(0))
    assert seen[:20] == [64] * 20
    assert set(seen[20:]) == {64, 256, 1024}
