"""`mambamia ask` end to end on a rendered video with the tiny models.

The answer is checked against a greedy decode written here from the model's forward pass alone
(no `generate`, no evaluator code), on features from the vision tower run directly.
"""
from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

QUESTION = "What colour is the square?"
FRAMES = 6


@pytest.fixture(scope="module")
def setup(tiny_assets, tmp_path_factory):
    import torch

    from data.synthetic import write_video
    from model.config import CompressorConfig, VideoLLMConfig
    from model.video_llm import VideoLLM

    root = tmp_path_factory.mktemp("ask")
    cfg = VideoLLMConfig(llm_path=str(tiny_assets["llm"]), compressor=CompressorConfig(
        input_dim=32, hidden_size=32, num_layers=1, k=4, taa_layers=1, keyframes=3, d_state=16,
        headdim=16, ssd_chunk_size=32, gpa_dropout=0.0))
    torch.manual_seed(0)
    model = VideoLLM.build(cfg)
    # the random tiny LLM answers only newlines (an empty answer once stripped): silence the
    # whitespace tokens so that the answer compared below has text in it
    tok = model.tokenizer
    blank = [i for i in range(len(tok)) if not tok.decode([i]).strip() and i != tok.eos_token_id]
    with torch.no_grad():
        model.llm.get_output_embeddings().weight[blank] = 0
    model.save_pretrained(root / "export")
    # 6 s at 4 fps: a grey drift with a red square in seconds 2-3
    rng = np.random.default_rng(0)
    frames = np.clip(rng.normal(60, 10, (24, 32, 32, 3)), 0, 255).astype(np.uint8)
    frames[8:12, 8:24, 8:24] = (230, 30, 30)
    write_video(root / "clip.mp4", frames, 4.0)
    return root


def _oracle_answer(export, video, encoder, max_new: int) -> str:
    import torch

    from data.extract import EncoderConfig, FrameEncoder
    from data.video import SamplingConfig, decode_video
    from model.video_llm import VideoLLM

    model = VideoLLM.from_pretrained(export).eval()
    decoded = decode_video(video, SamplingConfig(fps=1.0, max_frames=FRAMES))
    feats = torch.from_numpy(FrameEncoder(EncoderConfig(path=str(encoder), device="cpu"))(decoded.frames).astype(np.float32))
    tok = model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": f"<video>\n{QUESTION}"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            x = torch.tensor([ids + new])
            logits = model(x, torch.ones_like(x), feats.unsqueeze(0), torch.ones(1, len(feats), dtype=torch.bool)).logits
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).strip()


def test_ask_answers_like_a_hand_written_greedy_decode_and_explains(setup, tiny_assets, capsys):
    from trainer.ask import main

    png = setup / "why.png"
    assert main([str(setup / "export"), str(setup / "clip.mp4"), QUESTION, "--encoder", str(tiny_assets["vision"]),
                 "--frames", str(FRAMES), "--max-new-tokens", "5", "--explain", str(png)]) == 0
    out, err = capsys.readouterr()
    expected = _oracle_answer(setup / "export", setup / "clip.mp4", tiny_assets["vision"], 5)
    assert expected and out == expected + "\n"  # the random model says something, the same thing
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width >= 600 and height >= 300
    kept = err.split("kept frames at ")[1].split(" s;")[0].split(", ")
    assert len(kept) == 3 and all(0 <= float(t) < 6 for t in kept)  # keyframes=3 of the 6 sampled


def test_ask_reads_frames_and_layer_from_training_json(setup, tiny_assets, tmp_path, capsys):
    from trainer.ask import main

    export = tmp_path / "export"
    shutil.copytree(setup / "export", export)
    (export / "training.json").write_text(json.dumps(
        {"max_frames": 2, "features": {"encoder": "vision", "layer": -2, "fps": 1.0, "patches": 16, "dim": 32}}))
    assert main([str(export), str(setup / "clip.mp4"), QUESTION, "--encoder", str(tiny_assets["vision"]),
                 "--max-new-tokens", "2", "--explain", str(tmp_path / "e.png")]) == 0
    # 2 frames sampled (training's max_frames), both kept: the budget of 3 is not reached
    assert len(capsys.readouterr().err.split("kept frames at ")[1].split(" s;")[0].split(", ")) == 2


def test_ask_bad_inputs_are_one_line_errors(setup, tiny_assets, tmp_path, capsys):
    from trainer.ask import main

    export, video, enc = str(setup / "export"), str(setup / "clip.mp4"), ["--encoder", str(tiny_assets["vision"])]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    from trainer.tiny import build_vision_encoder

    build_vision_encoder(tmp_path / "wide_vision", hidden_size=48)
    partial = tmp_path / "partial_export"
    shutil.copytree(setup / "export", partial)
    (partial / "projector.safetensors").unlink()
    (tmp_path / "trained").mkdir()
    shutil.copytree(setup / "export", tmp_path / "trained" / "export")
    (tmp_path / "trained" / "export" / "training.json").write_text(json.dumps({"features": {"patches": 16}}))
    cases = [
        ([export, str(tmp_path / "nope.mp4"), QUESTION, *enc], "nope.mp4"),
        ([export, str(broken), QUESTION, *enc], "broken.mp4"),
        ([export, video, "   ", *enc], "question is empty"),
        ([str(partial), video, QUESTION, *enc], "projector.safetensors"),
        ([export, video, QUESTION], "--encoder"),  # the export holds no vision tower
        ([export, video, QUESTION, "--encoder", str(tiny_assets["llm"])], "SigLIP"),
        ([export, video, QUESTION, "--encoder", str(tmp_path / "wide_vision")], "48-wide features"),
        ([str(tmp_path / "trained" / "export"), video, QUESTION, *enc, "--pool", "2"], "4 patches per frame"),
    ]
    for argv, named in cases:
        assert main(argv) == 1, argv
        # decoders may log their own complaints; ours is one line, the last
        err = capsys.readouterr().err.strip().splitlines()
        ours = [line for line in err if line.startswith("mambamia ask: ")]
        assert len(ours) == 1 and ours[0] == err[-1] and named in ours[0], err
