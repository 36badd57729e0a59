"""Render one row of a task format into token ids and labels.

Loss masking is the point of this module: for instruction and chat data only the response / assistant tokens
carry labels (the rest are -100), so the model learns to answer, not to repeat prompts. Prompts and responses
are tokenized as separate segments, which is also how generation sees them (prompt ids, then new tokens).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from typing import Any

from .conversations import Conversation, ConversationError, from_messages, from_sharegpt
from .prompts import PromptRenderer, Rendered
from .readers import DataError

IGNORE = -100
PREFERENCE_FORMATS = ("preference", "unpaired_preference")
CONVERSATION_FORMATS = ("chat", "sharegpt")


class RowError(ValueError):
    """This row cannot be used; the message says why (reported with its line number)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # token labels for causal LM, a class index for classification
    prompt_ids: list[int] = field(default_factory=list)  # what generation starts from
    reference: str | None = None  # expected generated answer
    truncated: bool = False
    rejected_ids: list[int] | None = None  # format preference: the rejected answer's ids (after prompt_ids)
    desirable: bool | None = None  # format unpaired_preference: whether the answer is a desirable one
    fields: dict[str, Any] | None = None  # the row's columns (and __file__, __line__), for GRPO's rewards


def _text_field(fields: dict[str, Any], name: str, required: bool = True) -> str:
    value = fields.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowError(f"missing or empty field {name!r}")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field {name!r} must be text, got {type(value).__name__}")
    return value


