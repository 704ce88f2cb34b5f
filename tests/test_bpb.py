"""Bits per byte against a hand computation from the model's logits."""

import math

import pytest
import torch

from chatforge.errors import DataError
from chatforge.eval.bpb import evaluate_bpb
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.runtime import init_runtime


def test_bpb_matches_a_hand_computation():
    rt = init_runtime("cpu", "fp32", announce=False)
    torch.manual_seed(0)
    V = 12
    model = GPT(GPTConfig(sequence_len=6, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # so the predictions are far from uniform
    token_bytes = torch.tensor([1, 2, 3, 1, 4, 2, 1, 1, 3, 2, 0, 0], dtype=torch.int32)  # 10, 11: specials
    batches = []
    for _ in range(3):
        x = torch.randint(0, V, (2, 6))
        y = torch.randint(0, V, (2, 6))
        y[0, 0] = -1   # ignored target
        y[1, 1] = 10   # special: counts neither loss nor bytes
        batches.append((x, y))

    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x).double()
            for b in range(2):
                for t in range(6):
                    target = int(y[b, t])
                    if target < 0 or int(token_bytes[target]) == 0:
                        continue
                    row = logits[b, t].tolist()
                    log_z = math.log(sum(math.exp(v) for v in row))
                    nats += log_z - row[target]
                    nbytes += int(token_bytes[target])
    expected = nats / (math.log(2) * nbytes)

    got = evaluate_bpb(model, batches, token_bytes, rt)
    assert got == pytest.approx(expected, rel=1e-5)


def test_no_bytes_is_a_data_error():
    rt = init_runtime("cpu", "fp32", announce=False)
    model = GPT(GPTConfig(sequence_len=4, vocab_size=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=8))
    with pytest.raises(DataError, match="no text bytes"):
        evaluate_bpb(model, [], torch.ones(8, dtype=torch.int32), rt)
