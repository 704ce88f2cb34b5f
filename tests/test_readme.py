"""Every command README.md shows parses with chatforge's own command line, and the cheap ones run.

The commands are read from README.md itself (its code blocks, the `chatforge ...` and `torchrun ...
-m chatforge ...` spans of its prose, and the chatforge lines of the runs/ scripts it names), so a
flag renamed or removed in the code but not in README fails here. Placeholders (DIR, PATH, PROMPT,
T, ...) get a sample value, `[--flag VALUE]` is checked with the flag given, and `a|b|c` once per
choice. A command must use today's flag names, not an old spelling kept for scripts.

Run here as written, on a tiny setup: `chatforge env`, `chatforge data offline`, `chatforge report
[--html]`, `chatforge chat -p PROMPT`, `chatforge export`/`import` on a tiny checkpoint, and the
Python snippet with the official OpenAI client against a server on a tiny model. The recipes run
end to end in tests/e2e (text file, own conversations) and the tiny preset's whole pipeline in
tests/e2e/test_pipeline_e2e.py; the stages' own tests run each stage with tiny flags.
What needs a GPU or hours (`pretrain --depth 20`, `speedrun --preset gpu1|d20|gpt2`, torchrun on 8
GPUs) is covered by the parse check below and by the presets' dry runs in
tests/test_speedrun_presets.py; `bash runs/test.sh` is what CI runs (.ci/run). The
lm-evaluation-harness command is another program's (not a dependency): only the local task it names
is checked here; its run on CPU is recorded in docs/export.md.
"""

import itertools
import re
import shlex
from pathlib import Path

import pytest

from chatforge import cli, paths, speedrun
from test_serve_api import served  # noqa: F401 - the fixture: a server on a tiny model

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMAND = re.compile(r"(chatforge|torchrun) ")
# what a placeholder in README stands for, when a command is parsed (not run)
SAMPLES = {"DIR": "some/dir", "PATH": "input.txt", "FILE": "input.txt", "PROMPT": "Hello!", "T": "t",
           "NAME": "Quill"}
# flags README mentions that belong to other programs (torchrun's are read with its commands)
OTHER_TOOLS_FLAGS = {"--model-impl"}


def readme_commands(text: str | None = None) -> list[str]:
    """Every chatforge command README shows, as written: each code block line that starts with one
    (a description after two spaces or a `#` cut off), then each inline span that is one."""
    text = README.read_text(encoding="utf-8") if text is None else text
    found = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            command = re.split(r"\s{2,}|\s#", line.strip())[0]
            if COMMAND.match(command):
                found.append(command)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return list(dict.fromkeys(found + [span for span in spans if COMMAND.match(span)]))


def script_commands(name: str) -> list[str]:
    """The chatforge lines of a runs/ script, shell expansions resolved the way a plain run has them."""
    lines = []
    for line in (ROOT / "runs" / name).read_text().splitlines():
        if line.startswith("chatforge "):
            line = re.sub(r'"\$\{\w+:-([^}]*)\}"', r"\1", line)  # "${PRESET:-d20}": its default
            lines.append(re.sub(r'\s*"\$(\{\w+\[@\]\}|@)"', "", line))  # "${data_flag[@]}", "$@": none
    return lines


def argvs(command: str) -> list[list[str]]:
    """The argument lists after `chatforge` that a command as written stands for."""
    words = shlex.split(command)
    if words[0] == "torchrun":
        words = words[words.index("-m") + 1:]
    assert words[0] == "chatforge", command
    choices = []
    for word in words[1:]:
        word = word.strip("[]") if word.startswith("[") or word.endswith("]") else word
        options = word.split("|") if "|" in word and not word.startswith("-") else [word]
        choices.append([SAMPLES.get(o, o) for o in options])
    return [list(argv) for argv in itertools.product(*choices)]


def parse(argv: list[str]):
    parser, handlers = cli.build_parser(argv)
    return parser.parse_args(argv), handlers


ALL_COMMANDS = list(dict.fromkeys(readme_commands() + script_commands("demo.sh") + script_commands("speedrun.sh")))


def test_the_extraction_finds_the_commands_of_every_kind():
    commands = readme_commands()
    assert "chatforge env" in commands  # the stages block, description cut off
    assert 'chatforge chat --source base -p "ROMEO:"' in commands  # a recipe
    assert "chatforge import --from DIR --tag T [--stage base|mid|sft|rl]" in commands  # prose, across a line break
    assert "torchrun --standalone --nproc_per_node=8 -m chatforge pretrain --depth 20" in commands
    assert len(commands) >= 25
    assert script_commands("demo.sh")[1] == "chatforge speedrun --preset demo"
    assert argvs("chatforge speedrun --preset demo|d20") == [["speedrun", "--preset", "demo"],
                                                              ["speedrun", "--preset", "d20"]]
    assert argvs("chatforge tokenizer train [--data PATH]") == [["tokenizer", "train", "--data", "input.txt"]]


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_readme_command_parses_with_todays_flags(command, capsys):
    for argv in argvs(command):
        try:
            _, handlers = parse(argv)
        except SystemExit:
            pytest.fail(f"README's `{command}` does not parse: {capsys.readouterr().err.strip()}")
        assert "main" in handlers, f"README's `{command}` names no stage"
        err = capsys.readouterr().err
        assert "note:" not in err, f"README's `{command}` uses an old flag name: {err.strip()}"