class Encoder:
    """Turns canonical rows (columns already renamed) into Examples for one tokenizer and task."""

    def __init__(self, tokenizer: Any, spec: Any, label_names: list[str] | None = None):
        self.tokenizer = tokenizer
        self.spec = spec
        self.max_length = spec.max_length
        self.label_index = {name: i for i, name in enumerate(label_names or [])}
        self.prompts = PromptRenderer(tokenizer, spec.system_prompt)
        self.has_chat_template = self.prompts.has_chat_template

    def key(self, fields: dict[str, Any]) -> str:
        """What makes two rows duplicates (the input, not the answer)."""
        try:
            return self._key(fields)
        except RowError:  # reported with its line number when the row is encoded
            return f"\x00unkeyable:{fields.get('__file__')}:{fields.get('__line__')}"

    def _key(self, fields: dict[str, Any]) -> str:
        fmt = self.spec.format
        if fmt in PREFERENCE_FORMATS:
            from .preference import pair_key

            return pair_key(fields, self.spec.instruction_template)
        if fmt in CONVERSATION_FORMATS:
            return self.conversation(fields).key()
        if fmt == "instruction" and self.spec.instruction_template:
            return self._templated(fields)[0]
        if fmt == "instruction":
            return f"{fields.get('instruction')}\x00{fields.get('input')}"
        return _text_field(fields, "text")  # a row without one is reported as malformed, not deduplicated

    def encode(self, fields: dict[str, Any]) -> Example:
        fmt = self.spec.format
        if fmt == "classification":
            return self._classification(fields)
        if fmt == "instruction":
            instruction, inp, output = self._instruction_fields(fields)
            return self._prompt_response(self._rendered(self.prompts.instruction, instruction, inp), output)
        if fmt in CONVERSATION_FORMATS:
            return self._chat(self.conversation(fields))
        if fmt in PREFERENCE_FORMATS:
            from .preference import encode_preference, encode_unpaired

            return (encode_preference if fmt == "preference" else encode_unpaired)(self, fields)
        return self._plain_text(fields)

    def prompt_ids(self, fields: dict[str, Any]) -> list[int]:
        """The ids generation starts from for a row without its answer: the same rendering (templates, chat
        template, system prompt) as training's prompt part, so a trained adapter sees what it learned from."""
        fmt = self.spec.format
        if fmt in PREFERENCE_FORMATS:
            from .preference import render_prompt

            return render_prompt(self, fields)[0]
        if fmt == "instruction":
            if self.spec.instruction_template:
                try:
                    instruction, inp = self.spec.instruction_template.format(**fields), ""
                except KeyError as exc:
                    raise RowError(
                        f"instruction_template needs field {exc}; give it (as JSON: {{{exc}: ...}})"
                    ) from None
            else:
                instruction, inp = (
                    _text_field(fields, "instruction"),
                    _text_field(fields, "input", required=False),
                )
            return self._bos() + self._rendered(self.prompts.instruction, instruction, inp).ids()
        if fmt in CONVERSATION_FORMATS:
            conversation = self.conversation(fields)
            return (
                self._bos()
                + self._rendered(self.prompts.chat, conversation.messages, True, conversation.tools).ids()
            )
        if fmt == "classification":
            raise RowError(
                "a classification config has no prompts to generate from; use `deltatune classify`"
            )
        return self._bos() + self.prompts.text_ids(_text_field(fields, "text"))

    def prompt_fields(self, text: str) -> dict[str, Any]:
        """A plain text given as a prompt, as the row field(s) this format reads: the one field the
        instruction template names, or the format's main field."""
        spec = self.spec
        if spec.format == "instruction" and spec.instruction_template:
            names = [n for _, n, _, _ in string.Formatter().parse(spec.instruction_template) if n]
            if len(set(names)) != 1:
                raise RowError(
                    f"instruction_template uses fields {sorted(set(names))}; give each prompt as a JSON object "
                    "with them"
                )
            return {names[0]: text}
        if spec.format == "instruction":
            return {"instruction": text}
        if spec.format in PREFERENCE_FORMATS:
            return {"prompt": text}
        if spec.format == "chat":
            return {"messages": [{"role": "user", "content": text}]}
        if spec.format == "sharegpt":
            return {"conversations": [{"from": "human", "value": text}]}
        return {"text": text}

    def conversation(self, fields: dict[str, Any]) -> Conversation:
        """The row's conversation (format chat: `messages`; sharegpt: `conversations`; either: `tools`),
        checked, and renderable by this tokenizer's chat template."""
        if not self.has_chat_template:
            raise RowError(
                f"format {self.spec.format!r} needs a tokenizer with a chat template; use format: instruction"
            )
        try:
            if self.spec.format == "sharegpt":
                conversation = from_sharegpt(fields.get("conversations"), fields.get("tools"))
            else:
                conversation = from_messages(fields.get("messages"), fields.get("tools"))
        except ConversationError as exc:
            raise RowError(str(exc)) from None
        used = {"tool_calls": conversation.calls_tools, "tools": bool(conversation.tools)}
        missing = (
            [part for part in self.prompts.unrendered_tool_parts() if used[part]]
            if any(used.values())
            else []
        )
        if missing:
            raise DataError(
                f"the tokenizer's chat template does not render {' or '.join(missing)}: rows with tool calls would "
                "train on turns with the calls left out. Use a model whose chat template renders tools (Qwen2.5, "
                "Llama 3.1 and later), or set its tokenizer's chat_template to one that does"
            )
        return conversation

    # --- formats -------------------------------------------------------------------------------------------
    def _classification(self, fields: dict[str, Any]) -> Example:
        text = _text_field(fields, "text")
        label = fields.get("label")
        label = label.strip() if isinstance(label, str) else label
        if is_missing(label):
            raise RowError(f"label {label!r} is a missing value; give the row its class or drop it")
        if "\n" in str(label):
            raise RowError(f"the label {str(label)[:40]!r}... spans several lines; a class name is one line")
        if str(label) not in self.label_index:
            raise RowError(f"label {label!r} is not one of {sorted(self.label_index)}")
        ids = self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]
        return Example(ids, self.label_index[str(label)], reference=str(label))

    def _templated(self, fields: dict[str, Any]) -> tuple[str, str]:
        spec = self.spec
        try:
            instruction = spec.instruction_template.format(**fields)
            output = spec.output_template.format(**fields) if spec.output_template else fields.get("output")
        except KeyError as exc:
            raise RowError(f"template field {exc} is not a column of this row") from None
        return instruction, output

    def _instruction_fields(self, fields: dict[str, Any]) -> tuple[str, str, str]:
        if self.spec.instruction_template:
            instruction, output = self._templated(fields)
            return instruction, "", _text_field({"output": output}, "output")
        return (
            _text_field(fields, "instruction"),
            _text_field(fields, "input", required=False),
            _text_field(fields, "output"),
        )

    def _rendered(self, render: Any, *args: Any) -> Rendered:
        """`render(*args)` of the prompt renderer, with its refusal as this row's error."""
        try:
            return render(*args)
        except ValueError as exc:
            raise RowError(str(exc)) from None

    def _apply_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: Any = None
    ) -> str:
        try:
            return self.prompts.chat_text(messages, add_generation_prompt, tools)
        except ValueError as exc:
            raise RowError(str(exc)) from None

    def answer_ids(self, answer: str) -> list[int]:
        """A plain-text answer's ids: with a chat template, followed by the template's own end-of-turn
        text (the model must learn to emit it); without one, by EOS."""
        if not self.has_chat_template:
            return self.prompts.text_ids(answer) + self._eos()
        full = self._apply_template(
            [{"role": "user", "content": "\x00"}, {"role": "assistant", "content": answer}], False
        )
        tail = full[full.rindex(answer) + len(answer) :] if answer in full else ""
        return self._rendered(self.prompts.render, lambda t: t[0] + tail, [answer]).ids()

    def _prompt_response(self, prompt: Rendered, output: str) -> Example:
        prompt_ids = self._bos() + prompt.ids()
        response_ids = self.answer_ids(output)
        return self._assemble([(prompt_ids, False), (response_ids, True)], reference=output)

    def _chat(self, conversation: Conversation) -> Example:
        turns = [i for i, m in enumerate(conversation.messages) if m["role"] == "assistant"]
        if not turns:
            raise RowError("no assistant message to learn from")
        trained = set(turns[-1:] if self.spec.assistant_turns == "last" else turns)
        messages, tools = conversation.messages[: turns[-1] + 1], conversation.tools
        self._check_tool_text(messages, tools)
        # Each turn's prompt and answer are ranges of the whole conversation's rendering; rendered once more
        # as a whole only when a message holds a special token's text, which must stay text.
        contents = [m["content"] for m in messages]
        typed = self.prompts.typed(contents + ([self.spec.system_prompt] if self.spec.system_prompt else []))
        whole = self._rendered(self.prompts.chat, messages, False, tools) if typed else None
        segments: list[tuple[list[int], bool]] = []
        rendered = prompt = full = ""
        for turn in turns:
            prompt = self._apply_template(messages[:turn], True, tools)
            full = self._apply_template(messages[: turn + 1], False, tools)
            if not (prompt.startswith(rendered) and full.startswith(prompt)) or (
                whole is not None and not whole.text.startswith(full)
            ):
                raise RowError("the chat template does not render turns as prefixes; cannot mask per turn")
            if whole is None:
                segments.append((self.prompts.markup_ids(prompt[len(rendered) :]), False))
                segments.append((self.prompts.markup_ids(full[len(prompt) :]), turn in trained))
            else:
                segments.append((whole.ids(len(rendered), len(prompt)), False))
                segments.append((whole.ids(len(prompt), len(full)), turn in trained))
            rendered = full
        segments[0] = (self._bos() + segments[0][0], False)
        last = messages[turns[-1]]
        reference = self._rendered_call(full[len(prompt) :]) if last.get("tool_calls") else last["content"]
        return self._assemble(segments, reference=reference)

    def _check_tool_text(self, messages: list[dict[str, Any]], tools: Any) -> None:
        """Tool calls and schemas are rendered by the template as they are: a special token's text in them
        would become a control token, so such a row is refused (contents are kept as text instead)."""
        calls = [m["tool_calls"] for m in messages if m.get("tool_calls")]
        if calls or tools:
            found = self.prompts.typed([json.dumps([calls, tools], ensure_ascii=False)])
            if found:
                raise RowError(
                    "a tool call or tool schema holds a special token's text, which the template would turn into "
                    "a control token; remove it"
                )

    def _rendered_call(self, answer: str) -> str:
        """A tool-calling turn as the model should write it: the template's rendering of the calls, without
        the end-of-turn text that follows every answer."""
        closed = self._apply_template(
            [{"role": "user", "content": "\x00"}, {"role": "assistant", "content": "\x01"}], False, None
        )
        tail = closed[closed.rindex("\x01") + 1 :] if "\x01" in closed else ""
        return answer.removesuffix(tail) if tail else answer

    def _plain_text(self, fields: dict[str, Any]) -> Example:
        ids = self._bos() + self.prompts.text_ids(_text_field(fields, "text")) + self._eos()
        truncated = len(ids) > self.max_length
        ids = ids[: self.max_length]
        return Example(ids, list(ids), truncated=truncated)

    # --- helpers -------------------------------------------------------------------------------------------
    def _bos(self) -> list[int]:
        return self.prompts.bos()

    def _eos(self) -> list[int]:
        return self.prompts.eos()

    def _assemble(self, segments: list[tuple[list[int], bool]], reference: str) -> Example:
        ids: list[int] = []
        labels: list[int] = []
        for seg_ids, trained in segments:
            ids += seg_ids
            labels += seg_ids if trained else [IGNORE] * len(seg_ids)
        # Generation starts from everything before the last trained segment.
        prompt_len = len(ids) - len(segments[-1][0])
        if prompt_len >= self.max_length:
            raise RowError(f"prompt is {prompt_len} tokens, data.max_length is {self.max_length}")
        truncated = len(ids) > self.max_length
        return Example(
            ids[: self.max_length], labels[: self.max_length], ids[:prompt_len], reference, truncated
        )


MISSING_VALUES = frozenset({"", "nan", "null", "none"})  # how files spell "no value", in any case


def is_missing(value: Any) -> bool:
    """A missing value as files spell it: None, a float NaN (JSON's NaN), or the text NaN, null, None
    or nothing at all. A label like that is no class."""
    if value is None or (isinstance(value, float) and value != value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_VALUES
