"""Custom conversations from a JSONL file: how a user gives the model a name, an identity, a voice.

    chatforge midtrain --extra me.jsonl      chatforge sft --extra me.jsonl

One conversation per line, either `{"messages": [...]}` or the bare list of messages, in the format of
docs/interfaces.md (roles system?/user/assistant alternating from user, assistant content a string or
{type, text} parts). A line that is not a valid training conversation — bad JSON, wrong role order,
empty content, an unknown part type, no assistant reply at the end — is skipped and reported with its
line number and the field at fault; the file is only rejected when no valid line is left.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from chatforge.conversation import validate_conversation
from chatforge.errors import DataError
from chatforge.runtime import print0
from chatforge.tasks.base import Task

REPORTED_LINES = 10  # bad lines listed one by one; beyond this only counted


def validate_training_conversation(conversation) -> dict:
    """The conversation as {"messages": [...]}, or DataError naming the message and field at fault.

    Stricter than rendering needs: every content is non-empty and the last message is the
    assistant's, since a conversation is only worth training on for the replies it teaches.
    """
    if isinstance(conversation, list):
        conversation = {"messages": conversation}
    messages = validate_conversation(conversation)
    for i, message in enumerate(messages):
        content = message["content"]
        empty = (not content.strip()) if isinstance(content, str) else (
            not content or all(not part["text"].strip() for part in content))
        if empty:
            raise DataError(f"conversation message {i}: field 'content' is empty")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"conversation message {len(messages) - 1}: field 'role' is "
                        f"{messages[-1]['role']!r}; the last message must be the assistant's reply")
    return conversation


def read_conversations(path: str | Path) -> list[dict]:
    """The valid conversations of a JSONL(.gz) file; invalid lines are reported and skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--extra {path}: no such file; give a JSONL file with one conversation per line")
    opener = gzip.open if path.suffix == ".gz" else open
    good, bad = [], []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    good.append(validate_training_conversation(json.loads(line)))
                except json.JSONDecodeError as exc:
                    bad.append(f"line {lineno}: not JSON ({exc.msg})")
                except DataError as exc:
                    bad.append(f"line {lineno}: {exc}")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"--extra {path} cannot be read ({exc}); give a UTF-8 JSONL file") from None
    for message in bad[:REPORTED_LINES]:
        print0(f"{path} {message}; skipped")
    if len(bad) > REPORTED_LINES:
        print0(f"{path}: {len(bad) - REPORTED_LINES} more invalid line(s) skipped")
    if not good:
        raise DataError(f"--extra {path} holds no valid conversation ({len(bad)} invalid line(s)); each line must be "
                        '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}')
    return good


class CustomJSON(Task):
    """The conversations of one JSONL file, in file order."""

    name = "custom"

    def __init__(self, path: str | Path, **slice_args):
        super().__init__(**slice_args)
        self.path = Path(path)
        self.name = f"custom:{self.path.name}"
        self.conversations = read_conversations(path)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]
