"""Independent naive references for the objectives tests, written from docs/objectives.md with loops and autograd.

Nothing here imports `objectives`: every formula is re-derived per sequence in float64.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DT = torch.float64


def random_batch(seed: int, max_len: int = 9):
    """Random groups (2-5 samples, 2-4 groups), random prompt offsets and response lengths, never-zero values."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 6, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
    group_ids = torch.tensor(sum(([7 * k + 3] * s for k, s in enumerate(sizes)), []))  # non-contiguous ids
    b = len(group_ids)
    mask = torch.zeros(b, max_len, dtype=torch.bool)
    for i in range(b):
        start = int(torch.randint(0, 3, (1,), generator=g))
        length = int(torch.randint(1, max_len - start + 1, (1,), generator=g))
        mask[i, start:start + length] = True
    rewards = torch.randint(0, 2, (b,), generator=g).to(DT)
    for k, s in enumerate(sizes):  # every group mixed, so r_hat is in (0, 1)
        first = sum(sizes[:k])
        rewards[first], rewards[first + 1] = 1.0, 0.0
    logp = -(0.05 + 2 * torch.rand(b, max_len, generator=g, dtype=DT))
    old = logp + 0.3 * torch.randn(b, max_len, generator=g, dtype=DT)
    ref = logp + 0.3 * torch.randn(b, max_len, generator=g, dtype=DT)
    return dict(logp=logp, old=old, ref=ref, mask=mask, rewards=rewards, group_ids=group_ids, g=g)


def to_packed(x, mask):
    """Padded [B,T] -> packed [N] keeping each row up to its last counted token (prompt tokens stay, unmasked)."""
    t = torch.arange(mask.shape[1])
    last = torch.where(mask, t, -1).max(1).values
    keep = t[None, :] <= last[:, None]
    seq = torch.arange(mask.shape[0])[:, None].expand_as(mask)[keep]
    return x[keep], mask[keep], seq


def groups(ids):
    return [torch.nonzero(ids == v).flatten().tolist() for v in ids.unique()]


def advantages(rewards, ids, kind, unbiased=True, eps=1e-6):
    out = torch.zeros_like(rewards)
    for members in groups(ids):
        r = rewards[members]
        g = len(members)
        for k, i in enumerate(members):
            if kind == "drgrpo":
                out[i] = r[k] - r.mean()
            elif kind == "rloo":
                out[i] = r[k] - (r.sum() - r[k]) / (g - 1)
            else:
                std = r.std(unbiased=unbiased) if g > 1 or not unbiased else torch.tensor(1.0, dtype=DT)
                out[i] = (r[k] - (r.mean() if g > 1 else 0)) / (std + eps)
    return out


def aggregate(x, mask, agg, constant=None):
    m = mask.to(x.dtype)
    lengths = m.sum(1)
    rows = lengths > 0
    if agg == "token_mean":
        return (x * m).sum() / m.sum()
    if agg == "sum_const":
        return (x * m).sum() / constant
    per_row = (x * m).sum(1)
    if agg == "seq_mean_token_mean":
        return (per_row[rows] / lengths[rows]).sum() / rows.sum()
    return (per_row[rows] / constant).sum() / rows.sum()


def k3(logp, ref):
    d = ref - logp
    return torch.exp(d) - d - 1


def ppo(logp, old, adv, mask, eps_low, eps_high, agg, constant=None, ref=None, beta=0.0):
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    x = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if ref is not None:
        x = x + beta * k3(logp, ref)
    return aggregate(x, mask, agg, constant)


def r_hat(rewards, ids):
    out = torch.zeros_like(rewards)
    for members in groups(ids):
        out[members] = (rewards[members] > 0).to(DT).mean()
    return out


def nft(logp, old, rewards, ids, mask, eps, weight, constant=1000.0, neg_weight=1.0, agg="sum_const"):
    rate = r_hat(rewards, ids).clamp(0.02, 0.98)[:, None]
    omega = {"1": torch.ones_like(rate), "1-r": 1 - rate, "sqrt": ((1 - rate) / rate).sqrt()}[weight]
    log_ratio = (logp - old).clamp(max=10)
    proxy = (1 - rate * torch.exp(log_ratio)) / (1 - rate)
    proxy = proxy + (proxy.clamp(min=eps) - proxy).detach()  # clamp_preserve_grad
    r = (rewards > 0).to(DT)[:, None]
    x = omega * (-r * log_ratio - neg_weight * (1 - r) * torch.log(proxy))
    return aggregate(x, mask, agg, constant)


