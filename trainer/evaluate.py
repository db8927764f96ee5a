"""Score an exported model on multiple-choice and open-ended video QA shards.

    mambamia eval EXPORT_DIR SHARDS_DIR --out eval/report.json
    mambamia eval EXPORT_DIR SHARDS_DIR --out eval/report.json --method generate
    torchrun --nproc_per_node 2 -m trainer.cli eval EXPORT_DIR SHARDS_DIR --out eval/report.json
    mambamia eval ... --rank 0 --world-size 4   # one of 4 independent jobs; the last one merges

SHARDS_DIR is a folder written by `mambamia convert` (shards + index.json). Every record's `qa`
items are scored; `--open-ended FILE.jsonl` also answers every record's first human turn and every
`qa` question asked bare (no options), beside the reference answer.

Rules (they decide the numbers, so they are fixed and written down here):
- `loglik` picks the option whose answer text has the highest log-likelihood after the prompt.
  The answer text is the option letter (`--target letter`, what multiple-choice training teaches),
  "B. text" (`--target option`), or, after the question alone without the option list, the
  option's text (`--target text`, what training on word answers teaches); the score is the sum
  of the answer tokens' log-probabilities
  (`--reduce sum`, the joint probability of the answer) or their mean (`--reduce mean`, which
  stops long options from being penalised for their length).
- Ties: the lowest option index among the maxima wins (plain argmax), and the item is flagged
  `tied`, so a model that scores everything equal is visibly at "always A", never lucky by chance.
- `generate` decodes greedily and parses the letter (`parse_letter`); an answer without a letter is
  wrong and counted as `unparsed`.
- Items whose answer is null (benchmarks that hide their test answers) are predicted but not
  scored; they are counted as `unanswered`. A malformed item stops the run with a one-line error
  naming the shard, the record and the field.
- Accuracy = correct / scored, overall, per question type and per duration bucket, beside the
  visual tokens per video (mean, max) from the model's budget function.
- Warnings (`diagnose`, in the report's `warnings` and printed) say when the numbers cannot mean
  what they seem to: one option chosen for (nearly) every item, letter probabilities that are tiny
  or flat (the model was not taught to answer with a letter), most generated answers naming no
  option, or a training mixture recorded in the export (training.json) without multiple-choice
  items while the scoring asks for letters.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from data.dataset import DatasetError, DatasetMissing, open_dataset
from data.dataset import iter_records as iter_dataset
from data.records import BadRecord
from data.text import VIDEO_TOKEN, mcq_prompt, option_letter


class MalformedItem(ValueError):
    """A QA item that cannot be scored; the message names where it is and which field is wrong."""


@dataclass(kw_only=True)
class QAItem:
    id: str
    video_key: str
    question: str
    options: list[str]
    answer: int | None
    type: str | None = None
    duration_bucket: str | None = None
    time_reference: str | None = None


def parse_qa_item(raw: object, *, video_key: str, where: str) -> QAItem:
    """Validate one converted `qa` entry; `where` names the shard/record for the error."""
    if not isinstance(raw, dict):
        raise MalformedItem(f"{where}: qa item is a {type(raw).__name__}, expected an object")
    item_id = raw.get("id")
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or str(item_id) == "":
        raise MalformedItem(f"{where}: qa item field 'id': expected a non-empty string, got {item_id!r}")
    here = f"{where}: qa item {str(item_id)!r}"
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise MalformedItem(f"{here} field 'question': expected a non-empty string, got {question!r}")
    options = raw.get("options")
    if (not isinstance(options, list) or len(options) < 2 or len(options) > 26
            or not all(isinstance(o, str) and o.strip() for o in options)):
        raise MalformedItem(f"{here} field 'options': expected a list of 2 to 26 non-empty strings, got {options!r}")
    answer = raw.get("answer")
    if answer is not None and (not isinstance(answer, int) or isinstance(answer, bool)
                               or not 0 <= answer < len(options)):
        raise MalformedItem(f"{here} field 'answer': expected an integer in [0, {len(options) - 1}] or null, got {answer!r}")
    labels = {}
    for name in ("type", "duration_bucket", "time_reference"):
        value = raw.get(name)
        if value is not None and not isinstance(value, str):
            raise MalformedItem(f"{here} field {name!r}: expected a string or null, got {value!r}")
        labels[name] = value
    return QAItem(id=str(item_id), video_key=video_key, question=question, options=list(options),
                  answer=answer, **labels)


def choose_option(scores: Sequence[float]) -> tuple[int, bool]:
    """(index of the best score, whether several options share it). NaN never wins."""
    clean = [-math.inf if math.isnan(s) else float(s) for s in scores]
    best = max(clean)
    winners = [i for i, s in enumerate(clean) if s == best]
    return winners[0], len(winners) > 1


_BARE = re.compile(r"^\(?([A-Z])\)?(?:[.:)]|$)")
_STATED = re.compile(r"\banswer(?: is|:)?\s*:?\s*\(?([A-Z])\b\)?", re.IGNORECASE)


def parse_letter(text: str, options: Sequence[str]) -> int | None:
    """Option index named by a generated answer, or None when it names none.

    Accepted: "B", "(B)", "B.", "B) text", "B: text", "Answer: B", "The answer is (B)", or the exact
    text of one option. A bare capital followed by a space ("A red square") is not a letter: it
    is the article, and reading it as option A would reward a model that never chose.
    """
    text = text.strip()
    match = _BARE.match(text) or _STATED.search(text)
    if match:
        index = ord(match.group(1).upper()) - ord("A")
        return index if 0 <= index < len(options) else None
    normal = text.rstrip(".").strip().lower()
    hits = [i for i, o in enumerate(options) if o.strip().rstrip(".").lower() == normal]
    return hits[0] if len(hits) == 1 else None


def score_items(items: Sequence[QAItem], *, method: str,
                loglik_fn: Callable[[QAItem], Sequence[float]] | None = None,
                generate_fn: Callable[[QAItem], str] | None = None) -> list[dict]:
    """One prediction dict per item; `loglik_fn` returns one score per option."""
    predictions = []
    for item in items:
        pred = {"id": item.id, "video_key": item.video_key, "type": item.type,
                "duration_bucket": item.duration_bucket, "answer": item.answer,
                "n_options": len(item.options)}
        if method == "loglik":
            scores = [float(s) for s in loglik_fn(item)]
            if len(scores) != len(item.options):
                raise ValueError(f"item {item.id!r}: scorer returned {len(scores)} scores for {len(item.options)} options")
            pred["predicted"], pred["tied"] = choose_option(scores)
            pred["scores"] = scores
        elif method == "generate":
            pred["output"] = generate_fn(item)
            pred["predicted"] = parse_letter(pred["output"], item.options)
            pred["tied"] = False
        else:
            raise ValueError(f"method: expected 'loglik' or 'generate', got {method!r}")
        pred["correct"] = item.answer is not None and pred["predicted"] == item.answer
        predictions.append(pred)
    return predictions


def _accuracy(preds: list[dict]) -> dict:
    scored = [p for p in preds if p["answer"] is not None]
    correct = sum(p["correct"] for p in scored)
    return {"correct": correct, "scored": len(scored),
            "accuracy": correct / len(scored) if scored else None}


def _grouped(preds: list[dict], field: str) -> dict:
    keys = sorted({p[field] for p in preds if p[field] is not None})
    return {k: _accuracy([p for p in preds if p[field] == k]) for k in keys}


def summarize(predictions: list[dict], *, visual_tokens: dict[str, int], method: str) -> dict:
    """The report: overall / per-type / per-duration accuracy, counts, chance, visual tokens."""
    predictions = sorted(predictions, key=lambda p: p["id"])
    scored = [p for p in predictions if p["answer"] is not None]
    tokens = [visual_tokens[k] for k in sorted({p["video_key"] for p in predictions})]
    return {
        "method": method,
        "items": len(predictions),
        **_accuracy(predictions),
        "unanswered": len(predictions) - len(scored),
        "unparsed": sum(p["predicted"] is None for p in predictions),
        "tied": sum(bool(p["tied"]) for p in predictions),
        # expected accuracy of a uniform random guess on the scored items
        "chance": sum(1 / p["n_options"] for p in scored) / len(scored) if scored else None,
        "by_type": _grouped(predictions, "type"),
        "by_duration": _grouped(predictions, "duration_bucket"),
        "visual_tokens": {"videos": len(tokens), "mean": sum(tokens) / len(tokens) if tokens else 0.0,
                          "max": max(tokens, default=0)},
        "predictions": predictions,
    }


# A diagnosis needs this many items: on fewer, one option winning everywhere is plausible.
MIN_ITEMS_TO_DIAGNOSE = 5
CONSTANT_CHOICE = 0.9
"""One option index predicted for at least this fraction of a group's items: answering by position."""
FLAT_ENTROPY = 0.97
"""Normalised entropy (1 = uniform) of an item's letter distribution at or above which it is flat."""
LOW_LETTER_MASS = 0.5
"""Mean next-token probability the option letters together get, below which the model does not
answer with a letter at all (a model trained on letters gives them nearly all of it)."""