def test_every_flag_readme_mentions_is_one_some_command_takes():
    from test_flags import SUBCOMMANDS, _leaf

    known = {o for name in SUBCOMMANDS for a in _leaf(name.split())._actions for o in a.option_strings}
    prose = re.sub(r"```.*?```", "", README.read_text(encoding="utf-8"), flags=re.S)
    mentioned = {flag for span in re.findall(r"`([^`]+)`", prose) if not span.startswith("torchrun")
                 for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", span)}
    assert mentioned - known - OTHER_TOOLS_FLAGS == set()


def test_the_demo_presets_stages_parse():
    """`bash runs/demo.sh` is `chatforge speedrun --preset demo` (parsed above): its stages, as the
    GPU presets' are in tests/test_speedrun_presets.py; the tiny preset runs them in tests/e2e."""
    from test_speedrun_presets import LOCAL

    for stage in speedrun.build_plan("demo", speedrun.PRESETS["demo"], LOCAL, rl=True):
        args, _ = parse(stage.argv)
        assert args.command == stage.argv[0], stage.name


# ---- the cheap ones, run as written ----------------------------------------------------------------


def run_as_written(command: str, optional: bool = True, **placeholders) -> None:
    """Run a README command in this process: placeholders filled in, `[...]` given or left out."""
    assert command in readme_commands(), f"README no longer shows `{command}`"
    written = re.sub(r"\[([^]]*)\]", r"\1" if optional else "", command)
    cli.main([placeholders.get(w, w) for w in shlex.split(written)[1:]])


def test_env_as_written(capsys):
    run_as_written("chatforge env")
    out = capsys.readouterr().out
    assert "suggested depth" in out and "checkpoints" in out


def test_data_offline_as_written(capsys):
    run_as_written("chatforge data offline")
    folder = paths.base_dir() / "data" / "stdlib-docstrings"
    assert str(folder) in capsys.readouterr().out and list(folder.glob("*.jsonl"))


def test_report_as_written(chatforge_home):
    from test_report import make_run

    make_run(chatforge_home)
    run_as_written("chatforge report [--html]", optional=False)
    assert not (paths.report_dir() / "report.html").exists()
    run_as_written("chatforge report [--html]")
    assert (paths.report_dir() / "report.md").is_file() and (paths.report_dir() / "report.html").is_file()


def test_chat_export_and_import_as_written_on_a_tiny_checkpoint(tmp_path, capsys):
    from tiny_chat import save_tiny_checkpoint

    save_tiny_checkpoint("sft", "d2")
    run_as_written("chatforge chat [-p PROMPT]", PROMPT="Hello!")
    assert capsys.readouterr().out.strip()
    run_as_written("chatforge export --source sft --out DIR", DIR=str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").is_file()
    run_as_written("chatforge import --from DIR --tag T", DIR=str(tmp_path / "hf"), T="back")
    run_as_written("chatforge export --source sft --tag T --out DIR", T="back", DIR=str(tmp_path / "hf2"))
    weights = [(tmp_path / out / "model.safetensors").read_bytes() for out in ("hf", "hf2")]
    assert weights[0] == weights[1]  # through a checkpoint and back, bit for bit


def readme_block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    return next(b for b in blocks if containing in b)


def test_the_openai_snippet_as_written_against_a_served_tiny_model(served):
    url, _, _ = served
    snippet = readme_block("python", "OpenAI(")
    assert 'base_url="http://127.0.0.1:8000/v1"' in snippet  # the one thing changed: this test's port
    scope: dict = {}
    exec(snippet.replace("http://127.0.0.1:8000", url), scope)
    assert isinstance(scope["reply"].choices[0].message.content, str) and scope["reply"].model


def test_the_lm_eval_commands_task_is_in_the_folder_it_includes():
    command = shlex.split(readme_block("bash", "lm_eval").replace("\\\n", " "))
    folder = ROOT / command[command.index("--include_path") + 1]
    task = command[command.index("--tasks") + 1]
    tasks = [re.search(r"^task: (\S+)$", y.read_text(), re.M) for y in folder.glob("*.yaml")]
    assert task in [t.group(1) for t in tasks if t], (folder, task)
