"""Built-in methods. Importing a method module registers it."""

from . import lora  # noqa: F401
