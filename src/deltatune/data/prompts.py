"""Prompts to token ids, one way for every path: training's encoder, `generate`, evaluation and the server.

A tokenizer turns the string "<|im_start|>" into the control token of that name wherever it appears, so a
user who types it into a message could open a system turn of their own inside the chat template (or, in
training data, teach the model that such text ends a turn). Text a user wrote (a message, an instruction, an
answer, a raw prompt) is therefore encoded with special tokens' strings split into ordinary pieces; only the
template's own markup becomes control tokens. Text without any special token's string encodes exactly as the
tokenizer encodes the whole rendering, so ordinary prompts are untouched.

Where the user's text sits in a rendering is found by rendering again with markers in its place, never by
searching the rendering for it: a typed "<|im_start|>" must not be confused with the template's own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def special_strings(tokenizer: Any) -> list[str]:
    """The strings a tokenizer turns into special (control) tokens."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {t.content for t in added.values() if getattr(t, "special", False)}
    found.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted(s for s in found if s)


@dataclass(frozen=True)
class Rendered:
    """A rendering split into spans: (text, written by a user). `ids(start, end)`: the ids of
    `text[start:end]`, markup encoded as the tokenizer does, users' text as text."""

    text: str
    spans: tuple[tuple[str, bool], ...]
    renderer: PromptRenderer

    def ids(self, start: int = 0, end: int | None = None) -> list[int]:
        end = len(self.text) if end is None else end
        if len(self.spans) == 1:
            return self.renderer.markup_ids(self.text[start:end])
        ids: list[int] = []
        at = 0
        for piece, typed in self.spans:
            lo, hi = max(start, at), min(end, at + len(piece))
            if lo < hi:
                part = piece[lo - at : hi - at]
                ids += self.renderer.text_ids(part) if typed else self.renderer.markup_ids(part)
            at += len(piece)
        return ids


class PromptRenderer:
    """One tokenizer's prompts: chat templates (with an optional system prompt put first), plain text and
    the BOS / EOS a rendering gets. Every caller that turns a prompt into ids goes through one of these."""

    def __init__(self, tokenizer: Any, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.specials = special_strings(tokenizer)
        self._any_special = re.compile("|".join(map(re.escape, self.specials))) if self.specials else None
        self._unrendered_tool_parts: list[str] | None = None

    # ---- ids of pieces -------------------------------------------------------------------------------------
    def text_ids(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of a user's text: special tokens' strings in it stay plain text. `add_special_tokens`: the
        tokenizer's own around it (a BOS, say), as it adds them to a whole input."""
        return self.tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)[
            "input_ids"
        ]

    def markup_ids(self, text: str) -> list[int]:
        """Ids of text deltatune or a template wrote: control tokens' strings become control tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def bos(self) -> list[int]:
        """The BOS a rendering starts with: the tokenizer's, when it adds one and no chat template does."""
        bos = self.tokenizer.bos_token_id
        add = getattr(self.tokenizer, "add_bos_token", False) and not self.has_chat_template
        return [bos] if bos is not None and add else []

    def eos(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

    # ---- renderings ----------------------------------------------------------------------------------------
    def typed(self, texts: Sequence[str]) -> list[int]:
        """Which of `texts` hold a special token's string (the ones that need care)."""
        if self._any_special is None:
            return []
        return [i for i, t in enumerate(texts) if self._any_special.search(t)]

    def render(self, fill: Callable[[Sequence[str]], str], texts: Sequence[str]) -> Rendered:
        """`fill(texts)` (a template filled with users' texts), split so that the texts encode as text."""
        whole = fill(texts)
        typed = self.typed(texts)
        if not typed:
            return Rendered(whole, ((whole, False),), self)
        marks = {i: f"\x00\x01{i}\x01\x00" for i in typed}
        marked = fill([marks.get(i, t) for i, t in enumerate(texts)])
        spans: list[tuple[str, bool]] = []
        for i in typed:
            before, found, marked = marked.partition(marks[i])
            if not found or marks[i] in marked:
                raise ValueError(self._unkeepable(texts[i]))
            spans += [(before, False), (texts[i], True)]
        spans.append((marked, False))
        if "".join(piece for piece, _ in spans) != whole:
            raise ValueError(self._unkeepable(texts[typed[0]]))
        return Rendered(whole, tuple(spans), self)

    def with_system(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt and (not messages or messages[0].get("role") != "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return list(messages)

    def chat_text(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The chat template's text over `messages` (the system prompt first when set and none is given) and
        the tool schemas it shows the model. A template that raises (roles it cannot render) is a ValueError
        carrying the template's own message."""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                self.with_system(messages),
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateError as exc:
            raise ValueError(f"the chat template refuses this conversation: {exc}") from None

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> Rendered:
        """The chat template over `messages`, split so that their contents encode as text."""
        messages = self.with_system(messages)

        def fill(contents: Sequence[str]) -> str:
            filled = [{**m, "content": c} for m, c in zip(messages, contents, strict=True)]
            return self.chat_text(filled, add_generation_prompt, tools)

        return self.render(fill, [m["content"] for m in messages])

    def unrendered_tool_parts(self) -> list[str]:
        """What of a tool-using conversation this chat template leaves out of its text ("tool_calls",
        "tools"), found by rendering a probe; many templates (SmolLM2's among them) drop both without a word,
        and a model trained on such renderings learns empty answers where the calls were."""
        if self._unrendered_tool_parts is None:
            name, schema = "probe_function_7f3a", "probe_tool_schema_7f3a"
            probe = [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": name, "arguments": {"a": 1}}}
                ]},
            ]  # fmt: skip
            tools = [{"type": "function", "function": {"name": schema, "parameters": {"type": "object"}}}]
            try:
                text = self.chat_text(probe, add_generation_prompt=False, tools=tools)
            except ValueError:
                text = ""
            self._unrendered_tool_parts = [
                part for part, mark in (("tool_calls", name), ("tools", schema)) if mark not in text
            ]
        return self._unrendered_tool_parts

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Ids of the chat template over `messages` with an assistant turn opened: what the server runs."""
        return self.chat(messages).ids()

    def instruction(self, instruction: str, inp: str = "") -> Rendered:
        """An instruction (and input) as a prompt: one user turn of the chat template when the tokenizer
        has one, else the Alpaca prompt."""
        if self.has_chat_template:
            return self.chat([{"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction}])
        template = ALPACA_PROMPT_WITH_INPUT if inp else ALPACA_PROMPT
        return self.render(lambda t: template.format(instruction=t[0], input=t[1]), [instruction, inp])

    def user_prompt_ids(self, text: str) -> list[int]:
        """A plain prompt as `generate` and evaluation send it: a user turn of the chat template when there
        is one, else the text after the tokenizer's BOS."""
        if self.has_chat_template:
            return self.chat_ids([{"role": "user", "content": text}])
        return self.bos() + self.text_ids(text)

    def _unkeepable(self, text: str) -> str:
        found = [s for s in self.specials if s in text][:3]
        return (
            "a message contains a special token's text, and the template changes message text, so it "
            f"cannot be kept as plain text; remove {found or 'it'}"
        )
