"""pass@k: the unbiased estimator against direct enumeration of k-subsets, and the averaged table."""

import itertools
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatforge.eval.passk import mean_pass_at_k, pass_at_k, pass_at_k_table
from chatforge.infer.reply import response_text


def enumerated_pass_at_k(outcomes: list[bool], k: int) -> Fraction:
    """The fraction of all k-subsets of the samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(outcomes, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


@pytest.mark.parametrize("outcomes", [
    [True, False, False, False],
    [False, False, False, False, False],
    [True, True, True],
    [False, True, False, True, False, False, True, False],
])
def test_hand_made_samples_match_enumeration(outcomes):
    n, c = len(outcomes), sum(outcomes)
    for k in range(1, n + 1):
        assert pass_at_k(n, c, k) == pytest.approx(float(enumerated_pass_at_k(outcomes, k)), abs=1e-12)


def test_known_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)      # one right in four: a single draw hits it 1/4 of the time
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)       # 3 of the 6 pairs hold it
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0                     # only 4 wrong: every 5-subset has a right one
    assert pass_at_k(200, 3, 1) == pytest.approx(3 / 200)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=9), st.data())
def test_any_outcomes_match_enumeration(outcomes, data):
    k = data.draw(st.integers(1, len(outcomes)))
    assert pass_at_k(len(outcomes), sum(outcomes), k) == pytest.approx(float(enumerated_pass_at_k(outcomes, k)))


def test_large_n_stays_finite_and_monotone():
    values = [pass_at_k(1000, 7, k) for k in (1, 10, 100, 500)]
    assert all(0 < v <= 1 for v in values) and values == sorted(values)


def test_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_mean_and_table_average_over_problems():
    counts = [(4, 1), (4, 0), (4, 4)]
    assert mean_pass_at_k(counts, [1, 2]) == pytest.approx({1: (0.25 + 0 + 1) / 3, 2: (0.5 + 0 + 1) / 3})
    table = pass_at_k_table([1, 0, 4], 4, [1, 2], device="cpu", world_size=1)
    assert table == pytest.approx({"pass@1": (0.25 + 0 + 1) / 3, "pass@2": (0.5 + 0 + 1) / 3})


def test_response_text_drops_only_the_final_end_token():
    from tiny_chat import tiny_tokenizer

    tok = tiny_tokenizer()
    end = tok.special_id("<|assistant_end|>")
    ids = tok.encode("the answer is 42")
    assert response_text(tok, ids + [end]) == "the answer is 42"
    assert response_text(tok, ids) == "the answer is 42"