def _constant_choice(preds: list[dict], group: str) -> str | None:
    chosen = [p["predicted"] for p in preds if p["predicted"] is not None]
    if len(preds) < MIN_ITEMS_TO_DIAGNOSE or not chosen:
        return None
    index, count = max(((i, chosen.count(i)) for i in set(chosen)), key=lambda ic: (ic[1], -ic[0]))
    if count < CONSTANT_CHOICE * len(preds):
        return None
    answers = sorted({p["answer"] for p in preds if p["answer"] is not None})
    spread = (f" while the answers are spread over {', '.join(option_letter(a) for a in answers)}"
              if len(answers) > 1 else "")
    return (f"{group}: option {option_letter(index)} chosen on {count} of {len(preds)} items{spread}: "
            "the model answers by position, not by content")


def _letter_diagnosis(preds: list[dict]) -> tuple[dict, list[str]]:
    """Letter scores are log-probabilities of the next token: how much of it the letters get,
    and how evenly they share it."""
    masses, flat = [], 0
    for p in preds:
        probs = np.exp(np.asarray(p["scores"], dtype=np.float64))
        mass = float(probs.sum())
        masses.append(mass)
        share = probs / mass if mass > 0 else np.full(len(probs), 1 / len(probs))
        entropy = -float(np.sum(share * np.log(np.clip(share, 1e-300, None))))
        flat += entropy / math.log(len(share)) >= FLAT_ENTROPY
    numbers = {"letter_mass_mean": sum(masses) / len(masses), "flat_items": flat}
    warnings = []
    if numbers["letter_mass_mean"] < LOW_LETTER_MASS:
        warnings.append(f"the option letters get {100 * numbers['letter_mass_mean']:.1f}% of the model's "
                        "next-token probability on average: it was not trained to answer with a letter "
                        "(word answers in training?); try --target text, or --open-ended")
    if flat > len(preds) / 2:
        warnings.append(f"the letter probabilities are near-uniform on {flat} of {len(preds)} items: "
                        "the model does not tell the options apart by letter, and ties break to A")
    return numbers, warnings


