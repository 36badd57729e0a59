"""deltatune train | eval | generate | classify | sweep | bench | forgetting | compare | combine | convert |
export | inspect | serve."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import DeltatuneError, DeltatuneWarning
from .adapters import add_adapter_parsers
from .arguments import positive_int
from .evaluate import add_evaluation_parsers
from .studio import add_studio_parser

if TYPE_CHECKING:
    from ..task.config import TrainConfig


def _train(args: argparse.Namespace) -> int:
    from ..train import load_train_config, train

    cfg = load_train_config(args.config, args.overrides)
    if args.resume:
        cfg = _resume_where_it_is(cfg, args.config)
    result = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(
            f"trained {result.steps} steps (median {result.seconds_per_step:.2f} s/step, mean "
            f"{result.mean_seconds_per_step:.2f}; peak RSS {result.peak_rss_mib:.0f} MiB)"
        )
        print(result.trainable)
        best = (
            f"{cfg.eval.metric}={result.best_metric:.4f} at step {result.best_step}"
            if result.best_step
            else "n/a"
        )
        print(f"best validation {best}{' (stopped early)' if result.stopped_early else ''}")
        print(
            f"saved: {result.saved_to}\nmetrics: {result.output_dir / 'metrics.jsonl'}\nplot: {result.output_dir / 'curves.png'}"
        )
    return 0


def _resume_where_it_is(cfg: TrainConfig, config_path: Path) -> TrainConfig:
    """`train RUN/config.yaml --resume` on a run folder that was moved: its saved output_dir is the old place;
    the run continues in the folder the config is in."""
    from ..train import RESOLVED_CONFIG

    folder = Path(config_path).resolve().parent
    if Path(config_path).name != RESOLVED_CONFIG or not (folder / "checkpoints").is_dir():
        return cfg
    if Path(cfg.output_dir).resolve() == folder:
        return cfg
    print(f"deltatune train: resuming in {folder} (the run was started in {cfg.output_dir})", file=sys.stderr)
    return cfg.model_copy(update={"output_dir": str(folder)})


def _eval(args: argparse.Namespace) -> int:
    from ..train import evaluate_adapter, load_train_config

    cfg = load_train_config(args.config, args.overrides)
    metrics = evaluate_adapter(
        cfg, None if args.base_only else args.adapter, allow_base_mismatch=args.allow_base_mismatch
    )
    print(json.dumps(metrics, indent=2))
    return 0


def _prompts(args: argparse.Namespace) -> Iterator[str]:
    """The prompts from the command line, else from --input, else one per line of stdin (interactive: until
    an empty line)."""
    if args.prompt:
        yield from args.prompt
        return
    if getattr(args, "input", None) is not None:
        with Path(args.input).open(encoding="utf-8") as handle:
            yield from (line.rstrip("\n") for line in handle if line.strip())
        return
    if sys.stdin.isatty():
        print("reading prompts, one per line; an empty line or Ctrl-D ends", file=sys.stderr)
        yield from iter(lambda: input("> "), "")
        return
    yield from (line.rstrip("\n") for line in sys.stdin if line.strip())


def _as_fields(prompt: str) -> str | dict:
    """A line that is a JSON object gives a row's fields (for templates with several); anything else is text."""
    if prompt.lstrip().startswith("{"):
        try:
            value = json.loads(prompt)
        except json.JSONDecodeError:
            return prompt
        if isinstance(value, dict):
            return value
    return prompt


def _generate(args: argparse.Namespace) -> int:
    from ..generation import Generator
    from ..runtime.sampling import Sampling

    try:  # before the model loads: a typo in a flag should not cost a load
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        print(f"deltatune generate: error: {exc}", file=sys.stderr)
        return 2

    base, system, data_spec = args.base, args.system, None
    if (
        args.config is not None
    ):  # render prompts as the adapter was trained: the config's format and templates
        from ..train import load_train_config

        cfg = load_train_config(args.config)
        base = base or cfg.model.path
        data_spec = cfg.data.model_copy(update={"system_prompt": system or cfg.data.system_prompt})
    if base is None:
        raise SystemExit("deltatune generate: give --base (or --config)")
    generator = Generator(
        base,
        args.adapter,
        system_prompt=system,
        allow_base_mismatch=args.allow_base_mismatch,
        compiled=args.compile,
        dtype=_dtype_of(args),
        quantize=args.quantize,
    )
    if data_spec is not None:
        generator.for_config(data_spec)
    for number, prompt in enumerate(_prompts(args), start=1):
        answer = generator(
            _as_fields(prompt) if data_spec is not None else prompt,
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
        )
        if args.jsonl:
            print(json.dumps({"prompt": prompt, "answer": answer}, ensure_ascii=False), flush=True)
        else:  # one block per prompt: its number, then the answer; the answer's own line breaks are indented
            print(f"[{number}] " + answer.replace("\n", "\n    "), flush=True)
    return 0


