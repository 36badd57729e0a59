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


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    import os

    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _plain_file_mode(folder) -> int:
    probe = folder / "probe.txt"
    probe.write_text("x")  # what any file the user's process writes gets
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    return mode


def test_published_weights_and_folders_have_the_modes_the_umask_gives(tmp_path, umask):
    """safetensors writes owner-only files (0600) and mkdtemp owner-only folders; neither may leak into a
    shipped adapter or merged model: every published file has the mode of any other file under the umask."""
    from conftest import build_llama

    import deltatune as dt
    from deltatune.core.export import export_merged

    model = build_llama()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    dt.save_adapter(model, tmp_path / "adapter")
    export_merged(model, tmp_path / "merged")
    file_mode, folder_mode = _plain_file_mode(tmp_path), 0o777 & ~umask
    for folder in (tmp_path / "adapter", tmp_path / "merged"):
        assert folder.stat().st_mode & 0o777 == folder_mode
        files = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert files and set(files.values()) == {file_mode}, files
    assert "adapter_model.safetensors" in {p.name for p in (tmp_path / "adapter").iterdir()}
    write_text_atomic(tmp_path / "report.json", "{}")
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == file_mode
