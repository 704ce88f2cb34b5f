"""The `chatforge` command: a table of subcommand -> stage module, and nothing else.

Each leaf names a module that has `add_arguments(parser)` and `main(args)` ("module"), or
`add_<name>_arguments(parser)` and `<name>_main(args)` ("module:name"). Only the chosen stage's
module is imported, so `chatforge --help` stays fast and a stage's heavy imports stay its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from chatforge import __version__
from chatforge.errors import ChatforgeError

# name -> (target, one-line help) or name -> (help, {sub-name: (target, help)})
COMMANDS: dict = {
    "env": ("chatforge.env_report", "what this machine offers and what chatforge will use"),
    "data": ("download or prepare pretraining data", {
        "download": ("chatforge.data.download", "download pretraining shards (resumable, verified)"),
        "offline": ("chatforge.data.offline", "write a corpus that needs no network (stdlib docstrings)"),
    }),
    "tokenizer": ("train and evaluate the BPE tokenizer", {
        "train": ("chatforge.tokenizer_stage:train", "train a GPT-4-style BPE tokenizer on the corpus"),
        "eval": ("chatforge.tokenizer_stage:eval", "compression ratio next to GPT-2/GPT-4 encodings"),
    }),
    "pretrain": ("chatforge.train.pretrain", "pretrain a base model; --depth sets its size"),
    "midtrain": ("chatforge.train.midtrain", "continue the base model on a conversation mixture"),
    "sft": ("chatforge.train.sft", "supervised fine-tuning on whole conversations"),
    "rl": ("chatforge.train.rl", "reinforcement learning on GSM8K (simplified GRPO)"),
    "eval": ("evaluate a checkpoint", {
        "base": ("chatforge.eval.base_stage", "CORE and bits per byte of a base model"),
        "chat": ("chatforge.eval.chat_stage", "the chat task suite and ChatCORE"),
    }),
    "chat": ("chatforge.chat_cli", "chat with a checkpoint in the terminal"),
    "serve": ("chatforge.serve.command", "OpenAI-compatible API and web UI on the engine"),
    "export": ("chatforge.export:export", "write a checkpoint as a Hugging Face transformers (NanoChat) folder"),
    "import": ("chatforge.export:import", "a transformers NanoChat folder -> a chatforge checkpoint"),
    "report": ("chatforge.report", "assemble report.md (and plots) from every stage's JSON"),
    "speedrun": ("chatforge.speedrun", "every stage in order for a preset (demo, d20, gpt2); resumable"),
    "bench": ("measure speed; each prints a table", {
        "tokenizer": ("chatforge.bench.tokenizer", "tokenizer training time and encode throughput"),
        "loader": ("chatforge.bench.loader", "data loader tokens/s"),
        "train": ("chatforge.bench.train", "training tokens/s, MFU and peak memory"),
        "infer": ("chatforge.bench.infer", "time to first token and decode tokens/s by batch size"),
        "serve": ("chatforge.bench.serve", "requests/s and time to first token under concurrent load"),
        "tools": ("chatforge.bench.tools", "sandbox latency and decode tokens/s with tool calls in the batch"),
        "export": ("chatforge.bench.export", "an exported model in transformers next to ours: logits, batch-1 speed"),
    }),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line and exits 2."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _resolve(target: str):
    module_name, _, name = target.partition(":")
    module = importlib.import_module(module_name)
    if name:
        return getattr(module, f"add_{name}_arguments"), getattr(module, f"{name}_main")
    return module.add_arguments, module.main


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict]:
    """The full command tree, with arguments filled in only for the leaf that argv selects."""
    words = [a for a in argv if not a.startswith("-")]
    parser = _Parser(prog="chatforge", description="From raw text to your own ChatGPT-like model.")
    parser.add_argument("--version", action="version", version=f"chatforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="STAGE", parser_class=_Parser)
    handlers: dict = {}
    for name, spec in COMMANDS.items():
        if isinstance(spec[1], dict):
            group_help, leaves = spec
            group = sub.add_parser(name, help=group_help, description=group_help)
            group_sub = group.add_subparsers(dest="subcommand", metavar="ACTION", parser_class=_Parser)
            group_sub.required = True
            for leaf, (target, leaf_help) in leaves.items():
                leaf_parser = group_sub.add_parser(leaf, help=leaf_help, description=leaf_help)
                if words[:2] == [name, leaf]:
                    add, main = _resolve(target)
                    add(leaf_parser)
                    handlers["main"] = main
        else:
            target, leaf_help = spec
            leaf_parser = sub.add_parser(name, help=leaf_help, description=leaf_help)
            if words[:1] == [name]:
                add, main = _resolve(target)
                add(leaf_parser)
                handlers["main"] = main
    return parser, handlers


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser, handlers = build_parser(argv)
        args = parser.parse_args(argv)
        if "main" not in handlers:
            parser.print_help()
            raise SystemExit(0 if not argv else 2)
        result = handlers["main"](args)
    except ChatforgeError as exc:
        sys.stderr.write(f"chatforge: error: {exc}\n")
        _leave_process_group()
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        sys.stderr.write("chatforge: interrupted (a run with checkpoints resumes with --resume)\n")
        raise SystemExit(130) from None
    _leave_process_group()
    if isinstance(result, int) and result:
        raise SystemExit(result)


def _leave_process_group() -> None:
    if "torch" in sys.modules:
        from chatforge.runtime import shutdown

        try:
            shutdown()
        except Exception:  # a broken group at exit must not hide the real error
            pass


if __name__ == "__main__":
    main()
