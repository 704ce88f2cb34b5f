"""One flag vocabulary: every subcommand's --help names each idea once, and old names still parse.

The subcommands are discovered from `chatforge`'s own parser, so a stage added later is walked too.
"""

import argparse
import re

import pytest

from chatforge import cli
from chatforge.flags import COMPILE_CHOICES

# one idea per row: the name --help shows, then names that mean the same and must not be shown
SYNONYMS = {
    "--max-problems": ("--max-per-task", "--core-max-per-task", "--eval-max-problems", "--eval-examples",
                       "--max-examples", "--max-items"),
    "--max-new-tokens": ("--max-tokens", "--default-max-tokens", "--new-tokens", "--eval-max-new-tokens"),
    "--data-dir": ("--eval-bundle", "--task-dir", "--tasks-dir"),
    "--tasks": ("--core-tasks", "--eval-tasks"),
    "--max-seq-len": ("--seq-len", "--sequence-len", "--context-len"),
    "--compile": ("--no-compile", "--torch-compile"),
}

# the renames of issue 22 (subcommand, old name, new name): scripts written against the old names
# keep working until they are removed
RENAMED = [
    ("pretrain", "--core-max-per-task", "--max-problems"),
    ("pretrain", "--eval-bundle", "--data-dir"),
    ("eval base", "--max-per-task", "--max-problems"),
    ("eval base", "--eval-bundle", "--data-dir"),
    ("eval base", "--core-tasks", "--tasks"),
    ("sft", "--eval-tasks", "--tasks"),
    ("sft", "--eval-max-problems", "--max-problems"),
    ("sft", "--eval-max-new-tokens", "--max-new-tokens"),
    ("rl", "--eval-examples", "--max-problems"),
    ("chat", "--max-tokens", "--max-new-tokens"),
    ("serve", "--default-max-tokens", "--max-new-tokens"),
    ("data download", "--data-dir", "--from"),
    ("bench train", "--seq-len", "--max-seq-len"),
    ("bench infer", "--new-tokens", "--max-new-tokens"),
    ("bench infer", "--seq-len", "--max-seq-len"),
    ("bench tools", "--new-tokens", "--max-new-tokens"),
    ("bench tools", "--seq-len", "--max-seq-len"),
    ("bench export", "--new-tokens", "--max-new-tokens"),
    ("bench export", "--seq-len", "--max-seq-len"),
    ("bench loader", "--seq-len", "--max-seq-len"),
    ("bench serve", "--max-tokens", "--max-new-tokens"),
    ("bench serve", "--concurrency", "--streams"),
    ("bench train", "--batch-size", "--device-batch-size"),
]


def _subparsers(parser):
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return found[0].choices if found else {}


def _leaves(parser, path=()):
    children = _subparsers(parser)
    if not children:
        yield path
    for name, child in children.items():
        yield from _leaves(child, (*path, name))


def _leaf(path):
    """The subcommand's parser with its arguments filled in (cli adds them only for the chosen leaf)."""
    parser, _ = cli.build_parser(list(path))
    for name in path:
        parser = _subparsers(parser)[name]
    return parser


SUBCOMMANDS = [" ".join(p) for p in _leaves(cli.build_parser([])[0])]


@pytest.fixture(scope="module")
def parsers():
    return {name: _leaf(name.split()) for name in SUBCOMMANDS}


def _visible(parser) -> list[str]:
    return [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings]


def _hidden(parser) -> list[tuple[str, argparse.Action]]:
    return [(o, a) for a in parser._actions if a.help == argparse.SUPPRESS and hasattr(a, "target")
            for o in a.option_strings]


def test_every_subcommand_is_walked():
    assert {"pretrain", "sft", "eval base", "eval chat", "chat", "serve", "bench infer", "data download"} \
        <= set(SUBCOMMANDS)


def test_each_idea_has_one_visible_name_in_every_help(parsers):
    second_names = {old: new for new, olds in SYNONYMS.items() for old in olds}
    found = [f"`chatforge {name}` shows {flag}; the vocabulary's word is {second_names[flag]}"
             for name, parser in parsers.items() for flag in _visible(parser) if flag in second_names]
    assert not found, "\n".join(found)


def test_help_text_does_not_mention_a_retired_name(parsers):
    found = []
    for name, parser in parsers.items():
        text = parser.format_help()
        for old, _ in _hidden(parser):
            if re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", text):
                found.append(f"`chatforge {name} --help` still mentions {old}")
    assert not found, "\n".join(found)


def test_compile_takes_auto_on_off_everywhere(parsers):
    compiles = {name: a for name, p in parsers.items() for a in p._actions if "--compile" in a.option_strings}
    assert {"pretrain", "midtrain", "sft", "serve", "bench train", "bench infer", "bench tools"} <= set(compiles)
    for name, action in compiles.items():
        assert tuple(action.choices) == COMPILE_CHOICES, name
        parser = parsers[name]
        assert parser.parse_args(["--compile"]).compile == "on", name
        assert parser.parse_args(["--no-compile"]).compile == "off", name
        assert parser.parse_args(["--compile", "auto"]).compile == "auto", name


def _sample_value(action: argparse.Action) -> list[str]:
    """Words that give `action` a value other than its default."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [next(str(c) for c in action.choices if c != action.default)]
    if action.type is int or getattr(action.type, "__name__", "") == "batch_size_arg":
        return ["3"]
    if action.type is float:
        return ["0.5"]
    return ["some/folder"]


def test_every_old_name_parses_to_the_same_value_as_the_new_one(parsers, capsys):
    checked = 0
    for name, parser in parsers.items():
        for old, alias in _hidden(parser):
            new = alias.target.option_strings[-1]
            if alias.value is not None:  # a spelling with its value built in: --no-compile is --compile off
                old_words, new_words = [old], [new, alias.value]
            else:
                value = _sample_value(alias.target)
                old_words, new_words = [old, *value], [new, *value]
            via_old, via_new = parser.parse_args(old_words), parser.parse_args(new_words)
            assert via_old == via_new, f"chatforge {name}: {old_words} != {new_words}"
            assert via_new != parser.parse_args([]), f"chatforge {name}: {new_words} changed nothing"
            checked += 1
    assert checked >= len(RENAMED)
    assert "is now" in capsys.readouterr().err


@pytest.mark.parametrize("name,old,new", RENAMED, ids=[f"{n}:{o}" for n, o, _ in RENAMED])
def test_renamed_flags_are_kept_as_hidden_aliases(parsers, name, old, new):
    parser = parsers[name]
    assert new in _visible(parser) and old not in _visible(parser)
    assert (old, new) in {(o, a.target.option_strings[-1]) for o, a in _hidden(parser)}


def test_an_old_name_says_the_new_one_in_one_line(parsers, capsys):
    args = parsers["eval base"].parse_args(["--max-per-task", "5"])
    assert args.max_problems == 5
    err = capsys.readouterr().err
    assert err == "chatforge: note: --max-per-task is now --max-problems (the old name will go)\n"


def test_pretrain_credits_its_facts_not_flags_it_lacks(parsers):
    from chatforge.model.scaling import derive
    from chatforge.train.pretrain import FACT_SOURCES

    visible = _visible(parsers["pretrain"])
    table = derive(2, vocab_size=512, world_size=1, device="cpu", given_by=FACT_SOURCES).describe()
    for field, flag in (("vocab_size", "--vocab-size"), ("world_size", "--world-size")):
        assert flag not in visible and flag not in table
        assert FACT_SOURCES[field] in table
    assert "--max-seq-len (given)" in derive(2, sequence_len=64, vocab_size=512, given_by=FACT_SOURCES).describe()
