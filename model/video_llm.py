"""The video LLM: frame features -> compressor -> projector -> spliced into a HF causal LM.

Each sample's prompt holds exactly one `<video>` token; it is replaced by the sample's visual
tokens (kept frames in temporal order, each followed by a learned frame separator), so the
spliced sequence is longer than `input_ids`. Visual and padding positions get label -100.
Training batches are right-padded, or packed: one row of the samples' tokens and `cu_seqlens`
marking where each begins (data/collate.py), spliced into one padding-free row in which each
sample attends only to itself (`_splice_packed`). Generation batches are left-padded so that every
sample's new tokens follow its last prompt token. No distributed code: the trainer wraps this module.

A saved model is a folder:
    llm/                      HF save_pretrained of the LLM and its tokenizer
    compressor.safetensors    VideoCompressor state_dict
    projector.safetensors     projector state_dict + "frame_separator"
    mambamia.json             VideoLLMConfig (llm_path "llm", relative to the folder)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.compressor import VideoCompressor
from model.config import CompressorConfig, VideoLLMConfig
from model.projector import build_projector

IGNORE_INDEX = -100
CONFIG_FILE = "mambamia.json"

log = logging.getLogger(__name__)
SEPARATOR_KEY = "frame_separator"


def resolve_attn_implementation(requested: str) -> str:
    """"auto" -> flash_attention_2 when CUDA and flash_attn are both there, else sdpa."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def resolve_video_token_id(tokenizer, config: VideoLLMConfig) -> int:
    ids = tokenizer.encode(config.video_token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"VideoLLMConfig.video_token: {config.video_token!r} is not a single "
                         f"token of the tokenizer in {config.llm_path} (encodes to {ids})")
    if config.video_token_id is not None and config.video_token_id != ids[0]:
        raise ValueError(f"VideoLLMConfig.video_token_id: {config.video_token_id} disagrees with "
                         f"the tokenizer in {config.llm_path}, which maps "
                         f"{config.video_token!r} to {ids[0]}")
    return ids[0]


class VideoLLMOutput(NamedTuple):
    # A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 hooks the tensors of a module's output
    # for its backward pass only when it can see them (tuples, lists, dicts), and warns otherwise.
    loss: torch.Tensor | None
    """Mean next-token cross-entropy over labels != -100 (None without labels)."""
    logits: torch.Tensor
    """[B, T_spliced, vocab]."""
    labels: torch.Tensor | None
    """[B, T_spliced]: the labels aligned with logits (visual and padding positions -100)."""
    attention_mask: torch.Tensor
    """[B, T_spliced]."""
    kept_frames: list[torch.Tensor]
    """Per sample, indices of the frames the compressor kept."""
    frame_scores: list[torch.Tensor | None]
    """Per sample, mean Δ per valid frame (None under uniform selection)."""


@dataclass(kw_only=True)
class _Spliced:
    embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None


