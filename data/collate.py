"""Batching: right-padded text, zero-padded frames with a frame mask, frames read in place.

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


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor born in shared memory: sending it to another process copies nothing."""
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class FeatureRing:
    """Shared-memory slots, touched once, that workers fill with batch features again and again.

    Fresh memory costs a page fault per 4 KiB on first touch (and far more under a VM); a batch of
    29 MB videos would pay it on every batch, in the worker and again in the trainer. The ring is
    allocated by the trainer process before the workers fork, so both sides see the same pages:
    a worker sends only the slot number. Worker w owns slots [w S, (w + 1) S) and uses them in
    turn; it waits until the trainer process has released a slot before refilling it, so a slot is
    never overwritten while in use, whatever the DataLoader prefetches.
    """

    def __init__(self, *, workers: int, slots_per_worker: int, slot_bytes: int):
        self.slots_per_worker = slots_per_worker
        self.slot_bytes = -(-slot_bytes // 64) * 64
        self.storage = torch.UntypedStorage._new_shared(workers * slots_per_worker * self.slot_bytes)
        torch.empty(0, dtype=torch.uint8).set_(self.storage).fill_(0)  # fault every page in now
        self.busy = torch.zeros(workers * slots_per_worker, dtype=torch.int32).share_memory_()

    def fits(self, workers: int, slots_per_worker: int, slot_bytes: int) -> bool:
        return (len(self.busy) == workers * slots_per_worker and self.slots_per_worker == slots_per_worker
                and slot_bytes <= self.slot_bytes)

    def reset(self) -> None:
        self.busy.zero_()

    def acquire(self, worker: int, count: int) -> int:
        slot = worker * self.slots_per_worker + count % self.slots_per_worker
        while int(self.busy[slot]):
            time.sleep(2e-4)
        self.busy[slot] = 1
        return slot

    def release(self, slot: int) -> None:
        self.busy[slot] = 0

    def view(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The slot as a tensor of `shape`, or None when that does not fit in a slot."""
        if int(np.prod(shape)) * dtype.itemsize > self.slot_bytes:
            return None
        offset = slot * self.slot_bytes // dtype.itemsize
        return torch.empty(0, dtype=dtype).set_(self.storage, offset, shape)


def collate(samples: list[PreparedSample], reader: ShardReader, *, pad_id: int,
            features_dtype: str = "float16", alloc=None) -> tuple[dict, list[tuple[PreparedSample, BadRecord]]]:
    """The batch dict of the samples whose features read cleanly, and the failed ones.

    `alloc(shape, dtype)` gives the features tensor (a ring slot, shared memory, or plain memory).
    Returns ({}, failures) when no sample survives.
    """
    _, patches, dim = samples[0].head.shape
    failures: list[tuple[PreparedSample, BadRecord]] = []
    kept = []
    for s in samples:
        if s.head.shape[1:] != (patches, dim):
            failures.append((s, BadRecord("shape", f"{s.head.key}: [P, D] {list(s.head.shape[1:])} "
                                                   f"differs from the batch's {[patches, dim]}")))
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
    batch = pad_text([s.input_ids for s in kept], [s.labels for s in kept], pad_id)
    batch.update(features=features, frame_mask=frame_mask, timestamps=timestamps,
                 keys=[s.head.key for s in kept])
    return batch, failures
