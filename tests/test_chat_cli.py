"""`chatforge chat`: one-shot -p on a tiny CPU checkpoint, and a two-turn session through a pty."""

import io
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pexpect
import pytest

from chatforge import cli
from chatforge.chat_cli import _as_content, reply
from chatforge.infer.engine import Engine
from tiny_chat import save_tiny_checkpoint

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FLAGS = ["--device", "cpu", "--temperature", "0", "--max-new-tokens", "12"]


def chat_args(**kw):
    base = dict(seed=None, max_new_tokens=12, temperature=0.0, top_k=50, top_p=None, no_tools=False)
    return SimpleNamespace(**{**base, **kw})


def expected_reply(messages, **kw):
    """The reply computed in-process through the engine (greedy, so it must match): (shown text, content)."""
    stream = io.StringIO()
    parts = reply(Engine.from_checkpoint("sft", device="cpu"), messages, chat_args(**kw), turn=0, stream=stream)
    return stream.getvalue(), _as_content(parts)


def run_chat(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "chatforge", "chat", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


@pytest.mark.slow
def test_one_shot_prints_the_reply():
    save_tiny_checkpoint()
    proc = run_chat("-p", "hello how are you", *FLAGS)
    assert proc.returncode == 0, proc.stderr
    expected, _ = expected_reply([{"role": "user", "content": "hello how are you"}])
    assert expected.strip()
    assert proc.stdout == expected


def test_missing_checkpoint_names_the_stage_to_run(capsys):
    for argv, message in ((["--source", "rl"], "no rl checkpoints"), (["--source", "base"], "chatforge pretrain"),
                          (["--temperature", "-1"], "--temperature")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["chat", "-p", "hi", "--device", "cpu", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_interactive_session_round_trips_two_turns():
    save_tiny_checkpoint()
    first = [{"role": "user", "content": "hello"}]
    turn1, content1 = expected_reply(first)
    second = first + [{"role": "assistant", "content": content1}, {"role": "user", "content": "the cat\nsat"}]
    turn2, _ = expected_reply(second)
    child = pexpect.spawn(sys.executable, ["-m", "chatforge", "chat", *FLAGS], env={**os.environ, "NO_COLOR": "1"},
                          encoding="utf-8", timeout=60)
    try:
        child.expect_exact("You: ")
        assert "/clear" in child.before
        child.sendline("hello")
        child.expect_exact("You: ")
        shown1 = ANSI.sub("", child.before).replace("\r\n", "\n")
        assert "Assistant: " in shown1
        got1 = shown1.split("Assistant: ", 1)[1].strip()
        assert got1 == turn1.strip()
        # second turn: a multi-line message (backslash continuation), answered with the history
        child.sendline("the cat\\")
        child.expect_exact("...  ")
        child.sendline("sat")
        child.expect_exact("You: ")
        got2 = ANSI.sub("", child.before).replace("\r\n", "\n").split("Assistant: ", 1)[1].strip()
        assert got2 == turn2.strip()  # answered with turn 1 in the history
        child.sendline("/clear")
        child.expect_exact("(conversation cleared)")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0

