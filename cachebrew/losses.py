"""KD and intermediate-feature losses with TextBrewer 0.2.1's numerics on fp32 inputs (exceptions below).

Two deliberate differences, both invisible on fp32 inputs with at least one unmasked position:
16-bit inputs are upcast to float32 before softmax/mse (bf16 softmax loses the teacher's tail), and a
fully masked batch gives a loss of 0 instead of NaN (a NaN would poison the whole run).

Masks weight positions instead of selecting them: where TextBrewer takes ``x[mask]`` (cos_loss, and the
objective's logits_mask) these functions take ``mask=`` and average with `_masked_mean`, so every shape stays
independent of the data and a training step never waits for the host to learn how many positions a mask
keeps (one sync per selection on a GPU). The mean is TextBrewer's up to float rounding: its sum runs over
the masked-out zeros too, so in another order (masked cos_loss: within 2.4e-7 relative, bitwise equal about
half the time; an exact match would need the count on the host, the very sync this removes).

Under ``global_denominators()`` (what `cachebrew distill` uses when ranks split each batch) every batch-wide
denominator is the whole global batch's: the count is summed over the ranks (an all-reduce, no host sync) and
divided by their number, so that DDP's gradient mean gives the one-process gradient of the global batch, whose
rows the ranks hold in unequal token counts. A process group's ranks must then compute the same terms in the
same order (they do: one config). Per-row denominators (fsp's lengths) stay per row.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

__all__ = [
    "kd_mse_loss", "kd_ce_loss", "att_mse_loss", "att_mse_sum_loss", "att_ce_loss", "att_ce_mean_loss",
    "hid_mse_loss", "cos_loss", "cls_mse_loss", "mean_mse_loss", "pkd_loss", "fsp_loss", "mmd_loss",
    "inc_kd_ce_loss", "inc_kd_kl_loss", "inc_kd_mse_loss", "inc_mse_feature_loss", "inc_l1_feature_loss",
    "inc_kl_feature_loss", "sparse_kd_loss",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _f32(*tensors):
    return [t.float() if t.dtype in _LOW_PRECISION else t for t in tensors]


_GLOBAL_DENOMINATORS: dict = {}  # set by global_denominators(): {"group": process group or None}


@contextlib.contextmanager
def global_denominators(group=None):
    """Inside: batch-wide loss denominators are the global batch's (summed over `group`'s ranks / their number).

    Without an initialized process group (one process) it changes nothing."""
    dist = torch.distributed
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    previous = dict(_GLOBAL_DENOMINATORS)
    _GLOBAL_DENOMINATORS.clear()
    if active:
        _GLOBAL_DENOMINATORS["group"] = group
    try:
        yield
    finally:
        _GLOBAL_DENOMINATORS.clear()
        _GLOBAL_DENOMINATORS.update(previous)


def _count(x: torch.Tensor) -> torch.Tensor:
    """The denominator of a batch-wide mean; clamped so an all-masked batch yields 0, not 0/0."""
    if _GLOBAL_DENOMINATORS:
        group = _GLOBAL_DENOMINATORS["group"]
        x = x.detach().to(torch.float32).clone()  # exact for counts below 2**24
        torch.distributed.all_reduce(x, group=group)
        x = x / torch.distributed.get_world_size(group)
        return x.clamp_min(1.0 / torch.distributed.get_world_size(group))
    return x.clamp_min(1)


def global_label_mean(loss: torch.Tensor, labels: torch.Tensor | None, shifted: bool = False) -> torch.Tensor:
    """A model's own label loss (a mean over this rank's labelled positions) as its share of the global mean.

    Hugging Face models average cross-entropy over the labels that are not -100 (`shifted`: a causal LM's,
    which predict the next token); under ``global_denominators()`` that local mean becomes
    ``sum / (global count / ranks)``. Outside it, or without labels, the loss is returned as it is."""
    if not _GLOBAL_DENOMINATORS or labels is None:
        return loss
    valid = labels[..., 1:] != -100 if shifted and labels.dim() > 1 else labels != -100
    n = valid.sum()
    return loss * n / _count(n)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``values.mean()``, or with a (batch, len) mask the mean over the kept positions' elements: TextBrewer's
    ``values[mask].mean()`` without a data-dependent shape. ``values`` is (batch, len, *per_position).

    where() rather than a product: a non-finite value at a padding position stays out of the sum. The count
    stays a device tensor (clamped: 0 for an all-masked batch), so nothing here waits for the host.
    """
    if mask is None:
        if _GLOBAL_DENOMINATORS:  # this rank's rows may be fewer than the global batch's share
            return values.sum() / _count(torch.tensor(values.numel(), device=values.device))
        return values.mean()
    keep = mask.to(device=values.device, dtype=torch.bool)
    per_position = math.prod(values.shape[keep.dim():])  # elements averaged per position
    keep_b = keep.reshape(keep.shape + (1,) * (values.dim() - keep.dim()))
    total = torch.where(keep_b, values, 0).sum()
    return total / _count(keep.sum() * per_position)


