"""Chat evaluation: categorical (multiple choice) and generative (sample, then check), and ChatCORE.

Where it sits: `chatforge eval chat` runs the task suite (tasks/) on a mid, sft or rl checkpoint.

- Categorical tasks (MMLU, ARC) are scored without sampling: the question is rendered as a chat
  prompt ending with `<|assistant_start|>`, and among the answer letters' tokens the one with the
  highest logit at that position is the model's answer. Prompts are batched, right-padded, and each
  row's logits are read at its own last position.
- Generative tasks (GSM8K, HumanEval, SpellingBee) sample completions through the inference engine
  (which runs the python tool when the model calls it) and hand the decoded text to the task's
  scorer; with several samples an example counts as solved if any sample is right (pass@k).
- Examples are split across ranks by stride; correct and total counts are summed by all-reduce.
- ChatCORE is the mean over tasks of the accuracy centered by random guessing,
  (acc - baseline) / (1 - baseline): 0.25 for four-choice questions, 0 for open answers.
"""

from __future__ import annotations

import torch

from chatforge.conversation import render_for_completion
from chatforge.errors import DataError
from chatforge.infer.reply import response_text
from chatforge.progress import Progress
from chatforge.runtime import print0


def centered(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


def letter_token_ids(tokenizer, letters: list[str]) -> list[int]:
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise DataError(f"the tokenizer spells answer letter {letter!r} with {len(encoded)} tokens; "
                            "categorical scoring needs one token per letter")
        ids.append(encoded[0])
    return ids


def pick_letters(last_logits: torch.Tensor, letter_ids: list[list[int]], letters: list[list[str]]) -> list[str]:
    """Per row, the letter whose token has the highest logit among that row's allowed letters."""
    picks = []
    for row, ids, names in zip(last_logits, letter_ids, letters):
        picks.append(names[int(row[torch.tensor(ids, device=row.device)].argmax())])
    return picks


def _sum_across_ranks(values: list[int], device, world_size: int) -> list[int]:
    if world_size <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


@torch.no_grad()
def run_categorical(model, tokenizer, task, runtime, indices: list[int], batch_size: int = 8,
                    max_seq_len: int | None = None) -> tuple[int, int, int]:
    """(correct, total, truncated) over this rank's examples."""
    device = runtime.device
    correct = truncated = 0
    bar = Progress(len(indices), f"{task.name}", unit="questions")
    for b in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[b:b + batch_size]]
        prompts = [render_for_completion(tokenizer, c) for c in convs]
        if max_seq_len is not None:
            truncated += sum(len(p) > max_seq_len for p in prompts)
            prompts = [p[-max_seq_len:] for p in prompts]
        width = max(len(p) for p in prompts)
        x = torch.full((len(prompts), width), tokenizer.bos_id, dtype=torch.long)
        for r, p in enumerate(prompts):
            x[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        with runtime.autocast():
            logits = model(x.to(device))  # (B, T, V)
        last = logits[torch.arange(len(prompts), device=logits.device),
                      torch.tensor([len(p) - 1 for p in prompts], device=logits.device)]  # (B, V)
        letters = [c["letters"] for c in convs]
        picks = pick_letters(last, [letter_token_ids(tokenizer, ls) for ls in letters], letters)
        correct += sum(task.evaluate(c, p) for c, p in zip(convs, picks))
        bar.update(len(convs))
    bar.close()
    return correct, len(indices), truncated


def run_generative(engine, tokenizer, task, indices: list[int], num_samples: int = 1, max_new_tokens: int = 512,
                   temperature: float = 0.0, top_k: int | None = None, batch_size: int = 8,
                   max_seq_len: int | None = None, seed: int = 0) -> tuple[int, int, int]:
    """(correct, total, truncated) over this rank's examples; an example is solved if any sample is."""
    correct = truncated = 0
    bar = Progress(len(indices), f"{task.name}", unit="questions")
    for b in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[b:b + batch_size]]
        prompts = [render_for_completion(tokenizer, c) for c in convs]
        if max_seq_len is not None:
            # leave room to answer: a prompt may take at most what the answer does not need
            keep = max(1, max_seq_len - min(max_new_tokens, max_seq_len // 2))
            truncated += sum(len(p) > keep for p in prompts)
            prompts = [p[-keep:] for p in prompts]
        results = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, seed=seed + b)
        for i, conv in enumerate(convs):
            texts = [response_text(tokenizer, r.tokens)  # rows are prompt-major
                     for r in results[i * num_samples:(i + 1) * num_samples]]
            correct += any(task.evaluate(conv, t) for t in texts)
        bar.update(len(convs))
    bar.close()
    return correct, len(indices), truncated


def evaluate_task(model, tokenizer, task, runtime, engine=None, max_problems: int | None = None,
                  num_samples: int = 1, max_new_tokens: int = 512, temperature: float = 0.0,
                  top_k: int | None = None, batch_size: int = 8, max_seq_len: int | None = None) -> dict:
    total = len(task) if max_problems is None else min(max_problems, len(task))
    indices = list(range(runtime.rank, total, runtime.world_size))
    if task.eval_type == "categorical":
        counts = run_categorical(model, tokenizer, task, runtime, indices, batch_size, max_seq_len)
    else:
        if engine is None:
            raise ValueError(f"{task.name} is generative and needs an engine")
        counts = run_generative(engine, tokenizer, task, indices, num_samples, max_new_tokens, temperature,
                                top_k, batch_size, max_seq_len, seed=1000 * runtime.rank)
    correct, n, truncated = _sum_across_ranks(list(counts), runtime.device, runtime.world_size)
    if truncated:
        print0(f"{task.name}: {truncated} prompt(s) longer than the model's context ({max_seq_len} tokens) "
               "were truncated from the left")
    accuracy = correct / n if n else 0.0
    return {"accuracy": accuracy, "centered": centered(accuracy, task.baseline), "baseline": task.baseline,
            "num_correct": correct, "num_problems": n, "eval_type": task.eval_type, "truncated": truncated}


def chatcore(results: dict[str, dict]) -> float:
    """Mean centered accuracy over the tasks that ran."""
    return sum(r["centered"] for r in results.values()) / len(results) if results else float("nan")
