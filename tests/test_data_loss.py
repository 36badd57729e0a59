"""Data is never silently lost (issue: a new user's first hour): a misspelled or missing column is an error
listing the file's header; a run-away quote in a CSV is reported where it opened and counts as every record it
swallowed; every load reports what it read, dropped and kept, per class."""

from __future__ import annotations

import csv
import warnings

import pytest
from train_helpers import sentiment_rows, write_jsonl

from deltatune.data import DataError, load_data
from deltatune.data.readers import read_rows
from deltatune.train.config import DataSpec, ModelSpec
from deltatune.train.setup import load_tokenizer


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
    (merged,) = bad
    assert merged.line == 12 and merged.records == 74 and "not closed before line 85" in merged.reason
    assert len(parsed) == 200 - 74
    with pytest.raises(
        DataError, match=r"(?s)74 of 200 rows are malformed \(37.0%\).*line 12: a quote opened"
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
