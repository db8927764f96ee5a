"""Annotation files in the forms datasets publish them, normalised to one per-video item.

Files: a JSON list, JSONL, or Parquet (`.parquet`, as Video-MME publishes its test set on the
Hugging Face hub; needs pyarrow: `pip install 'mambamia[parquet]'`), one item per element, line or
row. Formats (`auto` looks at the first item's fields):
- `llava`: LLaVA-Video / ShareGPT: {"video", "conversations": [{"from": "human"|"gpt", "value"}]}
  (an optional leading "system" turn is kept). The image/video placeholder becomes exactly one
  `<video>`, in the first human turn.
- `videomme`: Video-MME rows {"videoID", "question", "options": ["A. ...", ...], "answer": "A",
  "duration", "task_type", "question_id"}, or one row per video with those in "questions".
- `mlvu`: MLVU {"video", "question", "candidates": [...], "answer": <candidate text>,
  "question_type", "duration"}.
- `lvbench`: LVBench video_info.meta.jsonl {"key", "qa": [{"uid", "question": "...\\n(A) ...\\n(B) ...",
  "answer": "B", "question_type": [...], "time_reference"}]}.

Multiple-choice items become {"id", "question", "options" (no letter prefixes), "answer" (index or
None), "type", "duration_bucket", "time_reference"}; a question without an id (MLVU has none) gets
"<file name>:<record/line/row>[:part]", stable across runs, and a warning per file says so. A
malformed item raises AnnotationError whose message is one line naming the file, the line or
record, and the field. Text files are UTF-8, or UTF-16/32 with a byte-order mark.
"""
from __future__ import annotations

import codecs
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)
VIDEO_TOKEN = "<video>"
FORMATS = ("auto", "llava", "videomme", "mlvu", "lvbench")
_PLACEHOLDERS = ("<image>", VIDEO_TOKEN)
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
_LETTER_PREFIX = re.compile(r"^\s*\(?([A-Z])\s*[\.\):]\s*")
_LVBENCH_OPTION = re.compile(r"^\(([A-Z])\)\s*(.*)$")


class AnnotationError(ValueError):
    pass


@dataclass(kw_only=True)
class VideoItem:
    video: str
    """The video as the annotation names it (a path relative to the video root, or a file name)."""
    where: str
    """'file:line N' or 'file:record N' of the first annotation naming this video."""
    conversations: list[list[dict]] = field(default_factory=list)
    qa: list[dict] = field(default_factory=list)
    duration: float | None = None

    def merge(self, other: VideoItem) -> None:
        self.conversations.extend(other.conversations)
        self.qa.extend(other.qa)
        if self.duration is None:
            self.duration = other.duration


_NOT_SHOWN = object()


class _Ctx:
    """Where a record came from, to build one-line errors."""

    def __init__(self, path: Path, where: str):
        self.path, self.where = path, where

    @property
    def location(self) -> str:
        return f"{self.path}:{self.where}"

    def fail(self, field_name: str, expected: str, got: Any = _NOT_SHOWN) -> AnnotationError:
        got_text = "" if got is _NOT_SHOWN else f", got {_short(got)}"
        return AnnotationError(f"{self.path}:{self.where}: field '{field_name}': expected {expected}{got_text}")

    def get(self, record: dict, name: str, kind: type | tuple, *, optional: bool = False, prefix: str = ""):
        value = record.get(name)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(prefix + name, f"a {names}", value)
        return value


def _short(value: Any) -> str:
    if value is None:
        return "nothing"
    text = json.dumps(value, ensure_ascii=False, default=str)  # Parquet cells may be dates, bytes
    return text if len(text) <= 60 else text[:57] + "..."


