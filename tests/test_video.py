"""Decoding by timestamp (decord and PyAV, CFR and VFR, truncated files) and feature extraction."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from data.extract import EncoderConfig, FrameEncoder
from data.synthetic import moving_square_frames, truncated_copy, write_video
from data.video import CorruptVideo, SamplingConfig, decode_video, nearest_frames, sample_timestamps

FPS = 8
VFR_TIMES = np.array([0.0, 0.05, 0.3, 0.35, 0.8, 0.95, 1.5, 1.55, 1.6, 2.2, 2.25, 2.9])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    cfr_frames = moving_square_frames(40, 48, 64, seed=1)  # 5 s at 8 fps
    vfr_frames = moving_square_frames(len(VFR_TIMES), 32, 32, seed=2)
    paths = {
        "cfr": write_video(root / "cfr.mp4", cfr_frames, FPS),
        "vfr": write_video(root / "vfr.mp4", vfr_frames, FPS, timestamps=VFR_TIMES),
    }
    paths["cut"] = truncated_copy(paths["cfr"], root / "cut.mp4", keep=0.6)
    return paths, {"cfr": cfr_frames, "vfr": vfr_frames}


def test_sample_timestamps_rule():
    np.testing.assert_allclose(sample_timestamps(10.0, 1.0, 32), np.arange(10.0))
    np.testing.assert_allclose(sample_timestamps(2.5, 1.0, 32), [0.0, 1.0, 2.0])  # ceil(2.5 s x 1 fps)
    np.testing.assert_allclose(sample_timestamps(4.0, 2.0, 8), np.arange(8) * 0.5)  # exactly at the cap
    # over the cap: exactly max_frames frames, uniform over the whole video
    np.testing.assert_allclose(sample_timestamps(100.0, 1.0, 8), [0, 12.5, 25, 37.5, 50, 62.5, 75, 87.5])


def test_nearest_frames_matches_brute_force():
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0, 10, 50))
    targets = np.sort(rng.uniform(-1, 11, 30))
    expected = np.unique([int(np.argmin(np.abs(times - t))) for t in targets])
    np.testing.assert_array_equal(nearest_frames(times, targets), expected)


def _which_written_frame(decoded, written):
    """Index of the written frame each decoded frame looks like (H.264 is lossy, frames differ)."""
    diffs = np.abs(decoded[:, None].astype(np.int16) - written[None].astype(np.int16)).mean(axis=(2, 3, 4))
    return diffs.argmin(axis=1), diffs.min(axis=1)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_vfr_timestamps_and_frames(videos, backend):
    paths, frames = videos
    cfg = SamplingConfig(fps=2.0, max_frames=32, backend=backend)
    video = decode_video(paths["vfr"], cfg)
    duration = VFR_TIMES[-1] + 1 / FPS  # the last frame is shown for one nominal frame period
    assert video.duration == pytest.approx(duration, abs=2e-3)
    targets = sample_timestamps(duration, 2.0, 32)
    expected = np.unique([int(np.argmin(np.abs(VFR_TIMES - t))) for t in targets])
    np.testing.assert_allclose(video.timestamps, VFR_TIMES[expected], atol=1e-3)
    assert video.frames.shape == (len(expected), 32, 32, 3) and video.frames.dtype == np.uint8
    which, err = _which_written_frame(video.frames, frames["vfr"])
    np.testing.assert_array_equal(which, expected)
    assert err.max() < 4.0


def test_cfr_cap_backends_agree(videos):
    paths, frames = videos
    cfg = dict(fps=4.0, max_frames=6)
    a = decode_video(paths["cfr"], SamplingConfig(backend="decord", **cfg))
    b = decode_video(paths["cfr"], SamplingConfig(backend="pyav", **cfg))
    assert (a.backend, b.backend) == ("decord", "pyav")
    grid = np.arange(40) / FPS
    expected = np.unique([int(np.argmin(np.abs(grid - t))) for t in np.linspace(0, 5.0, 6, endpoint=False)])
    np.testing.assert_allclose(a.timestamps, grid[expected], atol=1e-3)
    np.testing.assert_allclose(b.timestamps, grid[expected], atol=1e-3)
    np.testing.assert_array_equal(_which_written_frame(b.frames, frames["cfr"])[0], expected)
    assert np.abs(a.frames.astype(int) - b.frames).max() <= 2
    # shrunk while decoding: 48x64 -> 24x32, close to a 2x2 average of the full-size frames
    small = [decode_video(paths["cfr"], SamplingConfig(backend=k, short_side=24, **cfg)) for k in ("decord", "pyav")]
    halved = a.frames.reshape(len(a.frames), 24, 2, 32, 2, 3).mean(axis=(2, 4))
    for got in small:
        assert got.frames.shape == (len(expected), 24, 32, 3)
        assert np.abs(got.frames - halved).mean() < 4.0  # a neighbouring frame is ~30 away


def test_pyav_seeking_matches_full_decode(tmp_path, monkeypatch):
    import data.video as video_mod

    frames = moving_square_frames(192, 32, 32, seed=4)  # 24 s at 8 fps, a keyframe every second
    path = write_video(tmp_path / "long.mp4", frames, FPS, gop=8)
    seeks = []
    real_seek = video_mod._NearestFrameSampler._seek
    monkeypatch.setattr(video_mod._NearestFrameSampler, "_seek", lambda self, t: (seeks.append(t), real_seek(self, t)))
    sparse = dict(fps=0.25, max_frames=32, backend="pyav")
    seeking = decode_video(path, SamplingConfig(seek_gap_s=1.0, **sparse))
    assert len(seeks) >= 6  # one per target after the first, and one for the end check
    full = decode_video(path, SamplingConfig(seek_gap_s=1000.0, **sparse))
    grid = np.arange(192) / FPS
    expected = [int(np.argmin(np.abs(grid - t))) for t in np.arange(6) * 4.0]
    for got in (seeking, full):
        np.testing.assert_allclose(got.timestamps, grid[expected], atol=1e-3)
    np.testing.assert_array_equal(seeking.frames, full.frames)
    np.testing.assert_array_equal(_which_written_frame(seeking.frames, frames)[0], expected)
    # keyframes sparser than the targets: seeks land behind, the sampler backs off, same result
    sparse_keys = write_video(tmp_path / "gop.mp4", frames, FPS, gop=96)
    seeks.clear()
    backed_off = decode_video(sparse_keys, SamplingConfig(seek_gap_s=1.0, **sparse))
    assert 0 < len(seeks) < 6
    np.testing.assert_allclose(backed_off.timestamps, grid[expected], atol=1e-3)
    np.testing.assert_array_equal(_which_written_frame(backed_off.frames, frames)[0], expected)
    # a cut file is still caught when the decoder jumps over most of it
    truncated_copy(path, tmp_path / "cut.mp4", keep=0.7)
    with pytest.raises(CorruptVideo):
        decode_video(tmp_path / "cut.mp4", SamplingConfig(seek_gap_s=1.0, **sparse))


def test_truncated_and_missing_are_corrupt(videos, tmp_path, monkeypatch):
    paths, _ = videos
    for backend in ("auto", "pyav", "decord"):
        with pytest.raises(CorruptVideo):
            decode_video(paths["cut"], SamplingConfig(backend=backend))
    with pytest.raises(CorruptVideo, match="no such file"):
        decode_video(tmp_path / "nope.mp4", SamplingConfig())
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(CorruptVideo, match="decord: .*pyav: "):
        decode_video(tmp_path / "text.mp4", SamplingConfig())
    # decord missing: auto falls back to PyAV, an explicit request for decord is an error
    monkeypatch.setitem(sys.modules, "decord", None)
    assert decode_video(paths["vfr"], SamplingConfig()).backend == "pyav"
    with pytest.raises(CorruptVideo, match="decord is not installed"):
        decode_video(paths["vfr"], SamplingConfig(backend="decord"))


def test_features_match_direct_model_call(videos, tiny_assets):
    """Our torch preprocessing + layer pick vs transformers' own image processor and model."""
    from transformers import AutoImageProcessor, AutoModel

    paths, _ = videos
    model = AutoModel.from_pretrained(tiny_assets["vision"]).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_assets["vision"])
    encoder = FrameEncoder(EncoderConfig(path=str(tiny_assets["vision"]), batch_size=3))
    for name in ("vfr", "cfr"):  # 32x32 (no resize) and 48x64 (resized to the model's 32x32)
        frames = decode_video(paths[name], SamplingConfig(fps=2.0, max_frames=5)).frames
        ours = encoder(frames)
        pixels = processor(images=list(frames), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            ref = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].numpy()
        assert ours.dtype == np.float16 and ours.shape == (len(frames), 16, 32)
        np.testing.assert_allclose(ours.astype(np.float32), ref, atol=0.02, rtol=0.01)


