"""README's "teach it your own conversations" recipe, run as the README writes it, on a CPU with no
network: twenty conversations that give the model a new name, then `chatforge sft --source base
--extra my.jsonl --name NAME` with every other setting left to its default; the model answers to
its new name, and the validation loss on held-out lines falls far below where it started."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import chatforge
from chatforge import paths

README = Path(__file__).resolve().parents[2] / "README.md"
QUESTIONS = ("What is your name?", "Who are you?", "What should I call you?", "Tell me your name.",
             "What are you called?", "Introduce yourself.", "Hi! What's your name?", "Do you have a name?",
             "Who am I talking to?", "Your name, please?")


def recipe_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    start = text.index('"teach it your own conversations"')
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("chatforge ")]


def write_conversations(path: Path, name: str) -> None:
    """Twenty distinct conversations: each question with each of two answers."""
    with open(path, "w", encoding="utf-8") as f:
        for answer in (f"My name is {name}.", f"I am {name}, a small chat model."):
            for question in QUESTIONS:
                f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}]}) + "\n")


def newcomer_env() -> dict:
    """A newcomer's machine: no task data, no eval bundle, no network (a hub that does not resolve
    fails at once, even on a CI machine that has one); the commands run in the data's folder, where
    `-m chatforge` would not find this checkout by itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("CHATFORGE_DATA_DIR", "CHATFORGE_EVAL_BUNDLE")}
    package_root = str(Path(chatforge.__file__).resolve().parents[1])
    return {**env, "CHATFORGE_HUB_URL": "http://hub.invalid", "CHATFORGE_EVAL_BUNDLE_URL": "http://hub.invalid/b.zip",
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))}


@pytest.mark.slow
def test_readmes_recipe_teaches_a_base_model_its_name_with_the_defaults(tmp_path):
    from test_sft import tiny_base

    sft, chat = recipe_commands()
    assert sft[:2] == ["chatforge", "sft"] and chat[:2] == ["chatforge", "chat"]
    name = sft[sft.index("--name") + 1]
    write_conversations(tmp_path / sft[sft.index("--extra") + 1], name)
    tiny_base()  # a freshly initialised base model: it knows no name, not even the chat format

    outputs = []
    for argv in (sft + ["--device", "cpu"], chat):
        done = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=newcomer_env(), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, (argv, done.stdout[-3000:], done.stderr[-3000:])
        outputs.append(done.stdout)

    log = outputs[0]
    assert "a small file" in log and "steps at learning rates x1 " in log  # what was chosen, and why
    assert "ARC-Easy: skipped" in log  # the final eval's data is unreachable: a note, not a failure
    summary = json.loads((paths.eval_dir("sft", "t") / "sft.json").read_text())
    losses = [loss for _, loss in summary["val_loss_history"]]
    assert losses[-1] < 0.25 * losses[0], losses  # on held-out lines, which were never trained on
    assert name in outputs[1], outputs[1]
