"""The studio's web app: server-rendered pages over the run folders (FastAPI + Jinja2, with one small script
for the live curves and the YAML preview; nothing is fetched from outside, so it works offline).

Guards: with an API key (required beyond loopback) every page and call needs it, as a cookie set by /login
or an `Authorization: Bearer` header, as `deltatune serve` takes it; bound to loopback, requests must name a
loopback host (a page elsewhere cannot reach it by DNS rebinding); every POST carries the app's token (a page
elsewhere cannot post a launch to it)."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import TemplateError

from ..task.config import ConfigError
from . import jobs, launcher
from .form import FormError, config_yaml, form_sections, raw_config
from .playground import MAX_ADAPTERS, Playground, build_chat_app, chat_runs
from .reports import KINDS, compare_heatmaps, find_reports, read_report, report_kind, sweep_tables
from .runs import (
    LOG_NAME,
    OutsideRoot,
    find_runs,
    read_json_file,
    read_metrics,
    read_run,
    read_text,
    resolve_run,
    tail_text,
)

HERE = Path(__file__).parent
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
COOKIE = "deltatune_studio"
CHAT_API = "/playground/api"  # `deltatune serve`'s endpoints over the playground's base model


def _host_name(header: str) -> str:
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def create_app(
    runs_dir: Path,
    *,
    api_key: str | None = None,
    loopback_only: bool = True,
    build_chat: Callable[[Path, str], tuple[Any, Any]] = build_chat_app,
) -> FastAPI:
    """The studio over `runs_dir`; `build_chat(root, base)` makes the playground's (serve app, engine)."""
    root = Path(runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)  # what every POST must carry
    session = hmac.new((api_key or "").encode(), b"deltatune-studio", hashlib.sha256).hexdigest()
    playground = Playground(root, build_chat)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        playground.close()

    app = FastAPI(
        title="deltatune studio", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.playground = playground
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.mount(CHAT_API, playground)
    pages = Jinja2Templates(directory=HERE / "templates")
    pages.env.globals["token"] = token
    pages.env.filters["json"] = lambda value: json.dumps(value, indent=1, default=str)
    pages.env.filters["size"] = _size
    pages.env.filters["num"] = _num
    pages.env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else ""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if loopback_only and _host_name(request.headers.get("host", "")) not in LOOPBACK:
            return Response("studio answers on its loopback address only", status_code=421)
        public = request.url.path.startswith("/static/") or request.url.path == "/login"
        if api_key and not public and not _authorized(request, api_key, session):
            if request.url.path.startswith(("/api/", CHAT_API + "/")) or request.method != "GET":
                return JSONResponse({"error": "missing or wrong API key"}, status_code=401)
            return RedirectResponse("/login", status_code=303)
        if _foreign_chat(request, token):
            return JSONResponse({"error": "missing or stale page token: reload the page"}, status_code=403)
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    async def page_token(request: Request) -> None:
        """Every POST but /login carries the token of a page this app served (header or form field)."""
        given = request.headers.get("x-studio-token")
        if given is None:
            given = str((await request.form()).get("token", ""))
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(403, "missing or stale page token: reload the page")

    posted = [Depends(page_token)]

    def folder_or_404(name: str) -> Path:
        try:
            return resolve_run(root, name)
        except OutsideRoot as exc:
            raise HTTPException(404, str(exc)) from None

    def run_or_404(name: str):
        path = folder_or_404(name)
        if not path.is_dir():
            raise HTTPException(404, f"no run {name!r}")
        return read_run(root, path)

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request):
        return pages.TemplateResponse(request, "login.html", {"error": None})

    @app.post("/login")
    def login(request: Request, key: str = Form("")):
        if not api_key or not hmac.compare_digest(key.encode(), api_key.encode()):
            return pages.TemplateResponse(request, "login.html", {"error": "wrong key"}, status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, session, httponly=True, samesite="strict")
        return response

    @app.get("/", response_class=HTMLResponse)
    def runs_page(request: Request):
        return pages.TemplateResponse(request, "runs.html", {"runs": find_runs(root), "root": root})

    @app.get("/api/runs")
    def runs_api():
        return [_run_json(r) for r in find_runs(root)]

    @app.get("/runs/{name:path}", response_class=HTMLResponse)
    def run_page(request: Request, name: str):
        run = run_or_404(name)
        files = {
            "config": _text(run.path / "config.yaml"),
            "data": read_json_file(run.path / "data_summary.json"),
            "summary": read_json_file(run.path / "summary.json"),
            "provenance": read_json_file(run.path / "adapter" / "deltatune.json")
            or read_json_file(run.path / "model" / "deltatune.json"),
        }
        log = tail_text(run.path / LOG_NAME) if run.status in ("failed", "killed", "running") else ""
        return pages.TemplateResponse(request, "run.html", {"run": run, "files": files, "log": log})

    @app.get("/api/runs/{name:path}/metrics")
    def metrics_api(name: str, offset: int = 0):
        run = run_or_404(name)
        records, end = read_metrics(run.path / "metrics.jsonl", max(0, offset))
        return {"records": records, "offset": end, "status": run.status, "steps": run.steps}

    @app.post("/runs/{name:path}/stop", dependencies=posted)
    def stop_run(name: str):
        run = run_or_404(name)
        launcher.stop(root, run.name)
        return RedirectResponse(f"/runs/{run.name}", status_code=303)

    @app.post("/runs/{name:path}/resume", dependencies=posted)
    def resume_run(request: Request, name: str):
        run = run_or_404(name)
        try:
            launcher.resume(root, run.name)
        except (launcher.LaunchRefused, ConfigError) as exc:
            return pages.TemplateResponse(
                request, "run.html", {"run": run, "files": {}, "log": "", "error": str(exc)}, status_code=409
            )
        return RedirectResponse(f"/runs/{run.name}", status_code=303)

    @app.get("/playground", response_class=HTMLResponse)
    def playground_page(request: Request, run: str | None = None):
        runs = chat_runs(root)
        chosen = next((r for r in runs if r.name == run), None)
        if chosen is not None and playground.state != "loading" and playground.base != chosen.base:
            playground.load(chosen.base)
        context = {"runs": runs, "bases": sorted({r.base for r in runs}), "chosen": chosen,
                   "playground": playground.describe(), "api": CHAT_API, "most": MAX_ADAPTERS}  # fmt: skip
        return pages.TemplateResponse(request, "playground.html", context)

    @app.get("/api/playground")
    def playground_state():
        on_base = [r.name for r in chat_runs(root) if r.base == playground.base]
        return playground.describe() | {"runs": on_base}

    @app.post("/playground/base", dependencies=posted)
    def playground_base(base: str = Form("")):
        try:
            playground.load(base)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return RedirectResponse("/playground", status_code=303)

    @app.get("/reports", response_class=HTMLResponse)
    def reports_page(request: Request):
        context = {"reports": find_reports(root), "jobs": jobs.find_jobs(root), "kinds": KINDS}
        return pages.TemplateResponse(request, "reports.html", context)

    @app.get("/reports/new/{kind}", response_class=HTMLResponse)
    def new_report_page(request: Request, kind: str):
        return pages.TemplateResponse(request, "report_new.html", _new_report_context(root, kind, {}, None))

    @app.post("/reports/new/{kind}", dependencies=posted)
    async def new_report(request: Request, kind: str):
        values = _form_values(await request.form())
        try:
            name = jobs.start(root, kind, values)
        except jobs.JobRefused as exc:
            context = _new_report_context(root, kind, values, str(exc))
            return pages.TemplateResponse(request, "report_new.html", context, status_code=400)
        return RedirectResponse(f"/jobs/{name}", status_code=303)

    @app.get("/jobs/{name:path}", response_class=HTMLResponse)
    def job_page(request: Request, name: str):
        job = jobs.read_job(root, name)
        if job is None:
            raise HTTPException(404, f"no job writing {name!r}")
        return pages.TemplateResponse(request, "job.html", {"job": job})

    @app.get("/api/jobs/{name:path}")
    def job_api(name: str):
        job = jobs.read_job(root, name)
        if job is None:
            raise HTTPException(404, f"no job writing {name!r}")
        return {"name": job.name, "kind": job.kind, "status": job.status, "log": job.log[-4000:]}

    @app.post("/jobs/{name:path}/stop", dependencies=posted)
    def stop_job(name: str):
        jobs.stop(root, name)
        return RedirectResponse(f"/jobs/{name}", status_code=303)

    @app.get("/reports/{name:path}/pictures/{picture}")
    def report_picture(name: str, picture: str):
        report = report_or_404(name)
        if picture not in report.pictures:
            raise HTTPException(404, f"{name} has no picture {picture!r}")
        return FileResponse(report.path / picture, media_type="image/png")

    @app.get("/reports/{name:path}", response_class=HTMLResponse)
    def report_page(request: Request, name: str):
        report = report_or_404(name)
        context = _report_context(root, report)
        try:
            return pages.TemplateResponse(request, "report.html", context)
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:  # fields it lacks
            detail = f"{type(exc).__name__}: {exc}"
            return pages.TemplateResponse(request, "report.html", context | {"raw": detail[:300]})

    def report_or_404(name: str):
        path = folder_or_404(name)
        kind = report_kind(path) if path.is_dir() else None
        if kind is None:
            raise HTTPException(404, f"no report {name!r}")
        return read_report(root, path, kind)

    @app.get("/launch", response_class=HTMLResponse)
    def launch_page(request: Request):
        return pages.TemplateResponse(request, "launch.html", _launch_context({}, None))

    @app.post("/launch/preview", dependencies=posted)
    async def preview(request: Request):
        values = _form_values(await request.form())
        try:
            raw = raw_config(values)
            launcher.checked_config(root, raw)
            return {"yaml": config_yaml(raw), "error": None}
        except (FormError, ConfigError, launcher.LaunchRefused) as exc:
            return {"yaml": _yaml_or_empty(values), "error": str(exc)}

    @app.post("/launch", dependencies=posted)
    async def launch(request: Request):
        values = _form_values(await request.form())
        try:
            out = launcher.launch(root, raw_config(values))
        except (FormError, ConfigError, launcher.LaunchRefused) as exc:
            return pages.TemplateResponse(
                request, "launch.html", _launch_context(values, str(exc)), status_code=400
            )
        return RedirectResponse(f"/runs/{out.relative_to(root).as_posix()}", status_code=303)

    return app


