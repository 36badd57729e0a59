"""The transfer matrix: every model (the base, each adapter, any extra model folder) on every evaluation task.

A task is a training config: its data section says what to read and how to render it, its eval section
which metrics to compute and which one is the task's headline (`eval.metric`). Each task's validation split
is read and tokenized once. The base is loaded once per kind of head (one for every causal-LM task; one per
label set for classification); the adapters go through the runtime's adapter cache into that one model and
are switched, not reloaded, across tasks; an extra model folder (a merged export, a full fine-tune) is
loaded once for all its tasks. A cell that fails (an adapter for another base, labels that do not fit its
head, a crash) records its reason and the rest still runs.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

BASE = "base"


@dataclass
class Task:
    name: str
    config: Any  # TrainConfig
    examples: list = field(default_factory=list)  # validation examples, tokenized
    label_names: list[str] | None = None
    data_error: str | None = None

    @property
    def metric(self) -> str:
        return self.config.eval.metric

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "loss"

    @property
    def classification(self) -> bool:
        return self.config.model.task == "classification"


@dataclass(frozen=True)
class Entry:
    """A row of the matrix: the base, an adapter folder, or a whole model folder."""

    name: str
    kind: str  # "base" | "adapter" | "model"
    path: Path | None = None


def parse_named(items: list[str], what: str) -> list[tuple[str, Path]]:
    """`name=path` or a bare path (named after its folder, or its parent for an `adapter` folder)."""
    named = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path = item
            folder = Path(item.rstrip("/"))
            name = folder.parent.name if folder.name in ("adapter", "model") else folder.name
        if not name or not path:
            raise ValueError(f"{what} {item!r}: write NAME=PATH or a path")
        named.append((name, Path(path)))
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"two {what}s share a name in {names}; name them with NAME=PATH")
    return named


def load_tasks(specs: list[tuple[str, Path]], overrides: list[str] | None = None) -> list[Task]:
    from ..task.config import load_train_config

    return [Task(name, load_train_config(path, overrides)) for name, path in specs]


def _group_key(task: Task) -> tuple:
    model = task.config.model
    quant = task.config.quantization.model_dump_json() if task.config.quantization else None
    return (model.path, model.task, model.trust_remote_code, quant)


def prepare_data(tasks: list[Task]) -> dict[tuple, Any]:
    """Tokenize every task's validation split once; returns each group's tokenizer. A task whose data
    cannot be read keeps its error, which every cell of its column will show."""
    from ..data import load_data
    from ..task.loading import load_tokenizer

    tokenizers: dict[tuple, Any] = {}
    for task in tasks:
        key = _group_key(task)
        if key not in tokenizers:
            tokenizers[key] = load_tokenizer(task.config.model)
        try:
            splits = load_data(task.config.data, tokenizers[key], task.config.training.seed)
        except Exception as exc:  # noqa: BLE001 - recorded in the report, the other tasks still run
            task.data_error = _reason(exc)
            continue
        task.examples, task.label_names = splits.validation, splits.label_names
    return tokenizers


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def score(model: nn.Module, tokenizer: Any, task: Task, device: Any) -> dict[str, Any]:
    """The task's validation metrics (loss, and generation or classification metrics) for `model` as it is."""
    from ..task.metrics import validation_metrics
    from ..task.shared_prefix import shares_in_evaluation

    metrics, answers = validation_metrics(
        model, tokenizer, task.examples, task.config.eval, classification=task.classification,
        n_classes=len(task.label_names or []), device=device, label_names=task.label_names,
        share_prefix=shares_in_evaluation(task.config, model),
    )  # fmt: skip
    metrics.pop("per_class", None)
    if answers:
        metrics["sample_answers"] = answers[:3]
    return metrics


Cells = dict[str, dict[str, dict[str, Any]]]  # entry name -> task name -> metrics or {"error": reason}


@dataclass(frozen=True)
class RunOptions:
    device: Any
    progress: Callable[[str], None] = lambda _: None  # told "<entry> on <task>" before each cell
    cache_bytes: int | None = None  # the adapter cache's budget (least recently used go); None: all stay


