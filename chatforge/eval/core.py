"""CORE: the DCLM in-context-learning ensemble, scored from a base model's losses.

Where it sits: `chatforge eval base` calls `evaluate_core` on a pretrained checkpoint; the number is
the one nanochat compares with GPT-2 (0.2565 for the 1.5B model, DCLM paper, 22 tasks).

The bundle is a folder holding `core.yaml` (the task list: label, dataset_uri, shots, task type,
continuation delimiter), `eval_meta_data.csv` (each task's random baseline, in percent) and
`eval_data/<dataset_uri>` (jsonl, or jsonl.gz). A task whose file is absent is skipped and listed;
CORE is then the mean over the tasks that ran, and the result says over how many.

How an item is scored (every choice is a (context, continuation) pair; only continuation tokens count):
- multiple_choice: one context, several continuations; the choice with the lowest mean loss wins.
- schema: several contexts, one continuation; the context under which the continuation has the
  lowest mean loss wins.
- language_modeling: one pair; correct iff greedy argmax reproduces every continuation token.

Choices made and why:
- Few-shot examples are drawn with a generator seeded by the item's index, never the item itself,
  so a run is reproducible and `--max-problems` changes which items run, not their prompts.
- The tokens scored are found by encoding the context and the whole text and taking their common
  prefix: BPE may merge the delimiter's trailing space into the continuation's first word, and the
  tokens after the shared prefix are then exactly the ones that spell the continuation.
- Sequences of all items are sorted by length and packed into batches under a token budget, so a
  GPU does a few large forwards instead of one per item; right padding cannot change a causal
  model's earlier positions.
- A prompt longer than the model's context keeps its last tokens (truncated from the left), and
  the run says how many were cut.
- Items are split across ranks by stride; correct counts are summed with one all-reduce per task.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from chatforge import paths
from chatforge.errors import DataError, DownloadError, UsageError
from chatforge.flags import add_flag
from chatforge.progress import Progress
from chatforge.runtime import print0
from chatforge.tasks.base import read_records

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
BUNDLE_ENV = "CHATFORGE_EVAL_BUNDLE"  # a local bundle folder
BUNDLE_URL_ENV = "CHATFORGE_EVAL_BUNDLE_URL"  # where to download the zip from instead of BUNDLE_URL
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # order of items before --max-problems takes the first N
FEWSHOT_SEED = 1234  # the few-shot draw for item i uses FEWSHOT_SEED + i


@dataclass
class CoreTask:
    label: str
    dataset_uri: str
    task_type: str
    num_fewshot: int
    delimiter: str
    baseline: float  # random-guess accuracy in percent, from eval_meta_data.csv
    path: Path | None  # None when the bundle lacks the task's file


@dataclass
class Scored:
    """One sequence to run: its ids and the [start, end) span whose tokens are scored."""

    ids: list[int]
    start: int
    end: int
    truncated: bool = False


@dataclass
class TaskResult:
    label: str
    accuracy: float
    centered: float
    baseline: float
    num_items: int
    num_correct: int
    malformed: int = 0
    truncated: int = 0
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- bundle


def resolve_bundle(path: str | Path | None = None, url: str | None = None) -> Path:
    """The bundle folder: --data-dir (the bundle or a data folder with eval/core), then
    $CHATFORGE_EVAL_BUNDLE, then a cached download.

    The download comes from `url`, else $CHATFORGE_EVAL_BUNDLE_URL (a mirror), else BUNDLE_URL, and
    is extracted into `<base>/eval_bundle`; later calls use that folder and fetch nothing.
    """
    if path is None and os.environ.get(BUNDLE_ENV):
        path = os.environ[BUNDLE_ENV]
    if path is not None:
        folder = Path(path).expanduser()
        root = _bundle_root(folder) or _bundle_root(folder / "eval" / "core")
        if root is None:
            raise DataError(f"eval bundle {path} has no core.yaml; point --data-dir (or {BUNDLE_ENV}) "
                            "at the folder holding core.yaml, eval_meta_data.csv and eval_data/")
        return root
    cache = paths.eval_bundle_dir()
    root = _bundle_root(cache)
    if root is not None:
        return root
    from chatforge.data.download import download_file

    url = url or os.environ.get(BUNDLE_URL_ENV) or BUNDLE_URL
    advice = (f"set {BUNDLE_URL_ENV} to a mirror of eval_bundle.zip, or pass --data-dir "
              f"(or set {BUNDLE_ENV}) with a local folder")
    zip_path = cache.with_name("eval_bundle.zip")
    tmp = cache.with_name(".eval_bundle.extracting")
    print0(f"downloading the CORE eval bundle from {url}")
    try:
        download_file(url, zip_path, hint="the server does not have it")
    except DownloadError as exc:
        raise DownloadError(f"{exc}; {advice}") from None
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)  # extractall drops absolute paths and '..' from member names
    except (zipfile.BadZipFile, EOFError) as exc:
        zip_path.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{zip_path} from {url} is not a valid zip ({exc}; deleted it); run again to "
                        f"re-download, or {advice}") from None
    if _bundle_root(tmp) is None:
        zip_path.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"the zip from {url} holds no core.yaml (deleted it); {advice}")
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    zip_path.unlink(missing_ok=True)
    return _bundle_root(cache)


def _bundle_root(path: Path) -> Path | None:
    """The folder holding core.yaml: `path` itself or its one subfolder (zips wrap a top folder)."""
    if (path / "core.yaml").is_file():
        return path
    if path.is_dir():
        for sub in sorted(path.iterdir()):
            if (sub / "core.yaml").is_file():
                return sub
    return None


def load_bundle(root: Path) -> list[CoreTask]:
    import yaml

    root = Path(root)
    try:
        config = yaml.safe_load((root / "core.yaml").read_text(encoding="utf-8"))
        entries = config["icl_tasks"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise DataError(f"{root / 'core.yaml'} is unreadable or has no icl_tasks list ({exc}); "
                        "re-download the bundle or fix the file") from None
    baselines = _read_baselines(root / "eval_meta_data.csv")
    tasks = []
    for entry in entries:
        try:
            label = entry["label"]
            uri = entry["dataset_uri"]
            task_type = entry["icl_task_type"]
            shots = entry.get("num_fewshot", [0])
            shots = int(shots[0] if isinstance(shots, list) else shots)
        except (KeyError, TypeError, ValueError, IndexError):
            raise DataError(f"{root / 'core.yaml'}: task entry {entry!r} lacks label, dataset_uri, "
                            "icl_task_type or a numeric num_fewshot") from None
        if task_type not in TASK_TYPES:
            raise DataError(f"{root / 'core.yaml'}: task {label} has icl_task_type {task_type!r}; "
                            f"known types are {', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise DataError(f"{root / 'eval_meta_data.csv'} has no random baseline for task {label}")
        # The bundle leaves the delimiter out where it is a single space.
        delimiter = entry.get("continuation_delimiter", " ")
        file = None
        for candidate in (root / "eval_data" / uri, root / "eval_data" / (uri + ".gz")):
            if candidate.is_file():
                file = candidate
                break
        tasks.append(CoreTask(label, uri, task_type, shots, delimiter, baselines[label], file))
    return tasks


def _read_baselines(path: Path) -> dict[str, float]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path} is unreadable or lacks the 'Eval Task'/'Random baseline' columns ({exc})") from None


def read_items(task: CoreTask) -> tuple[list[dict], int]:
    """The task's valid records and how many malformed lines were skipped."""
    records, malformed = read_records(task.path, f"CORE task {task.label}")
    items = [r for r in records if _valid(r, task.task_type)]
    return items, malformed + len(records) - len(items)