def _foreign_chat(request: Request, token: str) -> bool:
    """A chat posted without the token of a page this app served (by a page elsewhere)."""
    if not request.url.path.startswith(CHAT_API + "/") or request.method == "GET":
        return False
    return not hmac.compare_digest(request.headers.get("x-studio-token", "").encode(), token.encode())


def _authorized(request: Request, api_key: str, session: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), api_key.encode()):
        return True
    return hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), session.encode())


def _form_values(form) -> dict[str, str]:
    return {k: str(v) for k, v in form.items() if k != "token"}


def _yaml_or_empty(values: dict[str, str]) -> str:
    try:
        return config_yaml(raw_config(values))
    except FormError:
        return ""


def _launch_context(values: dict[str, str], error: str | None) -> dict[str, Any]:
    return {"sections": form_sections(), "values": values, "error": error, "yaml": _yaml_or_empty(values)}


def _new_report_context(root: Path, kind: str, values: dict[str, str], error: str | None) -> dict[str, Any]:
    if kind not in KINDS:
        raise HTTPException(404, f"no report kind {kind!r}; the kinds are {', '.join(KINDS)}")
    runs = chat_runs(root)
    return {"kind": kind, "values": values, "error": error, "runs": runs, "bases": sorted({r.base for r in runs}),
            "command": jobs.COMMANDS[kind]}  # fmt: skip