def oreal(logp, rewards, adv, mask, scores=None, ref=None, beta=0.01, eta=0.5):
    r = (rewards > 0).to(DT)
    m = mask.to(DT)
    n_pos, n_neg, n_all = (m * r[:, None]).sum(), (m * (1 - r[:, None])).sum(), m.sum()
    total = logp.new_zeros(())
    for i in range(len(r)):
        w_pos = w_neg = torch.ones(mask.shape[1], dtype=DT)
        if scores is not None:
            tokens = torch.nonzero(mask[i]).flatten().tolist()
            w_bar = torch.zeros(mask.shape[1], dtype=DT)
            for k, t in enumerate(tokens):
                w_bar[t] = scores[i, tokens[:k + 1]].mean()
            p = torch.sigmoid(w_bar)
            w_pos, w_neg = (2 * p - 1).clamp(min=0), (1 - 2 * p).clamp(min=0)
        row = m[i]
        if r[i] > 0:
            total = total + adv[i] * (w_pos * -logp[i] * row).sum() / n_pos
        else:
            total = total - eta * (torch.exp(logp[i] - logp[i].detach()) * adv[i] * w_neg * row).sum() / n_neg
        if ref is not None:
            total = total + beta * (k3(logp[i], ref[i]) * row).sum() / n_all
    return total


def seq_sums(logp, mask):
    return (logp * mask).sum(1), mask.to(DT).sum(1)


def redi(lw, ll, mw, ml, alpha):
    sw, nw = seq_sums(lw, mw)
    sl, nl = seq_sums(ll, ml)
    return (-sw / nw + alpha * sl / nl).mean()


def dpo(lw, ll, mw, ml, ref_w, ref_l, beta):
    sw, _ = seq_sums(lw, mw)
    sl, _ = seq_sums(ll, ml)
    return -F.logsigmoid(beta * ((sw - ref_w) - (sl - ref_l))).mean()


def simpo(lw, ll, mw, ml, beta, gamma):
    sw, nw = seq_sums(lw, mw)
    sl, nl = seq_sums(ll, ml)
    return -F.logsigmoid(beta * (sw / nw - sl / nl) - gamma).mean()


def jepo(logp, cot, ans, ids, ref, beta, beta_sup, multi, valid=None, fmt=None):
    """Mean over groups of -(1/n) sum sg[A~ + A~ref] sum_cot l - beta_sup bound + (beta/n) sum k3 (n = group size),
    A~ = clip(A/std(A), -1, 1) over valid samples, A~ref the same for the leave-one-out format-reward advantage
    over every sample (App. B.2); invalid samples leave the bound and the baselines."""
    valid = torch.ones(len(ids), dtype=torch.bool) if valid is None else valid
    fmt = torch.zeros(len(ids), dtype=DT) if fmt is None else fmt
    l_star = (logp * ans).sum(1)
    adv, fmt_adv = torch.zeros_like(l_star), torch.zeros_like(l_star)
    bounds = []
    for members in groups(ids):
        ok = [i for i in members if valid[i]]
        ls = l_star[ok]
        n = len(ok)
        bounds.append(torch.logsumexp(ls, 0) - math.log(n) if multi else ls.mean())
        for k, i in enumerate(ok):
            rest = torch.cat([ls[:k], ls[k + 1:]])
            base = torch.logsumexp(rest, 0) - math.log(n - 1) if multi else rest.mean()
            adv[i] = (bounds[-1] if multi else ls[k]) - base
        for i in members:
            fmt_adv[i] = fmt[i] - sum(fmt[j] for j in members if j != i) / (len(members) - 1)
    adv = adv.detach()
    a_valid = adv[valid]
    adv = torch.where(valid, (adv / a_valid.std(unbiased=False)).clamp(-1, 1), 0.0)
    f_std = fmt_adv.std(unbiased=False)
    total_adv = adv + ((fmt_adv / f_std).clamp(-1, 1) if f_std > 0 else 0.0)
    total = 0
    for q, members in enumerate(groups(ids)):
        n = len(members)
        pg = sum(total_adv[i] * (logp[i] * cot[i]).sum() for i in members) / n
        kl = sum((k3(logp[i], ref[i]) * cot[i]).sum() for i in members) / n
        total = total - pg - beta_sup * bounds[q] + beta * kl
    return total / len(groups(ids))


def gspo(logp, old, adv, mask, eps_low, eps_high):
    """GSPO (arXiv 2507.18071, the GSPO objective):
    -(1/G) sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i), s_i = (pi / pi_old)(y_i)^(1/|y_i|),
    differentiated through s_i by autograd."""
    terms = []
    for i in range(len(adv)):
        row = mask[i]
        if not row.any():
            continue
        s = torch.exp((logp[i] - old[i])[row].mean())
        terms.append(-torch.minimum(s * adv[i], s.clamp(1 - eps_low, 1 + eps_high) * adv[i]))
    return torch.stack(terms).mean()


def cispo(logp, old, adv, mask, eps_low, eps_high):
    """CISPO (arXiv 2506.13585 eq. 4): -(1/sum|o_i|) sum_i sum_t sg[clip(r_t, 1-eps_low, 1+eps_high)] A_i log pi."""
    m = mask.to(DT)
    weight = torch.exp(logp - old).clamp(1 - eps_low, 1 + eps_high).detach()
    return -(weight * adv[:, None] * logp * m).sum() / m.sum()
