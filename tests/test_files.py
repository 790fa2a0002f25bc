"""files.atomic_write: a file is written whole or not at all, whatever fails on the way."""
import errno
import json
import os
import stat

import pytest
import safetensors.torch
import torch

import files
from errors import OutputError


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    files.write_json(path, {"step": 1})
    files.write_json(path, {"step": 2, "名": "中文"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"step": 2, "名": "中文"}
    assert os.listdir(path.parent) == ["results.json"]


def test_a_failure_while_writing_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="interrupted"):
        with files.atomic_write(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["last.pt"]


def test_a_full_disk_is_one_line_naming_the_folder_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    path.write_bytes(b"previous")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=f"best.pt not written: no space left on the disk of {tmp_path}"):
        with files.atomic_write(path) as f:
            f.write(b"new")
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["best.pt"]


def test_two_writers_of_one_path_never_share_a_temporary_file(tmp_path):
    path = tmp_path / "index.npz"
    with files.atomic_write(path) as first, files.atomic_write(path) as second:
        assert first.name != second.name
        first.write(b"first")
        second.write(b"second")
    assert path.read_bytes() in (b"first", b"second") and os.listdir(tmp_path) == ["index.npz"]


def test_a_folder_that_cannot_be_written_is_one_line(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):      # root writes anyway: a file where the folder should be
            folder.chmod(0o700)
            folder.rmdir()
            folder.write_text("a file")
        with pytest.raises(OutputError, match="cannot be written"):
            files.write_json(folder / "x.json", {})
    finally:
        if folder.is_dir():
            folder.chmod(0o700)


def test_safetensors_are_written_whole_with_the_mode_of_any_new_file(tmp_path):
    # safetensors' own save_file made open_clip_model.safetensors 0600, unlike the export's other files
    umask = os.umask(0)
    os.umask(umask)
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    files.write_safetensors(tmp_path / "w.safetensors", weights, metadata={"format": "pt"})
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~umask
    assert torch.equal(safetensors.torch.load_file(tmp_path / "w.safetensors")["w"], weights["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