def _report_context(root: Path, report) -> dict[str, Any]:
    context: dict[str, Any] = {"report": report, "data": report.data or {}}
    if report.data and report.kind == "compare":
        context["heat"] = compare_heatmaps(report.data)
    if report.data and report.kind == "sweep":
        context["sweep"] = sweep_tables(report.data)
        context["trial_runs"] = _trial_runs(root, report.data)
    return context


def _trial_runs(root: Path, data: dict[str, Any]) -> dict[int, str]:
    """Trial number -> its run's name in the studio, for the trials inside the root."""
    found = {}
    for trial in data.get("trials") or []:
        folder = Path(str((trial or {}).get("trial_dir") or ""))
        if folder.is_absolute() and folder.is_relative_to(root) and folder.is_dir():
            found[trial.get("number")] = folder.relative_to(root).as_posix()
    return found


def _text(path: Path) -> str | None:
    try:
        return read_text(path)
    except OSError:
        return None


def _num(value: Any, spec: str) -> str:
    """A number as `spec` formats it; anything else (missing, None, text) as nothing."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return spec % value


def _size(count: int | None) -> str:
    if not count:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def _run_json(run) -> dict[str, Any]:
    return {
        "name": run.name, "status": run.status, "objective": run.objective, "method": run.method,
        "metric": run.metric, "best_metric": run.best_metric, "steps": run.steps, "max_steps": run.max_steps,
        "adapter_bytes": run.adapter_bytes, "problems": run.problems, "notes": run.notes, "error": run.error,
        "written_by": run.written_by,
    }  # fmt: skip
