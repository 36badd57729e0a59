"""Built-in methods. Importing a method module registers it."""

from . import ia3, lora  # noqa: F401
