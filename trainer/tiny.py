"""Tiny local stand-ins for the real checkpoints: tokenizer, causal LM and vision encoder.

Nothing is downloaded. Each builder writes a folder in the Hugging Face layout, and callers load it
back through the normal `from_pretrained` path, so tests and the demo exercise the same loading
code a 7B run uses.

    python -m trainer.tiny OUT_DIR     # writes OUT_DIR/{tokenizer,llm,vision}
"""
from __future__ import annotations

import sys
from pathlib import Path

VIDEO_TOKEN = "<video>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", VIDEO_TOKEN]

# Qwen2-style ChatML template; `{% generation %}` is not used so that any tokenizer version renders it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A small English corpus so the byte-level BPE learns the words our synthetic tasks use; any other
# text still tokenizes (byte fallback through the byte-level alphabet).
_CORPUS = """
You are a helpful assistant. What colour is the shape that appears in the video? Which shape
appears briefly? Answer with the option's letter from the given choices directly.
A. red B. green C. blue D. yellow E. white F. magenta G. cyan H. orange
circle square triangle star needle frame moving background distractor the a an of in on at is
describe the video. The video shows a red circle on a dark background. Options: (A) (B) (C) (D)
question answer yes no first last middle beginning end time seconds minutes hour long video
0 1 2 3 4 5 6 7 8 9 10 100 one two three four five six seven eight nine ten
"""


def build_tokenizer(out_dir: str | Path, vocab_size: int = 384):
    """Train a byte-level BPE on the embedded corpus and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", VIDEO_TOKEN],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.model_max_length = 32768
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    return hf


def build_llm(out_dir: str | Path, tokenizer, family: str = "qwen2", hidden_size: int = 64,
              num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0):
    """A randomly initialised Qwen2 or Llama causal LM with the tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = {"qwen2": (Qwen2ForCausalLM, Qwen2Config),
                    "llama": (LlamaForCausalLM, LlamaConfig)}[family]
    cfg = cfg_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=(family == "qwen2"),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = cls(cfg)
    model.save_pretrained(Path(out_dir))
    tokenizer.save_pretrained(Path(out_dir))  # an LLM folder is usable on its own
    return model


WARMUP_QUESTIONS = (
    "Describe the video.", "What colour is the shape that appears in the video?",
    "Which shape appears briefly?", "How long is the video?", "What is in the first frame?",
)
WARMUP_ANSWERS = ("red", "green", "blue", "yellow", "A", "B", "C", "D", "a red circle",
                  "a blue square", "the beginning", "the end", "two minutes", "yes", "no")


def warmup_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` short chats in the demo's shape (a question, then a one-word or letter answer)."""
    import random

    rng = random.Random(seed)
    return [[{"role": "user", "content": f"{VIDEO_TOKEN}\n{rng.choice(WARMUP_QUESTIONS)}"},
             {"role": "assistant", "content": rng.choice(WARMUP_ANSWERS)}] for _ in range(n)]


def warm_up_llm(llm_dir: str | Path, *, steps: int = 60, batch: int = 8, lr: float = 3e-3,
                seed: int = 0) -> tuple[float, float]:
    """Train the saved tiny LM on chat-formatted text, then save it back in place.

    A real recipe starts from a pretrained LLM that already writes the chat template and stops
    after an answer; a random one cannot, and a stage 1 that trains only the compressor and
    projector then has nothing to steer (its loss stays at ~5.7). A few dozen steps of plain
    next-token loss on chats like the demo's teach the template. Returns (first, last) loss.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm_dir = Path(llm_dir)
    tok = AutoTokenizer.from_pretrained(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir).train()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    chats = warmup_conversations(steps * batch, seed)
    losses = []
    for step in range(steps):
        texts = [tok.apply_chat_template(c, tokenize=False) for c in chats[step * batch:(step + 1) * batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.save_pretrained(llm_dir)
    return losses[0], losses[-1]


def build_vision_encoder(out_dir: str | Path, image_size: int = 32, patch_size: int = 8,
                         hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """A randomly initialised SigLIP vision tower plus its image processor config."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    cfg = SiglipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    torch.manual_seed(seed)
    model = SiglipVisionModel(cfg)
    model.save_pretrained(Path(out_dir))
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(Path(out_dir))
    return model


def build_all(out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir / "tokenizer")
    build_llm(out_dir / "llm", tok)
    build_vision_encoder(out_dir / "vision")
    return {"tokenizer": out_dir / "tokenizer", "llm": out_dir / "llm", "vision": out_dir / "vision"}


if __name__ == "__main__":
    print(build_all(sys.argv[1] if len(sys.argv) > 1 else "tiny_assets"))
