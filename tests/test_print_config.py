"""`mambamia train CONFIG --print-config`: the resolved config on stdout, nothing trained."""
from __future__ import annotations

from pathlib import Path

import yaml

from trainer.config import RunConfig, build
from trainer.train import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage1.yaml")


def test_print_config_shows_overrides_includes_and_env_then_exits(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAMBAMIA_TINY", str(tmp_path / "tiny"))
    # The flag is accepted before, between and after the overrides.
    assert main([CONFIG, "optimizer.lr=0.25", "--print-config", "schedule.total_steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optimizer"]["lr"] == 0.25 and printed["schedule"]["total_steps"] == 7
    # ${MAMBAMIA_TINY} expanded; the model section comes from the included preset file.
    assert printed["run_dir"] == str(tmp_path / "tiny" / "runs" / "stage1")
    preset = yaml.safe_load((Path(CONFIG).parent.parent / "presets" / "tiny_model.yaml").read_text())
    assert printed["model"]["compressor"]["hidden_size"] == preset["model"]["compressor"]["hidden_size"]
    # Defaults the YAML never names are printed too: the output is a complete, loadable config.
    assert printed["checkpoint"]["keep_last"] == RunConfig.__dataclass_fields__["checkpoint"].default_factory().keep_last
    build(RunConfig, printed, "").validate()
    assert not (tmp_path / "tiny").exists()  # no run folder, no training


def test_print_config_refuses_a_bad_value_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAMBAMIA_TINY", str(tmp_path))
    assert main([CONFIG, "--print-config", "optimizer.lr=-1"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and "optimizer.lr" in out.err


def test_the_command_tears_down_its_process_group_before_exit():
    """`mambamia`'s entry point destroys the process group a command left behind, so gloo's
    threads are not left to interpreter shutdown (a finished rank sometimes aborted there)."""
    import subprocess
    import sys

    code = ("import torch.distributed as dist, trainer.cli as cli\n"
            "def main():\n"
            "    dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
            "    return 0\n"
            "cli.main = main\n"
            "assert cli.entry() == 0 and not dist.is_initialized()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
