"""Writing files and folders so that a reader, or a crash, never sees one half-written.

Everything is written under a hidden sibling name (`.NAME.tmp-XXXX`) in the same directory, then renamed
into place (`os.replace`, atomic on one filesystem); on any error the temporary is deleted. Adapters,
exported models, checkpoints, the bundled model's cache, run reports and sweep results all go through here.
What is published gets the permissions the process's umask gives any new file (0644 / 0755 under umask 022):
the temporaries are owner-only (mkstemp, mkdtemp, and safetensors' own writer), and that must not leak out.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file path beside `path`, with the same suffix (so writers that go by the extension,
    like matplotlib's savefig, still do); it replaces `path` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        publish_modes(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def staged_folder(path: str | Path, *, whole: bool = False) -> Iterator[Path]:
    """A hidden sibling folder to write into; when the block ends without error it takes `path`'s place,
    on any error it is deleted. `whole`: an existing folder is swapped out entirely (its other files go);
    else the staged files replace theirs one by one (`commit_folder`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield staging
        publish_modes(staging)
        if whole:
            replace_folder(staging, path)
        else:
            commit_folder(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, as setting it to read it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_modes(path: Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes a new file and folder get under the
    umask: writers that stage owner-only temporaries must not decide who can read what is published."""
    mask = current_umask()
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in items:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def commit_folder(staging: Path, path: Path) -> None:
    """Move a fully written staging folder into place. New folder: one rename. Existing folder: each file is
    replaced atomically (os.replace), so a reader sees either the old or the new version of every file; a
    crash between two replaces leaves a weights file whose sha256 disagrees with deltatune.json, which
    `load_adapter` reports instead of loading."""
    if not path.exists():
        os.replace(staging, path)
        return
    for item in staging.iterdir():
        os.replace(item, path / item.name)
    shutil.rmtree(staging, ignore_errors=True)


def replace_folder(staging: Path, path: Path) -> None:
    """Swap whole folders: the old one is renamed aside, the new one renamed in, then the old one deleted,
    so `path` never holds a mix of both (between the two renames it is briefly absent)."""
    if not path.exists():
        os.replace(staging, path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, aside / path.name)
    os.replace(staging, path)
    shutil.rmtree(aside, ignore_errors=True)
