"""One flag vocabulary across stages: a flag declared under its name, its old spellings kept hidden.

Every stage says the same idea with the same word (`--data` a corpus, `--data-dir` task or eval data,
`--max-problems`, `--tasks`, `--max-new-tokens`, `--max-seq-len`, `--compile {auto,on,off}`). Names a
stage used before are still accepted, for scripts written against them: `add_flag` declares them
as hidden aliases (absent from --help) that store into the same destination and print one note on
stderr saying the new name. `tests/test_flags.py` walks every subcommand's --help for a second
visible name of the same idea.
"""

from __future__ import annotations

import argparse
import sys

COMPILE_CHOICES = ("auto", "on", "off")


class _OldName(argparse.Action):
    """A hidden old spelling: notes the new name on stderr, then acts exactly as the flag it renames
    (or, with `value`, as that flag given `value`: `--no-compile` is `--compile off`)."""

    def __init__(self, option_strings, dest, target: argparse.Action, value=None, **_):
        takes = 0 if value is not None else target.nargs
        super().__init__(option_strings, dest, nargs=takes, const=target.const, type=target.type,
                         choices=None if value is not None else target.choices, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS, metavar=target.metavar)
        self.target, self.value = target, value

    def __call__(self, parser, namespace, values, option_string=None):
        new = self.target.option_strings[-1] + (f" {self.value}" if self.value is not None else "")
        sys.stderr.write(f"chatforge: note: {option_string} is now {new} (the old name will go)\n")
        self.target(parser, namespace, self.value if self.value is not None else values, option_string)


def add_flag(parser, name: str, *old_names: str, **kwargs) -> argparse.Action:
    """parser.add_argument(name, **kwargs), with each of `old_names` still accepted but not shown."""
    if "dest" in kwargs and "action" not in kwargs:  # --help shows the name, not a dest kept from before
        kwargs.setdefault("metavar", name.lstrip("-").replace("-", "_").upper())
    action = parser.add_argument(name, **kwargs)
    for old in old_names:
        parser.add_argument(old, dest=action.dest, action=_OldName, target=action)
    return action


def add_compile_flag(parser, what: str, auto: str, default: str | None = "auto") -> argparse.Action:
    """--compile {auto,on,off} for torch.compile of `what`; `auto` says what the default, auto, means
    in this stage (None as `default` lets a stage fill it in later, as pretrain's presets do). A bare
    --compile is on and --no-compile is off, the spellings some stages had before."""
    action = parser.add_argument("--compile", choices=COMPILE_CHOICES, nargs="?", const="on", default=default,
                                 help=f"torch.compile {what}: on, off, or auto (the default), which is {auto}")
    parser.add_argument("--no-compile", dest=action.dest, action=_OldName, target=action, value="off")
    return action
