"""Model and vision-tower paths given as hub ids, resolved offline from a hub cache.

The tiny models are laid out as huggingface_hub lays out downloads (HF_HOME/hub/models--ORG--NAME/
blobs, snapshots/<commit>/ linking into blobs, refs/main naming the commit), then loaded by id in
child processes started with HF_HOME pointing there and HF_HUB_OFFLINE=1 (huggingface_hub reads
both at import, so the pytest process itself cannot switch to them). The oracle is the same model
loaded from its local folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LLM_ID, VISION_ID, EXPORT_ID = "tiny-org/tiny-llm", "tiny-org/tiny-siglip", "tiny-org/tiny-export"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(hf_home: Path, repo_id: str, folder: Path) -> None:
    """Put `folder`'s files into HF_HOME's hub cache as the snapshot `COMMIT` of model repo `repo_id`."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for src in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / src.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def offline_env(hf_home: Path, **extra: str) -> dict:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT), **extra}
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(name, None)  # they would take precedence over HF_HOME
    return env


@pytest.fixture(scope="module")
def hub(tiny_assets, tmp_path_factory):
    """HF_HOME holding the tiny LLM, vision tower and a saved VideoLLM as hub repos."""
    from tests.utils.exports import tiny_text_export

    root = tmp_path_factory.mktemp("hub")
    tiny_text_export(tiny_assets["llm"], root / "export", keyframes=2)
    hf_home = root / "hf_home"
    for repo_id, folder in ((LLM_ID, tiny_assets["llm"]), (VISION_ID, tiny_assets["vision"]),
                            (EXPORT_ID, root / "export")):
        lay_out_hub_cache(hf_home, repo_id, folder)
    return {"hf_home": hf_home, "export": root / "export", "root": root}


LOAD_BY_ID = """
import dataclasses, json, sys
import numpy as np, torch
from data.extract import EncoderConfig, FrameEncoder
from model.video_llm import VideoLLM

llm_local, vision_local, export_local = sys.argv[1:4]
out = {}
frames = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
by_id = FrameEncoder(EncoderConfig(path="%(vision)s", device="cpu"))
local = FrameEncoder(EncoderConfig(path=vision_local, device="cpu"))
out["encoder_equal"] = bool(np.array_equal(by_id(frames), local(frames)))
out["encoder_name"] = by_id.name
a, b = VideoLLM.from_pretrained("%(export)s").eval(), VideoLLM.from_pretrained(export_local).eval()
ids = torch.tensor([[10, 11, 12, a.config.video_token_id, 13]])
feats = torch.randn(1, 4, 16, 32)
kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), features=feats,
          frame_mask=torch.ones(1, 4, dtype=torch.bool))
with torch.no_grad():
    out["export_logits_equal"] = bool(torch.equal(a(**kw).logits, b(**kw).logits))
from transformers import AutoModelForCausalLM
hub_llm = VideoLLM.build(dataclasses.replace(a.config, llm_path="%(llm)s")).llm
out["llm_equal"] = all(torch.equal(p, q) for p, q in zip(hub_llm.state_dict().values(),
                        AutoModelForCausalLM.from_pretrained(llm_local).state_dict().values()))
errors = {}
for what, load in (("llm", lambda: VideoLLM.build(dataclasses.replace(a.config, llm_path="nobody/none"))),
                   ("vision", lambda: FrameEncoder(EncoderConfig(path="nobody/none", device="cpu"))),
                   ("export", lambda: VideoLLM.from_pretrained("nobody/none")),
                   ("missing_folder", lambda: VideoLLM.from_pretrained("/no/such/folder"))):
    try:
        load()
        errors[what] = None
    except FileNotFoundError as err:
        errors[what] = str(err)
out["errors"] = errors
print(json.dumps(out))
""" % {"vision": VISION_ID, "export": EXPORT_ID, "llm": LLM_ID}


