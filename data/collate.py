"""Batching: right-padded text, zero-padded frames with a frame mask, frames read in place.

Feature bytes are the bulk of a batch (64 x 196 x 1152 float16 is 29 MB per video), so they are
read from the shard straight into the batch tensor, which a DataLoader worker allocates in shared
memory: handing the batch to the trainer process then moves a file handle, not the data.
"""
from __future__ import annotations

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


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    if not shared:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def collate(samples: list[PreparedSample], reader: ShardReader, *, pad_id: int,
            features_dtype: str = "float32", shared: bool = False) -> tuple[dict, list[BadRecord]]:
    """The batch dict of the samples whose features read cleanly, and the failures.

    Returns ({} , failures) when no sample survives.
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
    features = _empty((len(kept), frames, patches, dim), DTYPES[features_dtype], shared)
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
    if len(good) < len(kept):  # rare: a record cut short after its header; compact the slots
        features = features[good].clone()
        if shared:
            features.share_memory_()
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
