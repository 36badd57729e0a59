"""Data is never silently lost (issue: a new user's first hour): a misspelled or missing column is an error
listing the file's header; a run-away quote in a CSV is reported where it opened and counts as every record it
swallowed; every load reports what it read, dropped and kept, per class."""

from __future__ import annotations

import csv
import json
import warnings

import pytest
from train_helpers import sentiment_rows, write_jsonl

from deltatune.data import DataError, load_data
from deltatune.data.readers import read_rows
from deltatune.data.spec import DataSpec
from deltatune.models.spec import ModelSpec
from deltatune.task.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return load_tokenizer(ModelSpec(path=str(tiny_bert), task="classification"))


def _csv(path, rows, header=("text", "label")):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[r["text"], r["label"]] for r in rows])
    return path


def test_a_misspelled_label_column_names_the_column_and_lists_the_header(tmp_path, tokenizer):
    data = _csv(tmp_path / "d.csv", sentiment_rows(40, 0), header=("text", "topic"))
    with pytest.raises(DataError, match=r"d.csv has no column 'label'.*columns are \['text', 'topic'\]"):
        load_data(DataSpec(train=str(data), format="classification"), tokenizer, 0)
    mapped = DataSpec(train=str(data), format="classification", columns={"label": "topik"})
    with pytest.raises(DataError, match=r"no column 'topik'.*data.columns.label names 'topik': fix the name"):
        load_data(mapped, tokenizer, 0)
    fixed = DataSpec(train=str(data), format="classification", columns={"label": "topic"})
    assert len(load_data(fixed, tokenizer, 0).train) > 30


def test_a_missing_text_column_is_an_error_not_one_deduplicated_row(tmp_path, tokenizer):
    rows = [{"body": r["text"], "label": r["label"]} for r in sentiment_rows(40, 0)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"no column 'text'.*columns are \['body', 'label'\]"):
        load_data(DataSpec(train=str(data), format="classification"), tokenizer, 0)


