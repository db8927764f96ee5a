"""Pipeline-parallel training of a VideoLLM on DeepSpeed's pipeline engine (`parallel.pipeline_stages`).

The model is re-expressed as a flat list of layers without touching model/'s modules: the layers
below hold references to the VideoLLM's own submodules, so one VideoLLM object is the source of
the weights and every layer's state_dict keys map back to VideoLLM names (see `model_key_map`).

    [VisualLayer]        compressor + projector + frame separator -> padded visual tokens
    [EmbedLayer] (tied)  token embedding, splices the visual tokens, pads to a bucketed length
    [DecoderLayer] x N   the LLM's decoder layers (HF causal mask + rotary embedding per layer)
    [NormLayer]          final norm
    [EmbedLayer|HeadLayer]  LM head: the tied embedding again when the LLM ties them
    loss                 next-token CE, mean over labels != -100 (as HF's causal LM loss)

The first two layers always share the first stage and the last two the last stage, so the only
thing ever sent between stages is the 4-tuple (hidden [B,L,D], attention mask [B,L], positions
[B,L], labels [B,L]). The engine runs with `dynamic_shape` (it sends the tuple's shapes ahead of
each micro-batch, since spliced lengths depend on the kept frames), and L is padded up to a
multiple of `bucket` so that only a few distinct shapes ever occur (allocator blocks and kernels
are reused). Padding positions have mask 0 and label -100, so losses equal the unsplit model's.

Every rank builds the whole VideoLLM (same seed, identical weights) before the split keeps its
stage's layers; a backbone too large for one process's memory would need meta-device building.

Layout rules (DeepSpeed's and ours): world size divisible by stages, at most N + 2 stages (every
stage needs a layer), ZeRO stage <= 1 (the pipeline engine refuses gradient partitioning).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ConfigError, RunConfig

IGNORE_INDEX = -100
DEFAULT_BUCKET = 64
EMBED_KEY = "embed"


# ------------------------------------------------------------------------------------ layers
class VisualLayer(nn.Module):
    """(features, frame_mask, input_ids, attention_mask, labels) -> visual tokens padded to
    [B, V, D] with their counts [B], the text tensors passed through."""

    def __init__(self, compressor: nn.Module, projector: nn.Module, frame_separator: nn.Parameter | None):
        super().__init__()
        self.compressor = compressor
        self.projector = projector
        self.frame_separator = frame_separator  # registered under the VideoLLM's own name

    def forward(self, inputs):
        features, frame_mask, input_ids, attention_mask, labels = inputs
        out = self.compressor(features, frame_mask.bool())
        proj_dtype = next(self.projector.parameters()).dtype
        rows = []
        for tokens in out.tokens:  # [N, T, H] per sample
            v = self.projector(tokens.to(proj_dtype))
            if self.frame_separator is not None:
                sep = self.frame_separator.to(v.dtype).expand(v.shape[0], 1, v.shape[-1])
                v = torch.cat([v, sep], dim=1)
            rows.append(v.reshape(-1, v.shape[-1]))
        counts = torch.tensor([r.shape[0] for r in rows], dtype=torch.long, device=features.device)
        visual = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [B, V, D]
        return visual, counts, input_ids, attention_mask, labels


class EmbedLayer(nn.Module):
    """The token embedding, used twice when the LLM ties it to the LM head: on the first stage it
    splices (5-tuple in), on the last it projects to the vocabulary (2-tuple in). DeepSpeed keeps
    the two copies equal (one broadcast at start, gradients summed over both stages each step).
    Both uses are the module's own forward, so DeepSpeed saves and loads both copies with the
    layers (it skips tied layers that go through a `forward_fn`)."""

    def __init__(self, embed_tokens: nn.Embedding, video_token_id: int, bucket: int):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.video_token_id = video_token_id
        self.bucket = bucket

    def forward(self, inputs):
        if len(inputs) == 2:  # last stage: (normed hidden, labels) -> (logits, labels)
            hidden, labels = inputs
            return F.linear(hidden, self.embed_tokens.weight), labels
        return splice(self.embed_tokens, *inputs, video_token_id=self.video_token_id, bucket=self.bucket)


def bucketed(length: int, bucket: int) -> int:
    return -(-length // bucket) * bucket


def splice(embed_tokens: nn.Embedding, visual, counts, input_ids, attention_mask, labels, *,
           video_token_id: int, bucket: int):
    """Right-padded spliced sequence, as VideoLLM._splice builds it, padded to a bucket multiple."""
    embeds = embed_tokens(input_ids)  # [B, T, D]
    rows, row_labels = [], []
    for b in range(input_ids.shape[0]):
        valid = attention_mask[b].bool()
        ids, e, lab = input_ids[b][valid], embeds[b][valid], labels[b][valid]
        where = (ids == video_token_id).nonzero()
        if where.shape[0] != 1:
            raise ValueError(f"pipeline: sample {b} has {where.shape[0]} video tokens "
                             f"(id {video_token_id}) in input_ids, expected 1")
        p, v = int(where[0, 0]), visual[b, : int(counts[b])].to(e.dtype)
        rows.append(torch.cat([e[:p], v, e[p + 1:]]))
        row_labels.append(torch.cat([lab[:p], lab.new_full((v.shape[0],), IGNORE_INDEX), lab[p + 1:]]))
    length = bucketed(max(r.shape[0] for r in rows), bucket)
    bsz = len(rows)
    hidden = embeds.new_zeros(bsz, length, embeds.shape[-1])
    mask = attention_mask.new_zeros(bsz, length)
    pos = torch.zeros(bsz, length, dtype=torch.long, device=embeds.device)
    lab_out = labels.new_full((bsz, length), IGNORE_INDEX)
    for b, r in enumerate(rows):
        n = r.shape[0]
        hidden[b, :n] = r
        mask[b, :n] = 1
        pos[b, :n] = torch.arange(n, device=embeds.device)
        lab_out[b, :n] = row_labels[b]
    return hidden, mask, pos, lab_out


class DecoderLayer(nn.Module):
    """One HF decoder layer on the 4-tuple; mask and rotary embedding are rebuilt from the mask
    and positions on every layer (cheap), so nothing but the 4-tuple crosses a stage boundary."""

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module, llm_config):
        super().__init__()
        self.layer = layer
        # Shared by all decoder layers, parameter-free (inv_freq is a non-persistent buffer).
        self.rotary_emb = rotary_emb
        self.llm_config = llm_config

    def forward(self, inputs):
        from transformers.masking_utils import create_causal_mask

        hidden, mask, pos, labels = inputs
        causal = create_causal_mask(config=self.llm_config, inputs_embeds=hidden, attention_mask=mask,
                                    cache=None, position_ids=pos)
        out = self.layer(hidden, attention_mask=causal, position_ids=pos,
                         position_embeddings=self.rotary_emb(hidden, pos))
        return (out[0] if isinstance(out, tuple) else out), mask, pos, labels


class NormLayer(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, inputs):
        hidden, _, _, labels = inputs
        return self.norm(hidden), labels


class HeadLayer(nn.Module):
    """The LM head of an LLM with untied embeddings."""

    def __init__(self, lm_head: nn.Module):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, inputs):
        hidden, labels = inputs
        return self.lm_head(hidden), labels


def causal_lm_loss(outputs, _labels_from_loader=None) -> torch.Tensor:
    """Mean next-token CE over labels != -100; the spliced labels travel with the activations
    (the loader's labels on the last stage do not know where the visual tokens went)."""
    logits, labels = outputs
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX)