def _valid(item, task_type: str) -> bool:
    if not isinstance(item, dict):
        return False
    if task_type == "multiple_choice":
        choices, gold = item.get("choices"), item.get("gold")
        return (isinstance(item.get("query"), str) and isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) for c in choices) and isinstance(gold, int) and 0 <= gold < len(choices))
    if task_type == "schema":
        options, gold = item.get("context_options"), item.get("gold")
        return (isinstance(options, list) and len(options) >= 2 and all(isinstance(c, str) for c in options)
                and isinstance(item.get("continuation"), str) and isinstance(gold, int) and 0 <= gold < len(options))
    return isinstance(item.get("context"), str) and isinstance(item.get("continuation"), str)


# ----------------------------------------------------------------------------- prompts


def fewshot_indices(num_items: int, index: int, k: int) -> list[int]:
    """k distinct item indices other than `index`, the same on every call and every rank."""
    k = min(k, num_items - 1)
    if k <= 0:
        return []
    rng = random.Random(FEWSHOT_SEED + index)
    picks = rng.sample(range(num_items - 1), k)
    return [p + 1 if p >= index else p for p in picks]  # skip over the item itself


def build_pairs(item: dict, shots: list[dict], task_type: str, delimiter: str) -> list[tuple[str, str]]:
    """(context, continuation) text pairs for one item: one per choice (MC/schema), one for LM.

    Few-shot examples come first, each a solved example, separated by blank lines.
    """
    if task_type == "multiple_choice":
        prefix = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [(prefix + item["query"] + delimiter, choice) for choice in item["choices"]]
    if task_type == "schema":
        prefix = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
        return [(prefix + option + delimiter, item["continuation"]) for option in item["context_options"]]
    prefix = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
    context = prefix + item["context"].strip() + delimiter
    # A trailing space in the delimiter would be tokenized alone; the continuation takes it instead.
    stripped = context.rstrip(" ")
    return [(stripped, context[len(stripped):] + item["continuation"].rstrip())]


