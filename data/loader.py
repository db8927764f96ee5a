"""The streaming loader: deterministic, rank- and worker-split, sample-exact resumable batches.

    loader = VideoLoader([("shards/llava", 2.0), ("shards/mcq", 1.0)], tokenizer, batch_size=4,
                         seed=0, rank=rank, world_size=world, num_workers=2, max_frames=64)
    loader.load_state_dict(saved)        # optional: resume
    for batch in loader: ...             # the rest of the current epoch, then the epoch advances
    saved = loader.state_dict()          # a handful of integers

Each source's index.json is first checked against its shards (data/dataset.py; how far:
`data.verify_index`): a stale, duplicated or escaping index is a one-line error before training.

The scheme, in order:
1. Epoch sequence. Mixture epoch `e` has `samples_per_epoch` = N positions (default: the sum of
   the sources' sample counts). Source s gets c_s of them (largest-remainder apportionment of N by
   weight), interleaved by a permutation seeded with (seed, e). Each source is an endless stream of
   its own epochs, each a permutation of its samples seeded with (seed, source, source epoch); the
   mixture epoch e continues source s at stream position e * c_s. With one source (or weights in
   proportion to sizes) a mixture epoch is exactly one pass: every sample once.
   With `group_by_length`, the epoch's positions are then cut into groups of `group_size` and
   each group is reordered by estimated length (Source.lengths: shard-table member sizes, nothing
   read), ties kept in their shuffled order: still a pure function of (seed, epoch), and the same
   global order at every world size and batch size.
2. Ranks. The sequence is consumed in global batches of world_size x batch_size positions; rank r
   takes positions r, r + W, r + 2W, ... of each global batch. Every rank therefore has
   ceil(N / (W B)) batches per epoch whatever the shard sizes, and the last global batch is split
   as evenly as possible; a rank left with nothing (fewer than W positions remain) repeats one
   early sample of the epoch rather than making the others wait (counted in `repeats`).
3. Workers. Worker w of a rank builds batches w, w + n, w + 2n, ... (whole batches, read and
   collated in the worker); DataLoader hands them back round-robin, i.e. in batch order, so the
   sequence does not depend on the number of workers.
4. State. (epoch, offset): offset = first position of the next global batch the consumer has not
   received; batches prefetched but not received do not count. Resuming at any world size or
   batch size continues from that offset: nothing is skipped, and at the same world size the
   remaining sequence is identical.
5. Bad records (data/records.py checks each to its leaves: tar, npy header, metadata, text) are
   skipped, counted per source and reason (`bad_counts`) and the first BAD_RECORDS_LOGGED logged
   with shard and key; a batch whose records are all bad takes the next readable record of the
   epoch instead (a counted repeat), so no rank ever yields fewer batches. A source whose bad
   fraction passes `bad_fraction_limit` stops the run; a single bad record never does.
6. Transport. Workers persist across epochs (the epoch to build is passed through a shared
   tensor) and read features straight into slots of a shared-memory ring the trainer process
   allocated before forking them (data/collate.py: FeatureRing); a batch crosses the process
   boundary as a slot number, and the slot itself is the batch's features (`zero_copy`, the
   default; or they are copied into a reused private buffer). A slot is refilled only once
   nothing in the trainer process references it any more, so kept batches stay valid.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.collate import (DTYPES, BufferPool, FeatureRing, PreparedSample, collate, shared_empty,
                          uniform_frame_indices)
from data.config import DataConfig, DataSource
from data.dataset import DatasetError, open_dataset
from data.records import FEATURES_MEMBER, META_MEMBER, BadRecord, ShardReader
from data.text import record_conversations, tokenize_conversation

log = logging.getLogger(__name__)
STATE_VERSION = 1
_MAX_FALLBACK = 64
# Batches a training loop still references when the next arrives: the one in its hands and the
# one before it (its variable is rebound only after `next` returns); ring slots per worker count it.
ZERO_COPY_HOLD = 2
BAD_RECORDS_LOGGED = 20
"""Distinct bad records named one by one (shard, key, reason) in the log per loader; later ones
are only counted."""
_SMALL = ("input_ids", "attention_mask", "labels", "frame_mask", "timestamps", "cu_seqlens")
_TEXT_BYTES_PER_TOKEN = 4
"""Metadata bytes per text token in the length estimate (BPE averages ~4 bytes of English)."""


class Source:
    """One dataset folder: its shards in index order and their sample counts, the index checked
    against the shards as `verify` says (data/dataset.py; DatasetError when it does not hold)."""

    def __init__(self, path: str, weight: float, verify: str = "counts"):
        self.path, self.weight = str(path), float(weight)
        dataset = open_dataset(path, verify=verify)
        self.shards = [s.path for s in dataset.shards]
        self.tables = dataset.tables  # scanned once here, inherited by the forked workers
        self.ends = np.cumsum([s.samples for s in dataset.shards])
        self.size = int(self.ends[-1]) if len(self.ends) else 0
        if self.size == 0:
            raise DatasetError(f"{Path(path) / 'index.json'}: no samples")

    def lengths(self, max_frames: int, tokens_per_frame: float) -> np.ndarray:
        """Estimated LLM length of every sample, for length grouping: frames x tokens_per_frame
        (frames capped at `max_frames`) + text bytes / 4. Only the shard tables are used, no
        feature or text byte is read: frames follow from the features member's size, text bytes
        are the metadata member's size less its timestamps (which grow with the frames: ~8 bytes
        each, an hour at 1 fps is ~30 KB). Header size, frame size and bytes per timestamp are
        measured on the source's first readable record. A record missing from its tar gets 0."""
        reader = ShardReader(check_finite=False, tables=self.tables)
        try:
            header, frame_bytes, stamp_bytes = self._layout(reader)
            out = np.zeros(self.size, dtype=np.float64)
            start = 0
            for path, end in zip(self.shards, self.ends):
                for i, (_, members) in enumerate(reader.table(path).records[: int(end) - start]):
                    feats, meta = members.get(FEATURES_MEMBER), members.get(META_MEMBER)
                    frames = max(0, feats.size - header) // frame_bytes if feats is not None else 0
                    text = max(0.0, meta.size - frames * stamp_bytes) if meta is not None else 0.0
                    out[start + i] = min(frames, max_frames) * tokens_per_frame + text / _TEXT_BYTES_PER_TOKEN
                start = int(end)
        finally:
            reader.close()
        return out

    def _layout(self, reader: ShardReader) -> tuple[int, int, float]:
        """(npy header bytes, bytes per frame, metadata bytes per timestamp) measured on the first
        readable of the source's records."""
        for index in range(min(self.size, _MAX_FALLBACK)):
            try:
                head = reader.head(*self.locate(index))
            except BadRecord:
                continue
            path, i = self.locate(index)
            member = reader.table(path).records[i][1][FEATURES_MEMBER]
            stamps = json.dumps(head.meta["timestamps"], ensure_ascii=False)
            return (head.data_offset - member.offset, 2 * head.shape[1] * head.shape[2],
                    len(stamps.encode()) / head.shape[0])
        raise DatasetError(f"{self.path}: none of the first {_MAX_FALLBACK} records is readable; "
                           "cannot estimate lengths for data.group_by_length")

    def locate(self, index: int) -> tuple[str, int]:
        shard = int(np.searchsorted(self.ends, index, side="right"))
        return self.shards[shard], index - (int(self.ends[shard - 1]) if shard else 0)