class VideoLLM(nn.Module):
    def __init__(self, config: VideoLLMConfig, llm: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        d_llm = llm.get_input_embeddings().embedding_dim
        self.compressor = VideoCompressor(config.compressor)
        self.projector = build_projector(config.projector, config.compressor.hidden_size, d_llm)
        if config.frame_separator:
            # LLaVA's image_newframe init: randn / sqrt(d_llm), a typical embedding scale.
            self.frame_separator = nn.Parameter(torch.randn(d_llm) / math.sqrt(d_llm))
        else:
            self.register_parameter("frame_separator", None)
        if config.gradient_checkpointing:
            # transformers 5 renamed gradient_checkpointing_enable (deprecated there, sole name in 4.x).
            kwargs = {"use_reentrant": False}
            if hasattr(llm, "activation_checkpointing_enable"):
                llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @classmethod
    def build(cls, config: VideoLLMConfig) -> "VideoLLM":
        """Load the LLM and tokenizer from `config.llm_path`; new compressor and projector."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:  # a local folder or a hub id (downloaded, or read from the hub cache when offline)
            tokenizer = AutoTokenizer.from_pretrained(config.llm_path)
        except OSError as err:  # not a folder, not a valid id, not on the hub, offline and not cached
            raise FileNotFoundError(f"VideoLLMConfig.llm_path: {config.llm_path!r} is neither a local "
                                    "folder holding a HF causal LM and its tokenizer nor a hub id that "
                                    f"resolves ({_reason(config.llm_path, err)})") from None
        config = dataclasses.replace(config, video_token_id=resolve_video_token_id(tokenizer, config))
        llm = AutoModelForCausalLM.from_pretrained(
            config.llm_path, dtype=getattr(torch, config.llm_dtype),
            attn_implementation=resolve_attn_implementation(config.attn_implementation))
        return cls(config, llm, tokenizer)

    def module_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters per group, for the trainer's freezing and learning-rate groups."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"llm": [], "compressor": [],
                                                               "projector": []}
        for name, p in self.named_parameters():
            top = name.split(".", 1)[0]
            groups["projector" if top == SEPARATOR_KEY else top].append((name, p))
        return groups

    # ---------------------------------------------------------------- splicing
    def _visual_embeds(self, features, frame_mask):
        out = self.compressor(features, frame_mask)
        proj_dtype = next(self.projector.parameters()).dtype
        visual = []
        for tokens in out.tokens:  # [N, T, H]
            v = self.projector(tokens.to(proj_dtype))  # [N, T, D]
            if self.frame_separator is not None:
                sep = self.frame_separator.to(v.dtype).expand(v.shape[0], 1, v.shape[-1])
                v = torch.cat([v, sep], dim=1)
            visual.append(v.reshape(-1, v.shape[-1]))
        return visual, out

    def _splice(self, input_ids, attention_mask, visual, labels, *, left_pad: bool) -> _Spliced:
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, T, D]
        rows, row_labels = [], []
        for b in range(input_ids.shape[0]):
            valid = attention_mask[b].bool()
            lab = labels[b][valid] if labels is not None else None
            row, row_label = self._splice_sample(b, input_ids[b][valid], embeds[b][valid], lab, visual[b])
            rows.append(row)
            row_labels.append(row_label)
        length = max(r.shape[0] for r in rows)
        bsz, dim = len(rows), embeds.shape[-1]
        out = embeds.new_zeros(bsz, length, dim)
        mask = attention_mask.new_zeros(bsz, length)
        pos = torch.zeros(bsz, length, dtype=torch.long, device=embeds.device)
        lab_out = (labels.new_full((bsz, length), IGNORE_INDEX) if labels is not None else None)
        for b, r in enumerate(rows):
            n = r.shape[0]
            sl = slice(length - n, length) if left_pad else slice(0, n)
            out[b, sl] = r
            mask[b, sl] = 1
            pos[b, sl] = torch.arange(n, device=embeds.device)
            if lab_out is not None:
                lab_out[b, sl] = row_labels[b]
        return _Spliced(embeds=out, attention_mask=mask, position_ids=pos, labels=lab_out)

    def _splice_sample(self, b, ids, embeds, labels, visual):
        """One sample's embeddings (and labels) with its `<video>` token replaced by `visual`."""
        where = (ids == self.config.video_token_id).nonzero()
        if where.shape[0] != 1:
            raise ValueError(f"VideoLLM: sample {b} has {where.shape[0]} "
                             f"{self.config.video_token!r} tokens in input_ids, expected 1")
        p = int(where[0, 0])
        row = torch.cat([embeds[:p], visual.to(embeds.dtype), embeds[p + 1:]])
        if labels is None:
            return row, None
        fill = labels.new_full((visual.shape[0],), IGNORE_INDEX)
        return row, torch.cat([labels[:p], fill, labels[p + 1:]])

    def _splice_packed(self, input_ids, cu_seqlens, visual, labels) -> _Spliced:
        """The packed row: every sample spliced, concatenated, positions restarting at 0 per
        sample, and each sample's first label ignored so that no token is trained to predict the
        next sample's first (unpacked, a first token is never a target either)."""
        bounds = cu_seqlens.tolist()
        if input_ids.shape[0] != 1 or len(bounds) != len(visual) + 1 or bounds[-1] != input_ids.shape[1]:
            raise ValueError(f"VideoLLM: packed input_ids {list(input_ids.shape)} with cu_seqlens "
                             f"{bounds} for {len(visual)} videos; expected [1, cu_seqlens[-1]] and "
                             "one boundary more than videos")
        embeds = self.llm.get_input_embeddings()(input_ids[0])
        rows, row_labels = [], []
        for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            lab = labels[0, start:end] if labels is not None else None
            row, row_label = self._splice_sample(b, input_ids[0, start:end], embeds[start:end], lab, visual[b])
            rows.append(row)
            if row_label is not None:
                row_labels.append(torch.cat([row_label.new_full((1,), IGNORE_INDEX), row_label[1:]]))
        pos = torch.cat([torch.arange(r.shape[0], device=embeds.device) for r in rows])[None]
        return _Spliced(embeds=torch.cat(rows)[None], attention_mask=torch.ones_like(pos),
                        position_ids=pos, labels=torch.cat(row_labels)[None] if row_labels else None)

    def _packed_attention(self, s: _Spliced) -> dict:
        """How the LLM keeps packed samples apart. flash_attention_2: its varlen kernel, given the
        boundaries. Others (sdpa, eager): no 2-D mask, so transformers reads sample boundaries
        from the restarting position_ids and builds the block-diagonal causal mask itself
        (masking_utils.find_packed_sequence_indices), in the form each implementation takes."""
        if self.llm.config._attn_implementation != "flash_attention_2":
            return {"attention_mask": None}
        starts = (s.position_ids[0] == 0).nonzero()[:, 0]
        cu = torch.cat([starts, starts.new_tensor([s.position_ids.shape[1]])]).to(torch.int32)
        longest = int(cu.diff().max())
        return {"attention_mask": None, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest}

    # ---------------------------------------------------------------- running
    def forward(self, input_ids, attention_mask, features, frame_mask, labels=None,
                cu_seqlens=None) -> VideoLLMOutput:
        """Padded batch, or packed when `cu_seqlens` is given (input_ids [1, total])."""
        visual, comp = self._visual_embeds(features, frame_mask)
        if cu_seqlens is None:
            s = self._splice(input_ids, attention_mask, visual, labels, left_pad=False)
            mask = {"attention_mask": s.attention_mask}
        else:
            s = self._splice_packed(input_ids, cu_seqlens, visual, labels)
            mask = self._packed_attention(s)
        out = self.llm(inputs_embeds=s.embeds, position_ids=s.position_ids, labels=s.labels,
                       use_cache=False, **mask)
        return VideoLLMOutput(loss=out.loss, logits=out.logits, labels=s.labels,
                              attention_mask=s.attention_mask, kept_frames=comp.kept,
                              frame_scores=comp.scores)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, features, frame_mask, **gen_kwargs) -> torch.Tensor:
        """New tokens only, [B, T_new] (prompts end at their last attended token)."""
        visual, _ = self._visual_embeds(features, frame_mask)
        s = self._splice(input_ids, attention_mask, visual, None, left_pad=True)
        gen_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        # The LLM derives positions from the left-padded attention mask.
        return self.llm.generate(inputs_embeds=s.embeds, attention_mask=s.attention_mask,
                                 **gen_kwargs)

    # ---------------------------------------------------------------- save / load
    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write the folder described in the module docstring, via a temporary sibling."""
        out_dir = Path(out_dir)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.llm.save_pretrained(tmp / "llm")
        self.tokenizer.save_pretrained(tmp / "llm")
        save_file(_plain(self.compressor.state_dict()), tmp / "compressor.safetensors")
        proj = _plain(self.projector.state_dict())
        if self.frame_separator is not None:
            proj[SEPARATOR_KEY] = self.frame_separator.detach().clone().contiguous()
        save_file(proj, tmp / "projector.safetensors")
        cfg = dataclasses.replace(self.config, llm_path="llm").to_dict()
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        _replace_dir(tmp, out_dir)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "VideoLLM":
        """Load a saved model from a local folder or a hub id (a repo holding that folder)."""
        folder = pretrained_folder(folder)
        cfg_path = folder / CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"VideoLLM.from_pretrained: {cfg_path} is missing; expected a "
                                    "folder written by VideoLLM.save_pretrained")
        saved = json.loads(cfg_path.read_text())
        compressor, filled = CompressorConfig.from_saved(saved.get("compressor", {}))
        if filled:
            log.warning("%s was saved before these compressor fields existed; read as %s, how it was "
                        "trained", cfg_path, ", ".join(filled))
        config = VideoLLMConfig.from_dict({**saved, "compressor": compressor.to_dict()})
        model = cls.build(dataclasses.replace(config, llm_path=str(folder / "llm")))
        model.load_modules(folder)
        return model

    def load_modules(self, folder: str | os.PathLike) -> None:
        """Load compressor, projector and separator weights (strictly) from a saved folder; the
        LLM is left as it is (a later stage builds it from `folder/llm` itself)."""
        folder = Path(folder)
        self.compressor.load_state_dict(_load(folder / "compressor.safetensors"))
        proj = _load(folder / "projector.safetensors")
        separator = proj.pop(SEPARATOR_KEY, None)
        if (separator is None) != (self.frame_separator is None):
            raise ValueError(f"{folder / 'projector.safetensors'}: holds "
                             f"{'a' if separator is not None else 'no'} frame_separator but the "
                             f"model has frame_separator={self.config.frame_separator}")
        self.projector.load_state_dict(proj)
        if separator is not None:
            with torch.no_grad():
                self.frame_separator.copy_(separator)


def pretrained_folder(name: str | os.PathLike) -> Path:
    """A saved model's local folder: `name` itself, or the snapshot of hub repo `name` (downloaded,
    or read from the hub cache under HF_HUB_OFFLINE=1)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name)))
    except (OSError, ValueError) as err:  # not a repo id, not on the hub, offline and not cached
        raise FileNotFoundError(f"VideoLLM.from_pretrained: {str(name)!r} is neither a local folder nor "
                                f"a hub id that resolves ({_reason(str(name), err)})") from None


def _reason(name: str, err: Exception) -> str:
    """Why `name` did not load, in one line; a path says it is missing, not that ids look otherwise."""
    if name.startswith(("/", ".", "~")):
        return "no such folder"
    return " ".join(str(err).split())[:300]


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views and shared storage: write independent contiguous copies.
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"VideoLLM.from_pretrained: {path} is missing")
    return load_file(str(path))


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a finished folder into place; a previous folder of that name is swapped out first."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)
