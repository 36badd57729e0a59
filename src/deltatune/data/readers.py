"""Read rows from local JSONL / JSON / CSV / TSV / Parquet files, keeping each row's line number so that a
malformed row can be reported where the user can find it. Parsing is the standard library's (json, csv) and
pyarrow's; nothing here is a hand-written parser."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import DeltatuneError


class DataError(DeltatuneError, ValueError):
    """A dataset file is missing, unreadable or has too many malformed rows."""


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line in the file (row number for Parquet / JSON arrays)
    fields: dict[str, Any]


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def read_rows(path: Path, encoding: str = "utf-8") -> tuple[list[Row], list[BadRow]]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path, encoding)
        if suffix == ".json":
            return _read_json_array(path, encoding)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, encoding, "\t" if suffix == ".tsv" else ",")
        if suffix == ".parquet":
            return _read_parquet(path)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid {encoding} (byte {exc.start}: {exc.reason}); set data.encoding to the "
            "file's encoding, e.g. encoding: latin-1"
        ) from None
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _read_jsonl(path: Path, encoding: str) -> tuple[list[Row], list[BadRow]]:
    rows, bad = [], []
    with path.open(encoding=encoding) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(BadRow(line_no, f"invalid JSON: {exc.msg} at column {exc.colno}"))
                continue
            if isinstance(value, dict):
                rows.append(Row(line_no, value))
            else:
                bad.append(BadRow(line_no, f"expected a JSON object, got {type(value).__name__}"))
    return rows, bad


def _read_json_array(path: Path, encoding: str) -> tuple[list[Row], list[BadRow]]:
    try:
        value = json.loads(path.read_text(encoding=encoding))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}; for one object per line use .jsonl") from None
    if not isinstance(value, list):
        raise DataError(f"{path} must hold a JSON array of objects (or use .jsonl)")
    rows, bad = [], []
    for index, item in enumerate(value, start=1):
        if isinstance(item, dict):
            rows.append(Row(index, item))
        else:
            bad.append(BadRow(index, f"item {index} is a {type(item).__name__}, not an object"))
    return rows, bad


def _read_csv(path: Path, encoding: str, delimiter: str) -> tuple[list[Row], list[BadRow]]:
    rows, bad = [], []
    with path.open(encoding=encoding, newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if not reader.fieldnames:
            raise DataError(f"{path} has no header row; the first line must name the columns")
        width = len(reader.fieldnames)
        for record in reader:
            line_no = reader.line_num
            if None in record:  # more cells than header columns
                bad.append(BadRow(line_no, f"{width + len(record[None])} cells, header has {width}"))
            elif any(value is None for value in record.values()):
                filled = sum(value is not None for value in record.values())
                bad.append(BadRow(line_no, f"{filled} cells, header has {width}"))
            else:
                rows.append(Row(line_no, dict(record)))
    return rows, bad


def _read_parquet(path: Path) -> tuple[list[Row], list[BadRow]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {path} needs pyarrow; install it with `pip install 'deltatune[parquet]'`"
        ) from None
    records = pq.read_table(path).to_pylist()
    return [Row(index, record) for index, record in enumerate(records, start=1)], []
