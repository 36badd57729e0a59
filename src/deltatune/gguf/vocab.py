"""A transformers byte-level BPE tokenizer as GGUF's tokenizer.ggml.* keys.

Tokens in id order, their kinds, and the merges come from the tokenizer itself (merges are saved as "a b"
strings or as [a, b] pairs depending on the tokenizers version; older gguf releases read only the first);
special token ids, the add-BOS/EOS flags and the chat template are read from its saved files by gguf's own
SpecialVocab.
`tokenizer.ggml.pre` names the pre-tokenizer (the regex that splits text before BPE), which llama.cpp knows
by name only: known tokenizers are listed by their hash (provenance.tokenizer_hash), any other gets
"default" unless the caller names one, and the report says so, since llama.cpp may then split some texts
differently from transformers (token ids given directly are unaffected).
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from ..core.errors import GgufExportError
from ..core.provenance import tokenizer_hash
from .layout import gguf_module

# tokenizer_hash -> llama.cpp's pre-tokenizer name
KNOWN_PRE_TOKENIZERS = {
    "7e0b8f35ca7f836d92d824d9e3db5747c22d9a1e2753ccf2ec9af24a8614e979": "smollm",  # SmolLM2 (bundled)
}


def pre_tokenizer_for(tokenizer: Any, given: str | None) -> tuple[str, bool]:
    """(name, known): the caller's name, the listed one, or "default" (known=False)."""
    if given:
        return given, True
    name = KNOWN_PRE_TOKENIZERS.get(tokenizer_hash(tokenizer))
    return (name, True) if name else ("default", False)


def _merges(backend: Any) -> list[str]:
    merges = json.loads(backend.to_str())["model"].get("merges") or []
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def add_vocabulary(writer: Any, tokenizer: Any, vocab_size: int, pre_tokenizer: str) -> None:
    gguf = gguf_module()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE":
        raise GgufExportError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 / Llama-3 / SmolLM style, a fast tokenizer); "
            f"this one is {type(getattr(backend, 'model', tokenizer)).__name__}"
        )
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, kinds = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            kinds.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            kinds.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            kinds.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    writer.add_token_merges(_merges(backend))
    if not special.chat_template and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template  # older gguf reads it only from tokenizer_config.json
    if "bos" not in special.add_special_token:  # say it either way: llama.cpp's default differs by vocab type
        probe = tokenizer("a")["input_ids"]
        special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    special.add_to_gguf(writer, quiet=True)
