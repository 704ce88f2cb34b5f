"""ARC (AI2 Reasoning Challenge): grade-school science questions, Easy and Challenge sets.

Records use the hub's `allenai/ai2_arc` fields: question, choices {text[], label[]}, answerKey.
A few questions have 3 or 5 choices or labels '1'..'4'; the choices are re-lettered A, B, C, ...
in their given order and the gold letter follows its position.
"""

from __future__ import annotations

from chatforge.tasks.base import Task, evaluate_letter, load_split, multiple_choice_conversation

SUBSETS = ("ARC-Easy", "ARC-Challenge")


def _valid(rec: dict) -> bool:
    choices = rec.get("choices")
    if not isinstance(rec.get("question"), str) or not isinstance(choices, dict):
        return False
    text, labels = choices.get("text"), choices.get("label")
    return (isinstance(text, list) and isinstance(labels, list) and len(text) == len(labels) >= 2
            and all(isinstance(t, str) for t in text) and rec.get("answerKey") in labels)


class ARC(Task):
    eval_type = "categorical"
    baseline = 0.25

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", data_dir=None, **slice_args):
        super().__init__(**slice_args)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train, validation or test, got {split!r}")
        self.name = subset
        self.records = load_split(f"arc/{subset}", "allenai/ai2_arc", subset, split, data_dir, subset, _valid)

    def num_examples(self) -> int:
        return len(self.records)

    def get_example(self, index: int) -> dict:
        r = self.records[index]
        labels = list(r["choices"]["label"])
        return multiple_choice_conversation(r["question"], r["choices"]["text"], labels.index(r["answerKey"]),
                                            id=r.get("id", ""))

    def evaluate(self, conversation: dict, response: str) -> bool:
        return evaluate_letter(conversation, response)