def _classify(args: argparse.Namespace) -> int:
    from ..classification import Classifier

    classifier = Classifier(args.base, args.adapter, allow_base_mismatch=args.allow_base_mismatch)
    texts = list(_prompts(args))
    for text, result in zip(texts, classifier(texts), strict=True):
        if args.jsonl:
            print(json.dumps({"text": text, **result}, ensure_ascii=False), flush=True)
        else:
            print(f"{result['label']}\t{result['probabilities'][result['label']]:.4f}\t{text}", flush=True)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ..core.inspect import describe_adapter

    print(describe_adapter(Path(args.adapter)))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from ..core.errors import require_extra

    require_extra("serve", ("fastapi", "uvicorn"), "deltatune serve")
    import uvicorn

    from ..serve import Limits, build_server
    from ..serve.shutdown import DrainingServer

    if args.shutdown_grace_s <= 0:
        raise SystemExit(f"deltatune serve: --shutdown-grace-s must be positive, got {args.shutdown_grace_s}")
    if args.prefix_cache_mb < 0:
        raise SystemExit(
            f"deltatune serve: --prefix-cache-mb must be 0 (off) or more, got {args.prefix_cache_mb}"
        )
    if args.prompt_tokens_per_round < 2:
        raise SystemExit(
            f"deltatune serve: --prompt-tokens-per-round must be at least 2, got {args.prompt_tokens_per_round}"
        )
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        raise SystemExit(f"deltatune serve: ${args.api_key_env} is empty; set it or drop --api-key-env")
    limits = Limits(
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        max_request_bytes=args.max_request_bytes,
        max_stops=args.max_stops,
        max_prompt_chars=args.max_prompt_chars,
        max_stop_chars=args.max_stop_chars,
        request_timeout_s=args.request_timeout_s,
    )
    app, engine = build_server(
        args.base,
        args.adapters_dir,
        base_name=args.base_name,
        api_key=api_key,
        cache_bytes=int(args.cache_mb * 2**20),
        max_batch=args.max_batch,
        batch_window_s=args.batch_window_ms / 1000,
        continuous=not args.fixed_batches,
        prompt_tokens_per_round=args.prompt_tokens_per_round,
        prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
        limits=limits,
        preload=args.preload,
        allow_base_mismatch=args.allow_base_mismatch,
        device=args.device,
        dtype=_dtype_of(args),
        quantize=args.quantize,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print("deltatune serve: warning: listening beyond loopback without an API key", file=sys.stderr)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_grace_s,
    )
    try:
        DrainingServer(config, engine, args.shutdown_grace_s).run()
    finally:
        engine.close()
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from ..sweep import (
        BestRule,
        Sweep,
        SweepSettings,
        load_base_config,
        load_space,
        require_optuna,
    )  # fmt: skip

    require_optuna()
    config = load_base_config(args.config, args.overrides)
    space = load_space(args.space)
    out = args.out or Path(f"{config.get('output_dir', 'outputs/run')}-sweep")
    settings = SweepSettings(
        config=config, space=space, out=out, trials=args.trials, jobs=args.jobs, storage=args.storage,
        study_name=args.study_name, timeout_s=args.timeout, resume=args.resume, seed=args.seed,
        pruner=args.pruner, multi_objective=args.multi_objective,
        rule=BestRule(rule=args.best, tolerance=args.tolerance, cost=args.cost),
    )  # fmt: skip
    sweep = Sweep(settings)
    best = sweep.run(log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"trials: {out / 'sweep.md'} (also trials.csv, trials.json, front.png, params.png)")
    if best is None:
        print("no trial completed; see the reasons in the table")
    else:
        print(f"best/: trial {best['number']}, {sweep.metric}={best['metric']:.4f}, {args.cost}="
              f"{best[args.cost]:,.0f} -> {out / 'best'}")  # fmt: skip
    return 128 + sweep.interrupted_by if sweep.interrupted_by else 0  # the shell's code for that signal


def _duration(text: str) -> float:
    """'90', '90s', '30m', '2h', '1h30m' -> seconds."""
    import re

    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write e.g. 90s, 30m, 2h or 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s