def apportion(total: int, weights: list[float]) -> list[int]:
    """Integer shares of `total` proportional to `weights`, summing to `total` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    exact = w * total
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


class EpochPlan:
    """Position in a mixture epoch -> (source, sample index); a pure function of (seed, epoch).

    With `lengths` (one array per source) the positions are regrouped by length in groups of
    `group_size` (scheme step 1); `order[p]` is then the ungrouped position that p stands for.
    """

    def __init__(self, sizes: list[int], weights: list[float], samples_per_epoch: int, seed: int, epoch: int,
                 lengths: list[np.ndarray] | None = None, group_size: int = 0):
        self.sizes, self.seed, self.epoch, self.length = sizes, seed, epoch, samples_per_epoch
        self.counts = apportion(samples_per_epoch, weights)
        order = np.repeat(np.arange(len(sizes), dtype=np.int32), self.counts)
        np.random.default_rng([seed, epoch, 0x6D6978]).shuffle(order)
        self.source_of = order
        self.rank_in_source = np.empty(len(order), dtype=np.int64)  # earlier positions of the same source
        for s in range(len(sizes)):
            where = np.flatnonzero(order == s)
            self.rank_in_source[where] = np.arange(len(where))
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self.order = self._grouped(lengths, group_size) if lengths is not None else None

    def _grouped(self, lengths: list[np.ndarray], group_size: int) -> np.ndarray:
        """Ungrouped positions sorted by length within each group of `group_size` (stable: equal
        lengths keep their shuffled order). Computed for the whole epoch at once, vectorized."""
        length = np.empty(self.length, dtype=np.float64)
        for s in range(len(self.sizes)):
            where = np.flatnonzero(self.source_of == s)
            stream = self.epoch * self.counts[s] + np.arange(len(where))
            source_epochs, j = np.divmod(stream, self.sizes[s])
            for e in np.unique(source_epochs):
                hit = source_epochs == e
                length[where[hit]] = lengths[s][self._perm(s, int(e))[j[hit]]]
        order = np.arange(self.length)
        for first in range(0, self.length, group_size):
            group = order[first: first + group_size]
            order[first: first + group_size] = group[np.argsort(length[group], kind="stable")]
        return order

    def _perm(self, source: int, source_epoch: int) -> np.ndarray:
        key = (source, source_epoch)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, source, source_epoch]).permutation(self.sizes[source])
        return self._perms[key]

    def item(self, position: int) -> tuple[int, int, int]:
        """(source, sample index within the source, source epoch) at `position`."""
        if self.order is not None:
            position = int(self.order[position])
        s = int(self.source_of[position])
        stream = self.epoch * self.counts[s] + int(self.rank_in_source[position])
        source_epoch, j = divmod(stream, self.sizes[s])
        return s, int(self._perm(s, source_epoch)[j]), source_epoch

    def rank_batch(self, start: int, batch: int, rank: int, world: int, batch_size: int) -> tuple[list[int], bool]:
        """Positions of `rank`'s batch number `batch` counted from offset `start`; True if padded."""
        first = start + batch * world * batch_size
        positions = list(range(first + rank, min(first + world * batch_size, self.length), world))
        if positions:
            return positions, False
        return [(rank - (self.length - first)) % self.length], True


