"""`deltatune compare`: run the transfer matrix (`transfer.py`), then summarize it (each cell's headline
metric, its change against the base, each adapter's reusability off its own task) and write compare.json,
compare.md and compare.png in one atomic step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core import provenance
from ..core.errors import DeltatuneError
from ..core.hashing import sha256_file
from ..core.io import resolve_safetensors_adapter
from .report_folder import write_report_folder
from .transfer import BASE, Cells, Entry, RunOptions, Task, load_tasks, parse_named, run_matrix

# The fields of a data section that make two tasks the same task (sample sizes and seeds do not).
_TASK_IDENTITY = ("train", "format", "instruction_template", "output_template", "system_prompt", "columns")


def compare(
    tasks: Sequence[str],
    adapters: Sequence[str] = (),
    *,
    models: Sequence[str] = (),
    with_base: bool = True,
    out: str | Path | None = None,
    device: str = "auto",
    progress: Callable[[str], None] = lambda _: None,
    cache_mb: float | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Evaluate the base (unless `with_base` is False), each adapter (`NAME=FOLDER` or a folder) and each model
    folder on each task (`NAME=CONFIG.yaml` or a config); returns the report and writes it to `out`.
    `cache_mb` bounds the memory of loaded adapters (None: all stay loaded); `overrides` (`section.key=value`)
    apply to every task's config, as `train` applies them to its one."""
    from ..core.devices import resolve_device
    from .latency import hardware

    loaded = load_tasks(parse_named(list(tasks), "task"), list(overrides))
    entries = [Entry(BASE, BASE)] if with_base else []
    entries += [
        Entry(name, "adapter", resolve_safetensors_adapter(path))
        for name, path in parse_named(list(adapters), "adapter")
    ]
    entries += [Entry(name, "model", path) for name, path in parse_named(list(models), "model")]
    if not loaded or len(entries) < 1:
        raise ValueError("give at least one task and one adapter or model")
    if len({e.name for e in entries}) != len(entries):
        raise ValueError(f"entry names must differ (and not be {BASE!r}): {[e.name for e in entries]}")
    where = resolve_device(device)
    cache_bytes = None if cache_mb is None else int(cache_mb * 2**20)
    done = iter(range(1, len(loaded) * len(entries) + 1))
    counted = lambda what: progress(f"[{next(done)}/{len(loaded) * len(entries)}] {what}")  # noqa: E731
    cells = run_matrix(loaded, entries, RunOptions(where, counted, cache_bytes))
    report = summarize(loaded, entries, cells)
    report["provenance"] = provenance.record(
        tasks={t.name: _task_record(t) for t in loaded},
        entries={e.name: _entry_record(e) for e in entries},
        hardware=hardware(where),
    )
    if out is not None:
        write_report(Path(out), report)
    return report


def _task_record(task: Task) -> dict[str, Any]:
    from ..data.dataset import resolve_data_path

    record: dict[str, Any] = {
        "metric": task.metric,
        "examples": len(task.examples),
        "data": task.config.data.train,
    }
    try:
        record["data_sha256"] = sha256_file(resolve_data_path(task.config.data.train))
    except Exception as exc:  # noqa: BLE001 - its cells already carry the error
        record["data_error"] = str(exc)
    return record


def _entry_record(entry: Entry) -> dict[str, Any]:
    if entry.kind == BASE:
        return {"kind": BASE}
    record: dict[str, Any] = {"kind": entry.kind, "path": str(entry.path)}
    weights = sorted(Path(entry.path).glob("*.safetensors"))
    if weights:
        record["sha256"] = sha256_file(*weights)
    return record


def own_task(entry: Entry, tasks: list[Task]) -> str | None:
    """The task an adapter or a fine-tuned model folder was trained on: the one whose data section (file,
    format, templates) matches the training config in its deltatune.json. None for the base, and for folders
    without one (written by PEFT, a merged export). An adapter made by `deltatune combine` owns the tasks of
    its sources, joined by "+"."""
    if entry.kind == BASE:
        return None
    return "+".join(_trained_tasks(Path(entry.path), tasks)) or None


def _trained_tasks(folder: Path, tasks: list[Task], depth: int = 0) -> list[str]:
    from ..core.io import read_provenance

    try:
        record = read_provenance(folder)
    except DeltatuneError:  # an unreadable record: the matrix is measured already, only this label is lost
        return []
    if record is None:
        return []
    sources = record.source_paths()
    if sources and depth < 4:  # a combination of combinations is followed a few levels, never in a cycle
        found = [name for s in sources for name in _trained_tasks(Path(s), tasks, depth + 1)]
        return list(dict.fromkeys(found))
    trained = record.trained_data()
    for task in tasks:
        data = task.config.data.model_dump()
        if trained and all(trained.get(k) == data.get(k) for k in _TASK_IDENTITY):
            return [task.name]
    return []


