"""Token log-probabilities in OpenAI's two shapes: `/v1/completions` (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) and `/v1/chat/completions` (`content`: one entry per token, with its UTF-8
bytes). Tokens whose text starts after a stop string's cut are left out, as their text is. Streamed chunks
carry the same entries, each chunk the tokens whose text it completes (`streaming.TextDeltas.settled`).

A token can hold part of a UTF-8 character, whose text on its own is only U+FFFD. Its bytes are then read from
the token's spelling in the vocabulary (byte-level BPE's byte alphabet, or SentencePiece's `<0xNN>` byte
fallback); the completions shape names it as OpenAI does, "bytes:\\xe2\\x80", so that no two tokens share a
name in `top_logprobs`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
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


def token_bytes(tokenizer: Any, token: int, text: str | None = None) -> bytes | None:
    """The token's own bytes, or None when neither its text (decoded here unless given) nor its spelling
    says them."""
    if text is None:
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


def shared_length(a: str, b: str) -> int:
    """How many characters the two texts share from the start."""
    return len(a) if b.startswith(a) else len(os.path.commonprefix([a, b]))


def token_offsets(tokenizer: Any, tokens: list[int]) -> list[int]:
    """Where each token's text starts in the decoded answer: the length of the text of the tokens before it
    that the answer keeps. A character those tokens only begin (U+FFFD on its own) is left to the token that
    completes it; one never completed stays U+FFFD in the answer too, and counts there."""
    whole = tokenizer.decode(tokens, skip_special_tokens=True)
    prefixes = _prefix_texts(tokenizer, tokens)
    if prefixes[-1] != whole:  # a tokenizer whose text is not local: decode every prefix (quadratic)
        prefixes = [tokenizer.decode(tokens[:i], skip_special_tokens=True) for i in range(len(tokens) + 1)]
    return [shared_length(prefixes[i], whole) for i in range(len(tokens))]


WINDOW = 8  # tokens of context a token's text is decoded in; a UTF-8 character spans at most 4 bytes


def _prefix_texts(tokenizer: Any, tokens: list[int]) -> list[str]:
    """The text of every prefix of `tokens` (`[:0]` to the whole), each from the one before by decoding only
    the last few tokens: what a new token changes (it appends text, or completes a character the one before
    began) shows within a short window, so this takes linear time where decoding every prefix takes
    quadratic. The caller checks the last against the whole text."""
    texts = [""]
    for i in range(1, len(tokens) + 1):
        start = max(0, i - WINDOW)
        before = tokenizer.decode(tokens[start : i - 1], skip_special_tokens=True)
        after = tokenizer.decode(tokens[start:i], skip_special_tokens=True)
        kept = shared_length(before, after)
        previous = texts[-1]
        texts.append(previous[: len(previous) - (len(before) - kept)] + after[kept:])
    return texts


def token_name(tokenizer: Any, token: int) -> str:
    """The token's text, or "bytes:\\x.." when it holds part of a character (OpenAI's completions)."""
    text = tokenizer.decode([token], skip_special_tokens=True)
    if REPLACEMENT not in text:
        return text
    raw = token_bytes(tokenizer, token, text)
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw) if raw is not None else text


Shape = Callable[[Any, list[TokenLogprob], list[int]], dict]  # (tokenizer, tokens' logprobs, their offsets)


def completion_shape(tokenizer: Any, chances: list[TokenLogprob], offsets: list[int]) -> dict[str, list]:
    return {
        "tokens": [token_name(tokenizer, c.token) for c in chances],
        "token_logprobs": [c.logprob for c in chances],
        "top_logprobs": [{token_name(tokenizer, t): lp for t, lp in c.top} for c in chances],
        "text_offset": offsets,
    }


def chat_shape(tokenizer: Any, chances: list[TokenLogprob], offsets: list[int]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token], skip_special_tokens=True)
        raw = token_bytes(tokenizer, token, text)
        return {"token": text, "logprob": logprob, "bytes": list(raw) if raw is not None else None}

    content = [
        entry(c.token, c.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in c.top]} for c in chances
    ]
    return {"content": content, "refusal": None}


def prompt_shape(tokenizer: Any, prompt: list[int], scores: list[TokenLogprob]) -> dict[str, list]:
    """Completions' log-probabilities of an echoed prompt's tokens: the very first has none, as nothing comes
    before it (None)."""
    offsets = token_offsets(tokenizer, prompt)
    scored = completion_shape(tokenizer, scores, offsets[1:])
    return {
        "tokens": [token_name(tokenizer, prompt[0])] + scored["tokens"],
        "token_logprobs": [None] + scored["token_logprobs"],
        "top_logprobs": [None] + scored["top_logprobs"],
        "text_offset": offsets[:1] + scored["text_offset"],
    }


def with_prompt(prompt: dict[str, list], prompt_chars: int, answer: dict[str, list]) -> dict[str, list]:
    """An echoed prompt's log-probabilities (`prompt_shape`) followed by the answer's, whose offsets move past
    the prompt's text (`prompt_chars` long)."""
    shifted = [offset + prompt_chars for offset in answer["text_offset"]]
    return {
        "tokens": prompt["tokens"] + answer["tokens"],
        "token_logprobs": prompt["token_logprobs"] + answer["token_logprobs"],
        "top_logprobs": prompt["top_logprobs"] + answer["top_logprobs"],
        "text_offset": prompt["text_offset"] + shifted,
    }


def for_answer(
    shape: Shape, tokenizer: Any, tokens: list[int], chances: list[TokenLogprob] | None, answer: str
) -> dict:
    """A whole (non-streamed) answer's log-probabilities: those of the tokens whose text starts before the
    answer's end (all of them, unless a stop string cut it)."""
    offsets = token_offsets(tokenizer, tokens)
    kept = sum(offset < len(answer) for offset in offsets) if answer else 0
    return shape(tokenizer, (chances or [])[:kept], offsets[:kept])
