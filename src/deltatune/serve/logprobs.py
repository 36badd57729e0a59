"""Token log-probabilities in OpenAI's two shapes: `/v1/completions` (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) and `/v1/chat/completions` (`content`: one entry per token, with its UTF-8
bytes). Tokens whose text starts after a stop string's cut are left out, as their text is.

A token can hold part of a UTF-8 character, whose text on its own is only U+FFFD. Its bytes are then read from
the token's spelling in the vocabulary (byte-level BPE's byte alphabet, or SentencePiece's `<0xNN>` byte
fallback); the completions shape names it as OpenAI does, "bytes:\\xe2\\x80", so that no two tokens share a
name in `top_logprobs`.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from ..runtime.sampling import TokenLogprob

REPLACEMENT = "\ufffd"  # what a token holding part of a UTF-8 character decodes to on its own
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_of_symbol() -> dict[str, int]:
    """Byte-level BPE's alphabet: bytes that are printable Latin-1 characters stand for themselves; the
    others (controls, space, ...) are spelled with the characters from U+0100 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    symbols |= {chr(256 + n): b for n, b in enumerate(others)}
    return symbols


def token_bytes(tokenizer: Any, token: int) -> bytes | None:
    """The token's own bytes, or None when neither its text nor its spelling says them."""
    text = tokenizer.decode([token], skip_special_tokens=True)
    if REPLACEMENT not in text:
        return text.encode()
    spelling = tokenizer.convert_ids_to_tokens(token)
    if not isinstance(spelling, str):
        return None
    if match := BYTE_FALLBACK.fullmatch(spelling):
        return bytes([int(match.group(1), 16)])
    alphabet = _byte_of_symbol()
    if spelling and all(ch in alphabet for ch in spelling):
        return bytes(alphabet[ch] for ch in spelling)
    return None


class TokenTexts:
    """Each token's own text, and where it starts in the decoded answer (a character offset; a token that
    ends inside a character starts that character's offset for the next)."""

    def __init__(self, tokenizer: Any, tokens: list[int]) -> None:
        self.tokenizer = tokenizer
        self.offsets = [
            len(tokenizer.decode(tokens[:i], skip_special_tokens=True).rstrip(REPLACEMENT))
            for i in range(len(tokens))
        ]

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=True)

    def name(self, token: int) -> str:
        """The token's text, or "bytes:\\x.." when it holds part of a character (OpenAI's completions)."""
        text = self.text(token)
        if REPLACEMENT not in text:
            return text
        raw = token_bytes(self.tokenizer, token)
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw) if raw is not None else text

    def kept(self, answer: str) -> int:
        """How many tokens the answer holds: those starting before its end (all, unless a stop string cut it)."""
        return sum(offset < len(answer) for offset in self.offsets) if answer else 0


def for_completion(
    tokenizer: Any, tokens: list[int], chances: list[TokenLogprob] | None, answer: str
) -> dict[str, list]:
    texts = TokenTexts(tokenizer, tokens)
    kept = (chances or [])[: texts.kept(answer)]
    return {
        "tokens": [texts.name(c.token) for c in kept],
        "token_logprobs": [c.logprob for c in kept],
        "top_logprobs": [{texts.name(t): lp for t, lp in c.top} for c in kept],
        "text_offset": texts.offsets[: len(kept)],
    }


def for_chat(
    tokenizer: Any, tokens: list[int], chances: list[TokenLogprob] | None, answer: str
) -> dict[str, Any]:
    texts = TokenTexts(tokenizer, tokens)

    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(tokenizer, token)
        return {
            "token": texts.text(token),
            "logprob": logprob,
            "bytes": list(raw) if raw is not None else None,
        }

    kept = (chances or [])[: texts.kept(answer)]
    content = [entry(c.token, c.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in c.top]} for c in kept]
    return {"content": content, "refusal": None}
