"""Request bodies of the OpenAI-style endpoints.

Unknown fields are ignored, as OpenAI clients send extras; but a known OpenAI field this server cannot honour
(best_of, suffix, tools, ...) is refused when set, rather than silently answered without it.
Types are strict (`Strict`). Every string must be valid Unicode: JSON can carry lone UTF-16 surrogates ("\\ud800"), which no tokenizer or
UTF-8 encoder accepts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..runtime.sampling import BIAS_LIMIT, PENALTY_LIMIT, TOP_LOGPROBS_LIMIT


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("utf-16", "surrogatepass")[2:].hex()
        raise ValueError(
            f"contains a lone UTF-16 surrogate (U+{bad[2:4]}{bad[0:2]}) at character {exc.start}, which is "
            "not valid Unicode text; send the text as valid UTF-8"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenKey = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]  # a token id written as a string (JSON keys are)
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]

# OpenAI fields this server does not implement, with the value that means "not used".
UNSUPPORTED: dict[str, Any] = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class Strict(BaseModel):
    """Values are taken as sent: `seed: true` is not the seed 1, nor `prompt: [true]` the token 1 (an integer
    stands in for a float, as JSON has one number type)."""

    model_config = ConfigDict(strict=True)


class StreamOptions(Strict):
    # a last event before [DONE] carries the request's token usage (choices: []); the others carry usage: null
    include_usage: bool = False


class _Generation(Strict):
    model: Text = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)  # None: 16 (OpenAI's default) or the server's limit
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT, allow_inf_nan=False)
    # the same request with the same seed gets the same answer, whatever it is batched with
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    # token id (as a string, like OpenAI's) -> added to its score at every step; 100 / -100: only / never it
    logit_bias: (
        dict[TokenKey, Annotated[float, Field(ge=-BIAS_LIMIT, le=BIAS_LIMIT, allow_inf_nan=False)]] | None
    ) = Field(None, max_length=300)
    n: int = Field(1, ge=1, le=16)  # choices per prompt; with prompts, at most the server's rows per request
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            used = [k for k, neutral in UNSUPPORTED.items() if k in data and data[k] not in neutral]
            if used:
                raise ValueError(
                    f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} not supported by this server; "
                    f"leave {'it' if len(used) == 1 else 'them'} out"
                )
        return data

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> _Generation:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true; set stream or leave it out")
        return self

    def row_logprobs(self) -> int | None:
        """How many alternatives each token's log-probability comes with (None: no log-probabilities)."""
        return None

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(token), bias) for token, bias in (self.logit_bias or {}).items()))

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class CompletionRequest(_Generation):
    # text, texts, token ids, or lists of token ids (OpenAI's four prompt forms)
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )

    # the chosen token's log-probability and this many most likely tokens, per new token (OpenAI: up to 5)
    logprobs: int | None = Field(None, ge=0, le=5)
    # the prompt comes back in front of the answer, and with logprobs its tokens are scored too; max_tokens 0
    # then scores the prompt alone (what evaluation harnesses ask for a continuation's log-likelihood)
    echo: bool = False
    max_tokens: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _echo_settings(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError(
                "max_tokens 0 generates nothing; it is allowed only with echo, to score the prompt"
            )
        if self.echo and self.stream:
            raise ValueError("echo is not streamed by this server; ask with stream false")
        return self

    def row_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_items(self) -> list[str | list[int]]:
        """The request's prompts, each a text or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_LIMIT)  # needs logprobs: true
    # OpenAI's newer name for max_tokens in chat (which it deprecated there); either may be sent, not both
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _one_token_limit(self) -> ChatRequest:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ; send one of them")
            self.max_tokens = self.max_completion_tokens
        return self

    def row_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(Strict):
    """vLLM's /tokenize, which evaluation harnesses use to tokenize on the server: a text, or chat messages
    rendered with the template (an assistant turn opened)."""

    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt (a text) or messages (a chat), not both and not neither")
        return self


class DetokenizeRequest(Strict):
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1 << 16)


class AdapterLoadRequest(Strict):
    name: Text = Field(min_length=1, max_length=256)
