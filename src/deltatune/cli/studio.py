"""`deltatune studio`: the web app over a folder of runs (the `studio` extra)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..core.errors import require_extra

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_studio_parser(sub) -> None:
    p = sub.add_parser(
        "studio", help="web app: runs with live curves, launch / stop / resume training from a form"
    )
    p.add_argument("--runs", type=Path, default=Path("outputs"), help="the folder whose run folders it shows")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--api-key-env",
        help="name of an environment variable holding the key a browser signs in with (or a client sends as "
        "'Authorization: Bearer KEY'); required beyond loopback, since the studio starts processes",
    )
    p.set_defaults(func=run_studio)


def run_studio(args: argparse.Namespace) -> int:
    require_extra("studio", ("fastapi", "uvicorn", "jinja2", "multipart"), "deltatune studio")
    import uvicorn

    from ..studio import create_app

    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        raise SystemExit(f"deltatune studio: ${args.api_key_env} is empty; set it or drop --api-key-env")
    loopback = args.host in LOOPBACK
    if not loopback and api_key is None:
        raise SystemExit(
            f"deltatune studio: --host {args.host} reaches beyond this machine, and the studio starts training "
            "processes: give it a key with --api-key-env VAR (or keep the default --host 127.0.0.1)"
        )
    app = create_app(args.runs, api_key=api_key, loopback_only=loopback)
    print(f"deltatune studio: http://{args.host}:{args.port}/ over {args.runs.resolve()}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
