"""Tasks: datasets of conversations that know how to score an answer, and ways to combine them.

Where it sits: the chat eval (`eval/chat.py`) runs a Task's examples through a model and asks the
task to score each answer; midtraining and SFT build their data as a TaskMixture of tasks; RL uses a
task's `reward`.

A Task yields conversations in the docs/interfaces.md format
(`{"messages": [{"role": ..., "content": str | [parts]}]}`), the last message the assistant's
reference answer. A categorical task (multiple choice) also puts `letters` and `answer` (the gold
letter) on the conversation, so an evaluator can compare the letters' logits without sampling.

Slicing is `Task(start, stop, step)` over the task's own examples, so a split can be cut without
copying data. TaskMixture interleaves tasks in a deterministic shuffled order, each repeated by its
weight (2.0 = two epochs of it, 0.5 = a fixed half of it). TaskSequence plays tasks one after
another (a curriculum).
"""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

from chatforge.errors import DataError


class Task:
    """Base class: subclasses give `num_examples`, `get_example`, `evaluate` and an `eval_type`."""

    name = "task"
    eval_type = "generative"  # or "categorical"
    baseline = 0.0  # accuracy of random guessing, for ChatCORE's centering

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, response: str) -> bool:
        """Whether the assistant's `response` text answers the conversation correctly."""
        raise NotImplementedError

    def reward(self, conversation: dict, response: str) -> float:
        return float(self.evaluate(conversation, response))

    def _range(self) -> range:
        total = self.num_examples()
        stop = total if self.stop is None else min(self.stop, total)
        return range(min(self.start, stop), stop, self.step)

    def __len__(self) -> int:
        return len(self._range())

    def __getitem__(self, index: int) -> dict:
        r = self._range()
        if not -len(r) <= index < len(r):
            raise IndexError(f"{self.name}: index {index} out of range for {len(r)} examples")
        return self.get_example(r[index])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskMixture:
    """Several tasks shuffled together; `weights[i]` is how many passes over task i (fractions allowed)."""

    def __init__(self, tasks: list, weights: list[float] | None = None, seed: int = 42):
        weights = [1.0] * len(tasks) if weights is None else list(weights)
        if len(weights) != len(tasks) or any(w < 0 for w in weights):
            raise ValueError("TaskMixture needs one non-negative weight per task")
        self.tasks = tasks
        self.index: list[tuple[int, int]] = []
        for t, (task, weight) in enumerate(zip(tasks, weights)):
            n = len(task)
            whole, frac = int(weight), weight - int(weight)
            self.index.extend((t, i) for _ in range(whole) for i in range(n))
            if frac > 0:
                extra = random.Random(seed + 1 + t).sample(range(n), round(frac * n))
                self.index.extend((t, i) for i in sorted(extra))
        random.Random(seed).shuffle(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict:
        t, i = self.index[index]
        return self.tasks[t][i]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskSequence:
    """Tasks one after another, in the order given."""

    def __init__(self, tasks: list):
        self.tasks = tasks
        self.offsets = []
        total = 0
        for task in tasks:
            self.offsets.append(total)
            total += len(task)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.total:
            raise IndexError(f"index {index} out of range for {self.total} examples")
        for task, offset in zip(reversed(self.tasks), reversed(self.offsets)):
            if index >= offset:
                return task[index - offset]
        raise AssertionError("unreachable")

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


# ----------------------------------------------------------------------------- multiple choice

LETTERS = "ABCDEFGHIJ"


def render_multiple_choice(question: str, choices: list[str], letters: str = LETTERS) -> str:
    """The user turn of a multiple-choice question: the question, lettered choices, the instruction."""
    lines = [question.strip(), ""]
    lines += [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
    lines += ["", "Answer with the letter of the correct choice only."]
    return "\n".join(lines)


def multiple_choice_conversation(question: str, choices: list[str], gold: int, **extra) -> dict:
    letters = list(LETTERS[: len(choices)])
    return {
        "messages": [
            {"role": "user", "content": render_multiple_choice(question, choices)},
            {"role": "assistant", "content": letters[gold]},
        ],
        "letters": letters,
        "answer": letters[gold],
        **extra,
    }


def evaluate_letter(conversation: dict, response: str) -> bool:
    """A categorical answer is right when it is the gold letter (surrounding space and '.' ignored)."""
    return response.strip().rstrip(".").strip() == conversation["answer"]


# ----------------------------------------------------------------------------- local and hub files


def read_records(path: Path, what: str) -> tuple[list[dict], int]:
    """Records of a jsonl(.gz) or parquet file, and how many malformed jsonl lines were skipped."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist(), 0
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{what} file {path} is not a readable parquet file ({exc}); delete it and "
                            "run again to re-download, or fix --data-dir") from None
    opener = gzip.open if path.suffix == ".gz" else open
    records, malformed = [], 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    malformed += 1
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
                else:
                    malformed += 1
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} file {path} is corrupt ({exc}); replace it or fix --data-dir") from None
    return records, malformed


DATA_DIR_ENV = "CHATFORGE_DATA_DIR"
HUB_URL_ENV = "CHATFORGE_HUB_URL"  # a server laid out like huggingface.co (a mirror)
HUB_URL = "https://huggingface.co"
HUB_PARQUET_LIST = "{base}/api/datasets/{repo}/parquet/{subset}/{split}"  # a JSON list of parquet URLs


def split_files(root: Path, local: str, repo: str, subset: str, split: str,
                stems: tuple[str, ...] = ()) -> list[Path]:
    """Files for one split under `root`, in the shared-copy layout or the hub's parquet layout."""
    for folder in (root / "eval" / local, root / local):
        for stem in (split, *stems):
            for ext in (".jsonl.gz", ".jsonl", ".parquet"):
                if (folder / f"{stem}{ext}").is_file():
                    return [folder / f"{stem}{ext}"]
    hub = root / repo / subset
    files = sorted((hub / split).glob("*.parquet")) if (hub / split).is_dir() else []
    return files or sorted(hub.glob(f"{split}-*.parquet")) or sorted(hub.glob(f"{split}.parquet"))


def locate_split(local: str, repo: str, subset: str, split: str, data_dir: str | Path | None = None,
                stems: tuple[str, ...] = ()) -> list[Path]:
    """The files of a task split: --data-dir, then $CHATFORGE_DATA_DIR, then the download cache,
    then a download of the hub's parquet export ($CHATFORGE_HUB_URL, else huggingface.co) into that cache."""
    from chatforge import paths

    roots = [Path(d).expanduser() for d in (data_dir, os.environ.get(DATA_DIR_ENV)) if d]
    for root in roots:
        files = split_files(root, local, repo, subset, split, stems)
        if files:
            return files
    cache = paths.task_cache_dir()
    files = split_files(cache, local, repo, subset, split)
    if files:
        return files
    return _download_split(cache, repo, subset, split, roots)


def hub_url() -> str:
    """Base URL of the dataset hub: $CHATFORGE_HUB_URL, else huggingface.co."""
    return (os.environ.get(HUB_URL_ENV) or HUB_URL).rstrip("/")


def _listed_urls(listing: Path, url: str, base: str) -> list[str]:
    """The parquet URLs of a listing, relative ones resolved against it; hub URLs moved onto `base`.

    A mirror may hand back the hub's listing verbatim, with huggingface.co addresses a machine
    behind the mirror cannot reach, so those are rewritten to the same path on the mirror.
    """
    from urllib.parse import urljoin

    try:
        urls = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        urls = None
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u for u in urls):
        return []
    out = []
    for u in urls:
        u = urljoin(url, u)
        if base != HUB_URL and u.startswith(HUB_URL + "/"):
            u = base + u[len(HUB_URL):]
        out.append(u)
    return out


def _download_split(cache: Path, repo: str, subset: str, split: str, roots: list[Path]) -> list[Path]:
    import shutil

    from chatforge.data.download import download_file, verify_parquet
    from chatforge.errors import DownloadError
    from chatforge.runtime import print0

    where = f" (looked in {', '.join(str(r) for r in roots)})" if roots else ""
    advice = (f"pass --data-dir (or set {DATA_DIR_ENV}) to a local copy of {repo}, or set {HUB_URL_ENV} "
              "to a mirror laid out like huggingface.co")
    dest = cache / repo / subset / split
    partial = dest.with_name(split + ".partial")  # renamed to `dest` once every file is in
    base = hub_url()
    url = HUB_PARQUET_LIST.format(base=base, repo=repo, subset=subset, split=split)
    print0(f"{repo} {subset}/{split} is not local{where}; downloading the hub's parquet export from {base}")
    listing = partial / "_files.json"
    listing.unlink(missing_ok=True)  # asked afresh each time; parquet files already in `partial` are kept
    try:
        download_file(url, listing, hint="the server does not have it")
        urls = _listed_urls(listing, url, base)
        if not urls:
            listing.unlink(missing_ok=True)  # not kept: the next run asks again
            raise DownloadError(f"{url} gave no JSON list of parquet files for {repo} {subset}/{split}")
        for i, file_url in enumerate(urls):
            download_file(file_url, partial / f"{i:04d}.parquet", verify=verify_parquet,
                          hint="the server does not have it")
    except DownloadError as exc:
        raise DownloadError(f"{exc}; {advice}") from None
    listing.unlink(missing_ok=True)
    shutil.rmtree(dest, ignore_errors=True)  # a folder there holds no parquet file, or we would not be here
    os.replace(partial, dest)
    return sorted(dest.glob("*.parquet"))


def load_split(local: str, repo: str, subset: str, split: str, data_dir: str | Path | None,
               what: str, valid=None, stems: tuple[str, ...] = ()) -> list[dict]:
    """All records of a task split, malformed ones skipped and reported."""
    from chatforge.runtime import print0

    records, malformed = [], 0
    files = locate_split(local, repo, subset, split, data_dir, stems)
    for path in files:
        recs, bad = read_records(path, what)
        good = [r for r in recs if valid is None or valid(r)]
        records.extend(good)
        malformed += bad + len(recs) - len(good)
    if malformed:
        print0(f"{what}: skipped {malformed} malformed record(s) in {', '.join(str(p) for p in files)}")
    if not records:
        raise DataError(f"{what}: {', '.join(str(p) for p in files)} holds no records; replace the file(s)")
    return records