def encode_pair(tokenizer, context: str, continuation: str, max_len: int | None) -> Scored | None:
    """BOS + context + continuation as ids, with the continuation's span; None if it has no tokens."""
    bos = [tokenizer.bos_id]
    ctx_ids = bos + tokenizer.encode(context)
    full_ids = bos + tokenizer.encode(context + continuation)
    start = 0
    limit = min(len(ctx_ids), len(full_ids))
    while start < limit and ctx_ids[start] == full_ids[start]:
        start += 1
    end = len(full_ids)
    if start >= end:
        return None
    truncated = False
    if max_len is not None and end > max_len:
        cut = end - max_len
        full_ids = full_ids[cut:]
        start, end = max(start - cut, 1), end - cut  # position 0 has no prediction, so start >= 1
        truncated = True
    return Scored(full_ids, start, end, truncated)


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_sequences(model, seqs: list[Scored], device, batch_tokens: int = 16384,
                    pad_id: int = 0) -> list[tuple[float, bool]]:
    """For each sequence: (mean loss over its scored tokens, whether greedy argmax gets all of them).

    Sequences are run shortest first in batches of at most `batch_tokens` padded tokens.
    """
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
    results: list[tuple[float, bool] | None] = [None] * len(seqs)
    pos = 0
    while pos < len(order):
        longest = len(seqs[order[pos]].ids)
        batch = [order[pos]]
        while pos + len(batch) < len(order):
            nxt = order[pos + len(batch)]
            if (len(batch) + 1) * max(longest, len(seqs[nxt].ids)) > batch_tokens:
                break
            longest = max(longest, len(seqs[nxt].ids))
            batch.append(nxt)
        pos += len(batch)
        x = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        rows, cols, targets, owner = [], [], [], []
        for r, i in enumerate(batch):
            s = seqs[i]
            x[r, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
            span = range(s.start, s.end)
            rows.extend([r] * len(span))
            cols.extend(p - 1 for p in span)  # position p-1 predicts token p
            targets.extend(s.ids[p] for p in span)
            owner.extend([r] * len(span))
        logits = model(x.to(device))  # (B, T, V)
        picked = logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)].float()
        tgt = torch.tensor(targets, device=logits.device)
        losses = F.cross_entropy(picked, tgt, reduction="none").cpu()
        hits = (picked.argmax(dim=-1) == tgt).cpu()
        owner_t = torch.tensor(owner)
        for r, i in enumerate(batch):
            mask = owner_t == r
            results[i] = (losses[mask].mean().item(), bool(hits[mask].all().item()))
    return results


def centered_accuracy(accuracy: float, baseline_percent: float) -> float:
    """Accuracy rescaled so random guessing scores 0 and a perfect score 1."""
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)


def item_is_correct(task_type: str, results: list[tuple[float, bool]], gold: int | None) -> bool:
    if task_type == "language_modeling":
        return results[0][1]
    losses = [loss for loss, _ in results]
    return min(range(len(losses)), key=losses.__getitem__) == gold


