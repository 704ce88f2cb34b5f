"""Greedy samples: a glance at what a model says, during pretraining and in `chatforge eval base`."""

from __future__ import annotations

import torch

SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


@torch.no_grad()
def greedy_samples(model, tokenizer, runtime, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 16) -> list[dict]:
    """Greedy continuations, re-running the whole prefix per token (a few short prompts: no KV cache).

    `model.forward` is called directly, so a model compiled in place runs eagerly here instead of
    recompiling for every length; rows are padded on the right to a multiple of 16 (FP8 matmuls
    need it), which a causal model's earlier positions never see.
    """
    was_training = model.training
    model.eval()
    limit = model.config.sequence_len
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
        start = len(ids)
        for _ in range(max_new_tokens):
            context = ids[-limit:]
            padded = context + [tokenizer.bos_id] * (-len(context) % 16)
            with runtime.autocast():
                logits = model.forward(torch.tensor([padded], dtype=torch.long, device=runtime.device))
            ids.append(int(logits[0, len(context) - 1].argmax()))
        out.append({"prompt": prompt, "completion": tokenizer.decode(ids[start:])})
    model.train(was_training)
    return out
