"""Atomic writes (core/atomic.py), the one way every file and folder is published: a failure mid-write leaves
the previous version in place and no temporary behind; success replaces it whole."""

from __future__ import annotations

import pytest

from deltatune.core.atomic import atomic_path, staged_folder, write_text_atomic


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_file_is_replaced_only_when_written_completely(tmp_path):
    target = tmp_path / "curves.png"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # same folder (one rename), same extension
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and _hidden(tmp_path) == []
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and _hidden(tmp_path) == []
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)  # readable like any other file, not owner-only


@pytest.mark.parametrize("whole", [False, True])
def test_a_folder_is_replaced_only_when_written_completely(tmp_path, whole):
    target = tmp_path / "adapter"
    with staged_folder(target) as staging:
        (staging / "a.txt").write_text("1")
        (staging / "old-only.txt").write_text("1")
    with pytest.raises(RuntimeError), staged_folder(target, whole=whole) as staging:
        (staging / "a.txt").write_text("2")
        raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "1" and _hidden(tmp_path) == []
    with staged_folder(target, whole=whole) as staging:
        (staging / "a.txt").write_text("2")
    assert (target / "a.txt").read_text() == "2" and _hidden(tmp_path) == []
    # a whole swap drops files the new version lacks; a file-by-file commit keeps them
    assert (target / "old-only.txt").exists() is not whole
