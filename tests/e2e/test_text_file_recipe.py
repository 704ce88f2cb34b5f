"""README's "train a GPT on a text file" recipe, run as the README writes it, on Tiny Shakespeare.

The commands are read from README.md, so the recipe a newcomer copies is the one tested; only the
step count is cut (the full recipe, timed on a 2-core CPU, is in the commit that set its numbers).
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import chatforge

README = Path(__file__).resolve().parents[2] / "README.md"
STEPS = "30"


def recipe_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    start = text.index('"train a GPT on a text file"')
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("chatforge ")]


@pytest.mark.slow
@pytest.mark.shared_data
def test_readmes_text_file_recipe_trains_on_the_cpu_in_seconds_a_step(shared_data, tmp_path, chatforge_home):
    shutil.copy(shared_data / "pretrain" / "tinyshakespeare.txt", tmp_path / "input.txt")
    commands = recipe_commands()
    assert [c[1] for c in commands] == ["tokenizer", "pretrain", "chat"]
    # the commands run in the data's folder, where `-m chatforge` would not find this checkout by itself
    package_root = str(Path(chatforge.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    outputs = []
    for argv in commands:
        if argv[1] == "pretrain":
            argv = [*argv, "--num-iterations", STEPS, "--eval-every", "15", "--device", "cpu"]
        done = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
        outputs.append(done.stdout)

    table = outputs[1]
    assert re.search(r"grad_accum_steps +1 ", table)  # one micro-batch a step on a CPU: seconds, not minutes
    tokens = int(re.search(r"data_tokens +([\d,]+)", table).group(1).replace(",", ""))
    assert 250_000 < tokens < 350_000  # Tiny Shakespeare's train split in a 4,096-token vocabulary
    assert re.search(r"passes +0\.\d+ ", table)
    summary = json.loads(next((chatforge_home / "eval" / "base").glob("*/pretrain.json")).read_text())
    first, last = summary["val_bpb_history"][0][1], summary["final_val_bpb"]
    assert last < 0.8 * first, summary["val_bpb_history"]
    assert outputs[2].strip()  # the model says something
