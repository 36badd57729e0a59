"""Built-in methods. Importing a method module registers it."""

from . import bottleneck, ia3, lora, prefix_tuning, prompt_tuning  # noqa: F401