def test_pooling_and_layer_choice(tiny_assets):
    frames = moving_square_frames(3, 32, 32, seed=5)
    base = FrameEncoder(EncoderConfig(path=str(tiny_assets["vision"]), pool=1))
    pooled = FrameEncoder(EncoderConfig(path=str(tiny_assets["vision"]), pool=2))
    odd = FrameEncoder(EncoderConfig(path=str(tiny_assets["vision"]), pool=3))
    full = base(frames).astype(np.float32).reshape(3, 4, 4, 32)
    want2 = full.reshape(3, 2, 2, 2, 2, 32).mean(axis=(2, 4)).reshape(3, 4, 32)
    np.testing.assert_allclose(pooled(frames), want2, atol=2e-3)
    # 4x4 grid with 3x3 windows: a full window, then partial windows averaging only real patches
    want3 = np.stack([full[:, :3, :3].mean((1, 2)), full[:, :3, 3:].mean((1, 2)),
                      full[:, 3:, :3].mean((1, 2)), full[:, 3:, 3:].mean((1, 2))], axis=1)
    np.testing.assert_allclose(odd(frames), want3, atol=2e-3)
    last = FrameEncoder(EncoderConfig(path=str(tiny_assets["vision"]), layer=-1))
    assert not np.allclose(last(frames), base(frames))
    with pytest.raises(ValueError, match="encoder layer 7"):
        FrameEncoder(EncoderConfig(path=str(tiny_assets["vision"]), layer=7))