@dataclass(frozen=True)
class _Spec:
    """What the workers need to build batches: no reference back to the VideoLoader, so dropping
    the loader frees its workers and ring at once instead of at the next garbage collection."""
    config: DataConfig
    sources: list[Source]
    tokenizer: object
    pad_id: int
    rank: int
    world_size: int
    samples_per_epoch: int
    lengths: list[np.ndarray] | None
    """Estimated length of every sample per source, when grouping by length (else None)."""

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan([s.size for s in self.sources], [s.weight for s in self.sources],
                         self.samples_per_epoch, self.config.seed, epoch, self.lengths,
                         self.config.group_size)


class _BatchStream(IterableDataset):
    """Builds this rank's batches `first, first+1, ...`; in worker w only those with index = w mod n.

    Which epoch, from which offset and how many batches is read from `job`, a shared tensor the
    trainer process sets before each iteration: the workers persist across epochs (no fork per
    epoch) and still follow every `set_epoch` / `load_state_dict`.
    """

    def __init__(self, spec: _Spec, job: torch.Tensor, ring: FeatureRing | None, pool: BufferPool | None = None):
        self.spec, self.job, self.ring, self.pool = spec, job, ring, pool
        self.plan: EpochPlan | None = None

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, self.start, num_batches, generation = (int(x) for x in self.job)
        if self.plan is None or self.plan.epoch != epoch:
            self.plan = self.spec.plan(epoch)
        cfg = self.spec.config
        reader = ShardReader(num_patches=cfg.num_patches, feature_dim=cfg.feature_dim,
                             check_finite=cfg.check_finite,
                             tables={p: t for s in self.spec.sources for p, t in s.tables.items()})
        try:
            for count, b in enumerate(range(worker, num_batches, workers)):
                if info is None:
                    yield (b, *self._build(b, reader, self.pool.empty if self.pool else None), None)
                    continue
                slot = self.ring.acquire(worker, generation, count) if self.ring is not None else None
                batch, stats = self._build(b, reader, self._slot_alloc(slot))
                where = None
                if slot is not None and self.ring.owns(slot, batch["features"]):
                    feats = batch.pop("features")  # the trainer process maps the same pages
                    where = (slot, tuple(feats.shape), str(feats.dtype).removeprefix("torch."))
                    del feats
                elif slot is not None:
                    self.ring.free(slot)  # the batch did not fit the slot
                # Small tensors as numpy arrays: pickled inline, where each tensor would cost a
                # shared-memory file and a socket round trip to pass its descriptor (~2 ms each).
                yield b, {k: v.numpy() if k in _SMALL else v for k, v in batch.items()}, stats, where
        finally:
            reader.close()

    def _slot_alloc(self, slot: int | None):
        def alloc(shape, dtype):
            view = self.ring.view(slot, shape, dtype) if slot is not None else None
            return view if view is not None else shared_empty(shape, dtype)
        return alloc

    def _prepare(self, position: int, reader: ShardReader) -> PreparedSample:
        spec, cfg = self.spec, self.spec.config
        s, index, source_epoch = self.plan.item(position)
        head = reader.head(*spec.sources[s].locate(index))
        try:
            convs = record_conversations(head.meta)
            if not convs:
                raise ValueError("no conversation and no answered qa item")
            pick = 0 if len(convs) == 1 else int(
                np.random.default_rng([cfg.seed, s, source_epoch, index]).integers(len(convs)))
            ids, labels = tokenize_conversation(spec.tokenizer, convs[pick], cfg.max_text_len)
        except ValueError as e:
            raise BadRecord("text", str(e), shard=head.path, key=head.key) from None
        return PreparedSample(head=head, source=spec.sources[s].path, input_ids=ids, labels=labels,
                              frame_idx=uniform_frame_indices(head.shape[0], cfg.max_frames))

    def _collate(self, prepared: list[PreparedSample], reader: ShardReader, alloc):
        if not prepared:
            return {}, []
        return collate(prepared, reader, pad_id=self.spec.pad_id,
                       features_dtype=self.spec.config.features_dtype, alloc=alloc,
                       pack=self.spec.config.pack_sequences)

    def _build(self, b: int, reader: ShardReader, alloc) -> tuple[dict, dict]:
        spec = self.spec
        positions, padded = self.plan.rank_batch(self.start, b, spec.rank, spec.world_size,
                                                 spec.config.batch_size)
        # Plain dicts: DataLoader's default conversion would re-add a Counter into its own copy.
        seen, bad, lines = {}, {}, []
        prepared = []
        for p in positions:
            source = spec.sources[self.plan.item(p)[0]].path
            seen[source] = seen.get(source, 0) + 1
            try:
                prepared.append(self._prepare(p, reader))
            except BadRecord as e:
                bad[source, e.reason] = bad.get((source, e.reason), 0) + 1
                lines.append((source, e.where, e.line()))
        batch, failures = self._collate(prepared, reader, alloc)
        for sample, e in failures:
            bad[sample.source, e.reason] = bad.get((sample.source, e.reason), 0) + 1
            lines.append((sample.source, e.where, e.line()))
        repeats, fallback, attempts = int(padded), positions[-1], 0
        while not batch:  # every record bad: take the next readable one so this rank keeps pace
            fallback, attempts = (fallback + 1) % self.plan.length, attempts + 1
            if attempts > min(_MAX_FALLBACK, self.plan.length):
                raise RuntimeError(f"{attempts - 1} unreadable records in a row after epoch position "
                                   f"{positions[0]}: check the shards of {sorted(seen)}")
            try:
                batch, _ = self._collate([self._prepare(fallback, reader)], reader, alloc)
            except BadRecord:
                continue
            repeats += 1
        return batch, {"seen": seen, "bad": bad, "repeats": repeats, "bad_lines": lines}


