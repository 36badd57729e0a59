"""Request bodies of the OpenAI-style endpoints (unknown fields are ignored, as OpenAI clients send extras)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class _Generation(BaseModel):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)  # None: 16 (OpenAI's default) or the server's limit
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stop: str | list[str] | None = None
    stream: bool = False

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(min_length=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)


class AdapterLoadRequest(BaseModel):
    name: str = Field(min_length=1, max_length=256)