def _add_sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="search a config's hyperparameters with Optuna; keep the smallest good adapter"
    )
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="section.key=value for the base config")
    p.add_argument(
        "--space", type=Path, required=True, help="SPACE.yaml: the keys to search and their ranges"
    )
    p.add_argument(
        "--trials", type=positive_int, required=True, help="trials in the study, all workers together"
    )
    p.add_argument("--jobs", type=positive_int, default=1, help="trials run in parallel on this machine")
    p.add_argument("--out", type=Path, help="sweep folder (default: the config's output_dir + '-sweep')")
    p.add_argument("--storage", help="Optuna storage URL shared by workers (default: sqlite file in --out)")
    p.add_argument("--study-name", default="deltatune-sweep")
    p.add_argument(
        "--resume", action="store_true", help="continue (or join) the study; finished trials are kept"
    )
    p.add_argument("--timeout", type=_duration, help="start no trial after this long, e.g. 2h or 90m")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    p.add_argument(
        "--multi-objective", action="store_true", help="optimise the metric and --cost together (no pruning)"
    )
    p.add_argument(
        "--best", choices=["smallest", "top"], default="smallest", help="the rule that picks best/"
    )
    p.add_argument(
        "--tolerance", type=float, default=0.01, help="'smallest': how far below the top metric best/ may be"
    )
    p.add_argument(
        "--cost", choices=["adapter_bytes", "trainable_params", "s_per_step", "peak_rss_mib"],
        default="adapter_bytes", help="the cost that 'smallest', the front and --multi-objective use",
    )  # fmt: skip
    p.set_defaults(func=_sweep)


def _add_io_flags(p: argparse.ArgumentParser, what: str, out: str) -> None:
    p.add_argument(
        "--input", type=Path, help=f"a file of {what}, one per line (default: arguments, else stdin)"
    )
    p.add_argument("--jsonl", action="store_true", help=f"one JSON object per line: the input and its {out}")
    _add_allow_base_mismatch(p)
    p.add_argument("prompt", nargs="*", metavar=what.upper()[:-1])


def _add_allow_base_mismatch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-base-mismatch", action="store_true", help="use adapters saved for a different base model"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training_parsers(sub)
    _add_generation_parsers(sub)
    _add_sweep_parser(sub)
    add_evaluation_parsers(sub)
    add_adapter_parsers(sub)
    p = sub.add_parser("inspect", help="print an adapter's config, provenance, sizes and parameter counts")
    p.add_argument("adapter")
    p.set_defaults(func=_inspect)
    _add_serve_parser(sub)
    add_studio_parser(sub)
    return parser


def _add_training_parsers(sub) -> None:
    p = sub.add_parser("train", help="train an adapter (or method: full) from a YAML config")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate an adapter on the config's validation split")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--adapter", type=Path)
    group.add_argument("--base-only", action="store_true", help="evaluate the base model without an adapter")
    _add_allow_base_mismatch(p)
    p.set_defaults(func=_eval)


def _add_dtype_flag(p) -> None:
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="the base model's dtype (adapters keep theirs; default float32, bfloat16 with --quantize). "
        "bfloat16 halves the bytes per token and, on a CPU with AVX512-BF16 or AMX, runs batches ~1.7x and a "
        "compiled stream ~1.3x faster than float32; answers may differ slightly (a few percent of greedy "
        "answers on the quickstart's tweets)",
    )


def _dtype_of(args: argparse.Namespace) -> str:
    """--dtype as given; unset, bfloat16 under --quantize (its kernels multiply in half precision), else float32."""
    if args.dtype is not None:
        return args.dtype
    return "bfloat16" if args.quantize else "float32"


def _add_quantize_flag(p) -> None:
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default=None,
        help="store the base's linear layers as int8 (per-row scales) or int4 (groups of 32) for torch's CPU "
        "kernels, with --dtype bfloat16 (or float16) for the activations; adapters stay unmerged on top. A "
        "compiled SmolLM2 stream with the quickstart's LoRA decodes 1.5-1.6x (int8) and 1.7x (int4, its head "
        "in int8) as fast as in bfloat16 (bench/README §34); answers may differ more than bfloat16's",
    )