def _scaled(logits_S, logits_T, temperature):
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        temperature = temperature.unsqueeze(-1)
    logits_S, logits_T = _f32(logits_S, logits_T)
    return logits_S / temperature, logits_T / temperature


# The KD losses take an optional (batch, len) ``mask`` for (batch, len, classes) logits: the positions a
# logits_mask keeps, averaged as TextBrewer averages the rows it selects (DistillationLoss passes it).

def kd_mse_loss(logits_S, logits_T, temperature=1, mask=None):
    """MSE between temperature-scaled logits; temperature may be a float or a per-example tensor."""
    beta_logits_S, beta_logits_T = _scaled(logits_S, logits_T, temperature)
    if mask is None:
        return F.mse_loss(beta_logits_S, beta_logits_T)
    return _masked_mean(F.mse_loss(beta_logits_S, beta_logits_T, reduction="none"), mask)


def kd_ce_loss(logits_S, logits_T, temperature=1, mask=None):
    """Cross-entropy of the student's tempered distribution against the teacher's (Hinton KD)."""
    beta_logits_S, beta_logits_T = _scaled(logits_S, logits_T, temperature)
    p_T = F.softmax(beta_logits_T, dim=-1)
    return -_masked_mean((p_T * F.log_softmax(beta_logits_S, dim=-1)).sum(dim=-1), mask)


def kd_kl_loss(logits_S, logits_T, temperature=1, mask=None):
    """KL(teacher || student) of the tempered distributions, batch mean: kd_ce_loss minus the teacher's entropy,
    so the same gradient; its value reaches 0 when the student matches (INC's 'KL' KD loss)."""
    beta_logits_S, beta_logits_T = _scaled(logits_S, logits_T, temperature)
    log_p_T = F.log_softmax(beta_logits_T, dim=-1)
    return _masked_mean((log_p_T.exp() * (log_p_T - F.log_softmax(beta_logits_S, dim=-1))).sum(dim=-1), mask)


def att_mse_loss(attention_S, attention_T, mask=None):
    """MSE between attention maps (batch, heads, len, len); without a mask, scores <= -1e-3 count as padding."""
    attention_S, attention_T = _f32(attention_S, attention_T)
    if mask is None:
        attention_S_select = torch.where(attention_S <= -1e-3, torch.zeros_like(attention_S), attention_S)
        attention_T_select = torch.where(attention_T <= -1e-3, torch.zeros_like(attention_T), attention_T)
        return F.mse_loss(attention_S_select, attention_T_select)
    mask = mask.to(attention_S).unsqueeze(1).expand(-1, attention_S.size(1), -1)  # (bs, heads, len)
    valid_count = torch.pow(mask.sum(dim=2), 2).sum()
    sq = F.mse_loss(attention_S, attention_T, reduction="none") * mask.unsqueeze(-1) * mask.unsqueeze(2)
    return sq.sum() / _count(valid_count)


def att_mse_sum_loss(attention_S, attention_T, mask=None):
    """Like att_mse_loss, after summing 4-D maps over heads."""
    attention_S, attention_T = _f32(attention_S, attention_T)
    if attention_S.dim() == 4:
        attention_T = attention_T.sum(dim=1)
        attention_S = attention_S.sum(dim=1)
    if mask is None:
        attention_S_select = torch.where(attention_S <= -1e-3, torch.zeros_like(attention_S), attention_S)
        attention_T_select = torch.where(attention_T <= -1e-3, torch.zeros_like(attention_T), attention_T)
        return F.mse_loss(attention_S_select, attention_T_select)
    mask = mask.to(attention_S)
    valid_count = torch.pow(mask.sum(dim=1), 2).sum()
    sq = F.mse_loss(attention_S, attention_T, reduction="none") * mask.unsqueeze(-1) * mask.unsqueeze(1)
    return sq.sum() / _count(valid_count)


