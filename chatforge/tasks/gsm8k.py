"""GSM8K: grade-school math word problems; the answer is the number after `####`.

Records use the hub's `openai/gsm8k` (`main`) fields: question, answer. A reference answer is
reasoning with calculator notes `<<48/2=24>>`, then `#### 72`. Each note becomes a python tool
call (the expression) and its output (the result), so a model trained on these conversations
learns to call the tool for arithmetic:

    "Natalia sold 48/2 = <<48/2=24>>24 clips"  ->  text "Natalia sold 48/2 = ", python "48/2",
                                                  python_output "24", text "24 clips"

Scored generatively: the last `#### <number>` of the response against the reference's.
"""

from __future__ import annotations

import re

from chatforge.tasks.base import Task, load_split

CALC_NOTE = re.compile(r"<<([^<>]*)>>")
FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def _valid(rec: dict) -> bool:
    return isinstance(rec.get("question"), str) and isinstance(rec.get("answer"), str) and "####" in rec["answer"]


def extract_answer(text: str) -> str | None:
    """The number after the last `####`, commas removed; None when there is none."""
    found = FINAL_ANSWER.findall(text)
    return found[-1].replace(",", "") if found else None


def answers_match(predicted: str | None, reference: str | None) -> bool:
    if predicted is None or reference is None:
        return False
    try:
        return float(predicted) == float(reference)
    except ValueError:
        return predicted == reference


def answer_to_parts(answer: str) -> list[dict]:
    """A reference answer as assistant parts: text, with each calculator note a python call + output."""
    parts: list[dict] = []
    pos = 0
    for note in CALC_NOTE.finditer(answer):
        if note.start() > pos:
            parts.append({"type": "text", "text": answer[pos:note.start()]})
        expr, _, result = note.group(1).rpartition("=")
        if not expr:  # a note without '=' is kept as plain text
            parts.append({"type": "text", "text": note.group(0)})
        else:
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        pos = note.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


class GSM8K(Task):
    name = "GSM8K"
    eval_type = "generative"
    baseline = 0.0

    def __init__(self, split: str = "test", data_dir=None, **slice_args):
        super().__init__(**slice_args)
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train or test, got {split!r}")
        self.records = load_split("gsm8k", "openai/gsm8k", "main", split, data_dir, "GSM8K", _valid)

    def num_examples(self) -> int:
        return len(self.records)

    def get_example(self, index: int) -> dict:
        r = self.records[index]
        return {
            "messages": [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": answer_to_parts(r["answer"])},
            ],
            "answer": extract_answer(r["answer"]),
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        return answers_match(extract_answer(response), conversation["answer"])