def _add_generation_parsers(sub) -> None:
    p = sub.add_parser("generate", help="generate with base + adapter; no prompt: read prompts from stdin")
    p.add_argument("--base", help="model folder, hub id, or a bundled name (smollm2)")
    p.add_argument("--adapter", type=Path)
    p.add_argument(
        "--config",
        type=Path,
        help="training config: prompts are rendered as in training (format, templates, system prompt); a "
        "prompt that is a JSON object fills a template's fields",
    )
    p.add_argument("--system", default=None, help="system prompt for chat models")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampled answers repeat with the same seed")
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode with a compiled step over a static KV cache: ~3x the tokens a second on a CPU (SmolLM2), "
        "after the first prompt has compiled it (1.5-2 minutes on 2 cores). It needs its cores to itself: "
        "on cores other processes keep busy, give it fewer threads (OMP_NUM_THREADS=1: 1.8-3.3x the tokens a "
        "second of 2 threads beside two busy processes on 2 cores)",
    )
    _add_dtype_flag(p)
    _add_quantize_flag(p)
    _add_io_flags(p, "prompts", "answer")
    p.set_defaults(func=_generate)

    p = sub.add_parser("classify", help="classify texts with base + classifier adapter: labels by name")
    p.add_argument("--base", required=True, help="model folder, hub id, or a bundled name (minilm)")
    p.add_argument("--adapter", type=Path, required=True)
    _add_io_flags(p, "texts", "label, probabilities")
    p.set_defaults(func=_classify)


def _add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-style HTTP server: one base model, the adapters of one directory"
    )
    p.add_argument("--base", required=True, help="model folder, hub id, or a bundled name (smollm2)")
    p.add_argument(
        "--adapters-dir",
        required=True,
        type=Path,
        help="each adapter is a folder in it; its name is the model id",
    )
    p.add_argument(
        "--base-name", help="model id that selects the base without adapter (default: the --base name)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key-env", help="name of an environment variable holding the API key clients must send"
    )
    p.add_argument("--cache-mb", type=float, default=1024, help="memory budget for loaded adapters")
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=256,
        help="memory for the KV of earlier prompts, reused by requests that open alike (a shared system "
        "prompt runs once per adapter); 0 turns it off",
    )
    p.add_argument("--max-batch", type=int, default=16, help="most rows in one batched forward")
    p.add_argument("--batch-window-ms", type=float, default=10, help="how long to wait for requests to batch")
    p.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=10,
        help="on SIGTERM, open requests may finish for half this long; the rest then get a 503 error",
    )
    p.add_argument(
        "--prompt-tokens-per-round",
        type=int,
        default=512,
        help="most prompt tokens run between two decode steps; longer prompts run in chunks, so no request "
        "holds the others",
    )
    p.add_argument(
        "--fixed-batches",
        action="store_true",
        help="run each batch to its end before the next starts (no continuous batching)",
    )
    _add_serve_limits(p)
    p.add_argument("--preload", nargs="*", default=[], help="adapters to load at start")
    p.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu, cuda, cuda:N")
    _add_dtype_flag(p)
    _add_quantize_flag(p)
    _add_allow_base_mismatch(p)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_serve)


def _add_serve_limits(p: argparse.ArgumentParser) -> None:
    """What one request may ask for: every path (completions, chat, scoring) obeys the same bounds."""
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        help="refused before tokenizing (default: 32 per prompt token)",
    )
    p.add_argument("--max-stops", type=int, default=4, help="most stop strings per request (OpenAI: 4)")
    p.add_argument("--max-stop-chars", type=int, default=256, help="longest stop string accepted")
    p.add_argument(
        "--request-timeout-s", type=float, default=300, help="a request not answered by then gets a 504"
    )


def _plain_warnings() -> None:
    """deltatune's own warnings (skipped rows, ignored keys, ...) print as what they say, without Python's
    category, source path and code line, which tell a command-line user nothing."""
    import warnings

    default = warnings.formatwarning

    def formatted(message, category, filename, lineno, line=None):  # noqa: ANN001, ANN202 (warnings' hook)
        if issubclass(category, DeltatuneWarning):
            return f"deltatune: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatted


def honour_interrupts() -> None:
    """Ctrl-C semantics (KeyboardInterrupt) for a deltatune process that leads its own session, even when its
    parent ignored SIGINT (a shell's background job ignores it, and so does all it starts): no terminal can
    send such a process SIGINT, so an inherited ignore would only make the studio's stop button do nothing."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        and os.getsid(0) == os.getpid()
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    honour_interrupts()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow the flags (`train c.yaml --resume optim.lr=0.1`), which argparse won't intermix.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _plain_warnings()
    try:
        return args.func(args)
    except DeltatuneError as exc:
        print(f"deltatune {args.command}: error: {exc}", file=sys.stderr)
        return 2
