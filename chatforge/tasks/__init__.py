"""Chat tasks: conversations with a way to score an answer (see base.py), and the eval suite's names."""

from __future__ import annotations

from chatforge.errors import UsageError


def eval_task(name: str, data_dir=None):
    """The task `chatforge eval chat -a NAME` runs, on its evaluation split."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        from chatforge.tasks.arc import ARC

        return ARC(name, "test", data_dir)
    if name == "MMLU":
        from chatforge.tasks.mmlu import MMLU

        return MMLU("test", data_dir)
    if name == "GSM8K":
        from chatforge.tasks.gsm8k import GSM8K

        return GSM8K("test", data_dir)
    if name == "HumanEval":
        from chatforge.tasks.humaneval import HumanEval

        return HumanEval(data_dir)
    if name == "SpellingBee":
        from chatforge.tasks.spelling import SpellingBee

        return SpellingBee(size=256, split="test")
    raise UsageError(f"unknown task {name!r} for -a/--tasks; known tasks: {', '.join(EVAL_TASKS)}")


EVAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
