"""Conversations as a chat template takes them, from the two shapes datasets hold them in: OpenAI messages
(`role` / `content`, assistant `tool_calls`, `tool` results) and ShareGPT (`from` / `value`, roles human / gpt /
system, and LLaMA-Factory's function_call / observation for tools).

Both are checked before anything is rendered, because a chat template given an odd conversation rarely
refuses it: it renders two user turns in a row, drops a tool call it does not understand, or puts a result
where no call was made, and the model then learns from a conversation nobody had. Such a row is malformed, and
the message names the turn and the rule it breaks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",  # LLaMA-Factory: the assistant's tool call, as JSON
    "observation": "tool",  # LLaMA-Factory: the tool's result
    "tool": "tool",
}


class ConversationError(ValueError):
    """This conversation cannot be trained on; the message names the turn and why."""


@dataclass(frozen=True)
class Conversation:
    """Messages in OpenAI's shape (tool-call arguments parsed to objects, as chat templates render them) and
    the tool schemas the template shows the model, or None."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None

    @property
    def calls_tools(self) -> bool:
        return any(m.get("tool_calls") for m in self.messages)

    def key(self) -> str:
        """What makes two rows duplicates."""
        return json.dumps([self.messages, self.tools], sort_keys=True, default=str)


def from_messages(messages: Any, tools: Any = None) -> Conversation:
    """An OpenAI-style `messages` list (and the row's `tools`), checked."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("'messages' must be a non-empty list of {role, content} objects")
    out = [_message(i, m) for i, m in enumerate(messages)]
    check_turns(out)
    return Conversation(out, parse_tools(tools))


def from_sharegpt(turns: Any, tools: Any = None) -> Conversation:
    """ShareGPT's `conversations` list of {from, value} (and the row's `tools`), as messages, checked."""
    if not isinstance(turns, list) or not turns:
        raise ConversationError("'conversations' must be a non-empty list of {from, value} objects")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"turn {i + 1} must be an object with 'from' and 'value'")
        speaker, value = turn["from"], turn["value"]
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise ConversationError(
                f"turn {i + 1} is from {speaker!r}, not one of {', '.join(SHAREGPT_ROLES)}; "
                "map it to one of them in the file"
            )
        if not isinstance(value, str):
            raise ConversationError(f"turn {i + 1}'s value must be text, got {type(value).__name__}")
        if speaker == "function_call":
            messages.append(
                _message(i, {"role": "assistant", "content": "", "tool_calls": _sharegpt_calls(i, value)})
            )
        else:
            messages.append(_message(i, {"role": role, "content": value}))
    check_turns(messages)
    return Conversation(messages, parse_tools(tools))


def parse_tools(value: Any) -> list[dict[str, Any]] | None:
    """The row's tool schemas: a list of objects, or the same as a JSON string (LLaMA-Factory stores them so)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConversationError(f"'tools' is not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConversationError("'tools' must be a list of tool schemas (JSON objects)")
    return value or None


def _message(index: int, message: Any) -> dict[str, Any]:
    where = f"message {index + 1}"
    if not isinstance(message, dict):
        raise ConversationError(f"{where} must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise ConversationError(f"{where} has role {role!r}, not one of {', '.join(ROLES)}")
    calls = message.get("tool_calls") or None
    content = message.get("content")
    if role == "assistant" and calls is not None:
        content = "" if content is None else content
    elif calls is not None:
        raise ConversationError(f"{where} ({role}) has tool_calls; only an assistant message calls tools")
    if not isinstance(content, str):
        got = "nothing" if content is None else type(content).__name__
        raise ConversationError(f"{where}'s content must be text, got {got}")
    if role == "assistant" and calls is None and not content.strip():
        raise ConversationError(f"{where} (assistant) is empty: there is no answer to learn")
    out = {**message, "content": content}
    if calls is not None:
        out["tool_calls"] = [_call(where, j, call) for j, call in enumerate(_as_list(where, calls))]
    return out


def _as_list(where: str, calls: Any) -> list[Any]:
    if not isinstance(calls, list):
        raise ConversationError(f"{where}'s tool_calls must be a list of calls")
    return calls


def _call(where: str, j: int, call: Any) -> dict[str, Any]:
    """One tool call as templates render it: {type: function, id?, function: {name, arguments: object}}.
    OpenAI's API sends arguments as a JSON string; templates print them with `tojson`, so a string would be
    printed quoted: it is parsed here, and must be a JSON object."""
    what = f"{where}'s tool call {j + 1}"
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ConversationError(f"{what} must be {{'function': {{'name': ..., 'arguments': ...}}}}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConversationError(
                f"{what} ({function['name']}): arguments are not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
    if not isinstance(arguments, dict):
        raise ConversationError(
            f"{what} ({function['name']}): arguments must be a JSON object, got {type(arguments).__name__}"
        )
    out: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call, dict) and call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def _sharegpt_calls(index: int, value: str) -> list[dict[str, Any]]:
    """A function_call turn's value: one call {name, arguments} or a list of them, as JSON."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConversationError(
            f"turn {index + 1} (function_call) is not valid JSON: {exc.msg} at column {exc.colno}"
        ) from None
    return calls if isinstance(calls, list) else [calls]


NEXT_ROLE = {None: "user", "user": "assistant", "assistant": "user", "tool": "assistant"}


def check_turns(messages: list[dict[str, Any]]) -> None:
    """The order a conversation must have: an optional system message first, then a user message, each
    answered by the assistant; an assistant message that calls tools is followed by one result per call (by
    `tool_call_id` where the calls have ids), and then by the assistant again."""
    pending: list[dict[str, Any]] = []  # calls not yet answered
    previous: str | None = None  # the last non-system role
    for i, message in enumerate(messages):
        role, where = message["role"], f"message {i + 1}"
        if role == "system":
            if i > 0:
                raise ConversationError(f"{where} is a system message; only the first message may be one")
            continue
        if role == "tool":
            _answer(where, message, pending)
        elif pending:
            names = [c["function"]["name"] for c in pending]
            raise ConversationError(
                f"{where} ({role}) comes before the result of call(s) {names}; every tool call needs its "
                "tool message"
            )
        elif role != NEXT_ROLE[previous]:
            raise ConversationError(
                f"{where} is {role!r}: a conversation starts with a user message (after any system one)"
                if previous is None
                else f"{where} is {role!r} after {previous!r}: roles must alternate user / assistant (merge "
                "consecutive messages of one role)"
            )
        if role == "assistant" and message.get("tool_calls"):
            pending = list(message["tool_calls"])
        previous = role


def _answer(where: str, message: dict[str, Any], pending: list[dict[str, Any]]) -> None:
    """Match a tool result to the call it answers (and take that call off `pending`)."""
    if not pending:
        raise ConversationError(
            f"{where} is a tool result without its call: no unanswered tool call of an assistant message "
            "comes before it"
        )
    wanted = message.get("tool_call_id")
    if wanted is None or not any("id" in c for c in pending):
        pending.pop(0)
        return
    for k, call in enumerate(pending):
        if call.get("id") == str(wanted):
            pending.pop(k)
            return
    ids = [c.get("id") for c in pending]
    raise ConversationError(
        f"{where} answers tool_call_id {wanted!r}, which no unanswered call has (unanswered: {ids})"
    )
