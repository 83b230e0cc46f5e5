"""Augmentation: TextBrewer's results under the same seed, and reproducible with an explicit RNG."""
import numpy as np
import pytest

from cachebrew import data_utils as du

TOKENS = [f"t{i}" for i in range(30)]
CASES = [
    ("masking", dict(p=0.3)),
    ("deleting", dict(p=0.3)),
    ("n_gram_sampling", dict()),
    ("short_disorder", dict(p=[0.5, 0.2, 0.1, 0.1, 0.1])),
    ("long_disorder", dict(p=0.3, length=4)),
    ("long_disorder", dict(p=0.5, length=0.4)),
]


@pytest.mark.parametrize("name,kwargs", CASES)
def test_equals_textbrewer_with_same_seed(textbrewer, name, kwargs):
    import textbrewer.data_utils as tdu

    for seed in range(5):
        np.random.seed(seed)
        theirs = getattr(tdu, name)(list(TOKENS), **kwargs)
        ours = getattr(du, name)(list(TOKENS), **kwargs, rng=np.random.RandomState(seed))
        assert ours == theirs
        np.random.seed(seed)
        assert getattr(du, name)(list(TOKENS), **kwargs) == theirs  # rng=None: the global RNG, like TextBrewer


@pytest.mark.parametrize("name,kwargs", CASES)
def test_reproducible_and_seed_dependent(name, kwargs):
    a = [getattr(du, name)(TOKENS, **kwargs, rng=s) for s in range(8)]
    b = [getattr(du, name)(TOKENS, **kwargs, rng=s) for s in range(8)]
    assert a == b
    assert len({tuple(x) for x in a}) > 1  # different seeds give different augmentations
    g1 = [getattr(du, name)(TOKENS, **kwargs, rng=np.random.default_rng(3)) for _ in range(2)]
    assert g1[0] == g1[1]
    assert TOKENS == [f"t{i}" for i in range(30)]  # input untouched


def test_semantics():
    out = du.masking(TOKENS, p=1.0, rng=0)
    assert out == ["[MASK]"] * 30
    assert du.deleting(TOKENS, p=1.0, rng=0) == []
    span = du.n_gram_sampling(TOKENS, p_ng=[0, 0, 1], l_ng=[1, 2, 3], rng=0)
    assert len(span) == 3 and " ".join(span) in " ".join(TOKENS)
    assert du.long_disorder(list(range(11)), p=1, length=0.4, rng=0) == [2, 3, 0, 1, 6, 7, 4, 5, 8, 9, 10]
    assert sorted(du.short_disorder(TOKENS, p=[0, 0, 0, 0, 1], rng=0)) == sorted(TOKENS)


def test_bad_rng():
    with pytest.raises(TypeError, match="rng must be"):
        du.masking(TOKENS, rng="seed")