def evaluate_task(model, tokenizer, task: CoreTask, device, max_per_task: int | None = None,
                  max_seq_len: int | None = None, batch_tokens: int = 16384, rank: int = 0,
                  world_size: int = 1) -> TaskResult:
    """One CORE task over this rank's strided share of items, counts summed across ranks."""
    items, malformed = read_items(task)
    if not items:
        raise DataError(f"CORE task file {task.path} has no valid records; re-download the eval bundle")
    order = list(range(len(items)))
    random.Random(SHUFFLE_SEED).shuffle(order)
    if max_per_task is not None:
        order = order[:max_per_task]
    mine = order[rank::world_size]
    seqs: list[Scored] = []
    spans: list[tuple[int, int, int]] = []  # (item index, first seq, number of seqs)
    skipped = 0
    for idx in mine:
        item = items[idx]
        shots = [items[j] for j in fewshot_indices(len(items), idx, task.num_fewshot)]
        encoded = [encode_pair(tokenizer, c, k, max_seq_len)
                   for c, k in build_pairs(item, shots, task.task_type, task.delimiter)]
        if any(e is None for e in encoded):
            skipped += 1  # an empty continuation cannot be scored
            continue
        spans.append((idx, len(seqs), len(encoded)))
        seqs.extend(encoded)
    results = score_sequences(model, seqs, device, batch_tokens=batch_tokens, pad_id=tokenizer.bos_id)
    correct = sum(item_is_correct(task.task_type, results[first:first + n], items[idx].get("gold"))
                  for idx, first, n in spans)
    truncated = sum(s.truncated for s in seqs)
    counts = torch.tensor([correct, len(spans), truncated, skipped], dtype=torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    correct, total, truncated, skipped = (int(v) for v in counts.tolist())
    accuracy = correct / total if total else 0.0
    return TaskResult(task.label, accuracy, centered_accuracy(accuracy, task.baseline), task.baseline,
                      total, correct, malformed + skipped, truncated)


def evaluate_core(model, tokenizer, bundle: Path, device, max_per_task: int | None = None,
                  max_seq_len: int | None = None, batch_tokens: int = 16384, rank: int = 0,
                  world_size: int = 1, labels: list[str] | None = None) -> dict:
    """Every task of the bundle whose file is present; CORE = mean centered accuracy over them."""
    tasks = load_bundle(bundle)
    if labels:
        known = {t.label for t in tasks}
        unknown = [name for name in labels if name not in known]
        if unknown:
            raise UsageError(f"unknown CORE task(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        tasks = [t for t in tasks if t.label in labels]
    present = [t for t in tasks if t.path is not None]
    missing = [t.label for t in tasks if t.path is None]
    if missing:
        print0(f"CORE: skipping {len(missing)} task(s) whose file is not in {bundle}: {', '.join(missing)}")
    results: list[TaskResult] = []
    bar = Progress(len(present), "CORE tasks", unit="task")
    for task in present:
        res = evaluate_task(model, tokenizer, task, device, max_per_task, max_seq_len, batch_tokens,
                            rank, world_size)
        results.append(res)
        if res.truncated:
            print0(f"CORE {task.label}: {res.truncated} prompt(s) longer than the model's context "
                   f"({max_seq_len} tokens) were truncated from the left")
        if res.malformed:
            print0(f"CORE {task.label}: skipped {res.malformed} malformed record(s)")
        bar.update(1, task=task.label, acc=f"{res.accuracy:.3f}")
    bar.close()
    core = sum(r.centered for r in results) / len(results) if results else float("nan")
    note = None
    if len(results) < len(tasks) or len(tasks) < 22:
        note = (f"CORE here is the mean over {len(results)} task(s), not the standard 22; "
                "it is not comparable with published 22-task CORE numbers")
    return {
        "core": core,
        "num_tasks": len(results),
        "num_tasks_configured": len(tasks),
        "skipped_tasks": missing,
        "note": note,
        "max_per_task": max_per_task,
        "bundle": str(bundle),
        "tasks": {r.label: {"accuracy": r.accuracy, "centered": r.centered, "baseline": r.baseline,
                            "num_items": r.num_items, "num_correct": r.num_correct,
                            "malformed": r.malformed, "truncated": r.truncated} for r in results},
    }


def add_core_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--max-problems", "--max-per-task", type=int, default=None,
             help="score at most N items per CORE task (a quick run); default all")
    add_flag(parser, "--data-dir", "--eval-bundle", default=None,
             help=f"local CORE bundle: its folder, or a data folder holding eval/core (default: ${BUNDLE_ENV}, "
                  f"else download ${BUNDLE_URL_ENV} or {BUNDLE_URL})")
    add_flag(parser, "--tasks", "--core-tasks", default=None,
             help="comma-separated CORE task labels to run (default: all present)")
    parser.add_argument("--batch-tokens", type=int, default=16384,
                        help="padded tokens per forward when scoring (lower it if memory runs out)")
