"""deltatune studio: a local web app over a folder of runs. It reads the files runs write (never sharing a
trainer's process), draws their curves live, and starts, stops and resumes `deltatune train` processes from a
form built from the training config's own models."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
