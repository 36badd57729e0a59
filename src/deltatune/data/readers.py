"""Read rows from local JSONL / JSON / CSV / TSV / Parquet files, keeping each row's line number so that a
malformed row can be reported where the user can find it. Parsing is the standard library's (json, csv) and
pyarrow's; nothing here is a hand-written parser."""

from __future__ import annotations

import csv
import io
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
    # >1: a quoted field spans lines that each look like a record, as a quote left open would make them;
    # valid CSV all the same, so the row is kept, but a value that cannot span lines (a label) names it
    spans: int = 1


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str
    records: int = 1  # the records it stands for: a run-away quote swallows the ones after it


def columns_of(rows: list[Row]) -> list[str]:
    """Every column name some row has, in first-seen order (a CSV's header)."""
    return list(dict.fromkeys(name for row in rows for name in row.fields))


SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def read_rows(path: Path, encoding: str = "utf-8") -> tuple[list[Row], list[BadRow]]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    encoding = _encoding_by_bom(path, encoding)
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


BOMS = {b"\xef\xbb\xbf": "utf-8-sig", b"\xff\xfe": "utf-16", b"\xfe\xff": "utf-16"}


def _encoding_by_bom(path: Path, encoding: str) -> str:
    """A byte-order mark says the encoding: UTF-8's is dropped rather than read into the first column's name,
    and a UTF-16 file read as anything else would be garbage (latin-1 reads any bytes without complaint)."""
    with path.open("rb") as handle:
        head = handle.read(3)
    found = next((name for bom, name in BOMS.items() if head.startswith(bom)), None)
    if found is None or encoding.lower().replace("_", "-") in (found, "utf-16-le", "utf-16-be"):
        return encoding
    if found == "utf-8-sig" and encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        return found
    raise DataError(
        f"{path} starts with a {found.upper().removesuffix('-SIG')} byte-order mark but data.encoding is "
        f"{encoding!r}; set encoding: {found.removesuffix('-sig')}"
    )


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
    """Rows of a CSV/TSV file. A quote that is never closed makes the csv module read on to the next quote,
    merging the records in between into one field: such a record is reported at the line where the quote
    opened and counts as every record it swallowed. A record over several lines that a strict reader takes
    as one record of the header's width is valid CSV (a quoted text with line breaks: code, addresses,
    poems) and is kept; when each of its lines looks like a record (`Row.spans`), a value that cannot span
    lines, such as a label, says a quote may have been left open there."""
    text = path.read_text(encoding=encoding)
    # split as the csv module counts lines (str.splitlines also breaks at U+0085 and others)
    lines = [line.rstrip("\r\n") for line in io.StringIO(text, newline="")]
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(f"{path} has no header row; the first line must name the columns")
    width = len(reader.fieldnames)
    rows, bad = [], []
    start = reader.line_num + 1  # the physical line the next record starts on
    for record in reader:
        end = reader.line_num
        misshapen = None in record or any(value is None for value in record.values())
        swallowed, spans = 0, 1
        if end > start and (misshapen or not _one_strict_record(lines[start - 1 : end], delimiter, width)):
            swallowed = _swallowed_records(lines[start:end], delimiter, width)
        elif end > start:
            spans = _closed_by_accident(lines[start:end], delimiter, width) + 1
        if swallowed >= 2 or (swallowed and misshapen):  # one such line can be a text with commas
            bad.append(
                BadRow(
                    start,
                    f"a quote opened on line {start} is not closed before line {end}: it merged {swallowed} more "
                    f'record(s) into this one (lines {start}-{end}); close or escape the quote ("")',
                    records=swallowed + 1,
                )
            )
        elif None in record:  # more cells than header columns
            bad.append(BadRow(start, f"{width + len(record[None])} cells, header has {width}"))
        elif any(value is None for value in record.values()):
            filled = sum(value is not None for value in record.values())
            bad.append(BadRow(start, f"{filled} cells, header has {width}"))
        else:
            rows.append(Row(start, dict(record), spans))
        start = end + 1
    if not rows and not bad:
        rows_hint = "" if len(lines) > 1 else " (it has only a header)"
        raise DataError(f"{path} has no data rows{rows_hint}")
    return rows, bad


def _one_strict_record(lines: list[str], delimiter: str, width: int) -> bool:
    """Whether these lines are one record of `width` cells to a strict reader: every quoted field closes and
    is followed by a delimiter or the line's end (a run-away quote closes at the next record's quote, with
    text after it, or never)."""
    reader = csv.reader(io.StringIO("\n".join(lines), newline=""), delimiter=delimiter, strict=True)
    try:
        records = list(reader)
    except csv.Error:
        return False
    return len(records) == 1 and len(records[0]) == width


def _closed_by_accident(continuation: list[str], delimiter: str, width: int) -> int:
    """The records a stray quote swallowed up to a quote that happened to end a line, or 0: then every
    continuation line is a whole record, the last one once its final quote is taken off (a text field with
    line breaks ends in the middle of its last line, or on a line of its own)."""
    *inner, last = continuation
    if not inner or not last.endswith('"'):
        return 0
    whole = _swallowed_records([*inner, last[:-1]], delimiter, width)
    return whole if whole == len(continuation) else 0


def _swallowed_records(continuation: list[str], delimiter: str, width: int) -> int:
    """How many of a multi-line record's continuation lines are themselves whole records (as many cells as
    the header): a text field with line breaks has few of those, a run-away quote has them all."""
    if width < 2:
        return 0
    return sum(1 for line in continuation if len(next(csv.reader([line], delimiter=delimiter), [])) == width)


def _read_parquet(path: Path) -> tuple[list[Row], list[BadRow]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {path} needs pyarrow; install it with `pip install 'deltatune[parquet]'`"
        ) from None
    records = pq.read_table(path).to_pylist()
    return [Row(index, record) for index, record in enumerate(records, start=1)], []
