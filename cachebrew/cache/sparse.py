"""Sparse logit targets: what a cache stores of a large-vocabulary teacher distribution, and its estimator.

A dense logit row of a 50k-vocabulary language model is 100 KB per token in fp16; a cache stores K slots per
position instead, each a token id and a probability mass, for the teacher's distribution p = softmax(logits / T)
at the export's temperature T:

``topk``     the K most probable ids with their exact probabilities p_v (computed with the full log-normaliser at
             export). The mass left out, ``tail = 1 - sum_k p_k``, is known at load time, so a loss can treat the
             tail as one bucket. A biased target: the student never sees which tail tokens the teacher favours.
``sampled``  K draws from p with replacement, merged into unique ids with mass count / K (unused slots: id 0,
             mass 0). ``E[count_v / K] = p_v``, so any loss linear in the target (cross-entropy, the forward KL's
             gradient) is an unbiased estimate of the dense one: Anshumann et al. 2025, "Sparse Logit Sampling".
             With a proposal temperature T_q the draws come from q = softmax(logits / T_q) instead (T_q > T: a
             flatter proposal that reaches further into the tail) and each carries the importance weight p_v / q_v:
             mass = count / K * p_v / q_v, still ``E[mass_v] = p_v``; the masses no longer sum to exactly 1.

Draws are reproducible and independent of batching, device count and resume: the uniform variates of row r,
position i, draw j come from a counter-based hash (splitmix64) of (seed, row key, i, j), the row key being a
hash of the row's (id, copy).
"""
from __future__ import annotations

import hashlib

import torch

SPARSE_METHODS = ("topk", "sampled")

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def row_key(row_id: str, copy: int) -> int:
    """A stable 62-bit key for one cached row (its id and augmented-copy number)."""
    return int.from_bytes(hashlib.blake2b(f"{row_id}\x00{copy}".encode(), digest_size=8).digest(), "little") >> 2


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic on negative values)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    z = x + _GOLDEN  # int64 arithmetic wraps around, as splitmix64's uint64 arithmetic does
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def uniforms(keys: list[int], lengths: list[int] | None, k: int, seed: int, device=None) -> torch.Tensor:
    """(sum of lengths, k) float64 uniforms in [0, 1): row r's positions in order, draw j in column j.

    lengths None: one position per row (sequence-level logits)."""
    lengths = [1] * len(keys) if lengths is None else lengths
    key = torch.repeat_interleave(torch.tensor(keys, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64))
    starts = torch.tensor([0] + lengths[:-1], dtype=torch.int64).cumsum(0)
    position = torch.arange(int(sum(lengths)), dtype=torch.int64) - torch.repeat_interleave(
        starts, torch.tensor(lengths, dtype=torch.int64))
    counter = _splitmix64(_splitmix64(key * 1_000_003 + seed) + position)[:, None] * 131 + torch.arange(k)[None, :]
    bits = _shr(_splitmix64(counter), 11)  # 53 random bits
    return (bits.to(torch.float64) / float(1 << 53)).to(device)


_CHUNK_ELEMENTS = 1 << 22  # float32 elements per working tensor (16 MB): reused by the allocator, no page faults


def sparse_targets(logits: torch.Tensor, method: str, k: int, temperature: float = 1.0,
                   u: torch.Tensor | None = None,
                   proposal_temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 (N, k), probability mass float32 (N, k)) for the rows of ``logits`` (N, V).

    ``u``: (N, k) uniforms for ``sampled`` (from `uniforms`); ``proposal_temperature``: draw from
    softmax(logits / proposal_temperature) with importance weights (None: from the target itself).
    Computed in float32 wherever the logits are:
    one softmax and one cumulative sum per row, in chunks of rows so that no (N, V) float32 tensor is ever
    allocated (at V = 32k a batch of 4,096 positions would need 0.5 GB per temporary, and the page faults of
    allocating it cost more than the arithmetic).
    """
    if method not in SPARSE_METHODS:
        raise ValueError(f"sparse method {method!r} is not one of {SPARSE_METHODS}")
    if method == "sampled" and u is None:
        raise ValueError("sampled targets need uniforms (u)")
    n, vocab = logits.shape
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    if proposal_temperature is not None and (method != "sampled" or proposal_temperature == temperature):
        proposal_temperature = None  # top-k draws nothing; a proposal equal to the target is the plain sampler
    parts = [_sparse_chunk(logits[i:i + step].detach(), method, k, temperature,
                           None if u is None else u[i:i + step], proposal_temperature) for i in range(0, n, step)]
    if not parts:
        width = min(k, vocab) if method == "topk" else k
        return (torch.zeros(0, width, dtype=torch.int64, device=logits.device),
                torch.zeros(0, width, dtype=torch.float32, device=logits.device))
    return torch.cat([ids for ids, _ in parts]), torch.cat([mass for _, mass in parts])


def _sparse_chunk(logits: torch.Tensor, method: str, k: int, temperature: float, u: torch.Tensor | None,
                  proposal_temperature: float | None):
    x = logits.float()
    x = x / temperature if temperature != 1.0 else x
    if method == "topk":
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        values, ids = x.topk(min(k, x.shape[-1]), dim=-1)
        return ids, (values - lse).exp()
    if proposal_temperature is None:
        return _draw(x, u)
    xq = logits.float() / proposal_temperature
    ids, freq = _draw(xq, u)
    log_w = (x.gather(1, ids) - torch.logsumexp(x, dim=-1, keepdim=True)) - \
        (xq.gather(1, ids) - torch.logsumexp(xq, dim=-1, keepdim=True))  # log p_v - log q_v
    return ids, torch.where(freq > 0, freq * log_w.exp(), 0.0)  # unused slots stay 0 (even where q_v = 0)


def _draw(x: torch.Tensor, u: torch.Tensor):
    """K draws from softmax(x) per row by inverse CDF, merged: (distinct ids, count / K), unused slots (0, 0).

    One softmax and one in-place cumulative sum per row. (A two-level variant — block sums, then only the drawn
    blocks' cumulative sums — was measured: 10 % faster at K = 12, 5x slower at K = 64, where gathering K blocks
    per position costs more than the one scan it saves.)"""
    cdf = torch.softmax(x, dim=-1).cumsum_(dim=-1)
    draws = torch.searchsorted(cdf, (u.to(cdf.device, torch.float64) * cdf[:, -1:].double()).float())
    draws = draws.clamp_(max=x.shape[-1] - 1).sort(dim=-1).values
    # merge repeated draws: slot g of a row holds its g-th distinct id and how often it was drawn
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    group = first.long().cumsum(dim=-1) - 1
    counts = torch.zeros(draws.shape, dtype=torch.float32, device=draws.device).scatter_add_(
        1, group, torch.ones_like(draws, dtype=torch.float32))
    ids = torch.zeros_like(draws).scatter_(1, group, draws)
    return ids, counts / draws.shape[-1]
