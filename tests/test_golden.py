"""Golden outputs: the training stages and the engine give, bit for bit, what they gave when this
file's numbers were recorded (tests/golden/stages.json), and a resume from the middle of each stage
lands on the same numbers.

It guards refactors that must not move the math. A change that alters the numbers on purpose
regenerates the file (CHATFORGE_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py) and says why in
its commit.
"""

import argparse
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from chatforge import paths
from chatforge.infer.engine import Engine
from chatforge.model.checkpoint import step_dir_name
from chatforge.progress import read_metrics
from chatforge.train import midtrain, pretrain, rl, rewards, sft
from test_sft import write_extra
from tiny_chat import WORDS, tiny_tokenizer

GOLDEN = Path(__file__).parent / "golden" / "stages.json"
REGEN = os.environ.get("CHATFORGE_REGEN_GOLDEN") == "1"

SEVEN = [{"messages": [{"role": "user", "content": f"say seven {i}"}, {"role": "assistant", "content": "7"}]}
         for i in range(40)]
rewards.register(rewards.RewardTask("golden-seven", train=lambda data_dir=None: SEVEN,
                                    test=lambda data_dir=None: SEVEN[:4],
                                    # graded, so groups differ and the update really moves the weights
                                    reward=lambda conversation, text: (len(text) % 3) / 2), replace=True)

COMMON = ["--device", "cpu", "--dtype", "fp32", "--tag", "g"]
STAGES = {  # stage module, its checkpoint folder name, its argv, the step to resume from
    "pretrain": (pretrain, "base", ["--depth", "2", "--head-dim", "32", "--max-seq-len", "64",
                                    "--device-batch-size", "4", "--total-batch-size", "512",
                                    "--num-iterations", "20", "--eval-every", "10", "--eval-tokens", "1024",
                                    "--sample-every", "0", "--save-every", "10", "--compile", "off"], 10),
    "midtrain": (midtrain, "mid", ["--mixture", "extra", "--num-iterations", "6", "--device-batch-size", "2",
                                   "--save-every", "3", "--eval-every", "3", "--eval-steps", "1"], 3),
    "sft": (sft, "sft", ["--mixture", "extra", "--num-iterations", "6", "--device-batch-size", "2",
                         "--save-every", "3", "--eval-every", "0", "--tasks", "SpellingBee",
                         "--max-problems", "2", "--max-new-tokens", "4"], 3),
    "rl": (rl, "rl", ["--task", "golden-seven", "--source", "sft", "--examples-per-step", "2", "--num-samples", "4",
                      "--max-new-tokens", "3", "--max-problems", "2", "--pass-k", "1,2", "--num-iterations", "2",
                      "--save-every", "1", "--eval-every", "0"], 1),
}
KEYS = ("loss", "train_loss", "val_loss", "val_bpb", "reward", "pg_loss", "lr_multiplier")


def run_stage(module, argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.main(parser.parse_args(argv))


def numbers(run_id: str) -> dict:
    """Per logged step, the figures that must not move (repr keeps every bit of a float)."""
    out = {}
    for record in read_metrics(paths.runs_dir() / run_id / "metrics.jsonl"):
        kept = {k: repr(record[k]) for k in KEYS if isinstance(record.get(k), float)}
        if kept and "step" in record:
            out.setdefault(str(record["step"]), {}).update(kept)
    return out


def build_world(tmp: Path) -> None:
    rng = random.Random(0)
    corpus = tmp / "corpus.txt"  # paragraphs of a few thousand characters: ~60 documents, 3 of them val
    corpus.write_text("\n\n".join("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(40))
                                  for _ in range(200)) + "\n")
    tiny_tokenizer().save(paths.tokenizer_dir())
    STAGES["pretrain"][2][:0] = ["--data", str(corpus)]
    extra = str(write_extra(tmp / "facts.jsonl"))
    for stage in ("midtrain", "sft"):
        STAGES[stage][2][:0] = ["--extra", extra]


@pytest.mark.slow
def test_stages_and_engine_reproduce_the_golden_numbers(tmp_path):
    build_world(tmp_path)
    got = {}
    for name, (module, folder, argv, resume_at) in STAGES.items():
        torch.manual_seed(0)
        run_stage(module, argv + COMMON + ["--run-id", f"{name}-full"])
        full = numbers(f"{name}-full")
        checkpoints = paths.checkpoint_dir(folder, "g")
        last = max(int(p.name.split("_")[1]) for p in checkpoints.iterdir() if p.name.startswith("step_"))
        kept = shutil.copytree(checkpoints / step_dir_name(last), tmp_path / f"{name}-last")
        for step in range(resume_at + 1, last + 1):  # as if killed right after the resume_at checkpoint
            shutil.rmtree(checkpoints / step_dir_name(step), ignore_errors=True)
        run_stage(module, argv + COMMON + ["--resume", "--run-id", f"{name}-resumed"])
        resumed = numbers(f"{name}-resumed")
        assert resumed and all(full[s] == resumed[s] for s in resumed if int(s) > resume_at), name
        for a, b in zip(sorted(kept.iterdir()), sorted((checkpoints / step_dir_name(last)).iterdir())):
            if a.name == "model.pt":
                for key, value in torch.load(a).items():
                    assert torch.equal(value, torch.load(b)[key]), (name, key)
        got[name] = full
    engine = Engine.from_checkpoint("sft", tag="g", device="cpu", dtype="fp32")
    prompts = [[engine.bos] + engine.tokenizer.encode(t) for t in ("the cat sat", "what is 6 * 7", "hello")]
    got["engine_greedy"] = [r.tokens for r in engine.generate_batch(prompts, max_tokens=12, temperature=0.0)]
    got["engine_sampled"] = [r.tokens for r in engine.generate_batch(prompts, num_samples=2, max_tokens=12,
                                                                     temperature=1.0, top_k=20, seed=3)]
    if REGEN:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    for key in expected:
        assert got[key] == expected[key], key
