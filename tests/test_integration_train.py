"""Training on the real bundled MiniLM and tweets: a short LoRA run must beat both the untrained model and the
majority class on held-out tweets by a clear margin."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from deltatune.data import load_data
from deltatune.task.loading import load_tokenizer
from deltatune.train import evaluate_adapter, load_train_config, train

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).parents[1] / "examples" / "sentiment_minilm.yaml"


def test_minilm_lora_learns_tweet_sentiment(tmp_path):
    overrides = [
        "training.max_steps=50", "training.batch_size=16", "training.checkpoint_every=null",
        "training.progress=false", "eval.every=null", "data.max_validation_samples=300",
        f"output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    cfg = load_train_config(CONFIG, overrides)
    splits = load_data(cfg.data, load_tokenizer(cfg.model), cfg.training.seed)
    majority = Counter(e.labels for e in splits.validation).most_common(1)[0][1] / len(splits.validation)
    untrained = evaluate_adapter(cfg, None)["accuracy"]  # random head, same seed as training starts from
    result = train(cfg)
    accuracy = result.validation["accuracy"]
    assert accuracy >= majority + 0.10, (accuracy, majority)
    assert accuracy >= untrained + 0.15, (accuracy, untrained)
    assert result.trainable.percent < 2.0
