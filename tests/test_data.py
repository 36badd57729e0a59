"""Data: readers, loss masking per task format, seeded splits, malformed-row reporting."""

from __future__ import annotations

import json
import warnings

import pytest
from train_helpers import instruction_rows, sentiment_rows, write_jsonl

from deltatune.data import DataError, load_data
from deltatune.data.formats import IGNORE
from deltatune.data.readers import read_rows
from deltatune.data.spec import DataSpec
from deltatune.models.spec import ModelSpec
from deltatune.task.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_causal_lm):
    return load_tokenizer(ModelSpec(path=str(tiny_causal_lm)))


def spec(path, fmt="instruction", **kw) -> DataSpec:
    return DataSpec(train=str(path), format=fmt, **kw)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
    )


def test_instruction_loss_only_on_the_response(tmp_path, tokenizer):
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "Say hi", "input": "politely", "output": "hi there"}] * 2
    )
    example = load_data(spec(data, validation=str(data), dedupe=False), tokenizer, 0).train[0]
    assert trained_text(tokenizer, example) == "hi there<|im_end|>\n"
    prompt = tokenizer.decode(example.prompt_ids)
    assert prompt == "<|im_start|>user\nSay hi\n\npolitely<|im_end|>\n<|im_start|>assistant\n"
    assert example.input_ids[: len(example.prompt_ids)] == example.prompt_ids
    assert example.reference == "hi there"


def test_instruction_without_chat_template_uses_alpaca_prompt_and_eos(tmp_path, tokenizer):
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    example = load_data(spec(data, validation=str(data)), tokenizer, 0).train[0]
    assert tokenizer.decode(example.prompt_ids) == "### Instruction:\nSay hi\n\n### Response:\n"
    assert trained_text(tokenizer, example) == "hi" + tokenizer.eos_token


def test_templates_build_instruction_and_output_from_columns(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"tweet": "so happy", "sentiment": "positive"}])
    s = spec(data, validation=str(data), instruction_template="Tweet: {tweet}",
             output_template='{{"sentiment": "{sentiment}"}}')  # fmt: skip
    example = load_data(s, tokenizer, 0).train[0]
    assert example.reference == '{"sentiment": "positive"}'
    assert "Tweet: so happy" in tokenizer.decode(example.prompt_ids)


def test_chat_loss_only_on_assistant_turns(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "good day"},
        {"role": "assistant", "content": "great"},
        {"role": "user", "content": "bad day"},
        {"role": "assistant", "content": "sad"},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    example = load_data(spec(data, "chat", validation=str(data)), tokenizer, 0).train[0]
    assert trained_text(tokenizer, example) == "great<|im_end|>\nsad<|im_end|>\n"
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == full
    assert example.reference == "sad"


def test_plain_text_and_truncation(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "good " * 100}])
    splits = load_data(spec(data, "text", validation=str(data), max_length=16), tokenizer, 0)
    example = splits.train[0]
    assert len(example.input_ids) == 16 and example.labels == example.input_ids
    assert splits.report.truncated == 2  # the train row and the validation row


def test_classification_labels(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(20, 0) + [{"text": "hmm", "label": "meh"}])
    with pytest.warns(UserWarning, match=r"line 21: label 'meh' is not one of \['negative', 'positive'\]"):
        splits = load_data(
            spec(data, "classification", labels=["negative", "positive"], max_bad_fraction=0.5), tokenizer, 0
        )
    assert splits.label_names == ["negative", "positive"]
    assert {e.labels for e in splits.train} <= {0, 1}


def test_seeded_split_is_reproducible_disjoint_and_deduplicated(tmp_path, tokenizer):
    rows = instruction_rows(100, 0)
    data = write_jsonl(tmp_path / "d.jsonl", rows + rows[:10])  # 10 exact duplicates
    a = load_data(spec(data, validation_fraction=0.2), tokenizer, seed=1)
    b = load_data(spec(data, validation_fraction=0.2), tokenizer, seed=1)
    c = load_data(spec(data, validation_fraction=0.2), tokenizer, seed=2)
    key = lambda split: sorted(tuple(e.input_ids) for e in split)  # noqa: E731
    assert key(a.train) == key(b.train) and key(a.validation) == key(b.validation)
    assert key(a.validation) != key(c.validation)
    unique = {tuple(e.input_ids) for e in a.train + a.validation}
    assert a.report.duplicates == len(rows + rows[:10]) - len(unique)
    assert not {tuple(e.input_ids) for e in a.train} & {tuple(e.input_ids) for e in a.validation}
    assert len(a.validation) == round(len(unique) * 0.2)
    assert a.data_sha256 == b.data_sha256 and len(a.data_sha256) == 64


def test_malformed_rows_reported_with_line_numbers(tmp_path, tokenizer):
    good = [json.dumps(r) for r in instruction_rows(40, 0)]
    lines = (
        good[:5] + ["{not json"] + good[5:10] + ['["a list"]', json.dumps({"instruction": "x"})] + good[10:]
    )
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_data(spec(data, max_bad_fraction=0.05), tokenizer, 0)
    message = str(info.value)
    assert "3 of 43 rows are malformed" in message
    assert "d.jsonl line 6: invalid JSON" in message
    assert "line 12: expected a JSON object, got list" in message
    assert "line 13: missing or empty field 'output'" in message
    assert "data.max_bad_fraction=0.05" in message
    with pytest.warns(UserWarning, match="skipping malformed rows: 3 of 43"):
        splits = load_data(spec(data, max_bad_fraction=0.1), tokenizer, 0)
    assert len(splits.train) + len(splits.validation) == 40


def test_csv_encoding_option_and_bad_cells(tmp_path, tokenizer):
    path = tmp_path / "d.csv"
    rows = ["text,label"] + [f"{r['text']},{r['label']}" for r in sentiment_rows(30, 0)]
    rows[3] = "caf\xe9 was good,positive"
    rows[5] = "too,many,cells"
    path.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    with pytest.raises(DataError, match=r"not valid utf-8 .*set data.encoding"):
        load_data(spec(path, "classification"), tokenizer, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_data(
            spec(path, "classification", encoding="latin-1", max_bad_fraction=0.1), tokenizer, 0
        )
    assert any("d.csv line 6: 3 cells, header has 2" in str(w.message) for w in caught)
    assert len(splits.train) + len(splits.validation) <= 29


def test_parquet_reads_like_jsonl(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = sentiment_rows(10, 0)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    parquet_rows, bad = read_rows(tmp_path / "d.parquet")
    jsonl_rows, _ = read_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    assert not bad and [r.fields for r in parquet_rows] == [r.fields for r in jsonl_rows]


def test_unsupported_and_missing_files(tmp_path, tokenizer):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'; use one of .jsonl"):
        load_data(spec(tmp_path / "d.txt"), tokenizer, 0)
    with pytest.raises(DataError, match="does not exist"):
        load_data(spec(tmp_path / "nope.jsonl"), tokenizer, 0)
    with pytest.raises(DataError, match="unknown bundled dataset 'bundled:nope'"):
        load_data(spec("bundled:nope"), tokenizer, 0)


def test_bundled_tweets_are_readable():
    from deltatune.data.dataset import resolve_data_path

    rows, bad = read_rows(resolve_data_path("bundled:tweets"), "latin-1")
    assert len(rows) == 38158 and not bad
    assert {r.fields["sentiment"] for r in rows} == {"negative", "neutral", "positive"}