def diagnose(predictions: list[dict], *, method: str, target: str,
             training_forms: list[str] | None = None) -> tuple[dict, list[str]]:
    """(numbers, one-line warnings) saying when the accuracy cannot mean what it seems to."""
    numbers: dict = {}
    warnings = []
    if training_forms is not None and "mc" not in training_forms and (method == "generate" or target != "text"):
        warnings.append(f"the export's training mixture holds no multiple-choice items (answer forms "
                        f"{sorted(training_forms)}), yet this scoring asks for option letters; "
                        "--target text scores the answer in words")
    if len(predictions) < MIN_ITEMS_TO_DIAGNOSE:
        return numbers, warnings
    constant = _constant_choice(predictions, "all items")
    if constant:
        warnings.append(constant)
    else:
        by_type: dict[str, list[dict]] = {}
        for p in predictions:
            by_type.setdefault(p["type"], []).append(p)
        warnings += filter(None, (_constant_choice(group, f"type {name!r}") for name, group in sorted(
            by_type.items(), key=lambda kv: str(kv[0])) if name is not None))
    if method == "loglik" and target == "letter":
        letter_numbers, letter_warnings = _letter_diagnosis(predictions)
        numbers.update(letter_numbers)
        warnings += letter_warnings
    if method == "generate":
        unparsed = sum(p["predicted"] is None for p in predictions)
        numbers["unparsed_fraction"] = unparsed / len(predictions)
        if unparsed > len(predictions) / 2:
            warnings.append(f"{unparsed} of {len(predictions)} generated answers name no option: the model "
                            "does not answer in the letter form; see the outputs in the report")
    return numbers, warnings


