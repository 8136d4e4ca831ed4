"""The oracle itself must be right: check it against first principles and FA's documented masks."""
import math

import pytest
import torch

from fa3.reference import attention_ref, attention_varlen_ref, combine_ref, visible_mask


def naive(q, k, v, mask, scale):
    """Textbook attention, fp64, one batch element, heads equal."""
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v.double())


def test_causal_mask_bottom_right_matches_fa_docstring():
    # FA: sq=2, sk=5 -> [[1,1,1,1,0],[1,1,1,1,1]]; sq=5, sk=2 -> first three rows empty.
    assert visible_mask(2, 5, causal=True).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert visible_mask(5, 2, causal=True).int().tolist() == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]


def test_window_mask():
    m = visible_mask(4, 6, window_size=(1, 1))
    # query i sits at key i + 2; keys [i+1, i+3] visible
    for i in range(4):
        assert m[i].nonzero().flatten().tolist() == [j for j in range(6) if i + 1 <= j <= i + 3]
    assert torch.equal(visible_mask(5, 7, causal=True), visible_mask(5, 7, window_size=(-1, 0)))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(7, 7), (5, 13), (13, 5)])
def test_matches_naive_and_lse(causal, sq, sk):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, n, 3, 16, dtype=torch.float64) for n in (sq, sk, sk))
    out, lse = attention_ref(q, k, v, causal=causal)
    scale = 1 / math.sqrt(16)
    for b in range(2):
        mask = visible_mask(sq, sk, causal)
        torch.testing.assert_close(out[b], naive(q[b], k[b], v[b], mask, scale).to(out.dtype))
        s = torch.einsum("qhd,khd->hqk", q[b], k[b]) * scale
        exp_lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1).float()
        torch.testing.assert_close(lse[b], exp_lse)
    assert lse.shape == (2, 3, sq) and lse.dtype == torch.float32


def test_fully_masked_rows_give_zero_and_neg_inf():
    q, k, v = (torch.randn(1, n, 2, 8) for n in (5, 2, 2))
    out, lse = attention_ref(q, k, v, causal=True)
    assert not torch.isnan(out).any()
    assert torch.all(out[0, :3] == 0)
    assert torch.all(torch.isneginf(lse[0, :, :3])) and torch.isfinite(lse[0, :, 3:]).all()


def test_gqa_equals_repeated_heads():
    q = torch.randn(2, 9, 6, 16)
    k, v = torch.randn(2, 11, 2, 16), torch.randn(2, 11, 2, 16)
    out, lse = attention_ref(q, k, v, causal=True)
    out2, lse2 = attention_ref(q, k.repeat_interleave(3, 2), v.repeat_interleave(3, 2), causal=True)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(lse, lse2)


def test_softcap():
    q, k, v = (torch.randn(1, 6, 2, 8, dtype=torch.float64) * 3 for _ in range(3))
    out, _ = attention_ref(q, k, v, softcap=2.0, softmax_scale=1.0)
    s = torch.tanh(torch.einsum("qhd,khd->hqk", q[0], k[0]) / 2.0) * 2.0
    exp = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v[0])
    torch.testing.assert_close(out[0], exp)


def test_sink_joins_denominator_only():
    q, k, v = (torch.randn(1, 4, 2, 8, dtype=torch.float64) for _ in range(3))
    sink = torch.tensor([0.5, -1.0], dtype=torch.float64)
    out, lse = attention_ref(q, k, v, sink=sink)
    s = torch.einsum("qhd,khd->hqk", q[0], k[0]) / math.sqrt(8)
    denom = torch.exp(s).sum(-1) + torch.exp(sink).view(2, 1)
    exp = torch.einsum("hqk,khd->qhd", torch.exp(s) / denom.unsqueeze(-1), v[0])
    torch.testing.assert_close(out[0], exp)
    torch.testing.assert_close(lse[0], torch.log(denom).float())


def test_varlen_equals_per_sequence_dense():
    lens_q, lens_k = [3, 0, 7, 1], [5, 2, 7, 0]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, 16)
    k, v = torch.randn(sum(lens_k), 2, 16), torch.randn(sum(lens_k), 2, 16)
    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True)
    assert out.shape == (11, 4, 16) and lse.shape == (4, 11)
    for i in range(4):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if q1 == q0:
            continue
        o, l = attention_ref(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=True)
        torch.testing.assert_close(out[q0:q1], o[0])
        torch.testing.assert_close(lse[:, q0:q1], l[0])
    # the last sequence has no keys: its row is fully masked
    assert torch.all(out[10] == 0) and torch.isneginf(lse[:, 10]).all()


def test_seqused_masks_tail():
    q, k, v = (torch.randn(2, 8, 2, 8) for _ in range(3))
    su_k = torch.tensor([5, 8], dtype=torch.int32)
    out, _ = attention_ref(q, k, v, seqused_k=su_k)
    o0, _ = attention_ref(q[:1], k[:1, :5], v[:1, :5])
    torch.testing.assert_close(out[:1], o0)


def test_upcast_false_runs_in_low_precision():
    q, k, v = (torch.randn(1, 32, 2, 64).bfloat16() for _ in range(3))
    hi, _ = attention_ref(q, k, v, upcast=True)
    lo, _ = attention_ref(q, k, v, upcast=False, reorder_ops=True)
    assert hi.dtype == lo.dtype == torch.bfloat16
    err = (hi.float() - lo.float()).abs().max()
    assert 0 < err < 0.05  # differs by bf16 rounding, not more


def test_combine_of_split_keys_equals_full():
    q, k, v = torch.randn(2, 6, 3, 16), torch.randn(2, 20, 3, 16), torch.randn(2, 20, 3, 16)
    full, lse_full = attention_ref(q, k, v)
    parts = [attention_ref(q, k[:, a:b], v[:, a:b]) for a, b in ((0, 7), (7, 15), (15, 20))]
    out_p = torch.stack([p[0].float() for p in parts])  # (splits, b, s, h, d)
    lse_p = torch.stack([p[1].transpose(1, 2) for p in parts])  # (splits, b, s, h)
    out, lse = combine_ref(out_p, lse_p)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_full.transpose(1, 2))


def test_backward_matches_finite_differences():
    q, k, v = (torch.randn(1, 5, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return attention_ref(q, k, v, causal=True, softcap=3.0)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))
