"""Typed configuration of the compressor and of the video LLM around it.

Every choice the paper leaves open (paper.md §6) is a field here with its default and the reason
for it in the docstring under the field. `to_dict`/`from_dict` round-trip through plain JSON/YAML
types; unknown keys and values of the wrong type are errors naming the field.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

COMPRESSOR_KINDS = ("mambamia", "bimamba", "causal_mambamia", "transformer", "avgpool")
FRAME_SELECTIONS = ("delta", "uniform")
GROUP_PADDINGS = ("masked", "zeros")
BACKWARD_DT_BIAS_INITS = ("ones", "like_forward")
DELTA_SCORES = ("deviation", "mean")
PROJECTORS = ("mlp2x_gelu", "linear")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
LLM_DTYPES = ("float32", "bfloat16", "float16")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether `value` is acceptable for a field annotated `hint` (plain JSON-like types only)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        # An int where a float is expected is fine (YAML writes 1 for 1.0).
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _from_dict(cls, data: dict[str, Any], nested: dict[str, type] | None = None):
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; expected some of {names}")
    kwargs = {}
    for name, value in data.items():
        if nested and name in nested and isinstance(value, dict):
            value = nested[name].from_dict(value)
        elif not _type_ok(value, hints[name]):
            expected = getattr(hints[name], "__name__", str(hints[name]))
            raise TypeError(f"{cls.__name__}.{name}: expected {expected}, got {value!r}")
        kwargs[name] = float(value) if hints[name] is float else value
    return cls(**kwargs)


def _choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name}: expected one of {list(allowed)}, got {value!r}")


def _positive(owner: str, name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{owner}.{name}: expected a positive integer, got {value!r}")


@dataclass(kw_only=True)
class CompressorConfig:
    """The hierarchical compressor: spatial(-temporal) stage, Time Axis Aggregator, keyframes."""

    kind: str = "mambamia"
    """Spatial stage: "mambamia" (bidirectional Mamba2 + GPA, the paper), or an ablation with the
    same queries and token budget: "bimamba" (bidirectional, no GPA), "causal_mambamia" (causal
    Mamba2 + GPA), "transformer" (bidirectional attention encoder), "avgpool" (mean of each group).
    The Time Axis Aggregator is the same bidirectional Mamba for every kind so that only the
    spatial stage differs between ablations."""
    input_dim: int = 1152
    """Width of the vision features (SigLIP so400m / SigLIP2: 1152)."""
    patches_per_frame: int | None = None
    """Patch tokens per frame P of the vision encoder (SigLIP2-so400m-patch16-384: 576). When set,
    features are checked against it and budgets use it; None accepts any P."""
    hidden_size: int = 1024
    """Compressor width after the input projection. [not stated] 1024 keeps the compressor small
    next to a 7B LLM (the AV audio compressor uses 3072 for 25x pooling of 1280-d features)."""
    num_layers: int = 2
    """Blocks in the spatial stage; 2 as in the AV compressor."""
    k: int = 8
    """GPA group size: one query per k patch tokens. [not stated] 8 divides SigLIP2's 24x24=576
    patches, giving 72 anchors per frame with no padding. When the patches per frame P are not a
    multiple of k, each frame's patches are zero-padded to ceil(P/k)*k, so a group never straddles
    two frames and every anchor belongs to exactly one frame (TAA scores and drops whole frames);
    the scan still runs over the whole clip, so context flows across frames."""
    taa_layers: int = 1
    """Bidirectional Mamba2 blocks of the Time Axis Aggregator over the anchor sequence. Their Δ
    (mean of heads, directions and layers) scores frames. [not stated] One block is the least
    that yields Δ; must be >= 1 when frame_selection is "delta"."""
    taa_k: int | None = None
    """GPA group size inside the TAA, or None for no further pooling there. [not stated] None:
    TAA contextualises anchors along time and selects frames, tokens per frame stay P/k."""
    keyframes: int = 64
    """Frames kept by the TAA (top Δ scores, temporal order). [not stated] 64 kept frames x (72
    tokens + 1 separator) = 4672 ~ the paper's 4.7K visual tokens for an hour of video."""
    frame_selection: str = "delta"
    """"delta": keep the frames with the largest mean Δ (paper, [inferred] top-N rule); "uniform":
    evenly spaced frames (ablation)."""
    keep_first_last: bool = True
    """[inferred] Always keep the first and last frame so the LLM sees both ends of the video."""
    d_state: int = 128
    """SSM state size N (MambaMia2Config default)."""
    d_conv: int = 4
    """Depthwise causal conv kernel of the mixer (MambaMia2Config default)."""
    headdim: int = 64
    """Mixer head dimension (MambaMia2Config default)."""
    expand: int = 2
    """Mixer inner width = expand * hidden_size (MambaMia2Config default)."""
    ngroups: int = 1
    """B/C groups of the mixer; 1 as in the AV compressor (the LLM-sized default is 8)."""
    ssd_chunk_size: int = 256
    """SSD kernel chunk length (unrelated to k)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon of blocks, mixer and final norm."""
    norm_before_gate: bool = True
    """Order of the mixer's gated RMSNorm: True normalises first, then multiplies by silu(z), as
    the official MambaMia code (its config default) and mamba_ssm's kernels; False gates first
    (rmsnorm(x * silu(z))), as transformers' Mamba2. The fused kernels receive the same flag."""
    init_scale: float = 1e-3
    """Scale of the GPA weight/gate layer weights at init, so GPA starts as a plain group mean with
    gate 0.5 (paper §1.2)."""
    gate_eps: float = 0.01
    """GPA gate rescaled to [gate_eps, 1 - gate_eps] affinely so both branches keep gradients."""
    gpa_dropout: float = 0.1
    """Dropout on the query before the GPA weight and gate layers (training only)."""
    residual_in_fp32: bool = True
    """Carry the residual stream in fp32 through the blocks (MambaMia2Config default)."""
    gradient_checkpointing: bool = False
    """Recompute each block in backward (plain torch.utils.checkpoint)."""
    transformer_heads: int = 8
    """Attention heads of the "transformer" ablation."""
    transformer_mlp_ratio: float = 4.0
    """MLP width / hidden of the "transformer" ablation (standard pre-norm encoder)."""
    transformer_rope_base: float = 10000.0
    """Rotary position base of the "transformer" ablation. Attention alone is blind to order, and
    with one shared query every query slot would produce the same anchor; rotary positions over
    the whole clip's sequence (every frame's patches and queries, in time order) give each slot
    its own position, cost no parameters and extend to any clip length (a learned absolute table
    would cap the length at the longest clip seen in training)."""
    group_padding: str = "masked"
    """How the zero padding of a frame's last group (P not a multiple of k) enters the pooling, the
    same way in GPA and in average pooling: "masked" leaves the padding slots out of GPA's softmax
    and of the pooling mean (padding is not content, so a short group's anchor keeps the scale of a
    full one); "zeros" counts them as tokens, as the official code's GPA does on its zero-padded
    sequence. The paper preset (576 patches, k=8) has no padding, so it only matters elsewhere."""
    backward_dt_bias_init: str = "ones"
    """Initial dt_bias of the backward scan direction: "ones", as in the official code (its weight
    init re-initialises only the forward dt_bias, the backward one keeps its constructor value 1,
    i.e. Δ ≈ softplus(dt + 1) ≈ 1.3: a short-memory backward scan whose Δ moves almost linearly
    with content), or "like_forward" (the forward's inverse-softplus of U[dt_min, dt_max])."""
    delta_score: str = "deviation"
    """How Δ becomes a frame score (frame_selection "delta"). [inferred] "deviation": the mean over
    the frame's anchors and heads of |log Δ - its median over the video's frames| (same anchor
    slot, same head): how far the frame moves the step size away from the video's usual one, in
    either direction. "mean": the mean Δ itself (paper.md §1.5's literal reading). Raw mean Δ ranks
    by position, not content: both scan directions start from a zero state, so anchors near either
    end of the clip differ from the others whatever they show, and an untrained layer raises or
    lowers Δ on a distinct frame with equal odds (bench/bench_method.py --profile shows both)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        _choice(name, "kind", self.kind, COMPRESSOR_KINDS)
        _choice(name, "frame_selection", self.frame_selection, FRAME_SELECTIONS)
        _choice(name, "group_padding", self.group_padding, GROUP_PADDINGS)
        _choice(name, "backward_dt_bias_init", self.backward_dt_bias_init, BACKWARD_DT_BIAS_INITS)
        _choice(name, "delta_score", self.delta_score, DELTA_SCORES)
        for f in ("input_dim", "hidden_size", "num_layers", "k", "keyframes", "d_state", "d_conv",
                  "headdim", "expand", "ngroups", "ssd_chunk_size", "transformer_heads"):
            _positive(name, f, getattr(self, f))
        for f in ("taa_k", "patches_per_frame"):
            if getattr(self, f) is not None:
                _positive(name, f, getattr(self, f))
        if self.taa_layers < 0:
            raise ValueError(f"{name}.taa_layers: expected >= 0, got {self.taa_layers}")
        if self.frame_selection == "delta" and self.taa_layers == 0:
            raise ValueError(f"{name}.taa_layers: Δ-based frame selection needs at least one TAA "
                             "layer; use frame_selection: uniform or taa_layers >= 1")
        if self.taa_layers == 0 and self.taa_k is not None:
            raise ValueError(f"{name}.taa_k: set but taa_layers is 0")
        if (self.expand * self.hidden_size) % self.headdim:
            raise ValueError(f"{name}.headdim: expand*hidden_size={self.expand * self.hidden_size}"
                             f" is not a multiple of headdim={self.headdim}")
        if self.kind == "transformer" and self.hidden_size % (2 * self.transformer_heads):
            raise ValueError(f"{name}.transformer_heads: hidden_size={self.hidden_size} is not a "
                             f"multiple of 2*{self.transformer_heads} (rotary positions rotate "
                             "pairs of channels in each head)")
        if not 0.0 <= self.gate_eps < 0.5:
            raise ValueError(f"{name}.gate_eps: expected 0 <= gate_eps < 0.5, got {self.gate_eps}")
        if not 0.0 <= self.gpa_dropout < 1.0:
            raise ValueError(f"{name}.gpa_dropout: expected in [0, 1), got {self.gpa_dropout}")
        if (self.transformer_mlp_ratio <= 0 or self.init_scale <= 0 or self.norm_eps <= 0
                or self.transformer_rope_base <= 1):
            raise ValueError(f"{name}: transformer_mlp_ratio, init_scale and norm_eps must be > 0 "
                             "and transformer_rope_base > 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressorConfig":
        return _from_dict(cls, data)

    # Fields added after models were first saved, with the value that reproduces how those older
    # models computed (their defaults since changed to follow the official code). A saved config
    # that lacks one of them is read with this value, never silently with today's default.
    SAVED_BEFORE = {"norm_before_gate": False, "group_padding": "zeros", "delta_score": "mean",
                    "backward_dt_bias_init": "like_forward"}

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> tuple["CompressorConfig", list[str]]:
        """A config read from a saved model, and the fields filled in with SAVED_BEFORE's values."""
        filled = {k: v for k, v in cls.SAVED_BEFORE.items() if k not in data}
        return cls.from_dict({**data, **filled}), [f"{k}={v}" for k, v in filled.items()]