def att_ce_loss(attention_S, attention_T, mask=None):
    """Cross-entropy between row-softmaxed attention scores (pre-softmax scores expected)."""
    attention_S, attention_T = _f32(attention_S, attention_T)
    probs_T = F.softmax(attention_T, dim=-1)
    if mask is None:
        probs_T_select = torch.where(attention_T <= -1e-3, torch.zeros_like(attention_T), probs_T)
        return -((probs_T_select * F.log_softmax(attention_S, dim=-1)).sum(dim=-1)).mean()
    mask = mask.to(attention_S).unsqueeze(1).expand(-1, attention_S.size(1), -1)  # (bs, heads, len)
    ce = (probs_T * F.log_softmax(attention_S, dim=-1) * mask.unsqueeze(2)).sum(dim=-1) * mask
    return -ce.sum() / _count(mask.sum())


def att_ce_mean_loss(attention_S, attention_T, mask=None):
    """Like att_ce_loss, after averaging 4-D maps over heads."""
    attention_S, attention_T = _f32(attention_S, attention_T)
    if attention_S.dim() == 4:
        attention_S = attention_S.mean(dim=1)
        attention_T = attention_T.mean(dim=1)
    probs_T = F.softmax(attention_T, dim=-1)
    if mask is None:
        probs_T_select = torch.where(attention_T <= -1e-3, torch.zeros_like(attention_T), probs_T)
        return -((probs_T_select * F.log_softmax(attention_S, dim=-1)).sum(dim=-1)).mean()
    mask = mask.to(attention_S)
    ce = (probs_T * F.log_softmax(attention_S, dim=-1) * mask.unsqueeze(1)).sum(dim=-1) * mask
    return -ce.sum() / _count(mask.sum())


def hid_mse_loss(state_S, state_T, mask=None):
    """MSE between hidden states (batch, len, dim), averaged over unmasked positions."""
    state_S, state_T = _f32(state_S, state_T)
    if mask is None:
        return F.mse_loss(state_S, state_T)
    mask = mask.to(state_S)
    valid_count = mask.sum() * state_S.size(-1)
    return (F.mse_loss(state_S, state_T, reduction="none") * mask.unsqueeze(-1)).sum() / _count(valid_count)


def cos_loss(state_S, state_T, mask=None):
    """Cosine embedding loss between hidden states at unmasked positions (DistilBERT).

    TextBrewer masked_selects the unmasked positions; here every position gets its loss and the mask weights
    them (`_masked_mean`): the same mean up to float rounding, with no shape that depends on the mask."""
    state_S, state_T = _f32(state_S, state_T)
    rows_S = state_S.reshape(-1, state_S.size(-1))
    rows_T = state_T.reshape(-1, state_T.size(-1))
    target = rows_S.new_ones(rows_S.size(0))
    if mask is None:
        return F.cosine_embedding_loss(rows_S, rows_T, target, reduction="mean")
    per_position = F.cosine_embedding_loss(rows_S, rows_T, target, reduction="none")
    return _masked_mean(per_position.view(state_S.shape[:-1]), mask)


def cls_mse_loss(state_S, state_T, mask=None):
    """MSE between the first position's vectors ([CLS] / <s>; TinyBERT's prediction-layer-free variant): it pairs
    no other positions, so teacher and student may tokenize the text differently. The mask is ignored."""
    state_S, state_T = _f32(state_S, state_T)
    cls_S = state_S[:, 0] if state_S.dim() == 3 else state_S
    cls_T = state_T[:, 0] if state_T.dim() == 3 else state_T
    return F.mse_loss(cls_S, cls_T)


def mean_mse_loss(state_S, state_T, mask=None):
    """MSE between each row's mean hidden state over its unmasked positions: the mean pooling sentence encoders
    such as all-mpnet-base-v2 are trained with, so it matches what such a teacher's embedding is. With a teacher of
    another tokenizer the teacher's states arrive aligned to the student's tokens by character spans (each student
    token the mean of the teacher tokens it overlaps) and the mask is the student's aligned positions, so the pooled
    teacher vector is the teacher's tokens weighted by how many student tokens overlap them."""
    state_S, state_T = _f32(state_S, state_T)
    if mask is None:
        return F.mse_loss(state_S.mean(dim=1), state_T.mean(dim=1))
    weights = mask.to(state_S).unsqueeze(-1)
    count = weights.sum(dim=1).clamp_min(1)
    return F.mse_loss((state_S * weights).sum(dim=1) / count, (state_T * weights).sum(dim=1) / count)