def _as_is(item):
    return item


def _as_source(item) -> DataSource:
    if isinstance(item, (str, os.PathLike)):
        return DataSource(path=str(item))
    if isinstance(item, (tuple, list)):
        return DataSource(path=str(item[0]), weight=float(item[1]))
    if isinstance(item, dict):
        return DataSource(**item)
    return DataSource(path=str(item.path), weight=float(getattr(item, "weight", 1.0)))


class VideoLoader:
    """Batches for one data-parallel rank; iterate for the rest of the current epoch."""

    def __init__(self, sources, tokenizer, *, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, **options):
        if not 0 <= rank < world_size:
            raise ValueError(f"VideoLoader: rank {rank} outside world_size {world_size}")
        self.config = DataConfig(sources=[_as_source(s) for s in sources], batch_size=batch_size,
                                 seed=seed, num_workers=num_workers, **options)
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rank, self.world_size = rank, world_size
        self.sources = [Source(s.path, s.weight, self.config.verify_index)
                        for s in self.config.sources if s.weight > 0]
        self.samples_per_epoch = self.config.samples_per_epoch or sum(s.size for s in self.sources)
        self.epoch, self.offset = 0, 0
        self.seen: Counter = Counter()
        self.bad: Counter = Counter()  # (source, reason) -> count
        self.repeats = 0
        self._bad_records: dict[str, set[str]] = {}  # source -> shard and key of each bad record
        self._plan: EpochPlan | None = None
        cfg = self.config
        lengths = ([s.lengths(min(cfg.max_frames, cfg.group_kept_frames), cfg.group_tokens_per_frame)
                    for s in self.sources]
                   if cfg.group_by_length else None)  # before the workers fork: they inherit them
        self._spec = _Spec(config=cfg, sources=self.sources, tokenizer=tokenizer, pad_id=self.pad_id,
                           rank=rank, world_size=world_size, samples_per_epoch=self.samples_per_epoch,
                           lengths=lengths)
        self._ring: FeatureRing | None = None
        self._pool: DataLoader | None = None
        self._buffers = BufferPool()  # copies out of the ring, or batches built in-process
        self._generation = 0
        self._job = torch.zeros(4, dtype=torch.int64).share_memory_()  # epoch, offset, batches, generation

    @classmethod
    def from_config(cls, config: DataConfig, tokenizer, *, rank: int = 0, world_size: int = 1) -> VideoLoader:
        options = config.to_dict()
        sources = [DataSource(**s) for s in options.pop("sources")]
        return cls(sources, tokenizer, rank=rank, world_size=world_size, **options)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.world_size * self.config.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.samples_per_epoch / self.global_batch)

    def __len__(self) -> int:
        """Batches left in the current epoch (all of them unless resumed mid-epoch)."""
        return math.ceil((self.samples_per_epoch - self.offset) / self.global_batch)

    # -- counters for metrics ------------------------------------------------------------------
    @property
    def bad_counts(self) -> dict[str, int]:
        out: Counter = Counter()
        for (_, reason), n in self.bad.items():
            out[reason] += n
        return dict(out)

    @property
    def bad_counts_by_source(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (source, reason), n in self.bad.items():
            out.setdefault(source, {})[reason] = n
        return out

    def _account(self, stats: dict, epoch_done: bool) -> None:
        self.seen.update(stats["seen"])
        self.bad.update(stats["bad"])
        for source, where, line in stats["bad_lines"]:
            if where in self._bad_records.setdefault(source, set()):
                continue  # the same record again, in a later epoch: counted, already named
            self._bad_records[source].add(where)
            if sum(map(len, self._bad_records.values())) <= BAD_RECORDS_LOGGED:
                log.warning("loader rank %d: skipped bad record %s", self.rank, line)
        self.repeats += stats["repeats"]
        if stats["repeats"]:
            log.info("loader rank %d epoch %d: %d sample(s) repeated to fill a batch (total %d)",
                     self.rank, self.epoch, stats["repeats"], self.repeats)
        cfg = self.config
        for src in {source for source, _ in (self.bad if epoch_done else stats["bad"])}:
            bad = sum(n for (s, _), n in self.bad.items() if s == src)
            # One bad record (seen once per epoch) is never a reason to stop, whatever the
            # fraction in a small source.
            several = len(self._bad_records.get(src, ())) > 1
            checked = self.seen[src] >= cfg.bad_check_after or epoch_done
            if several and checked and bad > cfg.bad_fraction_limit * self.seen[src]:
                raise RuntimeError(f"data source {src}: {bad} of {self.seen[src]} records bad "
                                   f"{self.bad_counts_by_source[src]}, above data.bad_fraction_limit="
                                   f"{cfg.bad_fraction_limit}")

    # -- order and state -----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless it is the epoch already in progress (resume)."""
        if epoch != self.epoch:
            self.epoch, self.offset = epoch, 0

    def epoch_plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = self._spec.plan(epoch)
        return self._plan

    def _fingerprint(self) -> dict:
        out = {"seed": self.config.seed, "samples_per_epoch": self.samples_per_epoch,
               "sources": [[s.path, s.weight, s.size] for s in self.sources]}
        cfg = self.config
        if cfg.group_by_length:  # only then: states saved before grouping existed still load
            out["length_groups"] = [cfg.group_size, cfg.group_tokens_per_frame,
                                    min(cfg.max_frames, cfg.group_kept_frames)]
        return out

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "offset": self.offset,
                "world_size": self.world_size, "batch_size": self.config.batch_size,
                "repeats": self.repeats, **self._fingerprint()}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Resume from this rank's saved state, or from the states of every rank of the old run.

        With several states (a new world size), the earliest position wins so nothing is skipped;
        samples the ahead ranks had already taken come again and are counted in `repeats`.
        """
        states = state if isinstance(state, list) else [state]
        mine = self._fingerprint()
        for st in states:
            if st.get("version") != STATE_VERSION:
                raise ValueError(f"loader state: version {st.get('version')}, expected {STATE_VERSION}")
            theirs = {k: st.get(k) for k in mine}
            if json.loads(json.dumps(theirs)) != json.loads(json.dumps(mine)):
                raise ValueError(f"loader state: saved for {theirs}, this loader has {mine}: the order "
                                 "would differ; start the stage afresh instead of resuming")
        positions = sorted((st["epoch"] * self.samples_per_epoch + st["offset"]) for st in states)
        self.epoch, self.offset = divmod(positions[0], self.samples_per_epoch)
        self.repeats = max(st.get("repeats", 0) for st in states) + positions[-1] - positions[0]
        if positions[-1] != positions[0]:
            log.warning("loader resume: ranks had stopped at different positions; %d samples will "
                        "repeat", positions[-1] - positions[0])
        old = states[0]
        if (old["world_size"], old["batch_size"]) != (self.world_size, self.config.batch_size):
            log.info("loader resume: world x batch %d x %d -> %d x %d, continuing epoch %d at sample "
                     "%d of %d", old["world_size"], old["batch_size"], self.world_size,
                     self.config.batch_size, self.epoch, self.offset, self.samples_per_epoch)

    # -- iteration -----------------------------------------------------------------------------
    def _feature_ring(self, plan: EpochPlan) -> FeatureRing | None:
        """A ring sized from the first readable record's [P, D]; None if none is found."""
        cfg = self.config
        patches, dim = cfg.num_patches, cfg.feature_dim
        if patches is None or dim is None:
            reader = ShardReader(check_finite=False, tables={p: t for s in self.sources for p, t in s.tables.items()})
            for position in range(min(plan.length, 16)):
                s, index, _ = plan.item(position)
                try:
                    _, patches, dim = reader.head(*self.sources[s].locate(index)).shape
                    break
                except BadRecord:
                    continue
            reader.close()
            if patches is None or dim is None:
                return None
        slot_bytes = cfg.batch_size * cfg.max_frames * patches * dim * DTYPES[cfg.features_dtype].itemsize
        slots = cfg.prefetch_factor + 1 + (ZERO_COPY_HOLD if cfg.zero_copy else 0)  # queued, building, held
        return FeatureRing(workers=cfg.num_workers, slots_per_worker=slots, slot_bytes=slot_bytes)

    def _workers(self, plan: EpochPlan) -> DataLoader:
        """The persistent worker pool, started on first use (forked: it shares the ring's pages)."""
        if self._pool is None:
            self._ring = self._feature_ring(plan)
            stream = _BatchStream(self._spec, self._job, self._ring)
            self._pool = DataLoader(stream, batch_size=None, num_workers=self.config.num_workers,
                                    prefetch_factor=self.config.prefetch_factor, collate_fn=_as_is,
                                    persistent_workers=True)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes now rather than when the loader is garbage-collected."""
        self._pool = None

    def _receive(self, source):
        """(b, batch, stats) in order, features mapped from (or copied out of) the ring."""
        ring = self._ring
        for b, batch, stats, where in source:
            for k in _SMALL:
                if k in batch:  # cu_seqlens only in packed batches
                    batch[k] = torch.from_numpy(batch[k])
            if where is not None:
                slot, shape, dtype = where
                ring.received.add(slot)
                view = ring.view(slot, shape, getattr(torch, dtype))
                if self.config.zero_copy:
                    batch["features"] = view
                else:
                    batch["features"] = self._buffers.empty(shape, view.dtype).copy_(view)
                del view
            if ring is not None:
                ring.collect()
            yield b, batch, stats

    def __iter__(self):
        plan, start, num_batches = self.epoch_plan(self.epoch), self.offset, len(self)
        self._generation += 1
        self._job.copy_(torch.tensor([self.epoch, start, num_batches, self._generation]))
        if self.config.num_workers > 0:
            workers = iter(self._workers(plan))  # waits for the workers to drop the last iteration
            if self._ring is not None:
                self._ring.new_iteration(self._generation)
            source = self._receive(workers)
        else:
            source = (item[:3] for item in _BatchStream(self._spec, self._job, None, self._buffers))
        for expected, (b, batch, stats) in enumerate(source):
            if b != expected:
                raise RuntimeError(f"loader: batch {b} arrived where {expected} was due (DataLoader order)")
            self.offset = min(start + (b + 1) * self.global_batch, self.samples_per_epoch)
            done = self.offset >= self.samples_per_epoch
            self._account(stats, done)
            if done:
                self.epoch, self.offset = self.epoch + 1, 0
            yield batch
