"""How many visual tokens the LLM receives for a video of a given length.

The count is measured, not derived by hand: the real compressor is built on the meta device and
run on meta features of the sampled shape, so it follows the code (padding, queries, TAA pooling,
keyframe selection) and costs no memory. For the paper preset (model.config.paper_config):

    3600 s at 1 fps, at most 256 frames  -> 256 frames of 576 SigLIP2 patches (dim 1152)
    spatial MambaMia, k = 8               -> 72 anchors per frame
    TAA keeps 64 keyframes                -> 64 x 72 = 4608 tokens
    + one frame separator per kept frame  -> 4672 visual tokens (the paper's ~4.7K)

    python -m model.budget [DURATION_S]   # prints the paper preset's count
"""
from __future__ import annotations

import dataclasses
import math
import sys

import torch

from model.compressor import VideoCompressor
from model.config import (PAPER_FPS, PAPER_MAX_FRAMES, CompressorConfig, VideoLLMConfig,
                          paper_config)


def sampled_frames(duration_s: float, fps: float, max_frames: int) -> int:
    """Frames the sampler takes: one per 1/fps seconds, capped at max_frames (paper §1.6)."""
    if duration_s <= 0 or fps <= 0 or max_frames < 1:
        raise ValueError(f"budget: expected duration_s > 0, fps > 0, max_frames >= 1; got "
                         f"{duration_s}, {fps}, {max_frames}")
    # The small tolerance keeps 10.0 s at 1 fps at 10 frames despite float error in the product.
    return min(max(1, math.ceil(duration_s * fps - 1e-9)), max_frames)


def visual_token_count(config: VideoLLMConfig | CompressorConfig, duration_s: float, fps: float,
                       max_frames: int, *, patches_per_frame: int | None = None) -> int:
    """Visual tokens spliced in place of `<video>` (frame separators counted for a
    VideoLLMConfig with frame_separator; a bare CompressorConfig counts compressor tokens only)."""
    comp = config.compressor if isinstance(config, VideoLLMConfig) else config
    separator = isinstance(config, VideoLLMConfig) and config.frame_separator
    patches = patches_per_frame or comp.patches_per_frame
    if patches is None:
        raise ValueError("visual_token_count: patches per frame unknown; set "
                         "CompressorConfig.patches_per_frame or pass patches_per_frame")
    n_frames = sampled_frames(duration_s, fps, max_frames)
    # The SSD chunk length never changes a shape; one chunk spares the meta run the chunk loop,
    # whose per-op dispatch dominates its cost at hour length (12 s -> well under 1 s).
    longest = n_frames * patches * 2
    with torch.device("meta"):
        model = VideoCompressor(dataclasses.replace(comp, ssd_chunk_size=longest)).eval()
    # Forward outside the device context: its per-op dispatch hook costs more than the meta ops.
    features = torch.empty(1, n_frames, patches, comp.input_dim, device="meta")
    with torch.no_grad():
        tokens = model(features).tokens[0]  # [kept, tokens per frame, hidden]
    kept, per_frame = tokens.shape[0], tokens.shape[1]
    return kept * (per_frame + int(separator))


if __name__ == "__main__":
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3600.0
    print(visual_token_count(paper_config(), seconds, PAPER_FPS, PAPER_MAX_FRAMES))
