"""The whole pipeline on the `tiny` preset: every stage runs, a crash mid-pretraining resumes without
redoing finished stages, and the report's numbers are the run's. Uses ../shared/data when it is there,
else the offline fallback (stdlib corpus, generated conversations)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def speedrun(*extra):
    source = ["--data-dir", str(SHARED)] if SHARED.is_dir() else ["--offline"]
    cmd = [sys.executable, "-m", "chatforge", "speedrun", "--preset", "tiny", "--nproc-per-node", "0", *source, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def markers(home):
    return {p.stem: json.loads(p.read_text()) for p in (home / "speedrun" / "tiny").glob("*.done")}


@pytest.mark.slow
def test_tiny_speedrun_resumes_after_a_crash_and_reports_its_own_numbers(chatforge_home):
    home = chatforge_home
    speedrun("--stop-after", "pretrain")
    first = markers(home)
    assert {"data", "tokenizer", "tokenizer-eval", "pretrain"} <= set(first) and "eval-base" not in first

    # a crash between pretraining checkpoints: the stage never finished, its last checkpoint is gone
    ckpts = home / "checkpoints" / "base" / "tiny"
    steps = sorted(ckpts.glob("step_*"))
    assert len(steps) >= 2
    shutil.rmtree(steps[-1])
    (home / "speedrun" / "tiny" / "pretrain.done").unlink()

    log = speedrun("--rl")
    assert "tokenizer already complete; skipping" in log and "tokenizer-eval already complete; skipping" in log
    done = markers(home)
    for stage in ("tokenizer", "tokenizer-eval"):
        assert done[stage]["started"] == first[stage]["started"]  # not redone
    pretrain = json.loads((home / "eval" / "base" / "tiny" / "pretrain.json").read_text())
    assert pretrain["resumed_from_step"] == int(steps[-2].name.split("_")[1])
    assert {"eval-base", "midtrain", "eval-mid", "sft", "eval-sft", "report"} <= set(done)
    if SHARED.is_dir():  # offline, RL is skipped: its GSM8K questions are unreachable
        assert {"rl", "eval-rl"} <= set(done)

    md = (home / "report" / "report.md").read_text()
    section = md.split("## Evaluations by stage", 1)[1].split("##", 1)[0]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in section.splitlines() if line.startswith("| "))}
    columns = rows.pop("metric")  # the header: chance, then one column per stage
    for stage in ("base", "mid", "sft", "rl"):
        col = columns.index(stage)
        path = home / "eval" / stage / "tiny" / "chat.json"
        chat = json.loads(path.read_text()) if path.is_file() else None
        if chat is None:
            assert rows["ChatCORE"][col] == "not run"
            continue
        assert rows["ChatCORE"][col] == f"{chat['chatcore']:.4f}"
        for task, result in chat["tasks"].items():
            assert rows[task][col] == f"{result['accuracy']:.4f}"
    if SHARED.is_dir():
        core = json.loads((home / "eval" / "base" / "tiny" / "core.json").read_text())
        assert rows["CORE"][columns.index("base")] == f"{core['core']:.4f}"
    else:
        assert "OFFLINE FALLBACK" in md
    for name in ("loss.png", "bpb.png", "evals.png"):
        assert f"]({name})" in md
        with Image.open(home / "report" / name) as image:
            image.verify()

    # a third run finds everything complete and only refreshes the report
    log = speedrun("--rl")
    assert "ran 1 stage(s)" in log and "sft already complete; skipping" in log
