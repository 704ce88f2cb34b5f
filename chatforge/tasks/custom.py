"""Custom conversations from a JSONL file: how a user gives the model a name, an identity, a voice.

    chatforge midtrain --extra me.jsonl      chatforge sft --extra me.jsonl

One conversation per line, either `{"messages": [...]}` or the bare list of messages, in the format of
docs/interfaces.md (roles system?/user/assistant alternating from user, assistant content a string or
{type, text} parts). A line that is not a valid training conversation — bad JSON, wrong role order,
empty content, an unknown part type, no assistant reply at the end — is skipped and reported with its
line number and the field at fault; the file is only rejected when no valid line is left.
"""

from __future__ import annotations

import copy
import gzip
import json
import random
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

    def held_out(self, count: int, seed: int) -> tuple[CustomJSON, CustomJSON]:
        """(training lines, the lines of `count` distinct conversations held out), drawn by `seed`. A
        conversation written on several lines is held out with all its copies, so no held-out line is
        also a training line."""
        copies: dict[str, list[int]] = {}
        for i, conversation in enumerate(self.conversations):
            copies.setdefault(json.dumps(conversation, sort_keys=True), []).append(i)
        groups = list(copies.values())
        random.Random(seed).shuffle(groups)
        held = {i for group in groups[:count] for i in group}
        train, val = copy.copy(self), copy.copy(self)
        train.conversations = [c for i, c in enumerate(self.conversations) if i not in held]
        val.conversations = [c for i, c in enumerate(self.conversations) if i in held]
        val.name = f"{self.name} (held out)"
        return train, val

    def distinct(self) -> int:
        """How many different conversations the file holds."""
        return len({json.dumps(c, sort_keys=True) for c in self.conversations})