def merge_parts(parts: Sequence[dict]) -> tuple[list[dict], dict[str, int]]:
    """Union of per-rank parts ({"predictions", "visual_tokens"}); an item twice is an error."""
    predictions, tokens, seen = [], {}, set()
    for part in parts:
        for pred in part["predictions"]:
            if pred["id"] in seen:
                raise ValueError(f"qa item {pred['id']!r} was scored by two ranks: ids must be unique")
            seen.add(pred["id"])
            predictions.append(pred)
        tokens.update(part["visual_tokens"])
    return predictions, tokens


def format_table(report: dict) -> str:
    """A readable plain-text table of the report."""
    def pct(acc):
        return "   n/a" if acc is None else f"{100 * acc:5.1f}%"

    rows = [("overall", report)]
    rows += [(f"type: {k}", v) for k, v in report["by_type"].items()]
    rows += [(f"duration: {k}", v) for k, v in report["by_duration"].items()]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{'':<{width}}{'accuracy':>9}{'correct':>9}{'scored':>8}"]
    lines += [f"{name:<{width}}{pct(r['accuracy']):>9}{r['correct']:>9}{r['scored']:>8}" for name, r in rows]
    vt = report["visual_tokens"]
    chance = report["chance"]
    lines.append(f"chance {pct(chance).strip()} | items {report['items']}, unanswered {report['unanswered']}, "
                 f"unparsed {report['unparsed']}, tied {report['tied']} | visual tokens per video: "
                 f"mean {vt['mean']:.1f}, max {vt['max']} over {vt['videos']} videos")
    lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def write_atomic(path: str | Path, text: str) -> None:
    """Write through a temporary name in the same folder, then rename: readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(kw_only=True)
class Record:
    key: str
    meta: dict
    items: list[QAItem]
    features: np.ndarray | None  # [F, P, D] float16; None for records other ranks score


def iter_records(shards_dir: str | Path, *, rank: int = 0, world_size: int = 1,
                 verify: str = "counts") -> Iterator[Record]:
    """Every record of the folder, in index order; features are read only for this rank's share
    (record i belongs to rank i % world_size, so a video's items are scored where its features are).

    Read through data/ with the training loader's checks (data/dataset.py, data/records.py: index
    against shards, plain tars only, metadata to its leaves, npy header, NaN/inf): a record that
    fails one stops the run with a one-line MalformedItem naming shard, record and reason, as a
    malformed qa item does: skipping it would change the denominator unseen."""
    try:
        dataset = open_dataset(shards_dir, verify=verify)
    except DatasetMissing:
        raise
    except DatasetError as err:
        raise MalformedItem(str(err)) from None
    seen: set[str] = set()
    records = iter_dataset(dataset, want_features=lambda position: position % world_size == rank)
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except BadRecord as err:
            raise MalformedItem(err.line()) from None
        where = f"{record.shard}: record {record.key!r}"
        items = [parse_qa_item(raw, video_key=record.key, where=where) for raw in record.meta.get("qa", [])]
        for item in items:
            if item.id in seen:
                raise MalformedItem(f"{where}: qa item {item.id!r} field 'id': already used by another item")
            seen.add(item.id)
        yield Record(key=record.key, meta=record.meta, items=items, features=record.features)


class ModelQA:
    """Asks an exported VideoLLM about one video: option log-likelihoods or a generated answer."""

    def __init__(self, model, tokenizer, *, max_frames: int | None, target: str = "letter",
                 reduce: str = "sum", max_new_tokens: int = 16):
        import torch

        self.torch = torch
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.compressor.parameters()).dtype
        self.max_frames, self.target, self.reduce = max_frames, target, reduce
        self.max_new_tokens = max_new_tokens

    def frame_indices(self, n_frames: int) -> np.ndarray:
        """Frames shown to the model: all, or max_frames spread uniformly (extraction's rule)."""
        if self.max_frames is None or n_frames <= self.max_frames:
            return np.arange(n_frames)
        return np.linspace(0, n_frames - 1, self.max_frames).round().astype(int)

    def frames(self, features: np.ndarray) -> np.ndarray:
        return features[self.frame_indices(len(features))]

    def visual_summary(self, features: np.ndarray) -> tuple[int, list[int]]:
        """(visual tokens the LLM receives, indices of the kept frames in the record's frames),
        measured on the compressor itself rather than predicted."""
        inputs = self._inputs(features, [[0]])
        with self.torch.no_grad():
            out = self.model.compressor(inputs["features"], inputs["frame_mask"])
        kept, per_frame = out.tokens[0].shape[0], out.tokens[0].shape[1]
        separator = int(getattr(self.model, "frame_separator", None) is not None)
        shown = self.frame_indices(len(features))
        return kept * (per_frame + separator), [int(shown[i]) for i in out.kept[0].tolist()]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_text(self, human_turn: str) -> str:
        messages = [{"role": "user", "content": human_turn}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _inputs(self, features: np.ndarray, rows: list[list[int]]):
        torch = self.torch
        feats = torch.from_numpy(self.frames(features).astype(np.float32)).to(self.device, self.dtype)
        ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                    features=feats.unsqueeze(0).expand(len(rows), *feats.shape),
                    frame_mask=torch.ones(len(rows), feats.shape[0], dtype=torch.bool, device=self.device))

    def option_logliks(self, item: QAItem, features: np.ndarray) -> list[float]:
        if self.target == "text":  # the question as a word-answer training conversation asks it
            prompt = self.prompt_text(f"{VIDEO_TOKEN}\n{item.question.strip()}")
            answers = [o.strip() for o in item.options]
        else:
            prompt = self.prompt_text(f"{VIDEO_TOKEN}\n{mcq_prompt(item.question, item.options)}")
            answers = [option_letter(i) if self.target == "letter" else f"{option_letter(i)}. {o}"
                       for i, o in enumerate(item.options)]
        prompt_ids = self._ids(prompt)
        conts = []
        for answer in answers:
            full = self._ids(prompt + answer)
            # BPE may merge across the boundary; then score the answer tokenized on its own
            conts.append(full[len(prompt_ids):] if full[:len(prompt_ids)] == prompt_ids else self._ids(answer))
        scores: list[float] = [0.0] * len(answers)
        # options whose answers have the same token count share one forward: no padding, so the
        # answer tokens are the last positions of every row whatever the visual splice looks like
        by_len: dict[int, list[int]] = {}
        for i, c in enumerate(conts):
            by_len.setdefault(len(c), []).append(i)
        with self.torch.no_grad():
            for n, members in by_len.items():
                logits = self.model(**self._inputs(features, [prompt_ids + conts[i] for i in members])).logits
                logp = self.torch.log_softmax(logits[:, -n - 1:-1].float(), dim=-1)
                target = self.torch.tensor([conts[i] for i in members], device=logp.device)
                token_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()  # [rows, n]
                per_row = token_lp.sum(-1) if self.reduce == "sum" else token_lp.mean(-1)
                for i, value in zip(members, per_row.tolist()):
                    scores[i] = value
        return scores

    def generate(self, human_turn: str, features: np.ndarray) -> str:
        inputs = self._inputs(features, [self._ids(self.prompt_text(human_turn))])
        with self.torch.no_grad():
            new = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.tokenizer.decode(new[0], skip_special_tokens=True).strip()


SCORING_MODES = """\
scoring modes: pick the one that matches how the model was taught to answer
  letter log-likelihood       --method loglik --target letter   (the default)
      The prompt lists the options and asks for the letter; each letter's probability is
      compared. Fits models trained on multiple-choice items answered by letter (the `qa` items
      of converted benchmark shards are trained that way). A model trained on word answers
      gives the letters little, nearly equal probability and ends up answering "A": eval warns.
  option-text log-likelihood  --method loglik --target text | option
      `text`: the question alone (no option list), each option's text scored as the answer: the
      form a model trained on word answers ("red") learned. `option`: the letter prompt with
      "B. <option text>" scored. Options differ in length: consider --reduce mean.
  generated letter            --method generate
      Greedy decoding after the letter prompt; the letter (or an option's exact text) is parsed
      from the output, anything else counts as wrong and `unparsed`. Shows what the model says.
  open-ended                  --open-ended FILE.jsonl   (beside any method)
      Every record's first human turn, and every multiple-choice question without its options,
      answered by generation next to the reference answer; no accuracy. Fits models trained on
      free-form answers; read it or give it to a judge.

Warnings (in the table, on stderr and in the report's `warnings`) say when the accuracy cannot
mean what it seems: one option chosen nearly everywhere, letter probabilities tiny or flat, most
generated answers naming no option, one open-ended answer for every video, a training mixture
(the export's training.json) with no multiple-choice items while letters are scored.

example: mambamia eval runs/stage2_export data/lvbench_shards --out eval/lvbench.json
"""


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mambamia eval",
        description="Score an exported model on the multiple-choice `qa` items of converted shards "
                    "(LVBench, MLVU, Video-MME, ... after `mambamia convert`).",
        epilog=SCORING_MODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", help="folder written by `mambamia export` (VideoLLM.save_pretrained)")
    p.add_argument("shards", help="dataset folder with shards and index.json")
    p.add_argument("--out", required=True, help="JSON report path; the table goes beside it as .txt")
    p.add_argument("--method", choices=["loglik", "generate"], default="loglik",
                   help="loglik: compare the options' log-likelihoods; generate: decode and parse a letter")
    p.add_argument("--target", choices=["letter", "option", "text"], default="letter",
                   help="loglik: score the letter, 'B. option text', or the option text after the bare question")
    p.add_argument("--reduce", choices=["sum", "mean"], default="sum",
                   help="loglik: sum (joint probability) or mean (length-normalised) over answer tokens")
    p.add_argument("--max-frames", type=int, default=None, help="thin longer videos uniformly to this many frames")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--open-ended", default=None, help="also answer every record's first human turn into this JSONL")
    p.add_argument("--rank", type=int, default=None, help="this job's share (with --world-size) when not under torchrun")
    p.add_argument("--world-size", type=int, default=None)
    args = p.parse_args(argv)
    if (args.rank is None) != (args.world_size is None):
        p.error("--rank and --world-size go together")
    if args.world_size is not None and not 0 <= args.rank < args.world_size:
        p.error(f"--rank: expected 0 <= rank < {args.world_size}, got {args.rank}")
    return args


def _score_share(args: argparse.Namespace, rank: int, world_size: int) -> dict:
    """This rank's predictions, visual tokens per video and open-ended answers."""
    from tqdm import tqdm

    from model.video_llm import VideoLLM

    model = VideoLLM.from_pretrained(args.export_dir)
    qa = ModelQA(model, model.tokenizer, max_frames=args.max_frames, target=args.target,
                 reduce=args.reduce, max_new_tokens=args.max_new_tokens)
    predictions, tokens, kept, answers = [], {}, {}, []
    bar = tqdm(iter_records(args.shards, rank=rank, world_size=world_size), desc=f"eval rank {rank}",
               unit="video", disable=rank != 0, file=sys.stderr)
    for record in bar:
        if record.features is None:
            continue
        features = record.features
        tokens[record.key], kept[record.key] = qa.visual_summary(features)
        predictions += score_items(record.items, method=args.method,
                                   loglik_fn=lambda item: qa.option_logliks(item, features),
                                   generate_fn=lambda item: qa.generate(
                                       f"{VIDEO_TOKEN}\n{mcq_prompt(item.question, item.options)}", features))
        if args.open_ended:
            answers += open_ended_answers(record, qa, features)
    return {"predictions": predictions, "visual_tokens": tokens, "kept_frames": kept, "open_ended": answers}


def open_ended_answers(record, qa: "ModelQA", features: np.ndarray) -> list[dict]:
    """The model's own words for every conversation's first human turn and for every
    multiple-choice question asked bare (no options), beside the reference answer."""
    rows = []
    for i, conv in enumerate(record.meta.get("conversations", [])):
        human = next((t["value"] for t in conv if t.get("from") == "human"), None)
        reference = next((t["value"] for t in conv if t.get("from") == "gpt"), None)
        if human is not None:
            rows.append({"id": f"{record.key}#{i}", "key": record.key, "prompt": human,
                         "reference": reference, "answer": qa.generate(human, features)})
    for item in record.items:
        prompt = f"{VIDEO_TOKEN}\n{item.question.strip()}"
        rows.append({"id": item.id, "key": record.key, "prompt": prompt,
                     "reference": None if item.answer is None else item.options[item.answer],
                     "answer": qa.generate(prompt, features)})
    return rows


def open_ended_warnings(rows: list[dict]) -> list[str]:
    """One line when (nearly) every open-ended answer is the same text, whatever the video."""
    if len(rows) < MIN_ITEMS_TO_DIAGNOSE:
        return []
    texts = [r["answer"].strip() for r in rows]
    top = max(set(texts), key=texts.count)
    if texts.count(top) < CONSTANT_CHOICE * len(texts):
        return []
    return [f"open-ended: {texts.count(top)} of {len(texts)} answers are {top!r}, whatever the video: "
            "the model has not learned to look"]


def recorded_training_forms(export_dir: str | Path) -> list[str] | None:
    """Answer forms of the training mixture as `mambamia export` recorded them (None: unknown)."""
    path = Path(export_dir) / "training.json"
    try:
        forms = json.loads(path.read_text()).get("answer_forms")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return forms if isinstance(forms, list) and all(isinstance(f, str) for f in forms) else None


def _finish(args: argparse.Namespace, parts: list[dict]) -> dict:
    predictions, tokens = merge_parts(parts)
    report = summarize(predictions, visual_tokens=tokens, method=args.method)
    forms = recorded_training_forms(args.export_dir)
    report["diagnostics"], report["warnings"] = diagnose(report["predictions"], method=args.method,
                                                         target=args.target, training_forms=forms)
    report["diagnostics"]["training_answer_forms"] = forms
    rows = sorted((a for part in parts for a in part["open_ended"]), key=lambda a: a["id"])
    report["warnings"] += open_ended_warnings(rows)
    kept = {k: v for part in parts for k, v in part["kept_frames"].items()}
    report.update(export_dir=str(args.export_dir), shards=str(args.shards), target=args.target,
                  reduce=args.reduce, world_size=len(parts),
                  videos={k: {"visual_tokens": tokens[k], "kept_frames": kept[k]} for k in sorted(tokens)})
    table = format_table(report)
    out = Path(args.out)
    write_atomic(out, json.dumps(report, indent=1) + "\n")
    write_atomic(out.with_suffix(".txt"), table + "\n")
    if args.open_ended:
        write_atomic(args.open_ended, "".join(json.dumps(r) + "\n" for r in rows))
    _record_in_card(args, report)
    print(table)
    for warning in report["warnings"]:
        print(f"mambamia eval: warning: {warning}", file=sys.stderr)
    print(f"report: {out}  table: {out.with_suffix('.txt')}" + (f"  open-ended: {args.open_ended}" if args.open_ended else ""))
    return report


def _record_in_card(args: argparse.Namespace, report: dict) -> None:
    """The export's model card gains (or updates) a row named for the shards folder, so a folder
    pushed to a hub carries its scores; an export made before cards existed is left as it is."""
    from trainer.model_card import CARD, record_eval

    if not (Path(args.export_dir) / CARD).is_file():
        print(f"mambamia eval: note: {args.export_dir} has no model card; the scores are only in {args.out}",
              file=sys.stderr)
        return
    record_eval(args.export_dir, report, Path(args.shards).name)


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    try:
        return _run(args)
    except (MalformedItem, FileNotFoundError) as err:  # bad input: one line naming where and what
        print(f"mambamia eval: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.world_size is None and env_world > 1:
        # under torchrun: every rank scores its share, rank 0 gathers and writes
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        part = _score_share(args, rank, world)
        parts = [None] * world
        dist.all_gather_object(parts, part)
        if rank == 0:
            _finish(args, parts)
        dist.barrier()
        dist.destroy_process_group()
        return 0
    if args.world_size is None:
        _finish(args, [_score_share(args, 0, 1)])
        return 0
    # independent jobs: each writes its part; whichever finds every part present writes the merged
    # report (two jobs finishing together write identical files through atomic renames)
    out = Path(args.out)
    part_path = lambda r: out.with_name(f"{out.name}.part{r}-of-{args.world_size}")  # noqa: E731
    write_atomic(part_path(args.rank), json.dumps(_score_share(args, args.rank, args.world_size)))
    paths = [part_path(r) for r in range(args.world_size)]
    if all(p.is_file() for p in paths):
        _finish(args, [json.loads(p.read_text()) for p in paths])
    else:
        print(f"rank {args.rank}: part written to {part_path(args.rank)}; the last job to finish merges")
    return 0
