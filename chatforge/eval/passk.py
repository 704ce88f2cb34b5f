"""pass@k: the chance that at least one of k samples solves a problem, estimated without bias.

Where it sits: `chatforge rl` reports pass@1..k on the GSM8K test set at its eval steps; any stage
that samples several answers per problem can use the same two pieces:

- `pass_at_k(n, c, k)`: from n samples of which c are correct, the probability that k samples
  drawn without replacement from those n contain a correct one, 1 - C(n-c, k) / C(n, k) (Chen et
  al. 2021, the Codex paper). Drawing n >= k samples and using this estimator has lower variance
  than drawing exactly k and checking whether any is right. The binomials overflow for large n, so
  it is computed as the product prod_{i=n-c+1..n} (1 - k / i), which is the same ratio.
- `count_correct(...)`: samples n answers per problem through the inference engine (tool use on)
  and counts the correct ones with a scoring function; `pass_at_k_table` averages over problems,
  summed across ranks.
"""

from __future__ import annotations

import torch

from chatforge.conversation import render_for_completion
from chatforge.infer.reply import response_text
from chatforge.progress import Progress


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with c correct among n samples (needs 0 <= c <= n, 1 <= k <= n)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset must contain a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(counts: list[tuple[int, int]], ks: list[int]) -> dict[int, float]:
    """{k: mean over problems of pass@k} for (n, c) pairs; ks larger than a problem's n are an error."""
    if not counts:
        return {k: float("nan") for k in ks}
    return {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}


def count_correct(engine, tokenizer, conversations: list[dict], score, num_samples: int, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None, batch_size: int = 8,
                  seed: int = 0) -> list[int]:
    """Per conversation, how many of `num_samples` sampled replies `score(conversation, text)` accepts."""
    correct = []
    bar = Progress(len(conversations), "pass@k", unit="questions")
    for b in range(0, len(conversations), batch_size):
        convs = conversations[b:b + batch_size]
        room = max(1, engine.config.sequence_len - max_new_tokens)  # a longer prompt keeps its last tokens
        prompts = [render_for_completion(tokenizer, c)[-room:] for c in convs]
        rows = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                     temperature=temperature, top_k=top_k, seed=seed + b)
        for i, conv in enumerate(convs):
            group = rows[i * num_samples:(i + 1) * num_samples]  # rows are prompt-major
            correct.append(sum(score(conv, response_text(tokenizer, r.tokens)) > 0 for r in group))
        bar.update(len(convs))
    bar.close()
    return correct


def pass_at_k_table(correct: list[int], num_samples: int, ks: list[int], device, world_size: int = 1
                    ) -> dict[str, float]:
    """{"pass@k": value} averaged over every rank's problems; `correct` holds this rank's counts."""
    sums = [sum(pass_at_k(num_samples, c, k) for c in correct) for k in ks] + [float(len(correct))]
    if world_size > 1:
        import torch.distributed as dist

        t = torch.tensor(sums, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        sums = t.tolist()
    problems = sums[-1]
    return {f"pass@{k}": (s / problems if problems else float("nan")) for k, s in zip(ks, sums)}
