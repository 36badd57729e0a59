"""Client text to token ids, with the client's text always read as text.

A tokenizer turns the string "<|im_start|>" into the control token of that name wherever it appears, so a
user who types it into a message could open a system turn of their own inside the chat template. Text that a
client sent is therefore encoded with special tokens split into ordinary pieces; only the template's own
markup becomes control tokens. Text without any special token's string encodes exactly as before.
"""

from __future__ import annotations

from typing import Any


def special_strings(tokenizer: Any) -> list[str]:
    """The strings a tokenizer turns into special (control) tokens."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {t.content for t in added.values() if getattr(t, "special", False)}
    found.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted(s for s in found if s)


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """Ids of client text: special tokens' strings in it stay plain text. `add_special_tokens`: the
    tokenizer's own around it (a BOS, say), as it adds them to a whole input."""
    return tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Ids of the chat template rendered over `messages`, with an assistant turn opened. Each message's
    content is encoded as text; the template around it keeps its control tokens."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    specials = special_strings(tokenizer)
    contents = [m["content"] for m in messages]
    if not any(s in c for c in contents for s in specials):
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    at = 0
    for content in contents:
        if not content:
            continue
        start = rendered.find(content, at)
        if start < 0:
            raise ValueError(
                "a message contains a special token's text, and the chat template changes message text, so "
                f"it cannot be kept as plain text; remove {[s for s in specials if s in content][:3] or 'it'}"
            )
        ids += tokenizer(rendered[at:start], add_special_tokens=False)["input_ids"]
        ids += encode_text(tokenizer, content)
        at = start + len(content)
    ids += tokenizer(rendered[at:], add_special_tokens=False)["input_ids"]
    return ids
