"""A dataset folder (shards + index.json from `mambamia convert`): its index read and checked against
the shards it describes, and one sequential record reader for every consumer that is not the
training loader (eval, the demo), with the loader's checks (data/records.py).

    dataset = open_dataset("shards/val", verify="counts")
    for record in iter_records(dataset, want_features=lambda position: position % 2 == 0):
        record.key, record.meta, record.features    # features: float16 [F, P, D] or None

What `open_dataset` checks (each failure is a DatasetError: one line naming index.json and shard):
- always, from metadata only: the index is a JSON object with a list of shards, each a plain
  relative file name inside the folder (no absolute path, no '..'), listed once, with integer
  sample and byte counts; every listed shard exists. A byte count that differs from the file is a
  warning (a damaged shard: its bad records are skipped and counted as they are met).
- `verify="counts"` (the default) also scans every shard's tar headers (header blocks only, the
  data is skipped by seeking; the table is then reused for reading, so nothing is scanned twice):
  a compressed or non-tar shard is refused, and a sample count that differs from the tar's is an
  error (the index is stale: training would skip or repeat data), except for a tar cut short,
  whose lost records are skipped and counted as truncated (a warning).
- `verify="sha256"` also reads every byte and compares the checksums (what `--verify` costs: a
  full read of the dataset).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import numpy as np

from data.config import VERIFY_INDEX
from data.records import ShardReader, ShardTable, scan_shard
from data.shards import file_sha256

log = logging.getLogger(__name__)
INDEX_NAME = "index.json"
MAX_INDEX_BYTES = 256 << 20
"""An index lists shards (~150 bytes each); a larger file is refused before it is read."""


class DatasetError(ValueError):
    """index.json does not describe the folder it is in; the message is one line."""


class DatasetMissing(DatasetError, FileNotFoundError):
    """No index.json in the folder."""


@dataclass(frozen=True)
class ShardEntry:
    name: str
    path: str
    samples: int
    bytes: int
    sha256: str | None


@dataclass
class Dataset:
    folder: str
    shards: list[ShardEntry]
    tables: dict[str, ShardTable] = field(default_factory=dict)
    """Scanned shard tables by path (empty with verify='none'): readers reuse them."""

    @property
    def size(self) -> int:
        return sum(s.samples for s in self.shards)

    def reader(self, **options) -> ShardReader:
        return ShardReader(tables=self.tables, **options)


def read_index(index_path: Path) -> dict:
    """index.json parsed; DatasetError for anything that is not a JSON object of bounded size."""
    if not index_path.is_file():
        raise DatasetMissing(f"{index_path}: missing; expected a dataset folder written by `mambamia "
                             f"convert` (or run `mambamia convert --merge-only {index_path.parent}`)")
    if index_path.stat().st_size > MAX_INDEX_BYTES:
        raise DatasetError(f"{index_path}: {index_path.stat().st_size} bytes, above the "
                           f"{MAX_INDEX_BYTES} limit of an index")
    try:
        index = json.loads(index_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{index_path}: not JSON ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise DatasetError(f"{index_path}: not an index (nested too deeply)") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise DatasetError(f"{index_path}: expected {{'shards': [{{'name', 'samples', 'bytes', 'sha256'}}, ...]}}")
    return index


def _entry(index_path: Path, i: int, raw, seen: set[str]) -> ShardEntry:
    where = f"{index_path}: shards[{i}]"
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: expected an object with 'name', 'samples', 'bytes'")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise DatasetError(f"{where} 'name': expected a shard file name, got {str(name)[:80]!r}")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts:
        raise DatasetError(f"{where} 'name' {name[:80]!r}: expected a file inside {index_path.parent} "
                           "(no absolute path, no '..')")
    if name in seen:
        raise DatasetError(f"{where} 'name' {name[:80]!r}: listed twice (its samples would be read twice)")
    seen.add(name)
    counts = [raw.get(k) for k in ("samples", "bytes")]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise DatasetError(f"{where} ({name}): 'samples' and 'bytes': expected integers >= 0, got {counts}")
    sha = raw.get("sha256")
    if sha is not None and not isinstance(sha, str):
        raise DatasetError(f"{where} ({name}) 'sha256': expected a string")
    path = str(index_path.parent / name)
    if not os.path.isfile(path):
        raise DatasetError(f"{where}: shard {path} listed but missing")
    return ShardEntry(name=name, path=path, samples=counts[0], bytes=counts[1], sha256=sha or None)


def _check_counts(index_path: Path, entry: ShardEntry, table: ShardTable) -> None:
    found = len(table.records)
    if table.unreadable:
        raise DatasetError(f"{index_path}: shard {entry.name}: {table.problem}")
    if found == entry.samples:
        return
    if table.problem is not None and found < entry.samples:
        log.warning("%s: %s; %d of its %d records are lost and will be skipped as truncated",
                    entry.path, table.problem, entry.samples - found, entry.samples)
        return
    raise DatasetError(f"{index_path}: shard {entry.name} holds {found} records, the index says "
                       f"{entry.samples}: the index is stale; rerun `mambamia convert --merge-only "
                       f"{index_path.parent}`")


def open_dataset(folder: str | Path, *, verify: str = "counts") -> Dataset:
    """The folder's index, checked as the module docstring says; DatasetError if it does not hold."""
    if verify not in VERIFY_INDEX:
        raise ValueError(f"verify: expected one of {VERIFY_INDEX}, got {verify!r}")
    index_path = Path(folder) / INDEX_NAME
    index = read_index(index_path)
    seen: set[str] = set()
    entries = [_entry(index_path, i, raw, seen) for i, raw in enumerate(index["shards"])]
    total = index.get("total_samples")
    if total is not None and total != sum(e.samples for e in entries):
        raise DatasetError(f"{index_path}: 'total_samples' {total!r} is not the sum of the shards' "
                           f"{sum(e.samples for e in entries)}")
    dataset = Dataset(folder=str(folder), shards=entries)
    for entry in entries:
        size = os.path.getsize(entry.path)
        if size != entry.bytes:
            log.warning("%s: %d bytes, index.json says %d; bad records will be skipped and counted",
                        entry.path, size, entry.bytes)
        if verify == "none":
            continue
        dataset.tables[entry.path] = table = scan_shard(entry.path)
        _check_counts(index_path, entry, table)
        if verify == "sha256":
            if entry.sha256 is None:
                raise DatasetError(f"{index_path}: shard {entry.name} has no 'sha256' to verify against")
            if file_sha256(entry.path) != entry.sha256:
                raise DatasetError(f"{index_path}: shard {entry.name} differs from its sha256 "
                                   "(changed since the index was written)")
    return dataset


@dataclass
class DatasetRecord:
    position: int
    """Order of the record in the dataset (index order, then tar order)."""
    shard: str
    """The shard's name in the index."""
    key: str
    meta: dict
    features: np.ndarray | None
    """float16 [F, P, D]; None where `want_features` said no."""


def iter_records(dataset: Dataset, *, want_features: Callable[[int], bool] = lambda position: True,
                 check_finite: bool = True) -> Iterator[DatasetRecord]:
    """Every record in index order, checked as the training loader checks it (metadata to its
    leaves, npy header, sizes; features only where read, NaN/inf refused). A bad record raises
    BadRecord (its `line()` names shard, key and reason): this reader is for consumers that must
    not skip, such as eval, whose denominator a silently dropped record would change."""
    reader = dataset.reader(check_finite=check_finite)
    position = 0
    try:
        for entry in dataset.shards:
            for i in range(entry.samples):
                head = reader.head(entry.path, i)
                features = reader.read_features(head) if want_features(position) else None
                yield DatasetRecord(position=position, shard=entry.name, key=head.key, meta=head.meta,
                                    features=features)
                position += 1
    finally:
        reader.close()
