"""A corpus that is always there: the docstrings of the local Python installation's standard library.

For machines with no network and no local copy of a real corpus (the demo's last resort). It is
English technical prose, a few MB of it; a model trained on it is silly, but every stage really runs.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

from chatforge.errors import DataError
from chatforge.paths import atomic_write_text


def iter_stdlib_docstrings(min_chars: int = 100):
    """Module, class and function docstrings of the stdlib, longest-first within each file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if any(part in {"test", "tests", "idlelib", "site-packages", "lib2to3"} for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def write_stdlib_corpus(dest: Path, max_chars: int = 4_000_000, docs_per_file: int = 500) -> Path:
    """Write the docstrings as jsonl files (field `text`) under `dest`, which `--data` can then read."""
    import json

    dest.mkdir(parents=True, exist_ok=True)
    done = dest / "COMPLETE"
    if done.exists():
        return dest
    batch, total, index = [], 0, 0
    for doc in iter_stdlib_docstrings():
        batch.append(json.dumps({"text": doc}))
        total += len(doc)
        if len(batch) == docs_per_file:
            atomic_write_text(dest / f"part_{index:03d}.jsonl", "\n".join(batch) + "\n")
            batch, index = [], index + 1
        if total >= max_chars:
            break
    if batch:
        atomic_write_text(dest / f"part_{index:03d}.jsonl", "\n".join(batch) + "\n")
        index += 1
    if index == 0:
        raise DataError(f"found no docstrings in the standard library under {sysconfig.get_paths()['stdlib']}; "
                        "pass --data PATH with a text corpus instead")
    atomic_write_text(done, f"{total} characters in {index} files\n")
    return dest


def add_arguments(parser) -> None:
    parser.add_argument("--max-chars", type=float, default=4e6, help="stop after this many characters")


def main(args) -> None:
    from chatforge import paths
    from chatforge.runtime import print0

    dest = write_stdlib_corpus(paths.data_dir("stdlib-docstrings"), max_chars=int(args.max_chars))
    print0(f"offline corpus (the standard library's docstrings): {(dest / 'COMPLETE').read_text().strip()}")
    print0(f"use it with: --data {dest}")