def pkd_loss(state_S, state_T, mask=None):
    """Squared distance of L2-normalised [CLS] vectors (BERT-PKD); the mask is ignored."""
    state_S, state_T = _f32(state_S, state_T)
    cls_T = state_T[:, 0] if state_T.dim() == 3 else state_T
    cls_S = state_S[:, 0] if state_S.dim() == 3 else state_S
    normed_cls_T = cls_T / torch.norm(cls_T, dim=1, keepdim=True)
    normed_cls_S = cls_S / torch.norm(cls_S, dim=1, keepdim=True)
    return (normed_cls_S - normed_cls_T).pow(2).sum(dim=-1).mean()


def fsp_loss(state_S, state_T, mask=None):
    """MSE between (dim x dim) Gram matrices of two layers each (FSP); takes two-element lists."""
    S0, S1 = _f32(*state_S)
    T0, T1 = _f32(*state_T)
    if mask is None:
        gram_S = torch.bmm(S0.transpose(1, 2), S1) / S1.size(1)
        gram_T = torch.bmm(T0.transpose(1, 2), T1) / T1.size(1)
    else:
        mask = mask.to(S0).unsqueeze(-1)
        lengths = mask.sum(dim=1, keepdim=True).clamp_min(1)  # per row: not a batch-wide denominator
        S0, S1, T0, T1 = S0 * mask, S1 * mask, T0 * mask, T1 * mask
        gram_S = torch.bmm(S0.transpose(1, 2), S1) / lengths
        gram_T = torch.bmm(T0.transpose(1, 2), T1) / lengths
    return F.mse_loss(gram_S, gram_T)


def mmd_loss(state_S, state_T, mask=None):
    """MSE between (len x len) similarity matrices of two layers each (NST); dims of S and T may differ."""
    S0, S1 = _f32(*state_S)
    T0, T1 = _f32(*state_T)
    if mask is None:
        gram_S = torch.bmm(S0, S1.transpose(1, 2)) / S1.size(2)
        gram_T = torch.bmm(T0, T1.transpose(1, 2)) / T1.size(2)
        return F.mse_loss(gram_S, gram_T)
    mask = mask.to(S0)
    valid_count = torch.pow(mask.sum(dim=1), 2).sum()
    # TextBrewer divides by the sequence length (size(1)) in the masked branch; kept for parity.
    gram_S = torch.bmm(S0, S1.transpose(1, 2)) / S1.size(1)
    gram_T = torch.bmm(T0, T1.transpose(1, 2)) / T1.size(1)
    sq = F.mse_loss(gram_S, gram_T, reduction="none") * mask.unsqueeze(-1) * mask.unsqueeze(1)
    return sq.sum() / _count(valid_count)


# -- Intel Neural Compressor's numerics (neural-compressor 2.x, compression/distillation/criterions.py) --------------
# INC scales the KD term by T**2 and averages its KL and MSE over every element, not per example; its
# intermediate-layer losses ignore padding. These are the losses INC's criterion configs select
# (cachebrew.hf / cachebrew.inc), registered as 'inc_*' so that a cachebrew YAML config can name them too.

def _t_squared(temperature):
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        return temperature.float() ** 2  # per example, matching the per-example loss it multiplies
    return temperature ** 2


def inc_kd_ce_loss(logits_S, logits_T, temperature=1, mask=None):
    """INC 'CE': ``(-softmax(t/T) * log_softmax(s/T)).sum(-1).mean() * T**2``."""
    s, t = _scaled(logits_S, logits_T, temperature)
    per_example = -(F.softmax(t, dim=-1) * F.log_softmax(s, dim=-1)).sum(dim=-1)
    return _masked_mean(per_example * _t_squared(temperature), mask)


