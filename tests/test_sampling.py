"""Poisson sampling at the exact rate (issue 11, item 3): every example joins a batch with
probability q, the double's exact value, for every q in (0, 1], including q far below 2^-24
where a float32 `rand() < q` is off by up to 2^-24 / q (q = 1e-7: 1.19·q).

A frequency test cannot see q = 1e-30, so the decision rule's probability is checked exactly,
with the uniform words forced; statistical tests check the real draws: the inclusion count at
q = 0.01 and the words' top and bottom bits (33 checks at 5 sigma, two-sided, ~6e-7 each:
false alarm < 3e-5 for the file)."""

import math
from fractions import Fraction

import pytest
import torch

from dp_attn import sampling
from dp_attn.sampling import WORD_BITS, PoissonBatchSampler, poisson_mask, rate_words

RATES = [1e-7, 2**-30, 1e-30, 0.3, 1 - 2**-53, 1.0, 5e-324]


@pytest.mark.parametrize("q", RATES)
def test_rate_words_are_the_exact_binary_expansion(q):
    words = rate_words(q)
    assert all(0 <= w < 2**WORD_BITS for w in words) or words == [2**WORD_BITS]
    value = sum(Fraction(w, 2 ** (WORD_BITS * (j + 1))) for j, w in enumerate(words))
    assert value == Fraction(q)


@pytest.mark.parametrize("q", RATES)
def test_inclusion_probability_is_q_exactly(q, monkeypatch):
    """Every outcome of the rule, with the words forced: at level j (the first j words equal
    q's) a word below q's word includes, above excludes, equal goes on; past q's last word the
    example is excluded. One example per outcome class (the class's lowest and highest word),
    each class weighted by its exact probability: the included weight is q, as a Fraction."""
    words = rate_words(q)
    top = 2**WORD_BITS - 1
    streams, weights, want = [], [], []  # an example's forced words, its class's probability
    for j, word in enumerate(words):
        level = Fraction(1, 2 ** (WORD_BITS * j))  # P(the first j words equal q's)
        below = [w for w in (0, word - 1) if 0 <= w < min(word, 2**WORD_BITS)]
        above = [w for w in (word + 1, top) if word < w <= top]
        for group, included, count in (
            (below, True, min(word, 2**WORD_BITS)),
            (above, False, max(top - word, 0)),
        ):
            for w in dict.fromkeys(group):
                streams.append([*words[:j], w])
                weights.append(level * Fraction(count, 2**WORD_BITS) / len(set(group)))
                want.append(included)
    if words != [2**WORD_BITS]:  # U equal to q's expansion: U >= q, excluded
        streams.append(list(words))
        weights.append(Fraction(1, 2 ** (WORD_BITS * len(words))))
        want.append(False)
    assert sum(weights) == 1

    level = [0]

    def forced_words(count, generator):
        """The level's words of the examples still undecided (in index order)."""
        j = level[0]
        level[0] += 1
        drawn = [s[j] for s in streams if len(s) > j and s[:j] == words[:j]]
        assert len(drawn) == count
        return torch.tensor(drawn, dtype=torch.int64)

    monkeypatch.setattr(sampling, "_uniform_words", forced_words)
    included = poisson_mask(len(streams), words, torch.Generator()).tolist()
    assert included == want
    assert sum(w for w, inc in zip(weights, included, strict=True) if inc) == Fraction(q)


def test_words_are_uniform_32_bit():
    words = sampling._uniform_words(200_000, torch.Generator().manual_seed(3))
    assert words.dtype == torch.int64 and words.min() >= 0 and words.max() < 2**32
    # the top and the bottom 4 bits are each uniform over their 16 values (5 sigma per cell)
    n, cells = words.numel(), 16
    for part in (words >> 28, words & 15):
        counts = torch.bincount(part, minlength=cells).double()
        sd = math.sqrt(n / cells * (1 - 1 / cells))
        assert ((counts - n / cells).abs() < 5 * sd).all(), counts


def test_inclusion_frequency_at_a_moderate_rate():
    """q = 0.01 over 10^6 inclusion draws: the count is Binomial(10^6, q)."""
    q, n, steps = 0.01, 100_000, 10
    sampler = PoissonBatchSampler(n, q, steps, generator=torch.Generator().manual_seed(7))
    batches = list(sampler)
    total = sum(len(b) for b in batches)
    draws = n * steps
    assert abs(total - draws * q) < 5 * math.sqrt(draws * q * (1 - q)), total
    assert all(b == sorted(set(b)) and all(0 <= i < n for i in b) for b in batches)


def test_sizes_vary_and_empty_batches_occur():
    """50 examples at q = 0.01: P(empty) = 0.99^50 ≈ 0.6, so 200 batches hold both empty and
    non-empty ones (failing that has probability < 1e-40); q = 1 takes every example."""
    sampler = PoissonBatchSampler(50, 0.01, 200, generator=torch.Generator().manual_seed(1))
    sizes = [len(b) for b in sampler]
    assert 0 in sizes and len(set(sizes)) >= 3
    assert list(PoissonBatchSampler(5, 1.0, 2)) == [[0, 1, 2, 3, 4]] * 2


def test_default_draws_are_fresh_each_epoch():
    sampler = PoissonBatchSampler(1000, 0.5, 2)
    assert list(sampler) != list(sampler)