# ------------------------------------------------------------------------------------ layout
def check_layout(*, stages: int, world_size: int, zero_stage: int, decoder_layers: int) -> None:
    """Raise ConfigError for a pipeline layout that cannot run."""
    if stages < 2:
        raise ConfigError(f"parallel.pipeline_stages: expected >= 2 for a pipeline, got {stages}")
    if world_size % stages:
        raise ConfigError(f"parallel.pipeline_stages: {stages} does not divide the world size "
                          f"{world_size} (processes = stages x data-parallel replicas)")
    if stages > decoder_layers + 2:
        raise ConfigError(f"parallel.pipeline_stages: {stages} stages but the model has only "
                          f"{decoder_layers} decoder layers (at most {decoder_layers + 2} stages: "
                          "front, one per decoder layer, head)")
    if zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage: {zero_stage} cannot be combined with "
                          "parallel.pipeline_stages > 1 (DeepSpeed's pipeline allows ZeRO-0/1 only)")


def _llm_parts(llm: nn.Module):
    body = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(body, attr):
            raise ConfigError(f"pipeline: the LLM {type(llm).__name__} has no {attr}; only "
                              "Llama/Qwen2-style decoders can be split into pipeline stages")
    kinds = set(getattr(llm.config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ConfigError(f"pipeline: layer types {sorted(kinds)} are not supported (full attention only)")
    return body


def build_layers(model: nn.Module, bucket: int = DEFAULT_BUCKET) -> list:
    """The VideoLLM as pipeline layers (modules, or TiedLayerSpec for a tied embedding)."""
    from deepspeed.pipe import TiedLayerSpec

    llm = model.llm
    body = _llm_parts(llm)
    vid = model.config.video_token_id
    tied = llm.get_output_embeddings().weight is body.embed_tokens.weight
    embed = (TiedLayerSpec(EMBED_KEY, EmbedLayer, body.embed_tokens, vid, bucket,
                           tied_weight_attr="embed_tokens.weight")
             if tied else EmbedLayer(body.embed_tokens, vid, bucket))
    layers: list = [VisualLayer(model.compressor, model.projector, model.frame_separator), embed]
    layers += [DecoderLayer(layer, body.rotary_emb, llm.config) for layer in body.layers]
    layers.append(NormLayer(body.norm))
    layers.append(embed if tied else HeadLayer(llm.get_output_embeddings()))
    return layers


def _module_of(layer) -> nn.Module:
    return layer.build() if not isinstance(layer, nn.Module) else layer


def layer_costs(layers: list) -> list[int]:
    """Parameter count per layer (a tied embedding counts on both stages that hold it)."""
    return [sum(p.numel() for p in _module_of(layer).parameters()) for layer in layers]


def measured_costs(layers: list, inputs: tuple, repeats: int = 3) -> list[int]:
    """Forward microseconds per layer on one sample micro-batch (min over `repeats` runs, after
    one warm-up), run here on the whole model: what the stages will spend, unlike parameter
    counts, which miss that the compressor reads every frame patch. Backward is taken to scale
    with forward."""
    modules = [_module_of(layer) for layer in layers]
    best = [float("inf")] * len(modules)
    with torch.no_grad():
        for _ in range(repeats + 1):
            x = inputs
            for i, module in enumerate(modules):
                t0 = time.perf_counter()
                x = module(x)
                best[i] = min(best[i], time.perf_counter() - t0)
    return [max(1, round(t * 1e6)) for t in best]


def partition(costs: list[int], stages: int) -> list[int]:
    """Stage boundaries (DeepSpeed's `parts`, stages + 1 offsets) minimising the largest stage's
    cost, with the first two and the last two layers kept together (see the module docstring).

    Binary search on the largest stage cost with a greedy left-to-right fill: the optimum for
    contiguous splits.
    """
    units = [costs[0] + costs[1], *costs[2:-2], costs[-2] + costs[-1]]  # atomic groups
    if stages > len(units):
        raise ConfigError(f"parallel.pipeline_stages: {stages} stages for {len(units)} pipeline units")

    lo, hi = max(units), sum(units)
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(units, stages, mid):
            hi = mid
        else:
            lo = mid + 1
    unit_bounds = _greedy_bounds(units, stages, lo)
    # Unit u >= 1 starts at layer u + 1 (unit 0 holds layers 0 and 1).
    return [0] + [u + 1 for u in unit_bounds[1:]] + [len(costs)]


def _feasible(units: list[int], stages: int, limit: int) -> bool:
    return _greedy_bounds(units, stages, limit) is not None


def _greedy_bounds(units: list[int], stages: int, limit: int) -> list[int] | None:
    """Fill stages left to right up to `limit`, opening a new one early when the remaining units
    are just enough to give every remaining stage one."""
    if max(units) > limit:
        return None
    bounds, total = [0], 0
    for i, c in enumerate(units):
        remaining_stages = stages - len(bounds)
        must_open = remaining_stages > 0 and len(units) - i == remaining_stages
        if i > 0 and (total + c > limit or must_open):
            if remaining_stages == 0:
                return None
            bounds.append(i)
            total = 0
        total += c
    return bounds if len(bounds) == stages else None


def _layer_name(layer) -> str:
    return (layer.typename if not isinstance(layer, nn.Module) else type(layer)).__name__


def describe_split(layers: list, parts: list[int], costs: list[int], unit: str = "params") -> str:
    lines = []
    for stage in range(len(parts) - 1):
        lo, hi = parts[stage], parts[stage + 1]
        names = ", ".join(f"{i}:{_layer_name(layers[i])}" for i in range(lo, hi))
        lines.append(f"  stage {stage}: {sum(costs[lo:hi]):,} {unit} [{names}]")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ engine
def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class FixedSplitPipelineModule(PipelineModule):
        """PipelineModule with our partition (DeepSpeed's methods cannot keep layer groups together)."""

        def __init__(self, layers, parts: list[int], **kwargs):
            object.__setattr__(self, "_fixed_parts", parts)
            super().__init__(layers, **kwargs)

        def _partition_layers(self, method="fixed"):
            self.parts = list(self._fixed_parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def _synchronize_tied_weights(self):
            # DeepSpeed broadcasts the tied embedding in place; outside no_grad autograd records
            # the broadcast on the leaf parameter and backward later runs through it.
            with torch.no_grad():
                super()._synchronize_tied_weights()

    return FixedSplitPipelineModule


def build_pipeline_module(model: nn.Module, *, stages: int, bucket: int = DEFAULT_BUCKET,
                          checkpoint_activations: bool = False, sample: tuple | None = None, log=print):
    """Layers -> partition -> DeepSpeed PipelineModule (needs the process group).

    The split balances parameters, or with `sample` (first-stage inputs of one micro-batch, as
    `micro_batches` yields them) the forward time measured on rank 0 and sent to every rank.
    """
    import torch.distributed as dist

    layers = build_layers(model, bucket)
    check_layout(stages=stages, world_size=dist.get_world_size(), zero_stage=0,
                 decoder_layers=len(layers) - 4)
    unit = "params"
    costs = layer_costs(layers)
    if sample is not None:
        unit = "us forward"
        box = [measured_costs(layers, sample) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        costs = box[0]
    parts = partition(costs, stages)
    kwargs: dict[str, Any] = {}
    if checkpoint_activations:
        # The pipeline recomputes each decoder layer in backward; HF's own per-layer checkpointing
        # is switched off so that nothing is recomputed twice.
        for layer in layers:
            if isinstance(layer, DecoderLayer) and hasattr(layer.layer, "gradient_checkpointing"):
                layer.layer.gradient_checkpointing = False
        kwargs = {"activation_checkpoint_interval": 1, "checkpointable_layers": ["DecoderLayer"],
                  "activation_checkpoint_func": functools.partial(torch.utils.checkpoint.checkpoint,
                                                                  use_reentrant=False)}
    module = _pipeline_module_class()(layers, parts, num_stages=stages, loss_fn=causal_lm_loss,
                                      partition_method="fixed", dynamic_shape=True, **kwargs)
    if dist.get_rank() == 0:
        log(f"[pipeline] {stages} stages x {dist.get_world_size() // stages} data-parallel, split by "
            f"{unit}:\n{describe_split(layers, parts, costs, unit)}\n[pipeline] spliced sequences are "
            f"right-padded to a multiple of {bucket} tokens so stages exchange few distinct shapes; "
            f"activation checkpointing per decoder layer: {'on' if checkpoint_activations else 'off'}")
    return module


def stage_param_groups(groups: list[dict[str, Any]], module: nn.Module) -> list[dict[str, Any]]:
    """The trainer's optimizer groups restricted to the parameters this stage holds.

    Every stage must keep every group: ZeRO's gradient norm all-reduces once per group over the
    pipeline stages (stages with different group counts deadlock) and it cannot flatten an empty
    group. A group with no parameter on this stage gets a one-element anchor parameter that no
    layer uses: its gradient stays zero, so AdamW never moves it and the norm is unchanged.
    """
    here = {id(p) for p in module.parameters()}
    anchors = nn.ParameterDict()
    out = []
    for group in groups:
        params = [p for p in group["params"] if id(p) in here]
        if not params:
            anchor = nn.Parameter(torch.zeros(1, device=next(module.parameters()).device))
            anchors[group["name"].replace(".", "_")] = anchor
            params = [anchor]
        out.append({**group, "params": params})
    module.group_anchors = anchors
    return out


def build_pipeline_engine(model: nn.Module, cfg: RunConfig, *, world_size: int, total_steps: int,
                          on_cuda: bool, bucket: int = DEFAULT_BUCKET, sample: tuple | None = None,
                          log=print):
    """Like engine.build_engine for `parallel.pipeline_stages > 1`: (engine, optimizer, scheduler).

    The DeepSpeed config is the trainer's, derived for the data-parallel size (world / stages):
    gradient accumulation becomes the number of micro-batches per `train_batch`.
    """
    import deepspeed

    from trainer.engine import build_ds_config, build_optimizer, freeze, param_groups, skip_shm_build

    stages = cfg.parallel.pipeline_stages
    check_layout(stages=stages, world_size=world_size, zero_stage=cfg.parallel.zero_stage,
                 decoder_layers=len(_llm_parts(model.llm).layers))
    freeze(model, cfg.trainable)
    groups = param_groups(model, cfg)
    module = build_pipeline_module(model, stages=stages, bucket=bucket, sample=sample,
                                   checkpoint_activations=cfg.model.gradient_checkpointing, log=log)
    groups = stage_param_groups(groups, module)
    if len(module.group_anchors) == len(groups):
        raise ConfigError(f"parallel.pipeline_stages: stage {module.stage_id} holds no trainable "
                          f"parameter of {cfg.trainable}; use fewer stages or train the LLM too")
    optimizer, scheduler = build_optimizer(groups, cfg, total_steps=total_steps, on_cuda=on_cuda)
    if not on_cuda:
        skip_shm_build()
    ds_config = build_ds_config(cfg, world_size // stages, on_cuda=on_cuda)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config)
    return engine, optimizer, scheduler


def data_parallel_coords(engine) -> tuple[int, int]:
    """(data-parallel rank, size): the loader splits the data by these, not by the global rank,
    since both ends of one pipeline must read the same micro-batches."""
    return engine.grid.data_parallel_id, engine.grid.data_parallel_size


def micro_batches(batches: Iterator[dict], device: torch.device, dtype: torch.dtype) -> Iterator[tuple]:
    """Loader batches as the engine's (inputs, labels) pairs; the frame mask travels as long
    (the engine's p2p layer does not take bool tensors)."""
    for batch in batches:
        inputs = (batch["features"].to(device, dtype=dtype), batch["frame_mask"].to(device).long(),
                  batch["input_ids"].to(device), batch["attention_mask"].to(device),
                  batch["labels"].to(device))
        yield inputs, inputs[-1]


def train_step(engine, data_iter: Iterator[tuple]) -> tuple[float, float, bool, float]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches:
    (loss averaged over micro-batches and data-parallel replicas, grad norm, skipped, seconds)."""
    skipped_before = engine.skipped_steps
    started = time.perf_counter()
    loss = engine.train_batch(data_iter=data_iter)
    norm = engine.get_global_grad_norm()
    return (float(loss), float(norm) if norm is not None else float("nan"),
            engine.skipped_steps != skipped_before, time.perf_counter() - started)


# ------------------------------------------------------------------------------------ export
def model_key_map(model: nn.Module, bucket: int = DEFAULT_BUCKET) -> list[dict[str, list[str]]]:
    """Per pipeline layer, its state_dict keys -> the VideoLLM state_dict keys holding that tensor
    (two for a tied embedding: the embedding's and the LM head's)."""
    names: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(name)
    out = []
    for layer in build_layers(model, bucket):
        module = _module_of(layer)
        saved = module.state_dict(keep_vars=True)
        out.append({k: names[id(t)] for k, t in saved.items()})
    return out


def pipeline_state_dict(folder: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The VideoLLM state dict from a pipeline checkpoint folder's `layer_XX-model_states.pt`.

    DeepSpeed writes each layer's module weights there (frozen ones included). Under fp32 these
    are the optimizer's weights themselves; a bf16 run's files hold the bf16 copy.
    """
    folder = Path(folder)
    state: dict[str, torch.Tensor] = {}
    for idx, mapping in enumerate(model_key_map(model)):
        files = sorted(folder.glob(f"layer_{idx:02d}-model_*states.pt"))
        if not files:
            raise FileNotFoundError(f"{folder}: layer_{idx:02d}-model_states.pt is missing; expected "
                                    "a checkpoint of a pipeline run of this model")
        saved = torch.load(files[0], map_location="cpu", weights_only=True)
        if set(saved) != set(mapping):
            raise ValueError(f"{files[0]}: keys {sorted(saved)[:4]}... do not match pipeline layer "
                             f"{idx} of the configured model ({sorted(mapping)[:4]}...)")
        for key, tensor in saved.items():
            state.update(dict.fromkeys(mapping[key], tensor))
    return state


def is_pipeline_checkpoint(folder: str | Path) -> bool:
    return any(Path(folder).glob("layer_*-model_*states.pt"))


# ------------------------------------------------------------------------------------ trainer
def data_parallel_layout(rank: int, world_size: int, stages: int) -> tuple[int, int]:
    """(replica, replicas) of a global rank under DeepSpeed's pipe-major topology
    (rank = stage x replicas + replica); the loader splits the data by these."""
    replicas = world_size // stages
    return rank % replicas, replicas


class PipelineSteps:
    """train.py's `train_step` for a pipeline engine: one `train_batch` per optimizer step.

    Only the first and the last stage draw batches (both the same ones: they share the replica's
    loader order); the counts in the StepResult are what this replica's first stage saw, summed
    over replicas, with the spliced visual tokens unknown outside the first stage (reported as the
    text tokens only).
    """

    def __init__(self, engine, batches: Iterator[dict], device: torch.device, dtype: torch.dtype):
        self.engine = engine
        # Per micro-batch (keys, text tokens, samples, patch tokens): not the batch itself, whose
        # features live in the loader's shared-memory ring and must be released for reuse.
        self._seen: list[tuple[list[str], float, float, float]] = []
        self._wait = 0.0
        self._data = micro_batches(self._record(batches), device, dtype)

    def _record(self, batches: Iterator[dict]) -> Iterator[dict]:
        while True:
            t0 = time.perf_counter()
            batch = next(batches)
            self._wait += time.perf_counter() - t0
            self._seen.append((list(batch["keys"]), float(batch["attention_mask"].sum()),
                               float(batch["input_ids"].shape[0]),
                               float(batch["frame_mask"].sum() * batch["features"].shape[2])))
            yield batch

    def __call__(self, info):
        import torch.distributed as dist

        from trainer.train import StepResult

        self._seen.clear()
        self._wait = 0.0
        loss, norm, skipped, _ = train_step(self.engine, self._data)
        counted = self.engine.is_first_stage()
        totals = torch.zeros(3, dtype=torch.float64, device=info.device)
        keys: list[str] = []
        for batch_keys, *counts in self._seen:
            keys += batch_keys
            if counted:
                totals += torch.tensor(counts, dtype=torch.float64, device=info.device)
        dist.all_reduce(totals)
        return StepResult(loss=loss, grad_norm=norm, skipped=skipped, tokens=int(totals[0]),
                          visual_tokens=0, samples=int(totals[1]), patch_tokens=int(totals[2]),
                          data_wait_s=self._wait, keys=keys)