def inc_kd_kl_loss(logits_S, logits_T, temperature=1, mask=None):
    """INC 'KL': ``F.kl_div(log_softmax(s/T), softmax(t/T)) * T**2`` with torch's default 'mean' reduction,
    i.e. averaged over batch x classes (INC's choice; TextBrewer-style 'kl' averages over the batch only)."""
    s, t = _scaled(logits_S, logits_T, temperature)
    p_T = F.softmax(t, dim=-1)
    pointwise = torch.xlogy(p_T, p_T) - p_T * F.log_softmax(s, dim=-1)  # kl_div's terms, 0 where p_T is 0
    t2 = _t_squared(temperature)
    if isinstance(t2, torch.Tensor) and t2.dim() > 0:
        t2 = t2.unsqueeze(-1)
    return _masked_mean(pointwise * t2, mask)


def inc_kd_mse_loss(logits_S, logits_T, temperature=1, mask=None):
    """INC 'MSE': ``MSELoss()(s/T, t/T) * T**2``."""
    s, t = _scaled(logits_S, logits_T, temperature)
    t2 = _t_squared(temperature)
    if isinstance(t2, torch.Tensor) and t2.dim() > 0:
        t2 = t2.unsqueeze(-1)
    return _masked_mean(F.mse_loss(s, t, reduction="none") * t2, mask)


def inc_mse_feature_loss(feature_S, feature_T, mask=None):
    """INC's intermediate 'MSE': ``MSELoss()`` over every element, padding included (INC hooks see no mask)."""
    feature_S, feature_T = _f32(feature_S, feature_T)
    return F.mse_loss(feature_S, feature_T)


def inc_l1_feature_loss(feature_S, feature_T, mask=None):
    """INC's intermediate 'L1': ``L1Loss()`` over every element, padding included."""
    feature_S, feature_T = _f32(feature_S, feature_T)
    return F.l1_loss(feature_S, feature_T)


def _as_probabilities(x):
    # INC: softmax a feature whose last-dim sums are not all within 0.2 of 1 (attention maps already are).
    # torch.where on the one flag keeps it on the device: no host sync per step.
    not_prob = ((x.sum(dim=-1) - 1.0).abs() > 0.2).any()
    return torch.where(not_prob, F.softmax(x, dim=-1), x)


def inc_kl_feature_loss(feature_S, feature_T, mask=None):
    """INC's intermediate 'KL': ``KLDivLoss()(log(p_S + 1e-9), p_T)`` averaged over every element, where a
    feature that is not already a distribution over its last dimension is softmaxed first."""
    feature_S, feature_T = _f32(feature_S, feature_T)
    log_p_S = torch.log(_as_probabilities(feature_S) + 1e-9)
    p_T = _as_probabilities(feature_T)
    return (torch.xlogy(p_T, p_T) - p_T * log_p_S).mean()


# -- KD against sparse targets (cache/sparse.py): never a dense teacher tensor ---------------------------------------

def sparse_kd_loss(logits_S, target: dict, temperature=1, kind: str = "ce", mask=None):
    """KD of dense student logits (N, V) against sparse teacher targets {ids, mass (N, K)[, tail (N,)]}.

    Per-token targets are (B, L, V) against (B, L, K) with ``mask`` (B, L): the mean over the kept positions
    (a causal LM's padding: id 0, mass 0, so every position's loss is finite and the mask drops it).

    The student's log-probabilities are gathered at the stored ids after one log-normaliser per row, so
    the cost is (N, V) for the student's own softmax and (N, K) for the target:
        ce:  -sum_k mass_k * log q(id_k)          (sampled: an unbiased estimate of the dense soft CE, and of
                                                  its gradient, which is the forward KL's)
             top-k adds the tail as one bucket:  - tail * log(1 - sum_k q(id_k))
        kl:  ce + sum_k mass_k log mass_k (+ tail log tail): the same gradient, 0 when the student matches
    """
    s = _f32(logits_S)[0] / temperature
    log_q = s.gather(-1, target["ids"]) - torch.logsumexp(s, dim=-1, keepdim=True)
    mass = target["mass"]
    ce = -(mass * log_q).sum(dim=-1)
    tail = target.get("tail")
    if tail is not None:
        q_tail = (1.0 - log_q.exp().sum(dim=-1)).clamp_min(1e-12)
        ce = ce - tail * torch.log(q_tail)
    if kind == "kl":
        ce = ce + torch.xlogy(mass, mass).sum(dim=-1) + (torch.xlogy(tail, tail) if tail is not None else 0.0)
    elif kind != "ce":
        raise ValueError(f"sparse KD loss kind {kind!r} is not 'ce' or 'kl'")
    return _masked_mean(ce, mask)


