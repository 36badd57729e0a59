"""`deltatune serve` checked by a real consumer: lm-evaluation-harness' `local-completions` model.

It tokenizes on the server (lm_eval's remote tokenizer: /tokenizer_info, /tokenize; no local tokenizer is
given), and its log-likelihood requests (token ids, `echo`, `logprobs: 1`, `max_tokens: 1`) and generation
requests (`stop`, `seed`, `max_tokens`) go to the server; the log-likelihoods and greedy flags it parses must
equal transformers' own on the same checkpoint (one full forward, log-softmax, summed over the continuation),
and its generations transformers' greedy ones. Runs in a virtual environment that has lm_eval (it is not a
deltatune dependency), against a server started from deltatune's:

    python3 -m venv /tmp/lme && /tmp/lme/bin/pip install torch==2.13.0
    /tmp/lme/bin/pip install 'lm_eval[api]==0.4.13' transformers==5.24.0
    .venv/bin/deltatune serve --base ~/.cache/deltatune/smollm2-135m-instruct --base-name base \
        --adapters-dir /tmp/no-adapters --port 8765 --max-tokens 32 &
    /tmp/lme/bin/python bench/lm_eval_check.py --url http://127.0.0.1:8765 \
        --checkpoint ~/.cache/deltatune/smollm2-135m-instruct

Exits 1 when a number is off (log-likelihood beyond 1e-4, a greedy flag or generation different).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI
from transformers import AutoModelForCausalLM, AutoTokenizer

PAIRS = [
    ("Tweet: I love rainy mornings with coffee.\nSentiment:", " positive"),
    ("Tweet: I love rainy mornings with coffee.\nSentiment:", " negative"),
    ("The capital of France is", " Paris"),
    ("The capital of France is", " a city of many bridges and old stone houses"),
    ("def add(a, b):\n    return", " a + b"),
]
GENERATE = ["The capital of France is", "Once upon a time,"]
NEW_TOKENS = 12


def reference(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = context_ids + tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    targets = torch.tensor(ids[1:])
    scores = logprobs[len(context_ids) - 1 :]
    wanted = targets[len(context_ids) - 1 :]
    total = float(scores.gather(1, wanted.unsqueeze(1)).sum())
    return total, bool((scores.argmax(-1) == wanted).all())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True, help="the running server, e.g. http://127.0.0.1:8765")
    parser.add_argument("--checkpoint", required=True, help="the folder the server's --base loaded")
    parser.add_argument("--model", default="base", help="the served model name (--base-name, or an adapter)")
    args = parser.parse_args()
    # lm_eval's default backend: it finds the server's /tokenizer_info and /tokenize, and tokenizes there
    harness = LocalCompletionsAPI(
        base_url=f"{args.url}/v1/completions", model=args.model, max_gen_toks=NEW_TOKENS
    )
    if type(harness.tokenizer).__name__ != "RemoteTokenizer":
        sys.exit(
            f"lm_eval did not take the server's tokenizer endpoints (it chose {type(harness.tokenizer)})"
        )
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()

    asked = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    served = harness.loglikelihood(asked, disable_tqdm=True)
    rows, failed = [], False
    for (context, continuation), (loglikelihood, greedy) in zip(PAIRS, served, strict=True):
        want, want_greedy = reference(model, tokenizer, context, continuation)
        ok = abs(loglikelihood - want) <= 1e-4 and greedy == want_greedy
        failed |= not ok
        rows.append({"continuation": continuation, "served": loglikelihood, "transformers": want,
                     "greedy": [greedy, want_greedy], "ok": ok})  # fmt: skip

    until = {"until": ["\n"], "max_gen_toks": NEW_TOKENS, "do_sample": False}
    generated = harness.generate_until(
        [Instance("generate_until", {}, (p, dict(until)), i) for i, p in enumerate(GENERATE)],
        disable_tqdm=True,
    )
    for prompt, text in zip(GENERATE, generated, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        want = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        ok = text == want
        failed |= not ok
        rows.append({"prompt": prompt, "served": text, "transformers": want, "ok": ok})
    print(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