@dataclass(kw_only=True)
class VideoLLMConfig:
    """The whole model: compressor -> projector -> HF causal LM, spliced at the video token."""

    llm_path: str
    """Local folder of the HF causal LM and its tokenizer (nothing is downloaded at run time).
    A saved VideoLLM stores it as "llm", relative to its own folder."""
    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    projector: str = "mlp2x_gelu"
    """Compressor width -> LLM width: LLaVA's "mlp2x_gelu" (Linear, GELU, Linear) or "linear"."""
    frame_separator: bool = True
    """[inferred] Append a learned vector after each kept frame's tokens (LLaVA's image_newframe),
    so the LLM can tell where one frame ends."""
    video_token: str = "<video>"
    """Placeholder token in the prompt; must be a single token of the tokenizer."""
    video_token_id: int | None = None
    """Resolved from the tokenizer by VideoLLM.build; a given value must agree with it."""
    attn_implementation: str = "auto"
    """"auto": flash_attention_2 on CUDA when flash_attn imports, else sdpa."""
    llm_dtype: str = "float32"
    """Dtype the LLM weights are loaded in; fp32 lets DeepSpeed keep fp32 masters and cast."""
    gradient_checkpointing: bool = False
    """Recompute LLM decoder layers in backward (HF gradient_checkpointing_enable)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.compressor, dict):
            self.compressor = CompressorConfig.from_dict(self.compressor)
        if not self.llm_path:
            raise ValueError(f"{name}.llm_path: expected a folder or a hub id, got {self.llm_path!r}")
        _choice(name, "projector", self.projector, PROJECTORS)
        _choice(name, "attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _choice(name, "llm_dtype", self.llm_dtype, LLM_DTYPES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VideoLLMConfig":
        return _from_dict(cls, data, nested={"compressor": CompressorConfig})


# The frame sampling that goes with the paper-sized preset: 1 fps, at most 256 frames (fps is
# lowered for longer videos, as the official video_utils does), so an hour becomes 256 frames.
PAPER_FPS = 1.0
PAPER_MAX_FRAMES = 256
PAPER_PATCHES = 576
"""SigLIP2-so400m-patch16-384 gives 24 x 24 = 576 patch tokens of width 1152 per frame."""
PAPER_LLM_HIDDEN = 3584
"""Qwen2-7B hidden size: the projector's target width."""


def paper_config(llm_path: str = "Qwen2-7B-Instruct") -> VideoLLMConfig:
    """The paper-sized preset: SigLIP2 features (576 x 1152), k=8, 64 keyframes out of 256.

    Tokens for a 3600 s video: 256 sampled frames -> 72 anchors each -> TAA keeps 64 frames ->
    64 x (72 + 1 separator) = 4672 visual tokens, the paper's ~4.7K.
    """
    return VideoLLMConfig(llm_path=llm_path, compressor=CompressorConfig(
        input_dim=1152, patches_per_frame=PAPER_PATCHES, hidden_size=1024, num_layers=2, k=8,
        taa_layers=1, keyframes=64))
