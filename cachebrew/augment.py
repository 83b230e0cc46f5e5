"""Text augmentation for distillation data (TextBrewer's five operations), reproducible by seed.

Each function takes ``rng``: None uses numpy's global RNG (TextBrewer's behaviour), an int seeds a
fresh ``np.random.RandomState``, and a RandomState or Generator is used as given. With
``rng=np.random.RandomState(s)`` the results equal TextBrewer's after ``np.random.seed(s)``.
"""
from __future__ import annotations

import numpy as np


class _Rng:
    """The three draws these functions need, over either numpy RNG API."""

    def __init__(self, rng):
        if rng is None:
            rng = np.random.mtrand._rand
        elif isinstance(rng, (int, np.integer)):
            rng = np.random.RandomState(int(rng))
        elif not isinstance(rng, (np.random.RandomState, np.random.Generator)):
            raise TypeError(f"rng must be None, an int seed, a RandomState or a Generator, got {type(rng).__name__}")
        self.rng = rng

    def rand(self):
        return self.rng.random() if isinstance(self.rng, np.random.Generator) else self.rng.random_sample()

    def randint(self, low, high):
        return self.rng.integers(low, high) if isinstance(self.rng, np.random.Generator) else self.rng.randint(low, high)

    def __getattr__(self, name):  # choice, binomial: same signature in both APIs
        return getattr(self.rng, name)


def masking(tokens, p=0.1, mask="[MASK]", rng=None):
    """A copy of `tokens` with each element replaced by `mask` with probability `p`."""
    r = _Rng(rng)
    outputs = list(tokens)
    for i in range(len(tokens)):
        if r.rand() < p:
            outputs[i] = mask
    return outputs


def deleting(tokens, p=0.1, rng=None):
    """A copy of `tokens` with each element dropped with probability `p`."""
    choice = _Rng(rng).binomial(1, 1 - p, len(tokens))
    return [tokens[i] for i in range(len(tokens)) if choice[i] == 1]


def n_gram_sampling(tokens, p_ng=(0.2, 0.2, 0.2, 0.2, 0.2), l_ng=(1, 2, 3, 4, 5), rng=None):
    """A random span of `tokens` whose length is drawn from `l_ng` with probabilities `p_ng`."""
    r = _Rng(rng)
    span_length = r.choice(list(l_ng), p=list(p_ng))
    start_position = max(0, r.randint(0, len(tokens) - span_length + 1)) if len(tokens) >= span_length else 0
    return list(tokens[start_position:start_position + span_length])


def short_disorder(tokens, p=(0.9, 0.1, 0, 0, 0), rng=None):
    """Locally permute tokens: at each position keep `abc` or make it bac / cba / cab / bca with probabilities `p`."""
    r = _Rng(rng)
    i = 0
    outputs = list(tokens)
    n = len(tokens)
    while i < n - 1:
        permutation = r.choice([0, 1, 2, 3, 4], p=list(p))
        if permutation != 0 and i == n - 2:
            outputs[i], outputs[i + 1] = outputs[i + 1], outputs[i]
            i += 2
        elif permutation == 1:
            outputs[i], outputs[i + 1] = outputs[i + 1], outputs[i]
            i += 2
        elif permutation == 2:
            outputs[i], outputs[i + 2] = outputs[i + 2], outputs[i]
            i += 3
        elif permutation == 3:
            outputs[i], outputs[i + 1], outputs[i + 2] = outputs[i + 2], outputs[i], outputs[i + 1]
            i += 3
        elif permutation == 4:
            outputs[i], outputs[i + 1], outputs[i + 2] = outputs[i + 1], outputs[i + 2], outputs[i]
            i += 3
        else:
            i += 1
    return outputs


def long_disorder(tokens, p=0.1, length=20, rng=None):
    """Swap the two halves of spans of `length` tokens (a fraction of the sequence if length <= 1) with probability `p`."""
    r = _Rng(rng)
    outputs = list(tokens)
    if int(length) <= 1:
        length = len(tokens) * length
    length = (int(length) + 1) // 2 * 2
    if length == 0:
        return outputs
    i = 0
    while i <= len(outputs) - length:
        if r.rand() < p:
            half = length // 2
            outputs[i:i + half], outputs[i + half:i + length] = outputs[i + half:i + length], outputs[i:i + half]
            i += length
        else:
            i += 1
    return outputs


AUGMENTATIONS = {
    "masking": masking,
    "deleting": deleting,
    "n_gram_sampling": n_gram_sampling,
    "short_disorder": short_disorder,
    "long_disorder": long_disorder,
}
