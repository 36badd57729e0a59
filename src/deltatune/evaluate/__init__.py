"""Judging an adapter before shipping it, each from the API and the CLI, each writing a report folder:

- `measure_latency` (`deltatune bench`): settings.py, latency.py, latency_report.py;
- `compare` (`deltatune compare`, the transfer matrix): transfer.py, compare_report.py;
- `measure_forgetting` (`deltatune forgetting`): forgetting.py, forgetting_report.py (the trainer's monitor,
  train/forgetting.py, uses the same measures).

The entry points import on first use, so the torch-free settings stay cheap for the CLI's parser.
"""

from __future__ import annotations

import importlib
from typing import Any

_ENTRY_POINTS = {
    "measure_latency": ".latency_report",
    "compare": ".compare_report",
    "measure_forgetting": ".forgetting_report",
}
__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str) -> Any:
    module = _ENTRY_POINTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deltatune.evaluate' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
