"""Validation loss per answer form, so that the held-out curve measures what training teaches.

A record can teach answers in two forms:
- `open`: conversations answered in words ("red");
- `mc`: answers that are option letters: its answered multiple-choice items, rendered as training
  renders them (`data.text.qa_conversation`: the question, the lettered options, the letter), and
  conversations whose every answer is a letter ("B", "(B)", "B. red"), as multiple-choice
  instruction data in ShareGPT form has them.
A multiple-choice item also has an open form: its question alone, answered by the correct
option's text. That is the form a model trained on word answers has learned, so held-out
multiple-choice shards still measure it.

Validation scores every held-out sample in every form it has and reports `val/loss_open`,
`val/loss_mc`, and `val/loss`: the mean over the samples in the forms the training mixture teaches
(scoring letters only, while training taught words, made the validation curve rise while the
training loss fell). Each sample counts once: its loss is the mean over its answer tokens.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist

from data.collate import PreparedSample, collate, uniform_frame_indices
from data.loader import Source
from data.records import BadRecord, ShardReader
from data.text import IGNORE_INDEX, VIDEO_TOKEN, qa_conversation, tokenize_conversation

FORMS = ("open", "mc")
FORM_WORDS = {"open": "answers in words", "mc": "multiple-choice items answered by their letter"}
PROBE_RECORDS = 64
"""Records read from the start of each training source to tell which forms it teaches."""
_LETTER_ANSWER = re.compile(r"^\(?[A-Z]\)?(?:[.:)]|$)")  # "A red square" is a sentence, not a letter


def conversation_form(conv: list[dict]) -> str:
    """`mc` when every answer of the conversation is an option letter, else `open`."""
    answers = [str(t.get("value", "")).strip() for t in conv if t.get("from") in ("gpt", "assistant")]
    return "mc" if answers and all(_LETTER_ANSWER.match(a) for a in answers) else "open"


def record_forms(meta: dict) -> list[tuple[str, list[dict]]]:
    """(form, conversation) for every held-out sample a record offers, in a fixed order."""
    out = [(conversation_form(conv), conv) for conv in meta.get("conversations", []) if conv]
    for item in meta.get("qa", []):
        conv = qa_conversation(item)  # ValueError on an answer that indexes no option
        if conv is None:
            continue
        out.append(("mc", conv))
        out.append(("open", [{"from": "human", "value": f"{VIDEO_TOKEN}\n{str(item['question']).strip()}"},
                             {"from": "gpt", "value": str(item["options"][item["answer"]])}]))
    return out


def taught_forms(meta: dict) -> set[str]:
    """Forms the training loader draws from a record (data.text.record_conversations)."""
    forms = {conversation_form(conv) for conv in meta.get("conversations", []) if conv}
    if any(isinstance(q, dict) and q.get("answer") is not None for q in meta.get("qa", [])):
        forms.add("mc")
    return forms


@lru_cache(maxsize=16)
def training_forms(paths: tuple[str, ...], probe: int = PROBE_RECORDS) -> frozenset[str]:
    """Forms the training sources teach, from the first `probe` readable records of each."""
    reader, forms = ShardReader(), set()
    try:
        for path in paths:
            source = Source(path, 1.0)
            for index in range(min(probe, source.size)):
                try:
                    forms |= taught_forms(reader.head(*source.locate(index)).meta)
                except BadRecord:
                    continue
    finally:
        reader.close()
    return frozenset(forms)


@dataclass
class _Sample:
    form: str
    prepared: PreparedSample


def held_out_samples(cfg, tokenizer, reader: ShardReader, limit: int | None) -> list[_Sample]:
    """The held-out samples in source and index order (the same list on every rank and call),
    at most `limit`; records or conversations that cannot be used are skipped, as training does."""
    samples: list[_Sample] = []
    for src in cfg.validation.sources:
        if src.weight <= 0:
            continue
        source = Source(src.path, src.weight)
        for index in range(source.size):
            try:
                head = reader.head(*source.locate(index))
                forms = record_forms(head.meta)
            except (BadRecord, ValueError, KeyError, IndexError, TypeError):
                continue
            frame_idx = uniform_frame_indices(head.shape[0], cfg.data.max_frames)
            for form, conv in forms:
                try:
                    ids, labels = tokenize_conversation(tokenizer, conv, cfg.data.max_text_len)
                except ValueError:
                    continue
                samples.append(_Sample(form, PreparedSample(head=head, source=source.path, input_ids=ids,
                                                            labels=labels, frame_idx=frame_idx)))
                if limit is not None and len(samples) >= limit:
                    return samples
    return samples


_HELD_OUT: dict[tuple, list[_Sample]] = {}


def _held_out_key(cfg, tokenizer, limit: int | None) -> tuple:
    """What the held-out list depends on: the sources as they are on disk now (an index rewritten
    since gives a new list), the tokenizer, the frame and text limits."""
    sources = []
    for src in cfg.validation.sources:
        try:
            stat = os.stat(os.path.join(src.path, "index.json"))
            on_disk = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            on_disk = None
        sources.append((src.path, src.weight, on_disk))
    return (tuple(sources), limit, id(tokenizer), len(tokenizer), cfg.data.max_frames,
            cfg.data.max_text_len, cfg.data.num_patches, cfg.data.feature_dim)


def cached_held_out_samples(cfg, tokenizer, reader: ShardReader, limit: int | None) -> list[_Sample]:
    """held_out_samples, built once per run: every validation call scores the same list, and
    re-reading every record header and re-tokenizing every conversation each time cost a pass
    over the held-out index per call."""
    key = _held_out_key(cfg, tokenizer, limit)
    if key not in _HELD_OUT:
        _HELD_OUT.clear()  # one run's list at a time
        _HELD_OUT[key] = held_out_samples(cfg, tokenizer, reader, limit)
    return _HELD_OUT[key]


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] mean next-token cross-entropy over each row's labelled positions (0 for a row without)."""
    target = labels[:, 1:]
    token = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2),
                                              target.clamp(min=0), reduction="none")
    mask = (target != IGNORE_INDEX).float()
    return (token * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _my_batches(samples: list[_Sample], rank: int, world: int, batch_size: int) -> list[list[tuple[_Sample, bool]]]:
    """This rank's batches of (sample, counted): global batch g is samples[g*W*B : (g+1)*W*B],
    rank r takes its r-th slice. Every rank runs the same number of batches of exactly B samples,
    as training does (ZeRO-3 gathers each module's weights when it runs, so ranks must make the same
    calls): a short slice is filled up with samples from the start of the list, not counted."""
    per_global = world * batch_size
    batches = []
    for g in range(math.ceil(len(samples) / per_global)):
        start = g * per_global + rank * batch_size
        batch = [(s, True) for s in samples[start:start + batch_size]]
        filler = [(samples[i % len(samples)], False) for i in range(batch_size - len(batch))]
        batches.append(batch + filler)
    return batches


def _forward_losses(engine, batch: list[tuple[_Sample, bool]], reader: ShardReader, cfg, pad_id: int,
                    device: torch.device, dtype: torch.dtype) -> list[tuple[str, float]] | None:
    """(form, loss) of every counted sample whose features read cleanly; None, with no forward,
    when no sample of the batch did."""
    collated, failures = collate([s.prepared for s, _ in batch], reader, pad_id=pad_id,
                                 features_dtype=cfg.data.features_dtype)
    if not collated:
        return None
    failed = {id(p) for p, _ in failures}
    kept = [(s, counted) for s, counted in batch if id(s.prepared) not in failed]
    inputs = {k: collated[k].to(device) for k in ("input_ids", "attention_mask", "labels", "frame_mask")}
    inputs["features"] = collated["features"].to(device, dtype=dtype)
    out = engine(**inputs)
    losses = per_sample_loss(out.logits, out.labels).tolist()
    return [(s.form, loss) for (s, counted), loss in zip(kept, losses) if counted]


def _run_batch(engine, batch: list[tuple[_Sample, bool]], samples: list[_Sample], reader: ShardReader, cfg,
               pad_id: int, device: torch.device, dtype: torch.dtype) -> list[tuple[str, float]]:
    """This rank's losses for one batch, after exactly one forward: a wholly unreadable batch is
    replaced by readable held-out samples, not counted."""
    result = _forward_losses(engine, batch, reader, cfg, pad_id, device, dtype)
    if result is not None:
        return result
    for start in range(0, len(samples), len(batch)):
        filler = [(samples[(start + i) % len(samples)], False) for i in range(len(batch))]
        if _forward_losses(engine, filler, reader, cfg, pad_id, device, dtype) is not None:
            return []
    raise ValueError("validation.sources: no held-out record has readable features")


@torch.no_grad()
def validation_scalars(engine, cfg, tokenizer, rank: int, world_size: int, device: torch.device,
                       dtype: torch.dtype) -> dict[str, float]:
    """{"val/loss", "val/loss_open", "val/loss_mc"} (a form without held-out samples is left out;
    {} when no held-out sample has an answer); a collective: every rank calls it."""
    trained = training_forms(tuple(s.path for s in cfg.data.sources if s.weight > 0))
    batch_size = cfg.data.batch_size
    limit = cfg.validation.max_batches * batch_size * world_size if cfg.validation.max_batches else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reader = ShardReader(num_patches=cfg.data.num_patches, feature_dim=cfg.data.feature_dim,
                         check_finite=cfg.data.check_finite)
    # [sum of losses, samples] per form
    totals = torch.zeros(len(FORMS), 2, dtype=torch.float64, device=device)
    try:
        samples = cached_held_out_samples(cfg, tokenizer, reader, limit)
        if not samples:  # e.g. a benchmark whose answers are hidden: nothing to validate against
            return {}
        engine.eval()
        for batch in _my_batches(samples, rank, world_size, batch_size):
            for form, loss in _run_batch(engine, batch, samples, reader, cfg, pad_id, device, dtype):
                totals[FORMS.index(form)] += torch.tensor([loss, 1.0], dtype=torch.float64, device=device)
    finally:
        reader.close()
        engine.train()
    dist.all_reduce(totals)
    return summarize_forms(totals.cpu().numpy(), trained)


def summarize_forms(totals: np.ndarray, trained: frozenset[str]) -> dict[str, float]:
    """Scalars from per-form [loss sum, count]; `val/loss` over the trained forms that have
    held-out samples (over every form when none has: the mismatch is reported by the caller)."""
    present = [f for i, f in enumerate(FORMS) if totals[i, 1] > 0]
    out = {f"val/loss_{f}": float(totals[FORMS.index(f), 0] / totals[FORMS.index(f), 1]) for f in present}
    chosen = [f for f in present if f in trained] or present
    rows = totals[[FORMS.index(f) for f in chosen]]
    return {"val/loss": float(rows[:, 0].sum() / rows[:, 1].sum()), **out}


_NOTED: set[tuple[tuple[str, ...], str]] = set()


def mismatch_note(cfg, scalars: dict[str, float]) -> str | None:
    """One line, the first time only, when the held-out data holds a form the training mixture
    does not teach (its loss is reported but left out of `val/loss`)."""
    paths = tuple(s.path for s in cfg.data.sources if s.weight > 0)
    trained = training_forms(paths)
    untaught = [f for f in FORMS if f"val/loss_{f}" in scalars and f not in trained]
    if not scalars:
        note = ("validation: the held-out sources hold no answered sample (a conversation, or a "
                "multiple-choice item with its answer): no validation loss")
    elif not untaught:
        return None
    else:
        left_out = any(f"val/loss_{f}" in scalars for f in trained)
        note = (f"validation: the training mixture teaches {sorted(trained) or 'no'} answers; "
                + ", ".join(f"val/loss_{f}" for f in untaught) + " scores a form training never asked for "
                f"({'; '.join(FORM_WORDS[f] for f in untaught)}), "
                + ("left out of val/loss" if left_out else "and val/loss is all there is to average: read it with care"))
    if (paths, note) in _NOTED:
        return None
    _NOTED.add((paths, note))
    return note


def features_record(paths: tuple[str, ...]) -> dict | None:
    """How the first readable training record's features were made: encoder name and layer,
    frame rate, patches per frame and width (what `mambamia ask` must reproduce), or None."""
    reader = ShardReader()
    try:
        for path in paths:
            source = Source(path, 1.0)
            for index in range(min(PROBE_RECORDS, source.size)):
                try:
                    head = reader.head(*source.locate(index))
                except BadRecord:
                    continue
                return {"encoder": head.meta.get("encoder"), "layer": head.meta.get("layer"),
                        "fps": head.meta.get("fps"), "patches": head.shape[1], "dim": head.shape[2]}
    finally:
        reader.close()
    return None


def write_training_record(cfg, out_dir) -> None:
    """`OUT_DIR/training.json` for `mambamia export`: the stage, its data sources, the answer forms
    they teach and how their features were made (null when the shards are gone), and the frames
    per video, so that `mambamia eval` can say when its scoring asks for a form the model was
    never taught and `mambamia ask` can prepare a video as training did."""
    import json
    from pathlib import Path

    from trainer.evaluate import write_atomic

    paths = tuple(s.path for s in cfg.data.sources if s.weight > 0)
    try:
        forms, features = sorted(training_forms(paths)), features_record(paths)
    except (OSError, ValueError):  # the training shards were moved or deleted since
        forms, features = None, None
    record = {"stage": cfg.stage, "sources": [{"path": s.path, "weight": s.weight} for s in cfg.data.sources],
              "answer_forms": forms, "features": features, "max_frames": cfg.data.max_frames}
    write_atomic(Path(out_dir) / "training.json", json.dumps(record, indent=1) + "\n")