def run_matrix(tasks: list[Task], entries: list[Entry], options: RunOptions) -> Cells:
    """Fill every (entry, task) cell; see the module docstring for what is loaded when."""
    cells: Cells = {e.name: {} for e in entries}
    tokenizers = prepare_data(tasks)
    for task in tasks:
        if task.data_error:
            for e in entries:
                cells[e.name][task.name] = {"error": f"task data: {task.data_error}"}
    ready = [t for t in tasks if not t.data_error]
    for (key, labels), group in _head_groups(ready).items():
        tokenizer = tokenizers[key]
        _run_group(group, entries, tokenizer, labels, options, cells)
    return cells


def _head_groups(tasks: list[Task]) -> dict[tuple, list[Task]]:
    groups: dict[tuple, list[Task]] = {}
    for task in tasks:
        labels = tuple(task.label_names) if task.classification else None
        groups.setdefault((_group_key(task), labels), []).append(task)
    return groups


def _run_group(
    tasks: list[Task], entries: list[Entry], tokenizer: Any, labels: tuple | None, options: RunOptions,
    cells: Cells,
) -> None:  # fmt: skip
    from ..runtime.cache import AdapterCache
    from ..task.loading import load_model

    spec, quant = tasks[0].config.model, tasks[0].config.quantization
    device = options.device
    base = load_model(spec, tokenizer, list(labels) if labels else None, quant, head_note=None)
    base.to(device).eval()
    cache = AdapterCache(base, tokenizer=tokenizer, budget_bytes=options.cache_bytes)
    for entry in entries:
        if entry.kind == "model":
            _run_model_entry(entry, tasks, tokenizer, labels, options, cells)
            continue
        try:
            activate = _activation(base, cache, entry, labels)
        except Exception as exc:  # noqa: BLE001 - an adapter that cannot load on this base fails its cells only
            for task in tasks:
                cells[entry.name][task.name] = {"error": _reason(exc)}
            continue
        for task in tasks:
            options.progress(f"{entry.name} on {task.name}")
            with activate():
                cells[entry.name][task.name] = _guarded(lambda t=task: score(base, tokenizer, t, device))


def _activation(model: nn.Module, cache: Any, entry: Entry, labels: tuple | None) -> Callable[[], Any]:
    """A context that makes `model` compute `entry`: adapters disabled for the base, else its adapter."""
    from ..core.adapters import all_wrappers, disable_adapter, set_adapter
    from ..core.io import saved_label_names

    if entry.kind == BASE:
        return (lambda: disable_adapter(model)) if any(True for _ in all_wrappers(model)) else nullcontext
    saved = saved_label_names(entry.path)
    if labels is not None and saved is not None and list(saved) != list(labels):
        raise ValueError(
            f"the adapter's classification head was trained on the labels {saved}, this task has "
            f"{list(labels)}; it cannot score them"
        )
    key = cache.load(entry.name, entry.path).key

    @contextmanager
    def active() -> Iterator[None]:
        set_adapter(model, key)
        yield

    return active


def _run_model_entry(
    entry: Entry, tasks: list[Task], tokenizer: Any, labels: tuple | None, options: RunOptions, cells: Cells
) -> None:
    from ..task.loading import load_model

    try:
        spec = tasks[0].config.model.model_copy(update={"path": str(entry.path)})
        model = load_model(spec, tokenizer, list(labels) if labels else None, None, head_note=None)
        model.to(options.device).eval()
    except Exception as exc:  # noqa: BLE001
        for task in tasks:
            cells[entry.name][task.name] = {"error": _reason(exc)}
        return
    for task in tasks:
        options.progress(f"{entry.name} on {task.name}")
        cells[entry.name][task.name] = _guarded(lambda t=task: score(model, tokenizer, t, options.device))


def _guarded(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - one failing cell must not end the matrix
        return {"error": _reason(exc), "traceback": traceback.format_exc(limit=4)}
