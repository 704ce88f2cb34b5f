"""`chatforge chat`: talk to a checkpoint in the terminal.

    chatforge chat                          # interactive, the latest sft checkpoint
    chatforge chat --source rl --step 400   # another stage or step
    chatforge chat -p "Why is the sky blue?"  # one reply on stdout, then exit

Interactive use: the conversation is kept and sent whole each turn. `/clear` starts a new
conversation, `/quit` (or Ctrl-D) leaves, Ctrl-C stops a reply midway (the partial reply stays in
the history). A line ending in a backslash continues on the next line, for multi-line messages.
Replies stream as they are generated. When the model calls the python tool, its code is shown on a
line starting `[python]` and the sandbox's answer on a line starting `[output]` (coloured on a
terminal; NO_COLOR turns colour off).
"""

from __future__ import annotations

import argparse
import os
import sys

from chatforge.conversation import render_for_completion
from chatforge.errors import UsageError
from chatforge.flags import add_flag
from chatforge.infer.engine import Engine
from chatforge.infer.reply import ReplyParser
from chatforge.infer.sampling import check_sampling_args
from chatforge.runtime import add_runtime_arguments

STAGES = ("sft", "mid", "base", "rl")
HELP = "/clear starts over, /quit exits, end a line with \\ to continue it on the next line"
PROMPT, CONTINUATION = "You: ", "...  "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--prompt", default=None, help="one message: print the reply and exit")
    parser.add_argument("--source", default="sft", choices=STAGES, help="which stage's checkpoint (default: sft)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. d20 (default: the most recent)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default: 0.6)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default: 50)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    add_flag(parser, "--max-new-tokens", "--max-tokens", type=int, default=512,
             help="longest reply in tokens (default: 512)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible replies")
    parser.add_argument("--no-tools", action="store_true", help="do not run the python tool the model asks for")
    add_runtime_arguments(parser)


class _Style:
    """ANSI colour for the tool blocks, only on a terminal and only without NO_COLOR."""

    def __init__(self, stream):
        self.on = stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"

    def __call__(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.on and text else text


class ReplyPrinter:
    """Shows a reply token by token and rebuilds it as conversation parts (text / python / output)."""

    COLORS = {"text": "0", "python": "36", "python_output": "2"}
    LABELS = {"python": "[python] ", "python_output": "[output] "}

    def __init__(self, engine: Engine, stream=None):
        self.parser = ReplyParser(engine.tokenizer)
        self.stream = stream or sys.stdout
        self.style = _Style(self.stream)
        self.parts: list[dict] = []
        self.line_start = True

    def write(self, text: str, color: str | None = None) -> None:
        if not text:
            return
        self.stream.write(self.style(text, color) if color else text)
        self.stream.flush()
        self.line_start = text.endswith("\n")

    def push(self, token: int) -> None:
        for event in self.parser.push(token):
            self._show(event)

    def _show(self, event) -> None:
        if event.event == "open":
            if not self.line_start:
                self.write("\n")
            self.write(self.LABELS[event.kind], "1;" + self.COLORS[event.kind])
            self.parts.append({"type": event.kind, "text": ""})
        elif event.event == "close":
            self.write("\n")
            self.parts.append({"type": "text", "text": ""})  # what follows a block is a new text part
        else:
            self.write(event.text, self.COLORS[event.kind] if event.kind != "text" else None)
            if not self.parts:
                self.parts.append({"type": "text", "text": ""})
            self.parts[-1]["text"] += event.text

    def finish(self) -> list[dict]:
        for event in self.parser.finish():
            self._show(event)
        if not self.line_start:
            self.write("\n")
        return [p for p in self.parts if p["text"] or p["type"] != "text"]


def reply(engine: Engine, messages: list[dict], args, turn: int, stream=None) -> list[dict]:
    """Generate and stream one assistant reply to `messages`; return its parts."""
    ids = render_for_completion(engine.tokenizer, {"messages": messages})
    printer = ReplyPrinter(engine, stream)
    seed = None if args.seed is None else args.seed + turn
    try:
        for step in engine.generate([ids], max_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_k=args.top_k, top_p=args.top_p, seed=seed, use_tools=not args.no_tools):
            printer.push(step[0].token)
    except KeyboardInterrupt:
        printer.write(" [stopped]")
    return printer.finish()


def _as_content(parts: list[dict]):
    if not parts:
        return ""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def read_message() -> str | None:
    """One user message (backslash-continued lines joined); None at end of input."""
    lines = []
    prompt = PROMPT
    while True:
        try:
            line = input(prompt)
        except EOFError:
            return None if not lines else "\n".join(lines)
        if line.endswith("\\"):
            lines.append(line[:-1])
            prompt = CONTINUATION
            continue
        lines.append(line)
        return "\n".join(lines)


def main(args) -> int:
    check_args(args)
    engine = Engine.from_checkpoint(args.source, tag=args.tag, step=args.step, device=args.device,
                                    dtype=args.dtype)
    if args.prompt is not None:
        reply(engine, [{"role": "user", "content": args.prompt}], args, turn=0)
        return 0
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    meta = engine.meta
    sys.stdout.write(f"chatforge chat: {args.source}/{meta.get('tag')} step {meta.get('step')} on {engine.device} "
                     f"({HELP})\n")
    messages: list[dict] = []
    turn = 0
    while True:
        try:
            text = read_message()
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            return 0
        if text is None:
            sys.stdout.write("\n")
            return 0
        command = text.strip()
        if command in ("/quit", "/exit"):
            return 0
        if command == "/clear":
            messages, turn = [], 0
            sys.stdout.write("(conversation cleared)\n")
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": text})
        sys.stdout.write("Assistant: ")
        try:
            parts = reply(engine, messages, args, turn)
        except UsageError as exc:
            messages.pop()
            sys.stdout.write(f"\n(error: {exc})\n")
            continue
        messages.append({"role": "assistant", "content": _as_content(parts)})
        turn += 1


def check_args(args) -> None:
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
