"""Conversation data: OpenAI messages with tool calls and tool results, ShareGPT, which assistant turns carry
loss, and the malformed conversations that are counted and named instead of trained on.

The oracle for which tokens carry loss is transformers' own assistant mask (`return_assistant_tokens_mask`)
over TRL's training variant of the Qwen2.5 template, whose `{% generation %}` blocks mark each assistant turn,
tool calls included."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from train_helpers import causal_config, write_jsonl

from deltatune.data import DataError, load_data
from deltatune.data.formats import IGNORE, Encoder
from deltatune.data.spec import DataSpec
from deltatune.models.spec import ModelSpec
from deltatune.task.loading import load_tokenizer

trl = pytest.importorskip("trl")
TEMPLATES = Path(trl.__file__).parent / "chat_templates"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "weather in Paris and Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [  # OpenAI's shape: arguments as a JSON string
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "c2", "content": '{"temp": 4}'},  # answered out of order, by id
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "Paris 21, Oslo 4."},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_causal_lm):
    tokenizer = load_tokenizer(ModelSpec(path=str(tiny_causal_lm)))
    tokenizer.chat_template = (TEMPLATES / "qwen2_5.jinja").read_text()
    return tokenizer


def spec(fmt: str = "chat", **kw) -> DataSpec:
    return DataSpec(train="unused.jsonl", format=fmt, max_length=4096, **kw)


def trained_spans(tokenizer, example) -> list[str]:
    """The decoded runs of tokens that carry loss."""
    spans, run = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans + ([tokenizer.decode(run)] if run else [])


def test_tool_calls_train_on_every_assistant_turn_as_the_templates_generation_blocks_mark_them(tokenizer):
    from transformers.utils.chat_template_utils import render_jinja_template

    encoder = Encoder(tokenizer, spec())
    example = encoder.encode({"messages": TOOL_CHAT, "tools": json.dumps(TOOLS)})  # tools as a JSON string
    messages = encoder.conversation({"messages": TOOL_CHAT}).messages
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Paris"
    }  # parsed, as templates take
    whole = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert tokenizer.decode(example.input_ids) == whole
    assert "# Tools" in whole and '"name": "get_weather", "arguments": {"city": "Oslo"}' in whole

    (rendered,), (blocks,) = render_jinja_template(
        [messages],
        tools=TOOLS,
        chat_template=(TEMPLATES / "qwen2_5_training.jinja").read_text(),
        return_assistant_tokens_mask=True,
    )
    assert rendered == whole
    oracle = [rendered[start:end] for start, end in blocks]
    # The training template opens its generation block right after "<|im_start|>assistant"; the newline after
    # it is the end of the generation prompt, which deltatune keeps in the prompt (where generation starts).
    assert [span.removeprefix("\n") for span in oracle] == trained_spans(tokenizer, example)
    assert len(oracle) == 3 and "<tool_call>" in oracle[0] and '{"temp"' not in "".join(oracle)
    assert example.reference == "You are welcome."


def test_only_the_last_assistant_turn_carries_loss_when_asked(tokenizer):
    every = Encoder(tokenizer, spec()).encode({"messages": TOOL_CHAT, "tools": TOOLS})
    last = Encoder(tokenizer, spec(assistant_turns="last")).encode({"messages": TOOL_CHAT, "tools": TOOLS})
    assert last.input_ids == every.input_ids and last.prompt_ids == every.prompt_ids
    assert trained_spans(tokenizer, last) == ["You are welcome.<|im_end|>\n"]
    assert len(trained_spans(tokenizer, every)) == 3


def test_a_conversation_ending_in_a_call_learns_the_call_and_generates_it(tokenizer):
    example = Encoder(tokenizer, spec()).encode({"messages": TOOL_CHAT[:3], "tools": TOOLS})
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert example.reference.startswith("<tool_call>\n" + call) and example.reference.endswith("</tool_call>")
    assert tokenizer.decode(example.prompt_ids).endswith("<|im_start|>assistant\n")


def sharegpt(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"from": speaker, "value": value} for speaker, value in turns]


def test_sharegpt_encodes_exactly_as_the_same_openai_conversation(tokenizer):
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    share = sharegpt(
        [
            ("system", "be brief"),
            ("human", "weather in Paris?"),
            ("function_call", json.dumps(calls[0])),  # LLaMA-Factory's tool call turn
            ("observation", '{"temp": 21}'),
            ("gpt", "21 degrees."),
            ("human", "thanks"),
            ("gpt", "You are welcome."),
        ]
    )
    openai = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": calls[0]}]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    for turns in ("all", "last"):
        a = Encoder(tokenizer, spec("sharegpt", assistant_turns=turns)).encode(
            {"conversations": share, "tools": TOOLS}
        )
        b = Encoder(tokenizer, spec("chat", assistant_turns=turns)).encode(
            {"messages": openai, "tools": TOOLS}
        )
        assert (a.input_ids, a.labels, a.prompt_ids, a.reference) == (
            b.input_ids,
            b.labels,
            b.prompt_ids,
            b.reference,
        )
    encoder = Encoder(tokenizer, spec("sharegpt"))
    plain = encoder.prompt_ids(encoder.prompt_fields("hello"))
    assert tokenizer.decode(plain).endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")


MALFORMED = {
    "chat": [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
         "message 2 is 'user' after 'user': roles must alternate"),
        ([{"role": "developer", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
         "message 1 has role 'developer', not one of system, user, assistant, tool"),
        ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
         "message 1 is 'assistant': a conversation starts with a user message"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "c"}],
         "message 2 is a tool result without its call"),
        ([{"role": "user", "content": "a"},
          {"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{}"}}]},
          {"role": "tool", "tool_call_id": "y", "content": "1"}, {"role": "assistant", "content": "c"}],
         "message 3 answers tool_call_id 'y', which no unanswered call has (unanswered: ['x'])"),
        ([{"role": "user", "content": "a"},
          {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}},
                                               {"function": {"name": "g", "arguments": "{}"}}]},
          {"role": "tool", "content": "1"}, {"role": "assistant", "content": "c"}],
         "message 4 (assistant) comes before the result of call(s) ['g']; every tool call needs its tool message"),
        ([{"role": "user", "content": "a"},
          {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"city": Paris}'}}]}],
         "message 2's tool call 1 (f): arguments are not valid JSON (Expecting value at column 10)"),
        ([{"role": "user", "content": "a"},
          {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
         "message 2's tool call 1 (f): arguments must be a JSON object, got list"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
         "message 3 is a system message; only the first message may be one"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}],
         "message 2 (assistant) is empty: there is no answer to learn"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": "b"}]}],
         "message 2's content must be text, got list"),
    ],
    "sharegpt": [
        (sharegpt([("human", "a"), ("bot", "b")]), "turn 2 is from 'bot', not one of human, user, gpt"),
        (sharegpt([("human", "a"), ("gpt", "b"), ("gpt", "c")]), "message 3 is 'assistant' after 'assistant'"),
        (sharegpt([("human", "a"), ("function_call", '{"name": "f", "arguments": {')]),
         "turn 2 (function_call) is not valid JSON"),
        (sharegpt([("human", "a"), ("observation", "1"), ("gpt", "b")]), "message 2 is a tool result without its call"),
        ([{"from": "human", "text": "a"}], "turn 1 must be an object with 'from' and 'value'"),
    ],
}  # fmt: skip


@pytest.mark.parametrize("fmt", ["chat", "sharegpt"])
def test_malformed_conversations_are_counted_and_named_by_line(tmp_path, tokenizer, fmt):
    field = "messages" if fmt == "chat" else "conversations"
    good = (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        if fmt == "chat"
        else sharegpt([("human", "hi"), ("gpt", "hello")])
    )
    cases = MALFORMED[fmt]
    rows = [{field: good}] + [{field: conversation} for conversation, _ in cases]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    held_out = write_jsonl(tmp_path / "v.jsonl", [{field: good}])
    with pytest.warns(UserWarning, match=f"{len(cases)} of {len(rows) + 1} rows are malformed"):
        splits = load_data(
            spec(fmt, max_bad_fraction=1.0).model_copy(
                update={"train": str(data), "validation": str(held_out)}
            ),
            tokenizer,
            0,
        )
    assert len(splits.train) == 1
    reasons = {bad.line: bad.reason for _, bad in splits.report.bad}
    for line, (_, why) in enumerate(cases, start=2):
        assert why in reasons[line], (line, reasons[line])


def test_a_bad_tools_column_is_a_malformed_row(tokenizer):
    from deltatune.data.formats import RowError

    encoder = Encoder(tokenizer, spec())
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(RowError, match="'tools' is not valid JSON"):
        encoder.encode({"messages": chat, "tools": "[{"})
    with pytest.raises(RowError, match="'tools' must be a list of tool schemas"):
        encoder.encode({"messages": chat, "tools": {"name": "f"}})
    call = {"function": {"name": "f", "arguments": {"text": "<|im_start|>system"}}}
    with pytest.raises(RowError, match="a tool call or tool schema holds a special token's text"):
        encoder.encode({"messages": [chat[0], {"role": "assistant", "tool_calls": [call]}]})


def test_a_template_that_drops_tool_calls_stops_the_run_with_the_reason(tmp_path, tiny_causal_lm):
    plain = load_tokenizer(ModelSpec(path=str(tiny_causal_lm)))  # ChatML over role and content only
    encoder = Encoder(plain, spec())
    with pytest.raises(
        DataError, match="does not render tool_calls: rows with tool calls would train on turns"
    ):
        encoder.encode({"messages": TOOL_CHAT})
    with pytest.raises(DataError, match="does not render tools"):
        encoder.encode({"messages": TOOL_CHAT[:2] + [{"role": "assistant", "content": "x"}], "tools": TOOLS})
    # a conversation without tools is unaffected
    assert encoder.encode({"messages": [TOOL_CHAT[1], TOOL_CHAT[-1]]}).reference == "You are welcome."


def test_a_template_that_refuses_a_conversation_makes_a_malformed_row_with_its_message(tokenizer):
    from deltatune.data.formats import RowError

    strict = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    with pytest.raises(
        RowError, match="the chat template refuses this conversation: System role not supported"
    ):
        Encoder(strict, spec()).encode({"messages": TOOL_CHAT[:1] + [TOOL_CHAT[1], TOOL_CHAT[-1]]})


def test_assistant_turns_belongs_to_conversation_formats():
    with pytest.raises(ValueError, match="data.assistant_turns chooses the trained turns of a conversation"):
        DataSpec(train="x.jsonl", format="instruction", assistant_turns="last")
    assert DataSpec(train="x.jsonl", format="instruction").assistant_turns == "all"


def test_a_sharegpt_tool_calling_run_trains(tmp_path, tiny_causal_lm, tokenizer):
    from deltatune.train import train, validate_config

    model = tmp_path / "model"
    shutil.copytree(tiny_causal_lm, model)
    tokenizer.save_pretrained(model)  # the tiny model with Qwen2.5's tool-rendering template
    rows = []
    for i, city in enumerate(["Paris", "Oslo", "Rome", "Lima", "Kyiv", "Quito", "Baku", "Doha"] * 3):
        call = json.dumps({"name": "get_weather", "arguments": {"city": city}})
        turns = [
            ("human", f"weather in {city} {i}?"),
            ("function_call", call),
            ("observation", str(i)),
            ("gpt", f"{i}"),
        ]
        rows.append({"conversations": sharegpt(turns), "tools": json.dumps(TOOLS)})
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    raw = causal_config(model, data, tmp_path / "run", max_steps=8, batch_size=4)
    raw["data"] |= {"format": "sharegpt", "max_length": 1024}
    raw["optim"]["lr"] = 2e-2
    result = train(validate_config(raw))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert result.steps == 8 and all(map(math.isfinite, losses))
    assert losses[-1] < losses[0]
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["malformed"] == 0 and summary["examples"]["train"] > 0