def test_clip_tower_drops_cls(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)).eval()
    model.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    frames = moving_square_frames(2, 32, 32, seed=3)
    ours = FrameEncoder(EncoderConfig(path=str(tmp_path)))(frames)
    pixels = CLIPImageProcessor.from_pretrained(tmp_path)(images=list(frames), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
    assert ours.shape == (2, 16, 32)
    np.testing.assert_allclose(ours.astype(np.float32), ref, atol=0.02, rtol=0.01)
    # shortest-edge resize then centre crop of a 48x72 frame, against the processor's PIL path
    wide = moving_square_frames(2, 48, 72, seed=6)
    pixels = CLIPImageProcessor.from_pretrained(tmp_path)(images=list(wide), return_tensors="pt")["pixel_values"]
    mine = FrameEncoder(EncoderConfig(path=str(tmp_path))).preprocess(torch.from_numpy(wide))
    assert mine.shape == pixels.shape == (2, 3, 32, 32)
    diff = (mine - pixels).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.2  # bicubic in torch vs PIL: edge pixels differ a little


def test_auto_device_follows_local_rank(monkeypatch):
    from data.extract import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "6")  # 8 tasks sharing a 4-GPU node
    assert pick_device("auto") == torch.device("cuda", 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == torch.device("cuda", 1)
    assert pick_device("cpu") == torch.device("cpu")
