"""A random tiny VideoLLM export whose greedy answers hold text, for tests of the commands and
plugins that load exports (ask by hub id, the lmms-eval plugin)."""
from __future__ import annotations

from pathlib import Path


def tiny_text_export(llm_path: str | Path, out: Path, *, keyframes: int):
    """Build (seed 0), save to `out` and return a tiny VideoLLM. A random tiny LLM answers only
    whitespace, which strips to nothing; those tokens' output rows are zeroed so answers hold text."""
    import torch

    from model.config import CompressorConfig, VideoLLMConfig
    from model.video_llm import VideoLLM

    torch.manual_seed(0)
    model = VideoLLM.build(VideoLLMConfig(llm_path=str(llm_path), compressor=CompressorConfig(
        input_dim=32, hidden_size=32, num_layers=1, k=4, taa_layers=1, keyframes=keyframes, d_state=16,
        headdim=16, ssd_chunk_size=32, gpa_dropout=0.0)))
    tok = model.tokenizer
    blank = [i for i in range(len(tok)) if not tok.decode([i]).strip() and i != tok.eos_token_id]
    with torch.no_grad():
        model.llm.get_output_embeddings().weight[blank] = 0
    model.save_pretrained(out)
    return model