def cross_tokenizer_kd_loss(logits_S, target: dict, temperature=1, mask=None, uld: str = "unmatched"):
    """KD of a student against a teacher with another tokenizer: the teacher's sparse next-token targets carried
    onto the student's positions and vocabulary (components/loader.py ``CacheBatches._aligned``: ``ids`` in the
    student's vocabulary, ``matched`` where a teacher token's text is a student token's, ``mass``, ``tail``).

    Two parts, after GOLD (TRL's cross-tokenizer distillation), which pairs exact vocabulary matches with ULD
    (Boizard et al., arXiv 2402.12030) for the rest:

    - **matched mass**, as KL: each matched token's probability, and everything else lumped into one bucket
      (``1 - sum matched``, which holds the unmatched slots and a top-k tail): the forward KL of those coarse
      distributions, ``sum_m p_m log(p_m / q_m) + p_rest log(p_rest / q_rest)``;
    - **unmatched mass**, as ULD: the teacher's u unmatched slot probabilities sorted, against the student's u
      largest probabilities among tokens no matched slot names, sorted: their L1 distance (Wasserstein-1 between
      the two sorted distributions, which needs no token correspondence), smoothed below `ULD_SMOOTHING`. A top-k
      cache's tail names no token and asks nothing of the student's other probabilities (``uld="unmatched"``).
      ``uld="zero_padded"`` compares the student's K largest other probabilities (K: the cache's slots) with the
      teacher's unmatched ones padded with zeros, as ULD pads the shorter vocabulary: slots the teacher spent on
      matched tokens or left to a top-k tail then pull the student's largest other probabilities towards 0 (with a
      sampled cache, whose slots hold all the mass, it is still 0 at the teacher's distribution; with a top-k tail
      it is not: it asks the student to put less than the teacher on tokens the teacher did not name).

    Both are 0, with a vanishing gradient, when the student's distribution equals the teacher's carried one.
    Averaged over the positions ``mask`` keeps (those aligned with a teacher position).
    """
    s = _f32(logits_S)[0] / temperature
    log_q = F.log_softmax(s, dim=-1)
    ids, mass = target["ids"], target["mass"]
    matched = target["matched"].to(mass.dtype)
    log_q_k = log_q.gather(-1, ids)
    p_m = mass * matched
    p_rest = (1.0 - p_m.sum(dim=-1)).clamp_min(0.0)
    q_rest = (1.0 - (log_q_k.exp() * matched).sum(dim=-1)).clamp_min(1e-12)
    kl = (torch.xlogy(p_m, p_m) - p_m * log_q_k).sum(dim=-1) + torch.xlogy(p_rest, p_rest) - p_rest * torch.log(q_rest)
    named = torch.zeros_like(log_q).scatter_add_(-1, ids, matched) > 0
    k = ids.size(-1)
    q_other = torch.topk(log_q.masked_fill(named, float("-inf")).exp(), k, dim=-1).values
    p_other = torch.sort(mass * (1.0 - matched), dim=-1, descending=True).values
    # as many of the student's as the teacher has unmatched slots with mass: a top-k cache's tail and its matched
    # slots name no unmatched token, so they ask nothing of the student's other probabilities
    distance = F.smooth_l1_loss(q_other, p_other, reduction="none", beta=ULD_SMOOTHING)
    if uld == "unmatched":
        distance = distance * (p_other > 0)
    elif uld not in ULD_VARIANTS:
        raise ValueError(f"cross-tokenizer ULD {uld!r} is not {' or '.join(map(repr, ULD_VARIANTS))}")
    return _masked_mean(kl + distance.sum(dim=-1), mask)


# What cross_tokenizer_kd_loss's ULD term compares the student's probabilities outside the matched tokens with
# (DistillationConfig.cross_tokenizer_uld validates against it)
ULD_VARIANTS = ("unmatched", "zero_padded")

# Below this distance the ULD term is quadratic (Huber): the L1 distance elsewhere, but its gradient goes to 0 as
# the student matches, instead of staying +-1 on float rounding
ULD_SMOOTHING = 1e-3
