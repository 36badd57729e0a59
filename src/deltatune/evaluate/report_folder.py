"""The one way an evaluation report reaches disk: NAME.json, NAME.md and NAME.png in one folder, written
into a staged sibling and swapped in whole, so a crash or a bad input never leaves half a report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.atomic import staged_folder


def write_report_folder(
    out: Path, name: str, report: dict[str, Any], markdown: str, plot: Callable[[Path], None]
) -> None:
    with staged_folder(out, whole=True) as staging:
        (staging / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (staging / f"{name}.md").write_text(markdown.rstrip() + "\n")
        plot(staging / f"{name}.png")