def test_models_and_exports_load_by_hub_id_offline(hub, tiny_assets):
    proc = subprocess.run([sys.executable, "-c", LOAD_BY_ID, str(tiny_assets["llm"]), str(tiny_assets["vision"]),
                           str(hub["export"])], env=offline_env(hub["hf_home"]), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["encoder_equal"] and out["llm_equal"] and out["export_logits_equal"]
    assert out["encoder_name"] == "tiny-siglip"  # what extract records, as for a folder
    for what, message in out["errors"].items():  # one line naming what was asked for
        assert message is not None and "\n" not in message, (what, message)
        assert ("/no/such/folder" if what == "missing_folder" else "nobody/none") in message


def test_config_naming_hub_ids_trains_and_exports_offline(hub, tiny_assets, tmp_path):
    """`model.llm_path: ORG/NAME` trains (one process, gloo) and exports with the hub unreachable;
    an id that is not there stops training with a line naming it; `init_from: ORG/NAME` loads an
    export from the hub cache."""
    import torch
    from safetensors.torch import load_file

    from tests.test_train import TINY_STAGE1, make_tiny_root

    root = make_tiny_root(tmp_path / "tiny", tiny_assets["llm"], train=8, val=2)
    env = offline_env(hub["hf_home"], MAMBAMIA_TINY=str(root), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    run = [sys.executable, "-m", "trainer.cli"]
    train = subprocess.run([*run, "train", TINY_STAGE1, f"model.llm_path={LLM_ID}", "schedule.total_steps=2",
                            "checkpoint.every_steps=2", "validation.every_steps=0", "validation.max_batches=1",
                            "parallel.global_batch_size=2"],
                           env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    export = tmp_path / "export"
    done = subprocess.run([*run, "export", str(root / "runs" / "stage1"), str(export)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((export / "mambamia.json").read_text())["llm_path"] == "llm"
    # the LLM was frozen: the export holds the hub snapshot's weights
    exported, original = load_file(export / "llm" / "model.safetensors"), load_file(tiny_assets["llm"] / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    bad = subprocess.run([*run, "train", TINY_STAGE1, "model.llm_path=nobody/none", f"run_dir={tmp_path / 'bad'}"],
                         env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "nobody/none" in bad.stderr
    # the next stage starts from that export pushed to a hub: init_from names its id
    lay_out_hub_cache(hub["hf_home"], "tiny-org/stage1-export", export)
    check = subprocess.run([sys.executable, "-c", INIT_FROM_ID, TINY_STAGE1, str(export)], env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and check.stdout.strip().endswith("same weights"), check.stderr[-3000:]


INIT_FROM_ID = """
import sys, torch
from safetensors.torch import load_file
from trainer.config import load_config
from trainer.train import build_model

model = build_model(load_config(sys.argv[1], ["init_from=tiny-org/stage1-export"]))
saved = load_file(sys.argv[2] + "/compressor.safetensors")
state = model.compressor.state_dict()
assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
print("same weights")
"""


def _free_port() -> int:
    from trainer.dist import free_port

    return free_port()


ASK_AND_EXTRACT = """
import contextlib, io, json, sys
from data.dataset import iter_records, open_dataset
from trainer.cli import main

video_dir, vision_local, export_local, out = sys.argv[1:5]
video = video_dir + "/clip.mp4"
answers = []
for export, vision in (("%(export)s", "%(vision)s"), (export_local, vision_local)):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["ask", export, video, "What colour is the square?", "--encoder", vision,
                     "--frames", "6", "--fps", "2", "--max-new-tokens", "3"])
    answers.append((code, buf.getvalue()))
features, encoders = [], []
for name, vision in (("by_id", "%(vision)s"), ("local", vision_local)):
    assert main(["extract", video_dir, "--encoder", vision, "--fps", "2", "--max-frames", "6",
                 "--out", out + "/" + name, "--merge"]) == 0
    records = list(iter_records(open_dataset(out + "/" + name)))
    features.append([(r.key, r.features.tolist()) for r in records])
    encoders.append(records[0].meta.get("encoder"))
print(json.dumps({"answers": answers, "features_equal": features[0] == features[1], "records": len(features[0]),
                  "encoders": encoders}))
""" % {"vision": VISION_ID, "export": EXPORT_ID}


def test_ask_and_extract_take_hub_ids_offline(hub, tiny_assets, tmp_path):
    import numpy as np

    from data.synthetic import write_video

    rng = np.random.default_rng(0)
    frames = np.clip(rng.normal(60, 10, (16, 32, 32, 3)), 0, 255).astype(np.uint8)
    frames[6:10, 8:24, 8:24] = (230, 30, 30)
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "clip.mp4", frames, 4.0)
    proc = subprocess.run([sys.executable, "-c", ASK_AND_EXTRACT, str(tmp_path / "videos"), str(tiny_assets["vision"]),
                           str(hub["export"]), str(tmp_path / "shards")], env=offline_env(hub["hf_home"]),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (id_code, id_answer), (local_code, local_answer) = out["answers"]
    assert id_code == local_code == 0 and id_answer == local_answer and id_answer.strip(), out["answers"]
    assert out["records"] == 1 and out["features_equal"]
    # the encoder recorded in the shards is the id's last part, as a folder's name is recorded
    assert out["encoders"] == ["tiny-siglip", Path(tiny_assets["vision"]).name]
