"""Batching: right-padded text (or one packed row), zero-padded frames with a frame mask, frames
read in place.

Packed text (`pack=True`, data.pack_sequences): the samples' tokens are concatenated into one row
[1, sum of lengths] with no pad, and `cu_seqlens` [B + 1] (int32, flash-attention's name and
layout) holds where each sample begins, the last entry the total. Only boundaries are carried:
per-sample positions and sample ids follow from them, and the model must derive its own after it
splices the visual tokens in (each `<video>` token becomes hundreds of positions), so any computed
here would be stale there.

Feature bytes are the bulk of a batch (64 x 196 x 1152 float16 is 29 MB per video), so they are
read from the shard straight into the batch tensor, which a DataLoader worker allocates in shared
memory (a `FeatureRing` slot): handing the batch to the trainer process then moves a slot number,
not the data.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from data.records import BadRecord, RecordHead, ShardReader
from data.text import IGNORE_INDEX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def uniform_frame_indices(num_frames: int, max_frames: int) -> np.ndarray:
    """All frames, or `max_frames` of them spread evenly (the centre of each of equal bins)."""
    if num_frames <= max_frames:
        return np.arange(num_frames)
    return ((np.arange(max_frames) + 0.5) * num_frames / max_frames).astype(np.int64)


@dataclass
class PreparedSample:
    """A record whose text is tokenized and whose frames are chosen, features not yet read."""
    head: RecordHead
    source: str
    """The dataset folder the record came from (bad records are counted per source)."""
    input_ids: list[int]
    labels: list[int]
    frame_idx: np.ndarray


def pad_text(ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    lab = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        attention[i, : len(x)] = 1
        lab[i, : len(y)] = torch.tensor(y, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": lab}


def pack_text(ids: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
    """The samples' tokens in one row, `cu_seqlens` marking their boundaries (module docstring)."""
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(ids) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    input_ids = torch.tensor([t for x in ids for t in x], dtype=torch.long)[None]
    lab = torch.tensor([t for y in labels for t in y], dtype=torch.long)[None]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": lab,
            "cu_seqlens": cu_seqlens}


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor born in shared memory: sending it to another process copies nothing."""
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def storage_users(storage: torch.UntypedStorage) -> int:
    """How many tensors, arrays and storage objects of this process hold `storage` (1: only ours).

    This is what makes reused buffers safe: a buffer handed out in a batch is refilled only once
    every tensor viewing it (the batch's, a row sliced off it, a numpy array over it) is gone, so
    a consumer that keeps batches (a list of them, a test) keeps valid data, and one that drops
    each batch before the next gets warm memory back.
    """
    return torch._C._storage_Use_Count(storage._cdata)


def _view(storage: torch.UntypedStorage, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class BufferPool:
    """A few private buffers, touched once, lent out as batch tensors again and again.

    Fresh memory costs a page fault per 4 KiB on first touch (far more under a VM): copying a
    batch of 29 MB videos into new memory ran at a fifth of the read speed. A buffer is lent again
    only when nothing else references it (`storage_users`); while all are held, plain memory.
    """

    def __init__(self, size: int = 4):
        self.size = size
        self.buffers: list[torch.UntypedStorage] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        for i, buf in enumerate(self.buffers):
            if storage_users(buf) == 1:
                if buf.nbytes() < nbytes:  # a longer batch than before: grow this one
                    buf = self.buffers[i] = torch.UntypedStorage(nbytes)
                return _view(buf, shape, dtype)
        if len(self.buffers) < self.size:
            self.buffers.append(torch.UntypedStorage(nbytes))
            return _view(self.buffers[-1], shape, dtype)
        return torch.empty(shape, dtype=dtype)


class FeatureRing:
    """Shared-memory slots, touched once, that workers fill with batch features again and again.

    The slots are allocated by the trainer process before the workers fork, so both sides map
    the same pages: a worker sends only the slot number, and the trainer hands the slot itself
    out as the batch's features (no copy, no fresh pages). `state[slot]` is 0 when free, else
    the iteration (generation) whose worker filled it. A worker takes any free slot of its own;
    the trainer frees a slot once it has received it and nothing of its process views it any
    more (`storage_users`). When all of a worker's slots stay held (a consumer keeping batches),
    the worker falls back to fresh shared memory instead of waiting forever.
    """

    def __init__(self, *, workers: int, slots_per_worker: int, slot_bytes: int):
        self.slots_per_worker = slots_per_worker
        self.slot_bytes = -(-slot_bytes // 64) * 64
        self.storages = [torch.UntypedStorage._new_shared(self.slot_bytes)
                         for _ in range(workers * slots_per_worker)]
        for storage in self.storages:  # fault every page in now, once
            _view(storage, (self.slot_bytes,), torch.uint8).fill_(0)
        self.state = torch.zeros(workers * slots_per_worker, dtype=torch.int64).share_memory_()
        self.received: set[int] = set()
        """Slots the trainer process got from a worker and has not freed (trainer side only)."""

    def acquire(self, worker: int, generation: int, first: int, wait_s: float = 0.05) -> int | None:
        """A free slot of `worker`, trying `first` (mod its count) first; None after `wait_s`."""
        n, base = self.slots_per_worker, worker * self.slots_per_worker
        deadline = time.monotonic() + wait_s
        while True:
            for k in range(n):
                slot = base + (first + k) % n
                if int(self.state[slot]) == 0:
                    self.state[slot] = generation
                    return slot
            if time.monotonic() > deadline:
                return None
            time.sleep(2e-4)

    def free(self, slot: int) -> None:
        self.received.discard(slot)
        self.state[slot] = 0

    def collect(self) -> None:
        """Free every received slot that nothing references any more."""
        for slot in list(self.received):
            if storage_users(self.storages[slot]) == 1:
                self.free(slot)

    def new_iteration(self, generation: int) -> None:
        """After the workers drained the last iteration: slots its dropped (prefetched, never
        received) batches were filling are free again; received ones follow `collect`."""
        for slot in range(len(self.storages)):
            if 0 < int(self.state[slot]) < generation and slot not in self.received:
                self.state[slot] = 0
        self.collect()

    def view(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The slot as a tensor of `shape`, or None when that does not fit in a slot."""
        if int(np.prod(shape)) * dtype.itemsize > self.slot_bytes:
            return None
        return _view(self.storages[slot], shape, dtype)

    def owns(self, slot: int, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() == self.storages[slot].data_ptr()


def collate(samples: list[PreparedSample], reader: ShardReader, *, pad_id: int,
            features_dtype: str = "float16", alloc=None,
            pack: bool = False) -> tuple[dict, list[tuple[PreparedSample, BadRecord]]]:
    """The batch dict of the samples whose features read cleanly, and the failed ones; text
    right-padded to the longest sample, or packed into one row (`pack`, module docstring).

    `alloc(shape, dtype)` gives the features tensor (a ring slot, shared memory, or plain memory).
    Returns ({}, failures) when no sample survives.
    """
    _, patches, dim = samples[0].head.shape
    failures: list[tuple[PreparedSample, BadRecord]] = []
    kept = []
    for s in samples:
        if s.head.shape[1:] != (patches, dim):
            failures.append((s, BadRecord("shape", f"[P, D] {list(s.head.shape[1:])} differs from the "
                                                   f"batch's {[patches, dim]}", shard=s.head.path, key=s.head.key)))
        else:
            kept.append(s)
    frames = max(len(s.frame_idx) for s in kept)
    shape, dtype = (len(kept), frames, patches, dim), DTYPES[features_dtype]
    features = alloc(shape, dtype) if alloc is not None else torch.empty(shape, dtype=dtype)
    good = []
    for i, s in enumerate(kept):
        n = len(s.frame_idx)
        try:
            reader.read_frames(s.head, s.frame_idx, features[i, :n])
        except BadRecord as e:
            failures.append((s, e))
            continue
        features[i, n:] = 0
        good.append(i)
    if not good:
        return {}, failures
    if len(good) < len(kept):  # rare: a record cut short after its header; compact in place
        for j, i in enumerate(good):
            if i != j:
                features[j] = features[i]
        features = features[: len(good)]
    kept = [kept[i] for i in good]
    frame_mask = torch.zeros((len(kept), frames), dtype=torch.bool)
    timestamps = torch.zeros((len(kept), frames), dtype=torch.float32)
    for i, s in enumerate(kept):
        frame_mask[i, : len(s.frame_idx)] = True
        ts = np.asarray(s.head.meta["timestamps"], dtype=np.float32)[s.frame_idx]
        timestamps[i, : len(ts)] = torch.from_numpy(ts)
    text = ([s.input_ids for s in kept], [s.labels for s in kept])
    batch = pack_text(*text) if pack else pad_text(*text, pad_id)
    batch.update(features=features, frame_mask=frame_mask, timestamps=timestamps,
                 keys=[s.head.key for s in kept])
    return batch, failures