def summarize(tasks: list[Task], entries: list[Entry], cells: Cells) -> dict[str, Any]:
    """Headline metric per cell, its change against the base (signed so that + is better), and each adapter's
    reusability: the mean change over the tasks it was not trained on, one mean per metric (a loss and an
    accuracy are not in the same units)."""
    headline: dict[str, dict[str, float | None]] = {}
    gain: dict[str, dict[str, float | None]] = {}
    for e in entries:
        headline[e.name] = {t.name: _value(cells[e.name][t.name], t.metric) for t in tasks}
    base = headline.get(BASE)
    for e in entries:
        gain[e.name] = {}
        for t in tasks:
            mine, theirs = headline[e.name][t.name], base[t.name] if base else None
            better = (
                None
                if mine is None or theirs is None
                else (mine - theirs) * (1 if t.higher_is_better else -1)
            )
            gain[e.name][t.name] = better
    reuse = {}
    for e in entries:
        if e.kind == BASE:
            continue
        own = own_task(e, tasks)
        mine = set(own.split("+")) if own else set()
        off: dict[str, list[float]] = {}
        for t in tasks:
            if t.name not in mine and gain[e.name][t.name] is not None:
                off.setdefault(t.metric, []).append(gain[e.name][t.name])
        reuse[e.name] = {
            "own_task": own,
            "mean_gain_off_task": {metric: sum(v) / len(v) for metric, v in off.items()},
            "tasks_counted": {metric: len(v) for metric, v in off.items()},
        }
    return {
        "tasks": {t.name: {"metric": t.metric, "higher_is_better": t.higher_is_better} for t in tasks},
        "entries": [e.name for e in entries],
        "headline": headline,
        "gain_vs_base": gain,
        "reusability": reuse,
        "cells": cells,
    }


def _value(cell: dict[str, Any], metric: str) -> float | None:
    value = cell.get(metric)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def table(report: dict[str, Any]) -> str:
    tasks, entries = list(report["tasks"]), report["entries"]
    head = " | ".join(f"{t} ({report['tasks'][t]['metric']})" for t in tasks)
    lines = [f"| model | {head} |", "|---|" + "---|" * len(tasks)]
    for e in entries:
        row = []
        for t in tasks:
            cell, value, gain = report["cells"][e][t], report["headline"][e][t], report["gain_vs_base"][e][t]
            if "error" in cell:
                row.append(f"error: {cell['error'][:60]}")
            elif value is None:
                row.append("n/a")
            else:
                row.append(f"{value:.3f}" + (f" ({gain:+.3f})" if gain is not None and e != BASE else ""))
        lines.append(f"| {e} | " + " | ".join(row) + " |")
    lines += ["", "(+x): change against the base, signed so that + is better; means are per metric.", "",
              "| adapter or model | trained on | mean gain off its own task |", "|---|---|---|"]  # fmt: skip
    for e, r in report["reusability"].items():
        means = [
            f"{metric} {mean:+.3f} over {r['tasks_counted'][metric]} task{'s' * (r['tasks_counted'][metric] > 1)}"
            for metric, mean in r["mean_gain_off_task"].items()
        ]
        lines.append(f"| {e} | {r['own_task'] or 'unknown'} | {'; '.join(means) or 'n/a'} |")
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> None:
    """compare.json, compare.md and compare.png (heatmaps of the metric and of the change), all or nothing."""
    write_report_folder(
        out, "compare", report, "# Transfer matrix\n\n" + table(report), lambda p: _plot(report, p)
    )


def _per_column(grid: Any, better: list[float], centred: bool) -> Any:
    """Each task's column on its own scale (tasks measure different metrics): the change against the base
    over the column's largest change, in [-1, 1]; a metric from its worst value (0) to its best (1), so the
    same colour means better in every column, whichever way the metric runs."""
    import numpy as np

    shade = np.full(grid.shape, np.nan)
    for j, sign in enumerate(better):
        column = grid[:, j]
        if not np.isfinite(column).any():
            continue
        if centred:
            limit = np.nanmax(np.abs(column))
            shade[:, j] = column / limit if limit > 0 else 0.0
            continue
        low, high = np.nanmin(column), np.nanmax(column)
        scaled = (column - low) / (high - low) if high > low else np.full(column.shape, 0.5)
        shade[:, j] = scaled if sign > 0 else 1 - scaled
    return shade


def _plot(report: dict[str, Any], path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    tasks, entries = list(report["tasks"]), report["entries"]
    panels = [
        ("headline metric", report["headline"], "viridis"),
        ("change against the base", report["gain_vs_base"], "RdBu"),
    ]
    fig = Figure(figsize=(4 + 2.2 * len(tasks), 1.2 + 0.55 * len(entries)))
    better = [1.0 if report["tasks"][t]["higher_is_better"] else -1.0 for t in tasks]
    for ax, (title, values, cmap) in zip(fig.subplots(1, 2), panels, strict=True):
        grid = np.array([[np.nan if values[e][t] is None else values[e][t] for t in tasks] for e in entries])
        shade = _per_column(grid, better, centred=cmap == "RdBu")
        ax.imshow(shade, cmap=cmap, aspect="auto", vmin=-1 if cmap == "RdBu" else 0, vmax=1)
        ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right", fontsize=8)
        ax.set_yticks(range(len(entries)), entries, fontsize=8)
        for i in range(len(entries)):
            for j in range(len(tasks)):
                text = "error" if "error" in report["cells"][entries[i]][tasks[j]] else (
                    "" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}")  # fmt: skip
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black",
                        bbox={"facecolor": "white", "alpha": 0.6, "pad": 1, "linewidth": 0})  # fmt: skip
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
