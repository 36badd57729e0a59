"""Preference rows rendered into token ids: a prompt with a chosen and a rejected answer (`format: preference`),
or a prompt with one answer marked desirable or not (`format: unpaired_preference`, for KTO).

A row comes in one of two shapes, as TRL takes them: plain strings, where the prompt is rendered exactly as
`format: instruction` renders an instruction (chat template, system prompt, or `instruction_template` over the
row's columns) and each answer as that format's response; or conversational, where `prompt` is a list of
messages and each answer a list of assistant messages, rendered by the tokenizer's chat template. Either way
the prompt's tokens are shared by both answers: an Example holds prompt + chosen as its `input_ids` (so the
SFT loss, generation and `deltatune eval` read it as an instruction row) and the rejected answer's ids apart.
"""

from __future__ import annotations

import json
from typing import Any

from .formats import IGNORE, Encoder, Example, RowError, _text_field

TRUE_WORDS, FALSE_WORDS = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no"})


def pair_key(fields: dict[str, Any], instruction_template: str | None = None) -> str:
    """Two rows are duplicates when prompt (as the template builds it from the row's columns) and both answers
    are the same."""
    prompt = fields.get("prompt")
    if instruction_template and not isinstance(prompt, list):
        try:
            prompt = instruction_template.format(**fields)
        except (KeyError, IndexError, ValueError):
            raise RowError("the row lacks a field instruction_template names") from None
    answers = [fields.get(k) for k in ("chosen", "rejected", "completion", "label")]
    return json.dumps([prompt, *answers], default=str)


def encode_preference(encoder: Encoder, fields: dict[str, Any]) -> Example:
    prompt_ids, conversational = render_prompt(encoder, fields)
    chosen = _answer_ids(encoder, fields, "chosen", conversational)
    rejected = _answer_ids(encoder, fields, "rejected", conversational)
    if chosen == rejected:
        raise RowError(
            "chosen and rejected are the same answer; a preference pair needs two different answers"
        )
    room = _room(encoder, prompt_ids)
    if chosen[:room] == rejected[:room]:
        raise RowError(
            f"chosen and rejected differ only after the first {room} answer tokens, which is all "
            f"data.max_length={encoder.max_length} leaves after the prompt; raise data.max_length"
        )
    example = _example(prompt_ids, chosen, room, fields.get("chosen"))
    example.rejected_ids = rejected[:room]
    example.truncated |= len(rejected) > room
    return example


def encode_unpaired(encoder: Encoder, fields: dict[str, Any]) -> Example:
    prompt_ids, conversational = render_prompt(encoder, fields)
    completion = _answer_ids(encoder, fields, "completion", conversational)
    example = _example(prompt_ids, completion, _room(encoder, prompt_ids), fields.get("completion"))
    example.desirable = desirable(fields.get("label"))
    return example


def desirable(label: Any) -> bool:
    """A KTO label: true (desirable) or false, as JSON booleans, 1 / 0, or the words true / false / yes / no."""
    if isinstance(label, bool):
        return label
    if isinstance(label, int) and label in (0, 1):
        return bool(label)
    text = str(label).strip().lower() if isinstance(label, str) else None
    if text in TRUE_WORDS or text in FALSE_WORDS:
        return text in TRUE_WORDS
    raise RowError(f"label {label!r} is not true or false (desirable or not); give true / false, 1 / 0")


def render_prompt(encoder: Encoder, fields: dict[str, Any]) -> tuple[list[int], bool]:
    """The prompt's ids (what generation starts from), and whether the row is conversational."""
    prompt = fields.get("prompt")
    if isinstance(prompt, list):
        if not encoder.has_chat_template:
            raise RowError(
                "a conversational prompt (a list of messages) needs a tokenizer with a chat template"
            )
        _check_messages(prompt, "prompt")
        return encoder._bos() + encoder._rendered(encoder.prompts.chat, prompt).ids(), True
    if encoder.spec.instruction_template:
        try:
            instruction = encoder.spec.instruction_template.format(**fields)
        except KeyError as exc:
            raise RowError(f"template field {exc} is not a column of this row") from None
    else:
        instruction = _text_field(fields, "prompt")
    return encoder._bos() + encoder._rendered(encoder.prompts.instruction, instruction).ids(), False


def _answer_ids(encoder: Encoder, fields: dict[str, Any], name: str, conversational: bool) -> list[int]:
    answer = fields.get(name)
    if isinstance(answer, list) or conversational:
        return _conversational_answer(encoder, fields["prompt"], answer, name)
    return encoder.answer_ids(_text_field(fields, name))


def _conversational_answer(encoder: Encoder, prompt: Any, answer: Any, name: str) -> list[int]:
    if not isinstance(prompt, list):
        raise RowError(f"{name} is a list of messages, so prompt must be one too (TRL's conversational form)")
    if not isinstance(answer, list) or not answer:
        raise RowError(f"missing or empty {name}: give a list of assistant messages")
    _check_messages(answer, name)
    if not any(m["content"].strip() for m in answer):
        raise RowError(f"{name} is empty: its messages have no content")
    before = encoder._apply_template(prompt, add_generation_prompt=True)
    full = encoder._rendered(encoder.prompts.chat, [*prompt, *answer], False)
    if not full.text.startswith(before):
        raise RowError("the chat template does not render the prompt as a prefix of prompt + answer")
    return full.ids(len(before))


def _check_messages(messages: list[Any], name: str) -> None:
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
        raise RowError(f"{name} must be a list of {{role, content}} objects")


def _room(encoder: Encoder, prompt_ids: list[int]) -> int:
    room = encoder.max_length - len(prompt_ids)
    if room <= 0:
        raise RowError(
            f"prompt is {len(prompt_ids)} tokens, which leaves no room for an answer within "
            f"data.max_length={encoder.max_length}; raise it or shorten the prompt"
        )
    return room


def _example(prompt_ids: list[int], answer: list[int], room: int, reference: Any) -> Example:
    kept = answer[:room]
    text = reference if isinstance(reference, str) else _last_content(reference)
    return Example(
        prompt_ids + kept,
        [IGNORE] * len(prompt_ids) + kept,
        list(prompt_ids),
        text,
        truncated=len(answer) > room,
    )


def _last_content(messages: Any) -> str | None:
    return messages[-1].get("content") if isinstance(messages, list) and messages else None