def test_rows_without_text_are_malformed_not_duplicates(tmp_path, tokenizer):
    rows = sentiment_rows(40, 0)
    for row in rows[:5]:
        del row["text"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_data(
            DataSpec(train=str(data), format="classification", max_bad_fraction=0.5), tokenizer, 0
        )
    assert splits.report.malformed == 5 and splits.report.duplicates == 0
    assert any("missing or empty field 'text'" in str(w.message) for w in caught)


def test_a_run_away_quote_counts_every_record_it_swallowed_at_the_line_it_opened(tmp_path, tokenizer):
    rows = sentiment_rows(200, 0)
    data = _csv(tmp_path / "d.csv", rows)
    lines = data.read_text().splitlines()
    lines[11] = lines[11].replace(",", ',"', 1)  # line 12 opens a quote that is never closed...
    lines[84] = lines[84] + '"'  # ...until line 85 ends one by accident
    data.write_text("\n".join(lines) + "\n")
    parsed, bad = read_rows(data)
    # valid CSV (the quote closes at a line's end): a strict reader takes lines 12-85 as one record, and so
    # does this one; its label spans lines, which no class name does, and that names the open quote
    merged = next(r for r in parsed if r.line == 12)
    assert not bad and len(parsed) == 200 - 73 and merged.spans == 74
    with pytest.raises(
        DataError,
        match=r"(?s)74 of 200 rows are malformed \(37.0%\).*line 12: the label .* spans 74 lines .*quote opened on line 12",
    ):
        load_data(DataSpec(train=str(data), format="classification"), tokenizer, 0)


def test_text_with_line_breaks_and_commas_is_not_a_run_away_quote(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text('text,label\n"first line, with a comma\nsecond line",positive\nplain,negative\n')
    rows, bad = read_rows(data)
    assert not bad and [r.line for r in rows] == [2, 4] and "\n" in rows[0].fields["text"]


def test_every_load_reports_rows_drops_and_classes_per_split(tmp_path, tokenizer):
    rows = sentiment_rows(60, 0)
    rows += rows[:4]  # duplicates
    rows.append({"text": "no label here", "label": ""})  # malformed
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = load_data(
            DataSpec(train=str(data), format="classification", validation_fraction=0.2, max_bad_fraction=0.1),
            tokenizer,
            0,
        )
    report = splits.report
    assert report.rows == 65 and report.duplicates == 4 and report.malformed == 1
    assert report.examples["train"] + report.examples["validation"] == 60
    assert sum(report.classes["train"].values()) == report.examples["train"]
    text = report.summary()
    assert "65 rows, 1 malformed, 4 duplicates dropped" in text
    assert "train classes: negative" in text and "validation classes:" in text


MULTI_LINE_TEXTS = {
    "code": "def area(w, h):\n    return mul(w, h)\n\nprint(area(2, 3), end=',')",
    "code at the end": "x = f(a, b)\ny = g(c, d)\nz = h(e, f)",
    "address": "Dept. of Physics\n12 Main St, Apt 4\nSpringfield, IL 62701",
    "poem": "Roses are red,\nviolets are blue,\nsugar is sweet,\nand so are you.",
    "quotes inside": 'She said "hi, there"\nand left, "quickly"',
}


@pytest.mark.parametrize("kind", list(MULTI_LINE_TEXTS))
@pytest.mark.parametrize("text_first", [True, False])
def test_valid_multi_line_fields_are_read_as_a_standard_reader_reads_them(tmp_path, kind, text_first):
    """Written by csv.writer, read back by csv.reader: every record is kept, whatever its inner lines look
    like (the old check counted lines with commas as swallowed records and dropped 215 of 1,492 rows)."""
    data = tmp_path / "d.csv"
    records = [[f"{MULTI_LINE_TEXTS[kind]} #{i}", "ab"[i % 2]] for i in range(20)]
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"] if text_first else ["label", "text"])
        writer.writerows(records if text_first else [r[::-1] for r in records])
    with data.open(newline="") as handle:
        expected = list(csv.DictReader(handle))
    rows, bad = read_rows(data)
    assert not bad and [r.fields for r in rows] == expected


def test_the_issues_code_snippet_file_loads_with_both_classes(tmp_path, tokenizer):
    data = tmp_path / "x.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(20):
            writer.writerows([[f"code {i}:\n\nx = f(a, b)\nend", "b"], [f"hi {i}", "a"]])
    splits = load_data(DataSpec(train=str(data), format="classification"), tokenizer, 0)
    assert splits.report.malformed == 0 and splits.label_names == ["a", "b"]
    assert len(splits.train) + len(splits.validation) == 40


@pytest.mark.parametrize(
    "broken, line, records",
    [
        ('text,label\n"one,a\ntwo,b\nthree,c\n"four",d\nfive,e\n', 2, 4),  # closes mid-line: text after it
        ('text,label\none,a\n"two,b\nthree,c\nfour,d"\nfive,e\n', 3, 3),  # closes at a line's end
        ('text,label\none,a\ntwo,"b\nthree,c\nfour,d\n', 3, 3),  # never closes
    ],
)
def test_run_away_quotes_are_still_caught(tmp_path, broken, line, records):
    data = tmp_path / "d.csv"
    data.write_text(broken)
    rows, bad = read_rows(data)
    assert [(b.line, b.records) for b in bad] == [(line, records)]
    assert "a quote opened" in bad[0].reason


def test_a_label_check_failing_after_rows_were_skipped_names_the_skipped_rows(tmp_path, tokenizer):
    data = tmp_path / "d.csv"
    data.write_text('text,label\n"one,a\ntwo,b\nthree,b\n"four",b\nfive,a\nsix,a\nseven,a\n')
    with pytest.raises(
        DataError, match=r"(?s)at least two labels.*found \['a'\].*skipped as malformed.*line 2"
    ):
        load_data(DataSpec(train=str(data), format="classification", max_bad_fraction=0.9), tokenizer, 0)


@pytest.mark.parametrize("missing", ["NaN", "nan", "null", "None", "", "  "])
def test_missing_value_labels_are_malformed_not_classes(tmp_path, tokenizer, missing):
    rows = sentiment_rows(40, 0)
    rows[3]["label"] = missing
    data = _csv(tmp_path / "d.csv", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_data(
            DataSpec(train=str(data), format="classification", max_bad_fraction=0.1), tokenizer, 0
        )
    assert missing.strip() not in splits.label_names and splits.report.malformed == 1
    assert any("missing" in str(w.message) for w in caught)


def test_a_json_nan_label_is_malformed(tmp_path, tokenizer):
    rows = sentiment_rows(40, 0)
    lines = [json.dumps(r) for r in rows]
    lines[5] = '{"text": "a text with no class", "label": NaN}'  # what json.dumps(float("nan")) writes
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = load_data(
            DataSpec(train=str(data), format="classification", max_bad_fraction=0.1), tokenizer, 0
        )
    assert "nan" not in splits.label_names and "NaN" not in splits.label_names
    assert splits.report.malformed == 1


@pytest.mark.parametrize("codec", ["utf-16", "utf-8-sig"])
def test_a_byte_order_mark_names_the_encoding(tmp_path, codec):
    data = tmp_path / "d.csv"
    data.write_bytes("text,label\nhello,a\ncafé,b\n".encode(codec))
    if codec == "utf-8-sig":  # read as utf-8, without the mark in the first column's name
        rows, _ = read_rows(data)
        assert list(rows[0].fields) == ["text", "label"] and rows[1].fields["text"] == "café"
        return
    for wrong in ("utf-8", "latin-1"):
        with pytest.raises(DataError, match=r"UTF-16 byte-order mark.*set encoding: utf-16"):
            read_rows(data, wrong)
    rows, _ = read_rows(data, "utf-16")
    assert rows[1].fields == {"text": "café", "label": "b"}


@pytest.mark.slow
def test_malformed_rows_are_listed_in_line_order_one_clean_line_each(tmp_path, tokenizer):
    """Rows refused when reading (bad JSON) and when encoding (no text) used to be listed in that order; and
    the command line printed each warning with Python's category, source path and code line."""
    import subprocess
    import sys

    rows = sentiment_rows(40, 0)
    lines = [json.dumps(r) for r in rows]
    lines[2] = json.dumps({"label": "positive"})  # line 3: no text (found when encoding)
    lines[9] = "{not json"  # line 10: found when reading
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    spec = DataSpec(train=str(data), format="classification", max_bad_fraction=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_data(spec, tokenizer, 0)
    (message,) = [str(w.message) for w in caught if "malformed" in str(w.message)]
    assert message.index("line 3:") < message.index("line 10:")
    probe = (
        "import warnings; from deltatune.cli.main import _plain_warnings; _plain_warnings();"
        "from deltatune.data import dataset; dataset.warnings.warn('2 of 40 rows are malformed', dataset.DeltatuneWarning)"
    )
    err = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600).stderr
    assert err == "deltatune: warning: 2 of 40 rows are malformed\n"


def test_a_text_field_that_swallowed_records_is_kept_and_named(tmp_path, tokenizer):
    """Valid CSV (the stray quote closes at a line's end), so the rows stand; with no label to give it away,
    a warning names the lines."""
    data = tmp_path / "d.csv"
    data.write_text('source,text\na,one\nb,"two\nc,three\nd,four"\ne,five\nf,six\ng,seven\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_data(DataSpec(train=str(data), format="text", validation_fraction=0.3), tokenizer, 0)
    (warning,) = [str(w.message) for w in caught if "quoted field spans" in str(w.message)]
    assert "line 3 (3 lines)" in warning and splits.report.rows == 7


def test_a_classification_text_that_swallowed_records_is_named_too(tmp_path, tokenizer):
    """The label comes first, so the stray quote sits in the text: no label spans lines to give it away, and
    the warning names the lines (before, classification data got no word of it)."""
    rows = [f"{'ab'[i % 2]},text {i}" for i in range(20)]
    rows[4] = rows[4].replace(",", ',"', 1)
    rows[6] += '"'
    data = tmp_path / "d.csv"
    data.write_text("label,text\n" + "\n".join(rows) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_data(DataSpec(train=str(data), format="classification", validation_fraction=0.3), tokenizer, 0)
    (warning,) = [str(w.message) for w in caught if "quoted field spans" in str(w.message)]
    assert "line 6 (3 lines)" in warning
