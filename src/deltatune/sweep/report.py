"""What a sweep leaves for people: the trials table (CSV, JSON, markdown), the Pareto front of quality against
cost, pictures, and the rule that picked the adapter in best/."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..core.atomic import atomic_path, write_text_atomic

COSTS = ("trainable_params", "adapter_bytes", "s_per_step", "peak_rss_mib")
STATES = ("complete", "pruned", "failed", "interrupted", "running", "waiting")


@dataclass(frozen=True)
class BestRule:
    """How best/ is chosen. 'smallest': the lowest `cost` among trials whose metric is within `tolerance`
    (absolute, in the metric's units) of the top one, ties to the better metric. 'top': the top metric, ties to
    the lower cost."""

    rule: Literal["smallest", "top"] = "smallest"
    tolerance: float = 0.01
    cost: str = "adapter_bytes"

    def describe(self, metric: str) -> str:
        if self.rule == "top":
            return f"the highest-scoring trial by {metric} (ties: the smaller {self.cost})"
        return (
            f"the smallest {self.cost} among trials whose {metric} is within {self.tolerance:g} of the best "
            f"{metric} (ties: the better {metric})"
        )


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def complete_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        r for r in rows if r["state"] == "complete" and r["metric"] is not None and math.isfinite(r["metric"])
    ]


def choose_best(rows: list[dict[str, Any]], mode: str, rule: BestRule) -> dict[str, Any] | None:
    done = complete_rows(rows)
    if not done:
        return None
    sign = 1 if mode == "max" else -1
    top = max(sign * r["metric"] for r in done) * sign
    if rule.rule == "top":
        return min(done, key=lambda r: (-sign * r["metric"], r[rule.cost], r["number"]))
    near = [r for r in done if abs(r["metric"] - top) <= rule.tolerance + 1e-12]
    return min(near, key=lambda r: (r[rule.cost], -sign * r["metric"], r["number"]))


def pareto_front(rows: list[dict[str, Any]], mode: str, cost: str) -> list[dict[str, Any]]:
    """Complete trials no other trial beats on both the metric and the cost, cheapest first."""
    done = complete_rows(rows)
    front = []
    for r in done:
        dominated = any(
            (o[cost] <= r[cost] and not _better(r["metric"], o["metric"], mode))
            and (o[cost] < r[cost] or _better(o["metric"], r["metric"], mode))
            for o in done
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r[cost], r["number"]))


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if not value.is_integer() or abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _mib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:.3f} MiB"


def baseline_of(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The majority-class baseline when the sweep's metric is accuracy (every trial reads the same
    validation split, so the first that recorded one speaks for all)."""
    if metric != "accuracy":
        return None
    return next((r["majority_baseline"] for r in rows if r.get("majority_baseline")), None)


def at_baseline(row: dict[str, Any], baseline: dict[str, Any] | None) -> bool:
    """A complete trial that scored no better than always answering the most common class: it learned
    nothing the metric can see."""
    return (
        baseline is not None and row["state"] == "complete" and row["metric"] is not None
        and row["metric"] <= baseline["accuracy"] + 1e-9
    )  # fmt: skip


def _table(
    rows: list[dict[str, Any]], params: list[str], metric: str, baseline: dict[str, Any] | None = None
) -> list[str]:
    head = [
        "trial",
        "state",
        metric,
        *params,
        "trainable params",
        "adapter",
        "s/step",
        "peak RSS MiB",
        "note",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r["number"]), r["state"], _fmt(r["metric"]), *(_fmt(r["params"].get(p)) for p in params),
            _fmt(r.get("trainable_params")), _mib(r.get("adapter_bytes")), _fmt(r.get("s_per_step")),
            _fmt(r.get("peak_rss_mib")), _note(r, baseline),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _note(row: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    note = (row.get("reason") or "").replace("|", "/").replace("\n", " ")[:120]
    return (
        "at the majority-class baseline" + (f"; {note}" if note else "")
        if at_baseline(row, baseline)
        else note
    )


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in row.items() if k not in ("params", "majority_baseline")}
    flat |= {f"param:{k}": v for k, v in row["params"].items()}
    return flat


def write_reports(
    out: Path, rows: list[dict[str, Any]], *, params: list[str], metric: str, mode: str, rule: BestRule,
    header: dict[str, Any], log_scale: set[str] | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """trials.csv, trials.json, sweep.md and the pictures; returns the best row (None: no complete trial)."""
    rows = sorted(rows, key=lambda r: r["number"])
    best = choose_best(rows, mode, rule)
    front = pareto_front(rows, mode, rule.cost)
    baseline = baseline_of(rows, metric)
    flat = [
        flat_row(r) | ({"at_majority_baseline": at_baseline(r, baseline)} if baseline else {}) for r in rows
    ]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    write_text_atomic(out / "trials.csv", buffer.getvalue())
    summary = {
        **header, "metric": metric, "mode": mode, "best_rule": rule.describe(metric),
        "best_trial": best["number"] if best else None, "pareto_front": [r["number"] for r in front],
        "majority_baseline": baseline,
        "counts": {s: n for s in STATES if (n := sum(r["state"] == s for r in rows))},
        "trials": rows,
    }  # fmt: skip
    write_text_atomic(out / "trials.json", json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"# Sweep {header.get('study')}", "", f"Metric: {metric} ({mode}imize). Trials: "
             + ", ".join(f"{n} {s}" for s, n in summary["counts"].items() if n) + ".", ""]  # fmt: skip
    if baseline:
        stuck = [r["number"] for r in rows if at_baseline(r, baseline)]
        lines += [f"Majority-class baseline: accuracy {_fmt(baseline['accuracy'])} (always {baseline['label']!r}); "
                  f"trials at it learned nothing accuracy shows: {stuck or 'none'}.", ""]  # fmt: skip
    if best:
        lines += [f"**best/** is trial {best['number']}: {metric} {_fmt(best['metric'])}, {rule.cost} "
                  f"{_fmt(best[rule.cost])}. Rule: {rule.describe(metric)}.", ""]  # fmt: skip
    lines += [
        f"## Pareto front ({metric} against {rule.cost})",
        "",
        *_table(front, params, metric, baseline),
        "",
    ]
    lines += ["## All trials", "", *_table(rows, params, metric, baseline), ""]
    write_text_atomic(out / "sweep.md", "\n".join(lines))
    plot_front(rows, front, best, out / "front.png", metric=metric, cost=rule.cost, baseline=baseline)
    plot_params(rows, out / "params.png", metric=metric, params=params, log_scale=log_scale or set())
    return best


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)


def plot_front(rows, front, best, path: Path, *, metric: str, cost: str, baseline=None) -> None:
    done = complete_rows(rows)
    if not done:
        return
    from matplotlib.figure import Figure  # no pyplot: reports are written from the sweep's worker threads

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.scatter([r[cost] for r in done], [r["metric"] for r in done], s=18, color="0.6", label="trial")
    ax.plot([r[cost] for r in front], [r["metric"] for r in front], "o-", color="C0", label="Pareto front")
    if best:
        ax.scatter([best[cost]], [best["metric"]], marker="*", s=220, color="C3", zorder=3, label="best/")
    if baseline:
        ax.axhline(baseline["accuracy"], color="0.3", linestyle="--", linewidth=1, label="majority class")
    if min(r[cost] for r in done) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(cost)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_params(
    rows, path: Path, *, metric: str, params: list[str], log_scale: set[str] = frozenset()
) -> None:
    """The metric against each numeric parameter, one panel each, coloured by the first categorical one;
    parameters the space samples on a log scale (`log_scale`) get a log axis. Returns the figure (None when
    there is nothing to plot)."""
    done = complete_rows(rows)
    numeric = [p for p in params if any(isinstance(r["params"].get(p), int | float) and not isinstance(
        r["params"].get(p), bool) for r in done)]  # fmt: skip
    if not done or not numeric:
        return None
    categorical = next((p for p in params if p not in numeric), None)
    groups = sorted({str(r["params"].get(categorical)) for r in done}) if categorical else ["all"]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(numeric), 4))
    axes = fig.subplots(1, len(numeric), squeeze=False)
    for ax, param in zip(axes[0], numeric, strict=True):
        for i, group in enumerate(groups):
            pts = [(r["params"][param], r["metric"]) for r in done if param in r["params"]
                   and (categorical is None or str(r["params"].get(categorical)) == group)]  # fmt: skip
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=22, color=f"C{i}", label=group)
        if param in log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    if categorical:  # one legend for all panels: a group may have no points in the first one
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], marker="o", linestyle="", color=f"C{i}", label=g) for i, g in enumerate(groups)
        ]
        axes[0][-1].legend(handles=handles, title=categorical, fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return fig
