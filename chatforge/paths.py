"""Where chatforge keeps its artifacts: one base directory, a fixed layout beneath it.

The base directory is ~/.cache/chatforge unless CHATFORGE_HOME says otherwise. Every stage reads
the previous stage's artifact from here and writes its own here.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from chatforge.errors import ChatforgeError

DEFAULT_HOME = Path("~/.cache/chatforge")


def base_dir(create: bool = True) -> Path:
    """The base directory, created and checked for writability on first use."""
    raw = os.environ.get("CHATFORGE_HOME")
    path = Path(raw).expanduser() if raw else DEFAULT_HOME.expanduser()
    if create:
        _ensure_writable(path, "CHATFORGE_HOME" if raw else "the default base directory")
    return path


def _ensure_writable(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ChatforgeError(
            f"cannot write to {what} {path} ({exc.strerror or exc}); "
            "set CHATFORGE_HOME to a writable directory"
        ) from None


def _subdir(*parts: str, create: bool = True) -> Path:
    path = base_dir(create=create).joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir(corpus: str, create: bool = True) -> Path:
    return _subdir("data", corpus, create=create)


def tokenizer_dir(name: str | None = None, create: bool = True) -> Path:
    """tokenizer/<name>/: one trained tokenizer. Without a name, tokenizer/ itself: the root that holds
    the named ones, and, in the layout before names, the only tokenizer (still read for old checkpoints)."""
    return _subdir("tokenizer", *([name] if name else []), create=create)


def checkpoint_dir(stage: str, tag: str, create: bool = True) -> Path:
    return _subdir("checkpoints", stage, tag, create=create)


def eval_dir(stage: str, tag: str, create: bool = True) -> Path:
    return _subdir("eval", stage, tag, create=create)


def runs_dir(create: bool = True) -> Path:
    return _subdir("runs", create=create)


def report_dir(create: bool = True) -> Path:
    return _subdir("report", create=create)


def stage_checkpoints_dir(stage: str, create: bool = False) -> Path:
    """checkpoints/<stage>/: one folder per tag."""
    return _subdir("checkpoints", stage, create=create)


def stage_eval_dir(stage: str, create: bool = False) -> Path:
    """eval/<stage>/: one folder of results per tag."""
    return _subdir("eval", stage, create=create)


def speedrun_dir(preset: str | None = None, create: bool = False) -> Path:
    """speedrun/[<preset>/]: a preset's stage markers (and the offline task files it staged)."""
    return _subdir("speedrun", *([preset] if preset else []), create=create)


def task_cache_dir(create: bool = False) -> Path:
    """tasks/: chat task data downloaded from the hub."""
    return _subdir("tasks", create=create)


def eval_bundle_dir(create: bool = False) -> Path:
    """eval_bundle/: the unzipped CORE bundle (beside it, eval_bundle.zip while it downloads)."""
    return _subdir("eval_bundle", create=create)


def safe_name(name: str) -> str:
    """A user-supplied tag or run name made safe to use as one path component."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not cleaned:
        raise ChatforgeError(f"name {name!r} has no usable characters; use letters, digits, '.', '_' or '-'")
    return cleaned


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that a reader (or a crash) sees either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
