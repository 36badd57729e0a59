"""The report folders under the studio's root: what `deltatune compare`, `forgetting`, `bench` (latency) and
`sweep` wrote, found by their JSON file and read as the page shows them (the compare matrix as heatmap cells,
the sweep's trials with its Pareto front). A report that cannot be read shows why, never an error page."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runs import is_run_folder, read_json_file, walk

# kind -> the JSON file that marks its folder, and the pictures the command draws beside it
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "compare": ("compare.json", ("compare.png",)),
    "forgetting": ("forgetting.json", ("forgetting.png",)),
    "latency": ("latency.json", ("latency.png",)),
    "sweep": ("trials.json", ("front.png", "params.png")),
}
SHADES = 10  # heatmap cells are shaded in SHADES + 1 steps (CSS classes b0..b10: no inline styles)


@dataclass
class Report:
    name: str  # the folder relative to the root, as in URLs
    path: Path
    kind: str
    data: dict[str, Any] | None = None  # the JSON file; None when it could not be read
    problems: list[str] = field(default_factory=list)
    updated: float = 0.0

    @property
    def pictures(self) -> list[str]:
        return [p for p in KINDS[self.kind][1] if (self.path / p).is_file()]


def report_kind(path: Path) -> str | None:
    return next((kind for kind, (marker, _) in KINDS.items() if (path / marker).is_file()), None)


def find_reports(root: Path) -> list[Report]:
    """Every report folder under `root` (up to MAX_DEPTH deep), newest first; run folders are not looked into
    (a sweep's trials are runs, listed on the runs page)."""
    root = root.resolve()
    ends = walk(root, lambda path: is_run_folder(path) or report_kind(path) is not None)
    found = [read_report(root, path, kind, load=False) for path in ends if (kind := report_kind(path))]
    return sorted(found, key=lambda r: r.updated, reverse=True)


def read_report(root: Path, path: Path, kind: str, *, load: bool = True) -> Report:
    marker = path / KINDS[kind][0]
    report = Report(path.relative_to(root.resolve()).as_posix(), path, kind)
    with contextlib.suppress(OSError):
        report.updated = marker.stat().st_mtime
    if load:
        report.data = read_json_file(marker)
        if report.data is None:
            report.problems.append(f"{marker.name} could not be read as a JSON object")
    return report


# ---- compare: the transfer matrix as heatmaps ---------------------------------------------------------------
@dataclass
class Cell:
    text: str
    shade: int | None  # 0..SHADES, None: no value (an error, or no base to compare with)
    title: str = ""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def compare_heatmaps(data: dict[str, Any]) -> dict[str, Any]:
    """The headline metric shaded per task from worst (0) to best (SHADES), and the change against the base
    (compare signs it so that + is better, whichever way the metric runs) shaded from the largest loss (0)
    through none (SHADES / 2) to the largest gain (SHADES)."""
    tasks = data.get("tasks") or {}
    entries = data.get("entries") or []
    cells = data.get("cells") or {}
    headline, gain = data.get("headline") or {}, data.get("gain_vs_base") or {}
    better = {t: 1.0 if (spec or {}).get("higher_is_better", True) else -1.0 for t, spec in tasks.items()}
    head_rows, gain_rows = [], []
    for entry in entries:
        head_rows.append(
            [_cell(headline, cells, entry, t, _sequential(headline, entries, t, better[t])) for t in tasks]
        )
        gain_rows.append(
            [_cell(gain, cells, entry, t, _diverging(gain, entries, t), sign=True) for t in tasks]
        )
    columns = [f"{t} ({(tasks[t] or {}).get('metric', '')})" for t in tasks]
    return {"columns": columns, "entries": entries, "headline": head_rows, "gain": gain_rows}


def _cell(matrix, cells, entry: str, task: str, shade_of, sign: bool = False) -> Cell:
    error = ((cells.get(entry) or {}).get(task) or {}).get("error")
    if error:
        return Cell("error", None, str(error)[:500])
    value = _number((matrix.get(entry) or {}).get(task))
    if value is None:
        return Cell("-", None)
    value += 0.0  # -0.0 shows as 0
    return Cell(f"{value:+.4g}" if sign else f"{value:.4g}", shade_of(value))


def _column(matrix, entries, task: str) -> list[float]:
    return [v for e in entries if (v := _number((matrix.get(e) or {}).get(task))) is not None]


def _sequential(matrix, entries, task: str, better: float):
    values = _column(matrix, entries, task)
    low, high = (min(values), max(values)) if values else (0.0, 0.0)

    def shade(value: float) -> int:
        if high == low:
            return SHADES // 2
        share = (value - low) / (high - low)
        return round(SHADES * (share if better > 0 else 1 - share))

    return shade


def _diverging(matrix, entries, task: str):
    largest = max((abs(v) for v in _column(matrix, entries, task)), default=0.0)

    def shade(value: float) -> int:
        if largest == 0:
            return SHADES // 2
        return round(SHADES / 2 * (1 + value / largest))

    return shade


# ---- sweep: the trials and the front ------------------------------------------------------------------------
def sweep_tables(data: dict[str, Any]) -> dict[str, Any]:
    """The trials in number order with their parameters as columns; the front's trial numbers marked."""
    trials = sorted(
        (t for t in data.get("trials") or [] if isinstance(t, dict)), key=lambda t: t.get("number", 0)
    )
    params = list(dict.fromkeys(k for t in trials for k in (t.get("params") or {})))
    front = set(data.get("pareto_front") or [])
    return {"trials": trials, "params": params, "front": front, "best": data.get("best_trial")}
