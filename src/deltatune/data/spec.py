"""What a config says about the data: files, format, columns, templates, split and limits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..core.section import Section


class DataSpec(Section):
    # A .jsonl / .json / .csv / .tsv / .parquet file, or bundled:tweets / movie_reviews / product_reviews / news.
    train: str
    validation: str | None = None
    # preference: prompt, chosen, rejected (strings, or TRL's conversational lists of messages);
    # unpaired_preference: prompt, completion, label (true: desirable), for training.objective kto
    # chat: messages (OpenAI's, tool calls included) and optional tools; sharegpt: conversations of {from, value}
    format: Literal[
        "classification", "instruction", "chat", "sharegpt", "text", "preference", "unpaired_preference"
    ]
    encoding: str = "utf-8"
    # Canonical field -> column in the file, e.g. {label: sentiment}.
    columns: dict[str, str] = Field(default_factory=dict)
    # Build instruction/output from any columns with str.format (instruction format only).
    instruction_template: str | None = None
    output_template: str | None = None
    system_prompt: str | None = None
    labels: list[str] | None = None  # classification label order; default: sorted labels of the train file
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    max_train_samples: int | None = Field(None, gt=0)
    max_validation_samples: int | None = Field(None, gt=0)
    dedupe: bool = True  # drop exact duplicate inputs before splitting (retweets would leak across the split)
    max_length: int = Field(256, gt=0)
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    # chat / sharegpt: which assistant turns carry loss; the earlier ones stay in the prompt either way
    assistant_turns: Literal["all", "last"] = "all"

    @model_validator(mode="after")
    def _check_assistant_turns(self) -> DataSpec:
        if self.assistant_turns != "all" and self.format not in ("chat", "sharegpt"):
            raise ValueError(
                f"data.assistant_turns chooses the trained turns of a conversation (format chat or sharegpt); "
                f"format {self.format!r} has none: remove it"
            )
        return self
