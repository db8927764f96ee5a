"""Chat templating and label masking against hand-built token sequences of the tiny tokenizer."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from data.text import (IGNORE_INDEX, mcq_prompt, option_letter, qa_conversation, record_conversations,
                       to_messages, tokenize_conversation)


@pytest.fixture(scope="module")
def tok(tiny_assets):
    return AutoTokenizer.from_pretrained(str(tiny_assets["tokenizer"]))


def _pieces_oracle(tok, pieces):
    """Tokenize hand-written pieces separately; a piece marked True is supervised."""
    ids, labels = [], []
    for text, supervised in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


CONV = [{"from": "human", "value": "<video>\nWhat colour is the shape?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Which shape?"},
        {"from": "gpt", "value": "A circle."}]


def test_labels_match_hand_built_chatml(tok):
    # ChatML written out by hand (not through the template): only answers + their <|im_end|> learn.
    expected = _pieces_oracle(tok, [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
         "<|im_start|>user\n<video>\nWhat colour is the shape?<|im_end|>\n<|im_start|>assistant\n", False),
        ("red<|im_end|>", True),
        ("\n<|im_start|>user\nWhich shape?<|im_end|>\n<|im_start|>assistant\n", False),
        ("A circle.<|im_end|>", True),
        ("\n", False),
    ])
    assert tokenize_conversation(tok, CONV, 512) == expected
    ids, labels = expected
    assert ids.count(tok.convert_tokens_to_ids("<video>")) == 1
    assert sum(label != IGNORE_INDEX for label in labels) > 2


def test_other_template_without_turn_newlines(tok, tiny_assets):
    vic = AutoTokenizer.from_pretrained(str(tiny_assets["tokenizer"]))
    vic.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
                         "{% else %}{{ 'ASSISTANT: ' + m['content'] + '<|endoftext|>' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}")
    # The byte-level BPE glues the space to the answer (" red"): that token is the first one learned.
    expected = _pieces_oracle(vic, [("USER: <video>\nWhat colour is the shape? ASSISTANT:", False),
                                    (" red<|endoftext|>", True),
                                    ("USER: Which shape? ASSISTANT:", False),
                                    (" the shape.<|endoftext|>", True)])
    conv = CONV[:3] + [{"from": "gpt", "value": "the shape."}]
    assert tokenize_conversation(vic, conv, 512) == expected


def test_video_placeholder_exactly_once_in_first_human_turn():
    missing = to_messages([{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "x"}])
    assert missing[0]["content"] == "<video>\nDescribe."
    twice = to_messages([{"from": "human", "value": "Look <video> here <video>"},
                         {"from": "gpt", "value": "ok"},
                         {"from": "human", "value": "<video> again?"}, {"from": "gpt", "value": "no"}])
    assert [m["content"].count("<video>") for m in twice] == [1, 0, 0, 0]
    assert twice[0]["content"].startswith("<video>\n")
    kept = to_messages([{"from": "system", "value": "Be brief."},
                        {"from": "human", "value": "Q <video>"}, {"from": "gpt", "value": "A"}])
    assert kept[1]["content"] == "Q <video>" and kept[0]["role"] == "system"
    with pytest.raises(ValueError, match="human turn before"):
        to_messages([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "<video>"}])
    with pytest.raises(ValueError, match="'from'"):
        to_messages([{"from": "robot", "value": "hi"}])


def test_truncation(tok):
    full_ids, full_labels = tokenize_conversation(tok, CONV, 10_000)
    first_answer = full_labels.index(next(x for x in full_labels if x != IGNORE_INDEX))
    ids, labels = tokenize_conversation(tok, CONV, first_answer + 1)
    assert ids == full_ids[: first_answer + 1] and labels == full_labels[: first_answer + 1]
    with pytest.raises(ValueError, match="no answer token"):
        tokenize_conversation(tok, CONV, first_answer)
    with pytest.raises(ValueError, match="beyond max_text_len"):
        tokenize_conversation(tok, CONV, 3)


def test_mcq_prompt_and_qa_conversation():
    assert [option_letter(i) for i in (0, 1, 25)] == ["A", "B", "Z"]
    with pytest.raises(ValueError):
        option_letter(26)
    prompt = mcq_prompt(" Which colour? ", ["A. red", "(B) green", "blue", "C. cyan"])
    assert prompt == ("Which colour?\nA. red\nB. green\nC. blue\nD. C. cyan\n"
                      "Answer with the option's letter from the given choices directly.")
    conv = qa_conversation({"id": "q1", "question": "Which colour?", "options": ["red", "green"], "answer": 1})
    assert conv[0]["value"].startswith("<video>\nWhich colour?\nA. red\nB. green\n")
    assert conv[1] == {"from": "gpt", "value": "B"}
    assert qa_conversation({"id": "q2", "question": "?", "options": ["a"], "answer": None}) is None
    with pytest.raises(ValueError, match="q3"):
        qa_conversation({"id": "q3", "question": "?", "options": ["a"], "answer": 4})
    meta = {"conversations": [CONV[:2]], "qa": [{"id": "q1", "question": "Q", "options": ["x", "y"], "answer": 0},
                                                 {"id": "q2", "question": "Q", "options": ["x"], "answer": None}]}
    convs = record_conversations(meta)
    assert len(convs) == 2 and convs[0] == CONV[:2] and convs[1][1]["value"] == "A"
