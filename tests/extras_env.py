"""A Python environment like this one minus some installed distributions: what a user who installed
deltatune without an extra has. Built in seconds, without pip: a bare venv whose one .pth file points at a
folder of links to this environment's site-packages entries, less the named distributions' files."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import deltatune

# Every optional extra's distributions (pyproject.toml), and the dev-only ones, which no command may need.
EXTRAS = {
    "models": {"gguf"},
    "parquet": {"pyarrow"},
    "quant": {"bitsandbytes", "accelerate"},
    "serve": {"fastapi", "uvicorn"},
    "sweep": {"optuna"},
    "studio": {"python-multipart"},  # and serve's fastapi and uvicorn; jinja2 is transformers' too
    "tensorboard": {"tensorboard"},
    "mlflow": {"mlflow-skinny"},  # its sqlalchemy and alembic are the sweep's too
    "wandb": {"wandb"},
    "trackio": {"trackio"},
}
DEV_ONLY = {"peft", "trl", "httpx", "schemathesis", "hypothesis", "pytest", "ruff", "playwright"}


def _top_level_entries(distribution: str) -> set[str]:
    """The site-packages entries (package folders, modules, dist-info) a distribution installed."""
    dist = metadata.distribution(distribution)
    return {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}


def python_without(root: Path, *, keep_extras: tuple[str, ...] = ()) -> Path:
    """The interpreter of a venv under `root` holding this environment's packages except every optional
    extra not in `keep_extras` (and the dev-only tools); deltatune itself from its source folder."""
    dropped = set(DEV_ONLY)
    for extra, names in EXTRAS.items():
        if extra not in keep_extras:
            dropped |= names
    hidden = set().union(*(_top_level_entries(name) for name in dropped))
    hidden.add("__pycache__")
    site = Path(sysconfig.get_paths()["purelib"])
    shadow = root / "site"
    shadow.mkdir(parents=True)
    for entry in site.iterdir():
        if entry.name not in hidden and not entry.name.startswith(
            "__editable__"
        ):  # deltatune: from src below
            (shadow / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    own_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    source = Path(deltatune.__file__).resolve().parents[1]
    (Path(own_site) / "shadow.pth").write_text(f"{shadow}\n{source}\n")
    return python
