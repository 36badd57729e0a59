"""Writing files and folders so that a reader, or a crash, never sees one half-written.

Everything is written under a hidden sibling name (`.NAME.tmp-XXXX`) in the same directory, then renamed
into place (`os.replace`, atomic on one filesystem); on any error the temporary is deleted. Adapters,
exported models, checkpoints, the bundled model's cache, run reports and sweep results all go through here.
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
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; it becomes the published file
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
    staging.chmod(0o755)  # mkdtemp makes it owner-only; it becomes the published folder
    try:
        yield staging
        if whole:
            replace_folder(staging, path)
        else:
            commit_folder(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


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
