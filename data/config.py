"""Typed configuration of the streaming loader; the trainer's run config composes it.

    cfg = DataConfig.from_dict({"sources": [{"path": "shards/llava", "weight": 2.0}],
                                "batch_size": 4, "max_frames": 64, "max_text_len": 2048})
    loader = VideoLoader.from_config(cfg, tokenizer, rank=rank, world_size=world_size)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

FEATURE_DTYPES = ("float32", "bfloat16", "float16")
VERIFY_INDEX = ("none", "counts", "sha256")


@dataclass(kw_only=True)
class DataSource:
    path: str
    """A dataset folder: shards plus the index.json written by `mambamia convert`."""
    weight: float = 1.0
    """Relative share of this source in every mixture epoch (0 leaves it out)."""


@dataclass(kw_only=True)
class DataConfig:
    sources: list[DataSource]
    batch_size: int
    """Samples per rank per batch (the micro-batch)."""
    max_frames: int = 64
    """Longer clips are subsampled uniformly to this many frames (timestamps follow)."""
    max_text_len: int = 2048
    """Token budget of the text; longer conversations are truncated on the right."""
    num_workers: int = 2
    """DataLoader worker processes per rank; each builds whole batches."""
    prefetch_factor: int = 2
    """Batches each worker keeps ready ahead of the consumer."""
    seed: int = 0
    """Order of every epoch is a function of (seed, epoch) only."""
    samples_per_epoch: int | None = None
    """Length of one mixture epoch; default: the sum of the sources' sample counts."""
    bad_fraction_limit: float = 0.01
    """A source whose bad records exceed this fraction of its records seen stops the run."""
    bad_check_after: int = 200
    """Records of a source seen before the limit is enforced (a single early bad record is noise)."""
    features_dtype: str = "float16"
    """dtype of the collated features. float16 is what shards store (no conversion, half the bytes
    of float32); the trainer casts to its compute dtype when it moves the batch to the device."""
    zero_copy: bool = True
    """With workers: a batch's features are the shared-memory ring slot the worker read them into
    (no copy). Safe whatever the consumer does: a slot is refilled only once nothing in the
    trainer process references it (a kept batch, a row sliced off it, a numpy view); while the
    consumer holds every slot, workers use fresh memory. False copies them into private memory
    (reused buffers, same rule) and frees the slot at once."""
    check_finite: bool = True
    """Reject records whose features hold NaN or inf (one fused pass per record)."""
    num_patches: int | None = None
    """Expected patches per frame (P); None accepts whatever the first record of a batch has."""
    feature_dim: int | None = None
    """Expected feature width (D); None accepts whatever the first record of a batch has."""
    group_by_length: bool = False
    """Batch samples of similar length together: the epoch's order is cut into groups of
    `group_size` positions and each group is sorted by an estimated LLM length (kept frames x
    `group_tokens_per_frame` + text bytes / 4, from the shard tables: nothing is read), so a
    global batch pads to neighbours of similar length instead of the longest of a random draw.
    Off by default: it changes which samples meet in a batch (a mild bias LLaVA-NeXT accepts for
    its `group_by_modality_length`), and with the paper's budget visual tokens saturate at 64 kept
    frames, so the gain comes from text length alone; turn it on for throughput (bench/
    bench_batching.py measures both). The order stays a pure function of (seed, epoch) and does not
    depend on world or batch size, so resume and world-size changes stay sample-exact."""
    group_size: int = 512
    """Positions per length group (a mega-batch). Larger groups pad less but make step cost ramp
    from short to long batches over group_size / global batch steps; keep it a multiple of the
    global batch and several times larger."""
    group_tokens_per_frame: float = 73.0
    """LLM tokens one kept frame costs, for the length estimate only (the paper preset: 72
    anchors + a frame separator). Only the order within a group depends on it."""
    group_kept_frames: int = 64
    """Frames the model keeps at most (the paper's TAA keeps 64 keyframes: any video of 64
    sampled frames or more costs the same 4672 visual tokens, model/budget.py), for the length
    estimate only: beyond it only text length tells samples apart."""
    pack_sequences: bool = False
    """Collate a batch as one padding-free row (data/collate.py): its samples concatenated, with
    `cu_seqlens` marking where each begins; the model attends within each sample only (block-
    diagonal causal mask under SDPA, flash-attention's varlen kernel on GPU) with positions and
    labels per sample. No pad token reaches the LLM; the loss is the same token-weighted mean.
    Off by default: under SDPA the mask is dense ((sum of lengths)^2), so it pays off with
    flash_attention_2 rather than on CPU; and the pipeline-parallel path takes padded batches."""
    verify_index: str = "counts"
    """How far each source's index.json is checked against its shards before training (a
    mismatch is a one-line error, data/dataset.py): "none" (names, duplicates, existence, from the
    index alone), "counts" (also every shard's tar headers: sample counts, compressed or cut
    shards; the scan is reused for reading) or "sha256" (also every byte against its checksum:
    a full read, `data.verify_index=sha256` when the data may have changed since conversion)."""

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, DataSource) else DataSource(**s) for s in self.sources]
        self.validate()

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("data.sources: expected at least one dataset folder, got []")
        for i, s in enumerate(self.sources):
            if not (math.isfinite(s.weight) and s.weight >= 0):  # NaN fails every comparison: test finiteness
                raise ValueError(f"data.sources[{i}].weight: expected a finite number >= 0, got {s.weight}")
        if not any(s.weight > 0 for s in self.sources):
            raise ValueError("data.sources: expected at least one source with weight > 0")
        for name in ("batch_size", "max_frames", "max_text_len", "prefetch_factor",
                     "group_size", "group_kept_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "bad_check_after", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name}: expected >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.bad_fraction_limit <= 1.0:
            raise ValueError(f"data.bad_fraction_limit: expected in [0, 1], got {self.bad_fraction_limit}")
        if self.features_dtype not in FEATURE_DTYPES:
            raise ValueError(f"data.features_dtype: expected one of {FEATURE_DTYPES}, "
                             f"got {self.features_dtype!r}")
        if self.verify_index not in VERIFY_INDEX:
            raise ValueError(f"data.verify_index: expected one of {VERIFY_INDEX}, got {self.verify_index!r}")
        if not self.group_tokens_per_frame >= 0:
            raise ValueError(f"data.group_tokens_per_frame: expected >= 0, got {self.group_tokens_per_frame}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"data.samples_per_epoch: expected >= 1, got {self.samples_per_epoch}")

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"data: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
