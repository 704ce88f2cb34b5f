"""SmolTalk: general user/assistant chat (HF `HuggingFaceTB/smol-smoltalk`, splits train and test).

Records carry `messages`: a list of {role, content}. The files come from --data-dir, then
$CHATFORGE_DATA_DIR, then the download cache, then a download of the hub's parquet export (see
tasks/base.py). A local folder may instead hold `chat/conversations.jsonl.gz` in the same shape — the
stand-in in ../shared/data (7,980 conversations from Dolly, OpenAssistant, Self-Instruct and
GPTeacher) — which has no splits of its own: every 20th conversation is its test split, the rest
train. `SmolTalk.source` says which was used, and the loader prints it.

Conversations that are not valid training conversations (see tasks/custom.py) are skipped and counted.
"""

from __future__ import annotations

from chatforge.errors import DataError
from chatforge.runtime import print0
from chatforge.tasks.base import Task, locate_split, read_records
from chatforge.tasks.custom import validate_training_conversation

REPO = "HuggingFaceTB/smol-smoltalk"
STAND_IN = "conversations"  # the stem of the shared stand-in file
STAND_IN_TEST_EVERY = 20


class SmolTalk(Task):
    name = "SmolTalk"

    def __init__(self, split: str = "train", data_dir=None, **slice_args):
        super().__init__(**slice_args)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, got {split!r}")
        files = locate_split("chat", REPO, "default", split, data_dir, stems=(STAND_IN,))
        stand_in = files[0].name.startswith(STAND_IN + ".")
        records = []
        for path in files:
            records.extend(read_records(path, "SmolTalk")[0])
        if stand_in:
            want_test = split == "test"
            records = [r for i, r in enumerate(records) if (i % STAND_IN_TEST_EVERY == 0) == want_test]
        self.conversations, skipped = [], 0
        for record in records:
            try:
                self.conversations.append({"messages": validate_training_conversation(record)["messages"]})
            except DataError:
                skipped += 1
        self.source = f"{'stand-in ' if stand_in else ''}{', '.join(str(p) for p in files)}"
        print0(f"SmolTalk {split}: {len(self.conversations):,} conversations from {self.source}"
               + (f" ({skipped} invalid skipped)" if skipped else ""))
        if not self.conversations:
            raise DataError(f"SmolTalk: {self.source} holds no valid conversation; replace the file(s)")

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]
