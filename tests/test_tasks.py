"""Chat tasks: slicing and mixtures, loaders on real and hand-made files, answer extraction, scoring."""

import gzip
import json

import pytest

from chatforge.conversation import render_conversation
from chatforge.errors import DataError, UsageError
from chatforge.tasks import EVAL_TASKS, eval_task
from chatforge.tasks.arc import ARC
from chatforge.tasks.base import Task, TaskMixture, TaskSequence, render_multiple_choice
from chatforge.tasks.gsm8k import GSM8K, answer_to_parts, extract_answer
from chatforge.tasks.humaneval import HumanEval, check_completion
from chatforge.tasks.mmlu import MMLU
from chatforge.tasks.spelling import SpellingBee, spelled_word
from chatforge.tokenizer import Tokenizer


class Numbers(Task):
    def __init__(self, n, tag, **kw):
        super().__init__(**kw)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"{self.tag}{i}"}]}


def names(seq):
    return [c["messages"][0]["content"] for c in seq]


def test_slicing():
    assert names(Numbers(10, "a", start=2, stop=8, step=3)) == ["a2", "a5"]
    assert len(Numbers(10, "a", start=20)) == 0
    t = Numbers(5, "a", stop=100)
    assert len(t) == 5 and t[-1]["messages"][0]["content"] == "a4"
    with pytest.raises(IndexError):
        t[5]


def test_mixture_is_deterministic_and_weighted():
    a, b = Numbers(10, "a"), Numbers(4, "b")
    mix = TaskMixture([a, b], weights=[0.5, 2])
    again = TaskMixture([Numbers(10, "a"), Numbers(4, "b")], weights=[0.5, 2])
    assert names(mix) == names(again)
    got = names(mix)
    assert len(got) == 5 + 8
    assert sorted(x for x in got if x.startswith("b")) == sorted(["b0", "b1", "b2", "b3"] * 2)
    assert len({x for x in got if x.startswith("a")}) == 5
    assert names(TaskMixture([a, b], seed=1)) != names(TaskMixture([a, b], seed=2))
    assert names(TaskSequence([Numbers(2, "a"), Numbers(3, "b")])) == ["a0", "a1", "b0", "b1", "b2"]


def test_gsm8k_calculator_notes_become_tool_calls():
    answer = "She sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"
    parts = answer_to_parts(answer)
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output", "text"]
    assert parts[1]["text"] == "48/2" and parts[2]["text"] == "24"
    assert "".join(p["text"] if p["type"] == "text" else "" for p in parts).endswith("#### 72")
    assert extract_answer("so #### 1,234") == "1234"
    assert extract_answer("#### -3.5 then #### 7") == "7"
    assert extract_answer("no final answer") is None


def test_gsm8k_real_records(shared_data):
    test = GSM8K("test", shared_data)
    train = GSM8K("train", shared_data)
    assert len(test) == 1319 and len(train) == 7473
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    for conv in (train[0], test[5]):
        ids, mask = render_conversation(tok, conv)
        assert conv["answer"] is not None and any(mask)
    conv = train[0]
    assert conv["answer"] == "72"
    parts = conv["messages"][1]["content"]
    assert {"type": "python", "text": "48/2"} in parts and {"type": "python_output", "text": "24"} in parts
    assert test.evaluate(test[0], f"the answer\n#### {test[0]['answer']}")
    assert not test.evaluate(test[0], "#### 123456789")


def test_mmlu_and_arc_real_sets(shared_data):
    mmlu = MMLU("test", shared_data)
    assert len(mmlu) == 14042
    assert len({mmlu.records[i]["subject"] for i in range(len(mmlu))}) == 57
    conv = mmlu[0]
    assert conv["letters"] == ["A", "B", "C", "D"] and conv["answer"] == "B"
    assert conv["messages"][0]["content"].splitlines()[2] == "A. 0"
    assert mmlu.evaluate(conv, " B.") and not mmlu.evaluate(conv, "C")
    easy, challenge = ARC("ARC-Easy", "test", shared_data), ARC("ARC-Challenge", "test", shared_data)
    assert (len(easy), len(challenge)) == (2376, 1172)
    odd = [c for c in easy if len(c["letters"]) != 4]
    assert odd and all(c["answer"] in c["letters"] for c in odd)


def test_multiple_choice_prompt_format():
    text = render_multiple_choice("Which is red?", ["sky", "blood"])
    assert text == "Which is red?\n\nA. sky\nB. blood\n\nAnswer with the letter of the correct choice only."


def test_humaneval_wrong_answer_fails_and_canonical_passes(shared_data):
    task = HumanEval(shared_data)
    assert len(task) == 164
    rec = task.records[0]
    assert check_completion(rec, rec["canonical_solution"])
    assert check_completion(rec, f"```python\n{rec['prompt']}{rec['canonical_solution']}```")
    assert not check_completion(rec, "    return False\n")
    assert not check_completion(rec, "    while True: pass\n", timeout=1)


@pytest.mark.slow
def test_humaneval_all_canonical_solutions_pass(shared_data):
    task = HumanEval(shared_data)
    failed = [r["task_id"] for r in task.records if not check_completion(r, r["canonical_solution"])]
    assert failed == []


def test_spelling_bee_generation_and_scoring():
    bee = SpellingBee(size=50, split="train")
    assert [c["word"] for c in bee] == [c["word"] for c in SpellingBee(size=50, split="train")]
    assert [c["word"] for c in bee] != [c["word"] for c in SpellingBee(size=50, split="test")]
    for conv in bee:
        content = conv["messages"][1]["content"]
        text = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
        assert bee.evaluate(conv, text)
        if conv["kind"] == "count":
            assert int(conv["answer"]) == conv["word"].count(conv["letter"])
            assert not bee.evaluate(conv, f"#### {int(conv['answer']) + 1}")
        else:
            assert not bee.evaluate(conv, "-".join(conv["word"][::-1] + "x"))
    no_tool = SpellingBee(size=20, use_tool=False, kinds=("count",))
    assert all(all(p["type"] == "text" for p in c["messages"][1]["content"]) for c in no_tool)
    assert spelled_word("It is s-t-r-a-w.") == "straw" and spelled_word("nothing") is None


def test_malformed_records_are_skipped(tmp_path):
    folder = tmp_path / "eval" / "gsm8k"
    folder.mkdir(parents=True)
    lines = [json.dumps({"question": "1+1?", "answer": "2\n#### 2"}), "{broken", json.dumps({"question": "x"})]
    (folder / "test.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    task = GSM8K("test", tmp_path)
    assert len(task) == 1 and task[0]["answer"] == "2"


def test_corrupt_file_and_unknown_task_errors(tmp_path):
    folder = tmp_path / "mmlu"
    folder.mkdir()
    (folder / "test.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="test.jsonl.gz"):
        MMLU("test", tmp_path)
    with pytest.raises(UsageError, match="known tasks: " + ", ".join(EVAL_TASKS)):
        eval_task("SQuAD")
