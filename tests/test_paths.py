"""The base directory, its override, and atomic writes."""

import os
from pathlib import Path

import pytest

from chatforge import paths
from chatforge.errors import ChatforgeError


def test_chatforge_home_overrides_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_HOME", str(tmp_path / "home"))
    assert paths.base_dir() == tmp_path / "home"
    assert paths.checkpoint_dir("base", "d4") == tmp_path / "home" / "checkpoints" / "base" / "d4"
    assert paths.tokenizer_dir().is_dir()


def test_default_base_dir_is_under_user_cache(monkeypatch):
    monkeypatch.delenv("CHATFORGE_HOME")
    assert paths.base_dir(create=False) == Path("~/.cache/chatforge").expanduser()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; the file case below covers it")
def test_unwritable_home_is_a_clear_error(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setenv("CHATFORGE_HOME", str(ro / "sub"))
    with pytest.raises(ChatforgeError, match="CHATFORGE_HOME"):
        paths.base_dir()


def test_home_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    monkeypatch.setenv("CHATFORGE_HOME", str(f))
    with pytest.raises(ChatforgeError, match="set CHATFORGE_HOME to a writable directory"):
        paths.base_dir()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out.json"
    paths.atomic_write_text(target, "one")
    paths.atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_safe_name_rejects_empty_and_cleans_separators():
    assert paths.safe_name("my run/1") == "my-run-1"
    with pytest.raises(ChatforgeError):
        paths.safe_name("///")