def decode_text(path: Path, raw: bytes) -> str:
    """Annotation bytes as text: UTF-8 (a BOM is dropped), or UTF-16/32 when a BOM says so."""
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                       (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                       (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            break
    else:
        codec = "utf-8"
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not {codec.upper()} text (byte {err.start}: {err.reason}); "
                              "save it as UTF-8") from None


def _json(text: str):
    """json.loads, with a structure nested past Python's recursion limit as a ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_records(path: str | Path) -> Iterator[tuple[_Ctx, dict | AnnotationError]]:
    """Each object of a JSON list, JSONL or Parquet file, with its location ('line N', 'record N'
    or 'row N'). A line or element that is not an object comes as an AnnotationError in place of
    the record (the caller may skip it); a file that cannot be read at all raises one."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    if path.suffix == ".parquet":
        yield from _parquet_records(path)
        return
    text = decode_text(path, path.read_bytes())
    if text.lstrip().startswith("["):
        try:
            records = _json(text)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        except ValueError as err:
            raise AnnotationError(f"{path}: not valid JSON ({err})") from None
        for i, record in enumerate(records):
            ctx = _Ctx(path, f"record {i}")
            yield ctx, record if isinstance(record, dict) else \
                AnnotationError(f"{path}:record {i}: expected a JSON object, got {_short(record)}")
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        ctx = _Ctx(path, f"line {lineno}")
        try:
            record = _json(line)
        except json.JSONDecodeError as err:
            yield ctx, AnnotationError(f"{path}:line {lineno}: not valid JSON ({err.msg})")
            continue
        except ValueError as err:
            yield ctx, AnnotationError(f"{path}:line {lineno}: not valid JSON ({err})")
            continue
        yield ctx, record if isinstance(record, dict) else \
            AnnotationError(f"{path}:line {lineno}: expected a JSON object, got {_short(record)}")


def _parquet_records(path: Path) -> Iterator[tuple[_Ctx, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise AnnotationError(f"{path}: reading Parquet needs pyarrow: pip install 'mambamia[parquet]' "
                              "(or convert the file to JSONL)") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own error types for damaged files
        raise AnnotationError(f"{path}: not a readable Parquet file ({_short(str(err))})") from None
    # Record batch by record batch: list columns (Video-MME's options) become Python lists.
    row = 0
    for batch in table.to_batches():
        for record in batch.to_pylist():
            yield _Ctx(path, f"row {row}"), record
            row += 1


def detect_format(record: dict) -> str | None:
    if "conversations" in record:
        return "llava"
    if "videoID" in record or ("questions" in record and "video_id" in record):
        return "videomme"
    if "candidates" in record:
        return "mlvu"
    if "qa" in record and "key" in record:
        return "lvbench"
    return None


def parse_file(path: str | Path, fmt: str = "auto",
               on_error: Callable[[AnnotationError], None] | None = None) -> list[VideoItem]:
    """All items of one annotation file, in file order (one per record; grouping is the caller's).

    A malformed record raises AnnotationError, or, with `on_error`, is passed to it and skipped;
    a file that cannot be read at all (not UTF-8/16/32 text, a JSON list with a syntax error) is
    passed to `on_error` whole. Questions without an id get one derived from file and location
    ("mlvu.json:record 12"), stable across runs, and one warning per file says how many.
    """
    if fmt not in FORMATS:
        raise AnnotationError(f"{path}: unknown annotation format {fmt!r}; expected one of {FORMATS}")
    items: list[VideoItem] = []
    try:
        for ctx, record in read_records(path):
            try:
                if isinstance(record, AnnotationError):
                    raise record
                if fmt == "auto":
                    fmt = _detect(ctx, record)
                items.extend(PARSERS[fmt](ctx, record))
            except AnnotationError as err:
                if on_error is None:
                    raise
                on_error(err)
    except AnnotationError as err:  # the file as a whole
        if on_error is None:
            raise
        on_error(err)
    derived = [q["id"] for item in items for q in item.qa if q.pop("id_derived", False)]
    if derived:
        log.warning("%s: %d question(s) without an id; ids derived from file and location (e.g. %r)",
                    path, len(derived), derived[0])
    return items


def _detect(ctx: _Ctx, record: dict) -> str:
    fmt = detect_format(record)
    if fmt is None:
        raise AnnotationError(f"{ctx.path}:{ctx.where}: cannot tell the format from fields "
                              f"{sorted(map(str, record))[:8]}; pass --format")
    return fmt


def _conversation(ctx: _Ctx, turns: Any, name: str) -> list[dict]:
    """Validated ShareGPT turns: an optional system turn, then human/gpt alternating, human first."""
    if not isinstance(turns, list) or len(turns) < 2:
        raise ctx.fail(name, "a list of at least 2 turns", turns)
    out = []
    if isinstance(turns[0], dict) and turns[0].get("from") == "system":
        if not isinstance(turns[0].get("value"), str):
            raise ctx.fail(f"{name}[0].value", "a string", turns[0].get("value"))
        out.append({"from": "system", "value": turns[0]["value"]})
    first = len(out)
    if len(turns) - first < 2:
        raise ctx.fail(name, "a question and an answer after the system turn", turns)
    for i in range(first, len(turns)):
        turn = turns[i]
        if not isinstance(turn, dict):
            raise ctx.fail(f"{name}[{i}]", "an object with 'from' and 'value'", turn)
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise ctx.fail(f"{name}[{i}].from", f"one of {sorted(_ROLES)}", turn.get("from"))
        expected_role = "human" if (i - first) % 2 == 0 else "gpt"
        if role != expected_role:
            raise ctx.fail(f"{name}[{i}].from", f"'{expected_role}' (turns alternate, human first)", turn["from"])
        value = turn.get("value")
        if not isinstance(value, str):
            raise ctx.fail(f"{name}[{i}].value", "a string", value)
        count = sum(value.count(tag) for tag in _PLACEHOLDERS)
        if count and i > first:
            raise ctx.fail(f"{name}[{i}].value", "the <video>/<image> placeholder only in the first human turn")
        if count > 1:
            raise ctx.fail(f"{name}[{i}].value", f"one <video>/<image> placeholder, found {count}")
        out.append({"from": role, "value": value.replace("<image>", VIDEO_TOKEN)})
    if VIDEO_TOKEN not in out[first]["value"]:
        out[first]["value"] = f"{VIDEO_TOKEN}\n{out[first]['value']}"
    return out


def _parse_llava(ctx: _Ctx, record: dict) -> list[VideoItem]:
    video = ctx.get(record, "video", str)
    return [VideoItem(video=video, where=ctx.location,
                      conversations=[_conversation(ctx, record.get("conversations"), "conversations")])]


def answer_index(ctx: _Ctx, answer: Any, options: list[str], name: str) -> int | None:
    """A letter ("B", "(B)", "B. text") or an option's exact text -> index; None when absent."""
    if answer is None or answer == "":
        return None
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(options):
            return answer
        raise ctx.fail(name, f"an option index below {len(options)}", answer)
    if not isinstance(answer, str):
        raise ctx.fail(name, "a letter or option text", answer)
    text = answer.strip()
    if text in options:
        return options.index(text)
    m = _LETTER_PREFIX.match(text + ".") if len(text) <= 3 else _LETTER_PREFIX.match(text)
    if m:
        idx = ord(m.group(1)) - ord("A")
        if idx < len(options):
            return idx
    raise ctx.fail(name, f"a letter A-{chr(ord('A') + len(options) - 1)} or one of the options' texts", answer)


def strip_letters(ctx: _Ctx, options: Any, name: str, *, prefixed: bool) -> list[str]:
    """["A. red", "B. blue"] -> ["red", "blue"]; letters must run A, B, C... in order."""
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise ctx.fail(name, "a list of at least 2 strings", options)
    if not prefixed:
        return [o.strip() for o in options]
    out = []
    for i, option in enumerate(options):
        m = _LETTER_PREFIX.match(option)
        if m is None or m.group(1) != chr(ord("A") + i):
            raise ctx.fail(f"{name}[{i}]", f"an option starting with '{chr(ord('A') + i)}.'", option)
        out.append(option[m.end():].strip())
    return out


def _qa(ctx: _Ctx, *, id: Any, question: str, options: list[str], answer: int | None, type: Any = None,
        duration_bucket: Any = None, time_reference: Any = None, part: str = "") -> dict:
    """A normalised question. Without an id (MLVU publishes none), one is derived from where the
    question is, "file.json:record 12[:questions[1]]": unique within a run and stable across runs,
    so eval, which keys predictions by id, never meets a missing one."""
    if isinstance(type, list):
        type = ", ".join(str(t) for t in type)
    derived = id is None or str(id).strip() == ""
    if derived:
        id = f"{ctx.path.name}:{ctx.where}" + (f":{part}" if part else "")
    return {"id": str(id), "id_derived": derived, "question": question.strip(), "options": options,
            "answer": answer, "type": None if type is None else str(type),
            "duration_bucket": None if duration_bucket is None else str(duration_bucket),
            "time_reference": None if time_reference in (None, "") else str(time_reference)}


def _videomme_question(ctx: _Ctx, q: dict, prefix: str) -> dict:
    options = strip_letters(ctx, q.get("options"), f"{prefix}options", prefixed=True)
    return _qa(ctx, id=q.get("question_id"), question=ctx.get(q, "question", str, prefix=prefix), options=options,
               part=prefix.rstrip("."),
               answer=answer_index(ctx, q.get("answer"), options, f"{prefix}answer"),
               type=q.get("task_type"), duration_bucket=q.get("duration"))


def _parse_videomme(ctx: _Ctx, record: dict) -> list[VideoItem]:
    video_id = ctx.get(record, "videoID", str)
    if "questions" in record:
        questions = ctx.get(record, "questions", list)
        qa = []
        for i, q in enumerate(questions):
            if not isinstance(q, dict):
                raise ctx.fail(f"questions[{i}]", "an object", q)
            qa.append(_videomme_question(ctx, {"duration": record.get("duration"), **q}, f"questions[{i}]."))
    else:
        qa = [_videomme_question(ctx, record, "")]
    return [VideoItem(video=f"{video_id}.mp4", where=ctx.location, qa=qa)]


def _parse_mlvu(ctx: _Ctx, record: dict) -> list[VideoItem]:
    video = ctx.get(record, "video", str)
    options = strip_letters(ctx, record.get("candidates"), "candidates", prefixed=False)
    duration = ctx.get(record, "duration", (int, float), optional=True)
    if duration is not None and not (math.isfinite(duration) and duration >= 0):
        raise ctx.fail("duration", "a finite number of seconds >= 0", duration)
    qa = _qa(ctx, id=record.get("question_id"), question=ctx.get(record, "question", str), options=options,
             answer=answer_index(ctx, record.get("answer"), options, "answer"),
             type=record.get("question_type"))
    return [VideoItem(video=video, where=ctx.location, qa=[qa], duration=duration)]


def _split_lvbench_question(ctx: _Ctx, text: str, name: str) -> tuple[str, list[str]]:
    question_lines, options = [], []
    for line in text.splitlines():
        m = _LVBENCH_OPTION.match(line.strip())
        if m:
            if m.group(1) != chr(ord("A") + len(options)):
                raise ctx.fail(name, f"option '({chr(ord('A') + len(options))})' next", line)
            options.append(m.group(2).strip())
        elif options:
            raise ctx.fail(name, "options '(A) ...' as the last lines", line)
        else:
            question_lines.append(line)
    if len(options) < 2:
        raise ctx.fail(name, "a question followed by lines '(A) ...', '(B) ...'", text)
    return "\n".join(question_lines).strip(), options


def _parse_lvbench(ctx: _Ctx, record: dict) -> list[VideoItem]:
    key = ctx.get(record, "key", str)
    entries = ctx.get(record, "qa", list)
    qa = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ctx.fail(f"qa[{i}]", "an object", entry)
        text = ctx.get(entry, "question", str, prefix=f"qa[{i}].")
        question, options = _split_lvbench_question(ctx, text, f"qa[{i}].question")
        qa.append(_qa(ctx, id=entry.get("uid"), question=question, options=options, part=f"qa[{i}]",
                      answer=answer_index(ctx, entry.get("answer"), options, f"qa[{i}].answer"),
                      type=entry.get("question_type"), time_reference=entry.get("time_reference")))
    info = record.get("video_info") if isinstance(record.get("video_info"), dict) else {}
    minutes = info.get("duration_minutes")
    duration = float(minutes) * 60 if isinstance(minutes, (int, float)) else None
    return [VideoItem(video=f"{key}.mp4", where=ctx.location, qa=qa, duration=duration)]


PARSERS: dict[str, Callable[[_Ctx, dict], list[VideoItem]]] = {
    "llava": _parse_llava, "videomme": _parse_videomme, "mlvu": _parse_mlvu, "lvbench": _parse_lvbench,
}
