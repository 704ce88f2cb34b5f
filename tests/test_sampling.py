"""Sampling matches hand-computed distributions: greedy, temperature, top-k, top-p, seeds."""

import pytest
import torch

from chatforge.errors import UsageError
from chatforge.infer.sampling import check_sampling_args, filtered_logits, sample_next

PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
LOGITS = PROBS.log()[None, :]  # (1, 5)


def frequencies(logits, n=40000, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    ids = sample_next(logits.expand(n, -1).contiguous(), generator=gen, **kw)
    return torch.bincount(ids, minlength=logits.shape[-1]).float() / n


def test_temperature_zero_and_top_k_one_are_argmax():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))
    gen = torch.Generator().manual_seed(2)
    assert torch.equal(sample_next(logits, temperature=1.3, top_k=1, generator=gen), logits.argmax(-1))


def test_plain_sampling_follows_the_softmax():
    freq = frequencies(LOGITS, temperature=1.0)
    assert torch.allclose(freq, PROBS, atol=0.01)


def test_temperature_sharpens_as_computed_by_hand():
    expected = PROBS ** 2 / (PROBS ** 2).sum()  # T = 0.5 squares the probabilities
    freq = frequencies(LOGITS, temperature=0.5)
    assert torch.allclose(freq, expected, atol=0.01)


def test_top_k_renormalises_the_k_largest():
    expected = torch.tensor([0.5, 0.25, 0.15, 0, 0]) / 0.9
    freq = frequencies(LOGITS, temperature=1.0, top_k=3)
    assert freq[3] == 0 and freq[4] == 0
    assert torch.allclose(freq, expected, atol=0.01)


def test_top_p_excludes_the_tail():
    # cumulative mass 0.5, 0.75, 0.90: top_p 0.8 needs the first three tokens to reach 0.8
    f = filtered_logits(LOGITS, 1.0, None, 0.8)
    assert torch.isfinite(f[0, :3]).all() and torch.isinf(f[0, 3:]).all()
    freq = frequencies(LOGITS, temperature=1.0, top_p=0.8)
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.15, 0, 0]) / 0.9, atol=0.01)
    # a tiny top_p keeps only the most likely token
    assert torch.equal(frequencies(LOGITS, n=200, temperature=1.0, top_p=0.01), torch.tensor([1.0, 0, 0, 0, 0]))


def test_top_p_works_on_unsorted_rows():
    logits = torch.stack([PROBS.log(), PROBS.flip(0).log()])
    f = filtered_logits(logits, 1.0, None, 0.6)
    assert torch.isfinite(f[0]).tolist() == [True, True, False, False, False]
    assert torch.isfinite(f[1]).tolist() == [False, False, False, True, True]


def test_same_seed_same_draws_different_seed_different_draws():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(3))
    a = sample_next(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(7))
    b = sample_next(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(7))
    c = sample_next(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments_name_the_flag():
    for kwargs, flag in (({"temperature": -1, "top_k": None, "top_p": None}, "--temperature"),
                         ({"temperature": 1, "top_k": 0, "top_p": None}, "--top-k"),
                         ({"temperature": 1, "top_k": None, "top_p": 1.5}, "--top-p")):
        with pytest.raises(UsageError, match=flag):
            check_sampling_args(**kwargs)
