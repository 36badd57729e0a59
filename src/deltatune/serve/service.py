"""What the HTTP handlers do with a request, apart from HTTP: check it against the limits, turn it into engine
rows, wait for or stream their answers, and shape the text. One `Service` per app (`app.state.service`);
the routes (`serve/routes.py`) reach it through a FastAPI dependency."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..core.errors import AdapterNotFoundError
from ..data.prompts import PromptRenderer
from ..runtime import AdapterNameInvalid, Completion
from ..runtime.sampling import Sampling, TokenLogprob
from .engine import Engine
from .errors import ApiError, PathsHidden
from .logprobs import Shape
from .schemas import ChatRequest, CompletionRequest
from .stops import first_stop
from .streaming import TextDeltas, TokenFeed, event
from .work import Row, Score


@dataclass
class Limits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_request_bytes: int = 1 << 20
    max_prompts_per_request: int = 16
    # OpenAI allows 4 stop sequences; long or many ones would make every token's stop check costly
    max_stops: int = 4
    max_stop_chars: int = 256
    # text longer than this is refused before tokenizing (None: 32 characters per allowed prompt token)
    max_prompt_chars: int | None = None
    # a request not answered by then fails with 504 and its rows leave the batch
    request_timeout_s: float = 300.0
    # how often a non-streamed request checks whether its client is still connected
    disconnect_poll_s: float = 0.5

    @property
    def prompt_chars(self) -> int:
        return self.max_prompt_chars if self.max_prompt_chars is not None else 32 * self.max_prompt_tokens


Choice = Callable[[int, str, "str | None"], dict]  # (index, text, finish reason) -> one event's choice


class Service:
    def __init__(self, engine: Engine, *, base_name: str, api_key: str | None, limits: Limits) -> None:
        self.engine, self.base_name, self.api_key, self.limits = engine, base_name, api_key, limits
        self.tokenizer, self.cache = engine.tokenizer, engine.cache
        self.prompts = PromptRenderer(self.tokenizer)  # a client's messages carry their own system turn
        self.public = PathsHidden(self.cache.directory)  # errors as clients may see them
        self.vocabulary = len(self.tokenizer)
        self.started = time.time()

    # ---- who and what --------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error"
            )

    def adapter_for(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        try:
            self.cache.resolve(model)
        except (AdapterNameInvalid, AdapterNotFoundError) as exc:
            raise ApiError(
                404,
                f"model {model!r} not found: {exc}. GET /v1/models lists what is served",
                code="model_not_found",
            ) from None
        return model

    # ---- limits --------------------------------------------------------------------------------------------
    def check_text(self, request: CompletionRequest | ChatRequest, prompts: int, texts: list[str]) -> None:
        """Limits that hold before any tokenizing: the number of rows (prompts times choices), the size of
        the prompts' text, stop strings."""
        limits = self.limits
        if prompts * request.n > limits.max_prompts_per_request:
            asked = f"{prompts} prompts" if request.n == 1 else f"{prompts} prompts x n={request.n} choices"
            raise ApiError(400, f"{asked} in one request; the limit is {limits.max_prompts_per_request} rows")
        self.check_length(sum(len(t) for t in texts))
        stops = request.stops()
        if len(stops) > limits.max_stops:
            raise ApiError(400, f"{len(stops)} stop strings; the limit is {limits.max_stops}", code="stop")
        longest = max((len(s) for s in stops), default=0)
        if longest > limits.max_stop_chars:
            raise ApiError(
                400,
                f"a stop string has {longest} characters; the limit is {limits.max_stop_chars}",
                code="stop",
            )

    def check_length(self, characters: int) -> None:
        """Prompt text longer than any prompt may be is refused before tokenizing."""
        if characters > self.limits.prompt_chars:
            raise ApiError(
                400,
                f"the prompt text has {characters} characters; the limit is {self.limits.prompt_chars}",
                code="prompt_too_long",
            )

    def check_token_ids(self, ids: list[int], what: str = "token id") -> None:
        """Token ids a client sent (a prompt, a logit_bias, ids to decode) must name tokens of the vocabulary."""
        if ids and max(ids) >= self.vocabulary:
            raise ApiError(
                400,
                f"{what} {max(ids)} is outside the vocabulary (0 to {self.vocabulary - 1})",
                code="token_id",
            )

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ApiError(400, "a prompt encodes to no tokens; send some text")
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"a prompt has {len(ids)} tokens; the limit is {self.limits.max_prompt_tokens}",
                code="prompt_too_long",
            )
        self.check_token_ids(ids)

    def checked_prompts(
        self, request: CompletionRequest | ChatRequest, prompts: list[list[int]]
    ) -> str | None:
        """The adapter the request names (None: the base), once the model and every prompt pass the limits."""
        adapter = self.adapter_for(request.model)
        self._check_prompts(prompts)
        return adapter

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        for ids in prompts:
            self._check_prompt(ids)

    def rows(self, request: CompletionRequest | ChatRequest, prompts: list[list[int]]) -> list[Row]:
        """The engine rows for a request, after every limit is checked: `n` per prompt, one after another
        (OpenAI's choice order), each seeded choice with its own seed."""
        adapter = self.adapter_for(request.model)
        limit = self.limits.max_tokens
        max_tokens = request.max_tokens if request.max_tokens is not None else min(16, limit)
        if max_tokens > limit:
            raise ApiError(
                400, f"max_tokens {max_tokens} is over this server's limit of {limit}", code="max_tokens"
            )
        self._check_prompts(prompts)
        deadline = time.monotonic() + self.limits.request_timeout_s
        try:
            sampling = Sampling(request.temperature, request.top_p, request.presence_penalty,
                                request.frequency_penalty, request.seed, request.row_logprobs(),
                                request.bias_pairs())  # fmt: skip
            self.check_token_ids([token for token, _ in sampling.logit_bias], "logit_bias token id")
            return [
                Row(ids, adapter, max_tokens, sampling.for_choice(j), stops=request.stops(), deadline=deadline)
                for ids in prompts
                for j in range(request.n)
            ]  # fmt: skip
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def scorings(self, request: CompletionRequest, prompts: list[list[int]]) -> list[Score]:
        """Echo with logprobs: each prompt's own tokens scored once (its `n` choices share the scores), queued
        like rows."""
        adapter = self.checked_prompts(request, prompts)
        deadline = time.monotonic() + self.limits.request_timeout_s
        return [Score(ids, adapter, request.logprobs or 0, deadline) for ids in prompts]

    # ---- prompts -------------------------------------------------------------------------------------------
    async def encoded(self, request: CompletionRequest) -> list[list[int]]:
        items = request.prompt_items()
        texts = [t for t in items if isinstance(t, str)]
        self.check_text(request, len(items), texts)
        if not texts:
            return items
        # off the event loop: a long text takes a while, and /health must keep answering meanwhile
        done = iter(await asyncio.to_thread(lambda: [self.prompts.text_ids(t) for t in texts]))
        return [next(done) if isinstance(t, str) else t for t in items]

    async def chat_prompt(self, request: ChatRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "the base model's tokenizer has no chat template; use /v1/completions")
        messages = [m.model_dump() for m in request.messages]
        self.check_text(request, 1, [m["content"] for m in messages])
        try:
            return await asyncio.to_thread(self.prompts.chat_ids, messages)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    # ---- answers -------------------------------------------------------------------------------------------
    def _submit_all(self, rows: list[Row | Score]) -> list:
        futures = []
        try:
            for row in rows:
                futures.append(self.engine.submit(row))
        except Exception as exc:
            for row in rows:  # the part of the request that was queued is not needed any more
                row.cancelled = True
            raise self.public(exc) from exc
        return futures

    async def complete(
        self, http: Request, request: CompletionRequest | ChatRequest, prompts: list[list[int]]
    ) -> list[Completion]:
        """Wait for the rows' answers; a client that disconnects meanwhile ends its rows at their next token."""
        rows = self.rows(request, prompts)
        await self._wait(http, rows)
        return [r.future.result() for r in rows]

    async def complete_echoed(
        self, http: Request, request: CompletionRequest, prompts: list[list[int]]
    ) -> tuple[list[Completion], list[list[TokenLogprob]] | None]:
        """The answers of a completions request and, for echo with logprobs, each prompt's own scores: rows
        and scorings queued together, under the same limits, deadline and cancellation. max_tokens 0
        generates nothing (empty answers, n per prompt)."""
        if request.max_tokens == 0:
            self.checked_prompts(request, prompts)
            rows = []
        else:
            rows = self.rows(request, prompts)
        scorings = self.scorings(request, prompts) if request.echo and request.logprobs is not None else []
        await self._wait(http, [*rows, *scorings])
        if rows:
            results = [r.future.result() for r in rows]
        else:
            results = [Completion([], "length", len(ids)) for ids in prompts for _ in range(request.n)]
        return results, [s.future.result() for s in scorings] if scorings else None

    async def _wait(self, http: Request, items: list[Row | Score]) -> None:
        """Queue the items and wait until every one is answered; a client that disconnects meanwhile
        cancels them (rows end at their next token, prompts being scored before their next chunk)."""
        pending = {asyncio.wrap_future(f) for f in self._submit_all(items)}
        give_up = time.monotonic() + self.limits.request_timeout_s + 30  # the engine's own deadline first
        try:
            while pending:
                _, pending = await asyncio.wait(pending, timeout=self.limits.disconnect_poll_s)
                if pending and await http.is_disconnected():
                    raise ApiError(499, "the client disconnected", code="client_closed")
                if pending and time.monotonic() > give_up:
                    raise ApiError(504, "the request passed its deadline", "timeout", "request_timeout")
            for item in items:
                if item.future.exception() is not None:
                    raise self.public(item.future.exception())
        finally:
            for item in items:
                item.cancelled = True  # a no-op for those already answered

    def stream(
        self,
        request: CompletionRequest | ChatRequest,
        prompts: list[list[int]],
        head: dict,
        choice: Choice,
        shape: Shape,
    ) -> StreamingResponse:
        """Server-sent events: `head` (id, object, created, model) with `choice(index, text, finish_reason)` per
        piece of text, then [DONE]. When the request asks for log-probabilities, each choice carries those of
        the tokens its text completes, in `shape`. With stream_options.include_usage, each event has `usage:
        null` and one more before [DONE] holds the usage of the whole request. Limits and a full queue are
        refused before the stream starts; a row failing later ends with an error event."""
        rows = self.rows(request, prompts)
        feed = TokenFeed(asyncio.get_running_loop())
        for i, row in enumerate(rows):
            row.on_token = feed.on_token(i)
        futures = self._submit_all(rows)
        for i, future in enumerate(futures):
            feed.watch(i, future)
        stops = request.stops()
        with_usage = {"usage": None} if request.include_usage else {}
        deltas = [TextDeltas(self.tokenizer, stops, request.row_logprobs() is not None) for _ in rows]
        chances: list[list[TokenLogprob]] = [[] for _ in rows]  # each row's, as its tokens arrive
        given = [0] * len(rows)  # how many of them went out

        def chunk(index: int, text: str, reason: str | None) -> str:
            body = choice(index, text, reason)
            if request.row_logprobs() is not None:
                first, settled = given[index], deltas[index].settled(given[index])
                offsets = [deltas[index].start(k) for k in range(first, settled)]
                body["logprobs"] = shape(self.tokenizer, chances[index][first:settled], offsets)
                given[index] = settled
                deltas[index].forget(settled)
            return event({**head, "choices": [body], **with_usage})

        async def events() -> AsyncIterator[str]:
            answered: dict[int, Completion] = {}
            try:
                async for i, token, logprob in feed.items(len(rows)):
                    if token is not None:
                        if logprob is not None:
                            chances[i].append(logprob)
                        piece = deltas[i].add(token)  # the engine ends the row at a stop string
                        if piece:
                            yield chunk(i, piece, None)
                        continue
                    try:
                        result = futures[i].result()
                    except Exception as exc:
                        err = self.public(exc)
                        yield event({"error": {"message": err.message, "type": err.kind, "code": err.code}})
                        continue
                    answered[i] = result
                    text, reason = self.text_of(result, stops)
                    piece = deltas[i].rest(text)
                    if piece:
                        yield chunk(i, piece, None)
                    yield chunk(i, "", reason)
                if with_usage:  # the rows that failed generated nothing to count
                    yield event({**head, "choices": [], "usage": usage(answered, request.n)})
                yield event("[DONE]")
            finally:  # also when the client went away mid-stream: its rows stop at their next token
                for row in rows:
                    row.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream")

    def text_of(self, result: Completion, stops: list[str]) -> tuple[str, str]:
        text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
        cut = first_stop(text, stops)
        if cut is not None:
            return text[:cut], "stop"
        return text, result.finish_reason


def usage(answered: dict[int, Completion], choices: int = 1) -> dict[str, int]:
    """OpenAI's token counts of the answered rows (row index -> result): each prompt once (its `choices`
    rows share it), every choice's new tokens."""
    prompt = sum({row // choices: r.prompt_tokens for row, r in answered.items()}.values())
    completion = sum(len(r.tokens) for r in answered.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
