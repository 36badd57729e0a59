"""`deltatune serve` checked by the official `openai` Python client (not a deltatune dependency; run it from a
venv that has it, against a running server: see bench/lm_eval_check.py for starting one).

Chat with n=2, a seed, logprobs with top_logprobs and `max_completion_tokens`; the same chat streamed with
`stream_options.include_usage` and logprobs; a completion with `echo` and logprobs; a seeded, penalized
completion asked twice. Exits 1 unless the client parses every answer and they agree: the stream's text,
usage and log-probabilities equal the first non-streamed choice's, the seeded answers repeat, the echoed
prompt leads with a first token scored `None`.

    /tmp/lme/bin/pip install openai
    /tmp/lme/bin/python bench/openai_client_check.py --url http://127.0.0.1:8765
"""

from __future__ import annotations

import argparse
import json
import sys

from openai import OpenAI


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="base")
    parser.add_argument("--api-key", default="none")
    args = parser.parse_args()
    client = OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key)
    messages = [{"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(
        model=args.model, messages=messages, max_completion_tokens=8, temperature=0, logprobs=True,
        top_logprobs=2, n=2, seed=3,
    )  # fmt: skip
    first = chat.choices[0]
    stream = client.chat.completions.create(
        model=args.model, messages=messages, max_completion_tokens=8, temperature=0, logprobs=True,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    pieces, streamed_logprobs, streamed_usage = [], [], None
    for chunk in stream:
        streamed_usage = chunk.usage or streamed_usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            streamed_logprobs += [
                t.logprob for t in (choice.logprobs.content if choice.logprobs else None) or []
            ]
    prompt = "The capital of France is"
    echoed = client.completions.create(
        model=args.model, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True
    ).choices[0]
    seeded = [
        client.completions.create(
            model=args.model, prompt="Once", max_tokens=6, temperature=1.0, seed=7, presence_penalty=0.5,
            frequency_penalty=0.5,
        ).choices[0].text
        for _ in range(2)
    ]  # fmt: skip
    checks = {
        "chat: two choices, each with logprobs and 2 alternatives": len(chat.choices) == 2
        and all(len(t.top_logprobs) == 2 for c in chat.choices for t in c.logprobs.content),
        "stream text = first choice": "".join(pieces) == first.message.content,
        "stream usage = one choice's": streamed_usage is not None
        and streamed_usage.completion_tokens == len(first.logprobs.content),
        # one row streamed against two batched: equal up to float rounding
        "stream logprobs = first choice's": len(streamed_logprobs) == len(first.logprobs.content)
        and all(
            abs(a - t.logprob) < 1e-4 for a, t in zip(streamed_logprobs, first.logprobs.content, strict=True)
        ),
        "echo: prompt first, its first token None": echoed.text.startswith(prompt)
        and echoed.logprobs.token_logprobs[0] is None,
        "seeded answers repeat": seeded[0] == seeded[1],
    }
    print(json.dumps({"checks": checks, "chat": [c.message.content for c in chat.choices],
                      "echoed": echoed.text, "seeded": seeded}, indent=1))  # fmt: skip
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
