"""CPU model of the sm80 forward's schedule (fwd_sm80_kernel.py), checked without a GPU:

* the cp.async commit order and "wait until <= 2s-2 groups pending" really deliver K_i before
  S = Q K_i^T and V_i before P V_i, and no refill overwrites a ring slot still to be read;
* walking KV blocks from the last one down, masking the first block and the diagonal blocks only,
  with the log2-domain online softmax and the empty-row rules, reproduces the fp32 oracle; every
  block run without a mask is fully visible to every valid row of its tile.
The model mirrors the kernel's order by hand: change one, change the other.
"""
import math

import pytest
import torch

from fa3.reference import attention_ref


def n_block_max(sq, sk, m, tm, tn, causal):
    n = -(-sk // tn)
    if causal:
        n = min(n, -(-max((m + 1) * tm + sk - sq, 0) // tn))
    return n


def block_order(sq, sk, m, tm, tn, causal):
    """[(n_block, masked)] in the kernel's order: first block, diagonal blocks, unmasked rest."""
    n_max = n_block_max(sq, sk, m, tm, tn, causal)
    if n_max == 0:
        return []
    n_mask_min = n_max - 1
    if causal:
        n_mask_min = min(n_mask_min, max(m * tm + sk - sq + 1, 0) // tn)
    return ([(n_max - 1, True)] + [(n_max - 2 - i, True) for i in range(n_max - 1 - n_mask_min)]
            + [(n_mask_min - 1 - i, False) for i in range(n_mask_min)])


def replay_pipeline(n_max, s):
    """Per-thread cp.async groups, in the kernel's commit order; returns the problems found."""
    groups, done, errs = [], 0, []
    holds = {"K": {}, "V": {}}
    used = {"K": set(), "V": set()}

    def load(kind, it, slot):
        prev = holds[kind].get(slot)
        if prev is not None and prev not in used[kind]:
            errs.append(f"{kind}{it} overwrites unread {kind}{prev} in slot {slot}")
        holds[kind][slot] = it
        return (kind, it)

    def wait(pending):
        nonlocal done
        done = max(done, len(groups) - pending)  # cp.async.wait_group + barrier

    def landed(g):
        return g in groups[:done]

    groups.append(("Q", 0))
    for st in range(s):
        groups.append(load("K", st, st) if st < n_max else None)
        if st < s - 1:
            groups.append(load("V", st, st) if st < n_max else None)
    slot = 0
    for i in range(n_max):
        wait(2 * s - 2)
        if not (landed(("Q", 0)) and landed(("K", i)) and holds["K"][slot] == i):
            errs.append(f"K{i} not ready")
        if s == 1:
            groups.append(load("V", i, 0))
        else:
            groups.append(load("V", i + s - 1, (slot - 1) % s) if i + s - 1 < n_max else None)
        used["K"].add(i)  # S = Q K_i^T
        wait(2 * s - 2)
        if not (landed(("V", i)) and holds["V"][slot] == i):
            errs.append(f"V{i} not ready")
        nxt = i + max(s, 1)
        groups.append(load("K", nxt, slot) if nxt < n_max else None)
        used["V"].add(i)  # O += P V_i
        slot = (slot + 1) % s
    return errs


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_pipeline_groups(stages):
    for n_max in range(0, 10):
        assert replay_pipeline(n_max, stages) == [], (n_max, stages)


def model_fwd(q, k, v, causal, tm, tn, scale):
    sq, d = q.shape
    sk = k.shape[0]
    out, lse = torch.zeros(sq, d), torch.empty(sq)
    c = scale * math.log2(math.e)
    inf = torch.tensor(math.inf)
    for m in range(-(-sq // tm)):
        rows = torch.arange(m * tm, (m + 1) * tm)
        valid = rows < sq
        qt = torch.zeros(tm, d)
        qt[valid] = q[rows[valid]]  # zero-filled tail rows
        o, rmax, rsum = torch.zeros(tm, d), torch.full((tm,), -math.inf), torch.zeros(tm)
        order = block_order(sq, sk, m, tm, tn, causal)
        assert sorted(n for n, _ in order) == list(range(len(order)))
        for n, masked in order:
            cols = torch.arange(n * tn, (n + 1) * tn)
            kt, vt = torch.zeros(tn, d), torch.zeros(tn, d)
            kt[cols < sk], vt[cols < sk] = k[cols[cols < sk]], v[cols[cols < sk]]
            s = qt @ kt.T
            vis = (cols[None] < sk).expand(tm, tn)
            if causal:
                vis = vis & (cols[None] <= rows[:, None] + sk - sq)
            if masked:
                s = torch.where(vis, s, -inf)
            else:
                assert vis[valid].all(), f"unmasked block {n} of tile {m} needs a mask"
            m_new = torch.maximum(rmax, s.max(1).values)
            m_scaled = torch.where(torch.isinf(m_new), 0.0, m_new * c)
            row_scale = torch.exp2(rmax * c - m_scaled)
            p = torch.exp2(s * c - m_scaled[:, None])
            rsum, rmax = rsum * row_scale + p.sum(1), m_new
            o = o * row_scale[:, None] + p @ vt
        empty = rsum == 0
        o = o * torch.where(empty, 0.0, 1 / rsum)[:, None]
        l_ = torch.where(empty, -inf, rmax * scale + torch.log2(rsum) * math.log(2))
        out[rows[valid]], lse[rows[valid]] = o[valid], l_[valid]
    return out, lse


@pytest.mark.parametrize("tile", [(128, 64), (64, 64)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1, 1), (113, 203), (799, 3), (1024, 1024), (3, 1100),
                                   (257, 129), (130, 1)])
def test_schedule_matches_reference(sq, sk, causal, tile):
    torch.manual_seed(sq + sk)
    q, k, v = torch.randn(sq, 32), torch.randn(sk, 32), torch.randn(sk, 32)
    out, lse = model_fwd(q, k, v, causal, *tile, 32 ** -0.5)
    ref, ref_lse = attention_ref(q[None, :, None], k[None, :, None], v[None, :, None], causal=causal)
    ref, ref_lse = ref[0, :, 0], ref_lse[0, 0]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)  # -inf rows included
