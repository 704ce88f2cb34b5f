"""MMLU: 57 subjects of four-choice exam questions (Hendrycks et al.), scored categorically.

Records use the hub's `cais/mmlu` fields: question, subject, choices (4 strings), answer (index).
Splits: `dev` (5 per subject, few-shot material), `validation`, `test` (14,042, the eval set),
`auxiliary_train` (for midtraining, hub only).
"""

from __future__ import annotations

from chatforge.tasks.base import Task, evaluate_letter, load_split, multiple_choice_conversation

SPLITS = ("auxiliary_train", "dev", "validation", "test")


def _valid(rec: dict) -> bool:
    choices, answer = rec.get("choices"), rec.get("answer")
    return (isinstance(rec.get("question"), str) and isinstance(choices, list) and len(choices) >= 2
            and all(isinstance(c, str) for c in choices) and isinstance(answer, int)
            and 0 <= answer < len(choices))


class MMLU(Task):
    name = "MMLU"
    eval_type = "categorical"
    baseline = 0.25

    def __init__(self, split: str = "test", data_dir=None, subject: str | None = None, **slice_args):
        super().__init__(**slice_args)
        if split not in SPLITS:
            raise ValueError(f"MMLU split must be one of {SPLITS}, got {split!r}")
        subset = "auxiliary_train" if split == "auxiliary_train" else "all"
        hub_split = "train" if split == "auxiliary_train" else split
        records = load_split("mmlu", "cais/mmlu", subset, hub_split, data_dir, "MMLU", _valid,
                             stems=(split,))
        if subject is not None:
            records = [r for r in records if r.get("subject") == subject]
        self.records = records

    def num_examples(self) -> int:
        return len(self.records)

    def get_example(self, index: int) -> dict:
        r = self.records[index]
        return multiple_choice_conversation(r["question"], r["choices"], r["answer"],
                                            subject=r.get("subject", ""))

    def evaluate(self, conversation: dict, response: str) -> bool:
        return evaluate_letter(conversation, response)
