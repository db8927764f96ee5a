"""Conversations to token ids and loss labels, through the tokenizer's own chat template.

    ids, labels = tokenize_conversation(tokenizer, [{"from": "human", "value": "<video>\\nWhat?"},
                                                    {"from": "gpt", "value": "A red circle."}], 2048)

Labels are -100 everywhere except the assistant answers, including the end-of-turn token that
closes each answer (the model must learn to stop). Which characters belong to an answer is found by
rendering the template on growing prefixes of the conversation, so any template whose rendering of a
prefix is a prefix of the full rendering works (ChatML, Llama, Vicuna-style), without knowing its
markers.
"""
from __future__ import annotations

import re

from jinja2 import TemplateError

VIDEO_TOKEN = "<video>"
IGNORE_INDEX = -100
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


def option_letter(i: int) -> str:
    if not 0 <= i < 26:
        raise ValueError(f"option index {i}: expected 0..25")
    return chr(ord("A") + i)


def _strip_letter(option: str, i: int) -> str:
    """'B. red' / '(B) red' / 'B) red' -> 'red' when the letter is the one this option gets anyway."""
    m = re.match(r"^\s*\(?([A-Z])[.)]\s*", option)
    return option[m.end():] if m and m.group(1) == option_letter(i) else option


def mcq_prompt(question: str, options: list[str]) -> str:
    lines = [question.strip()]
    lines += [f"{option_letter(i)}. {_strip_letter(str(o), i).strip()}" for i, o in enumerate(options)]
    lines.append(MCQ_INSTRUCTION)
    return "\n".join(lines)


def qa_conversation(item: dict) -> list[dict] | None:
    """A multiple-choice item as a training conversation; None when it has no answer."""
    if not isinstance(item, dict):
        raise ValueError(f"qa item: expected an object, got {type(item).__name__}")
    answer, options, question = item.get("answer"), item.get("options"), item.get("question")
    if answer is None:
        return None
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"qa item {item.get('id')!r}: expected a non-empty string 'question'")
    if (not isinstance(options, list) or not all(isinstance(o, str) for o in options)
            or not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options)):
        raise ValueError(f"qa item {item.get('id')!r}: expected an answer index into a list of string 'options'")
    return [{"from": "human", "value": f"{VIDEO_TOKEN}\n" + mcq_prompt(question, options)},
            {"from": "gpt", "value": option_letter(answer)}]


def record_conversations(meta: dict) -> list[list[dict]]:
    """Every training conversation a record offers: its conversations, then its answered qa items."""
    conversations, qa = meta.get("conversations", []), meta.get("qa", [])
    if not isinstance(conversations, list) or not isinstance(qa, list):
        raise ValueError("'conversations' and 'qa': expected lists")
    convs = []
    for i, c in enumerate(conversations):
        if not isinstance(c, list):
            raise ValueError(f"conversation {i}: expected a list of turns, got {type(c).__name__}")
        if c:
            convs.append(c)
    for item in qa:
        conv = qa_conversation(item)
        if conv is not None:
            convs.append(conv)
    return convs


def to_messages(conversation: list[dict]) -> list[dict]:
    """ShareGPT turns -> chat messages with exactly one `<video>`, in the first user turn."""
    if not isinstance(conversation, list):
        raise ValueError(f"conversation: expected a list of turns, got {type(conversation).__name__}")
    messages = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i}: expected an object, got {type(turn).__name__}")
        role = turn.get("from", turn.get("role"))
        role = _ROLES.get(role) if isinstance(role, str) else None
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            raise ValueError(f"turn {i}: expected 'from' in {sorted(_ROLES)} and a string 'value'")
        messages.append({"role": role, "content": content})
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None or any(m["role"] == "assistant" for m in messages[:first_user]):
        raise ValueError("conversation: expected a human turn before the first answer")
    if sum(m["content"].count(VIDEO_TOKEN) for m in messages) != 1 or \
            VIDEO_TOKEN not in messages[first_user]["content"]:
        for m in messages:
            m["content"] = m["content"].replace(VIDEO_TOKEN, "")
        messages[first_user]["content"] = f"{VIDEO_TOKEN}\n" + messages[first_user]["content"].lstrip("\n")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation: no answer to learn from")
    return messages


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:  # a template refusing this conversation (e.g. roles it does not allow)
        raise ValueError(f"chat template: {e}") from None


def answer_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of the assistant answers."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        upto = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ValueError("chat template: rendering a prefix of the conversation is not a prefix "
                             "of the full rendering; cannot locate the answers")
        end = len(upto)
        while end > len(before) and upto[end - 1].isspace():  # the newline after end-of-turn
            end -= 1
        spans.append((len(before), end))
    return full, spans


def tokenize_conversation(tokenizer, conversation: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels), both at most `max_len` long; ValueError when nothing usable remains."""
    messages = to_messages(conversation)
    text, spans = answer_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    span_i = 0
    # A token overlapping an answer is learned: with templates like "ASSISTANT: {answer}" the
    # answer's first token carries the space before it (" red"), which starts outside the span.
    for t, (start, end) in enumerate(offsets):
        while span_i < len(spans) and start >= spans[span_i][1]:
            span_i += 1
        if span_i < len(spans) and end > spans[span_i][0] and end > start:
            labels[t] = ids[t]
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    if ids.count(video_id) != 1:
        raise ValueError(f"tokenizer: {VIDEO_TOKEN!r} must be one special token "
                         f"(found {ids.count(video_id)} times in the rendered conversation)")
    ids, labels = ids[:max_len], labels[:max_len]
    if video_id not in ids:
        raise ValueError(f"conversation: {VIDEO_TOKEN} falls beyond max_text_len={max_len}")
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"conversation: no answer token within max_text_len={max_len}")
    return ids, labels
