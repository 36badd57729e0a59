"""The offline corpora read from vaderSentiment's sdist (data/corpora.py): sizes and classes as documented,
a tampered or missing download fails clearly, and the corpora work as training data."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from deltatune.data import corpora
from deltatune.data.dataset import resolve_data_path
from deltatune.data.readers import DataError


@pytest.mark.parametrize(
    ("name", "rows", "classes"),
    [("movie_reviews", 10072, {"negative", "positive"}), ("product_reviews", 3708, {"negative", "neutral", "positive"}),
     ("news", 5190, {"negative", "neutral", "positive"})],
)  # fmt: skip
def test_each_corpus_has_its_documented_rows_and_classes(name, rows, classes):
    records = [json.loads(line) for line in resolve_data_path(f"bundled:{name}").read_text().splitlines()]
    assert len(records) == rows and set(Counter(r["sentiment"] for r in records)) == classes
    for r in records[:200]:
        expected = "neutral" if abs(r["rating"]) < 0.5 else ("positive" if r["rating"] > 0 else "negative")
        assert r["sentiment"] == expected and r["text"] and r["text"] == r["text"].strip()


def test_a_tampered_download_is_refused_and_deleted(tmp_path):
    fake = tmp_path / corpora.VADER_SDIST
    fake.write_bytes(b"not the sdist")
    with pytest.raises(DataError, match="not the pinned"):
        corpora.fetch_vader_sdist(tmp_path)
    assert not fake.exists()


def test_without_the_download_the_error_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "sources_dir", lambda: tmp_path)
    with pytest.raises(DataError, match="make setup"):
        resolve_data_path("bundled:news")
    with pytest.raises(DataError, match="available: .*movie_reviews"):
        resolve_data_path("bundled:films")
    assert not list(tmp_path.iterdir())


def test_movie_reviews_train_as_instruction_data(tiny_causal_lm):
    from transformers import AutoTokenizer

    from deltatune.data import load_data
    from deltatune.data.spec import DataSpec

    spec = DataSpec(train="bundled:movie_reviews", format="instruction", instruction_template="Review: {text}",
                    output_template="{sentiment}", max_train_samples=50, max_validation_samples=10, max_length=1024)  # fmt: skip
    splits = load_data(spec, AutoTokenizer.from_pretrained(tiny_causal_lm), seed=0)
    assert len(splits.train) == 50 and len(splits.validation) == 10
    assert len(splits.data_sha256) == 64
