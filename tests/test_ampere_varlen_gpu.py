"""sm80 varlen (cu_seqlens) and seqused, forward and backward, vs the fp32 oracle by FA's rule, on a
GPU of capability >= 8.0 (on the lent Hopper GPU the kernels are built for sm_90).

Forward: flash_fwd_sm80 into NaN-poisoned out/LSE with extra rows past the last sequence, which
must stay NaN (no tile writes outside its sequence). Backward: through the public API
(fa3.flash_attn_varlen_func(..., backend="sm80")) with the allocator poisoned, dq/dk/dv vs the
oracle's autograd; rows past seqused and rows of sequences that see no key must get exactly 0.
Length mixes are long-tailed and hold a zero-length sequence (q and k), length 1, k shorter than
q (fully masked rows under causal), and one sequence over 1k rows.
"""
import math

import pytest
import torch

import fa3
from fa3.reference import attention_ref, attention_varlen_ref
from fa3.testing import assert_fa_close, poison_, rounding_atol
from test_ampere_bwd_gpu import grad_atol, grads, poison_allocator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)),
                       reason="needs a CUDA GPU with compute capability >= 8.0"),
]

LENS_Q = [0, 1, 17, 300, 1100, 64, 0, 513, 129]
LENS_K = [3, 1, 17, 200, 1024, 0, 0, 600, 1]
PAD = 9  # rows past the last sequence in the forward's out/LSE


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")


def _used(lens, cut):
    """seqused below the lengths (including 0 and the full length)."""
    u = [max(0, n - cut) if i % 3 else (0 if i % 2 else n) for i, n in enumerate(lens)]
    return torch.tensor(u, dtype=torch.int32, device="cuda")


CASES = {
    "hd128-bf16-gqa": dict(d=128, dtype=torch.bfloat16, causal=False, h=4, hk=2),
    "hd64-fp16-causal": dict(d=64, dtype=torch.float16, causal=True, h=3, hk=3),
    "hd128-bf16-causal-seqused": dict(d=128, dtype=torch.bfloat16, causal=True, h=4, hk=2,
                                      seqused=True),
    "hd96-bf16-causal-mqa-seqused_k": dict(d=96, dtype=torch.bfloat16, causal=True, h=4, hk=1,
                                           seqused_k_only=True),
    "hd256-bf16-window-softcap": dict(d=256, dtype=torch.bfloat16, causal=False, h=2, hk=1,
                                      window=(96, 32), softcap=30.0),
    "hd64-fp16-local-seqused": dict(d=64, dtype=torch.float16, causal=True, h=2, hk=2,
                                    window=(128, 0), seqused=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_varlen_fwd_bwd(name):
    from fa3.ampere.flash_fwd_sm80 import flash_fwd_sm80

    c = CASES[name]
    d, dtype, h, hk = c["d"], c["dtype"], c["h"], c["hk"]
    torch.manual_seed(d + h + 7 * hk + len(name))
    cu_q, cu_k = _cu(LENS_Q), _cu(LENS_K)
    tq, tk = sum(LENS_Q), sum(LENS_K)
    q = torch.randn(tq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(tk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(tk, hk, d, device="cuda", dtype=dtype)
    g = torch.randn(tq, h, d, device="cuda", dtype=dtype)
    su_q = _used(LENS_Q, 5) if c.get("seqused") else None
    su_k = _used(LENS_K, 9) if c.get("seqused") or c.get("seqused_k_only") else None
    window, softcap = c.get("window", (-1, -1)), c.get("softcap", 0.0)
    kw = dict(causal=c["causal"], window_size=window, softcap=softcap)
    ref_kw = dict(seqused_q=su_q, seqused_k=su_k, **kw)
    mq, mk = max(LENS_Q), max(LENS_K)

    # forward, straight into poisoned buffers with rows past the last sequence
    out = poison_(torch.empty(tq + PAD, h, d, device="cuda", dtype=dtype))
    lse = poison_(torch.empty(h, tq + PAD, device="cuda"))
    win = None if window == (-1, -1) else window
    flash_fwd_sm80(q, k, v, out[:tq], lse[:, :tq], 1 / math.sqrt(d), c["causal"], window=win,
                   softcap=softcap, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq,
                   max_seqlen_k=mk, seqused_q=su_q, seqused_k=su_k)
    assert torch.isnan(out[tq:]).all() and torch.isnan(lse[:, tq:]).all(), "wrote past the end"
    out, lse = out[:tq], lse[:, :tq]
    out_ref, lse_ref = attention_varlen_ref(q, k, v, cu_q, cu_k, **ref_kw)
    out_pt, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, reorder_ops=True, **ref_kw)
    _check_out_lse(out, lse, out_ref, lse_ref, out_pt, dtype)

    # backward through the public API (autograd), allocator poisoned
    def fa(q, k, v):
        return fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, seqused_q=su_q,
                                          seqused_k=su_k, backend="sm80", **kw)

    poison_allocator()
    out_api, dq, dk, dv = grads(fa, q, k, v, g)
    assert torch.equal(out_api, out), "autograd forward differs from the direct call"
    _, *ref = grads(lambda q, k, v: attention_varlen_ref(q, k, v, cu_q, cu_k, **ref_kw)[0],
                    q, k, v, g)
    _, *pt = grads(lambda q, k, v: attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False,
                                                        reorder_ops=True, **ref_kw)[0], q, k, v, g)
    _check_grads((dq, dk, dv), ref, pt, dtype)
    _check_zero_rows(dq, LENS_Q, su_q)
    _check_zero_rows(dk, LENS_K, su_k)
    _check_zero_rows(dv, LENS_K, su_k)


def _check_out_lse(out, lse, out_ref, lse_ref, out_pt, dtype):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_fa_close(out, out_ref, out_pt, atol=rounding_atol(dtype))
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse)), "fully masked rows must have LSE = -inf"
    assert (lse[~fin] == -math.inf).all()
    if fin.any():
        err = (lse[fin] - lse_ref[fin]).abs().max().item()
        assert err <= 1e-3 * (1 + lse_ref[fin].abs().max().item()), f"lse error {err}"


def _check_grads(got, ref, pt, dtype):
    for name, x, x_ref, x_pt in zip(("dq", "dk", "dv"), got, ref, pt):
        assert not torch.isnan(x).any(), f"{name} has NaN (unwritten or bad math)"
        assert_fa_close(x, x_ref, x_pt, atol=grad_atol(x_ref, dtype), name=name)


def _check_zero_rows(x, lens, used):
    """Rows past seqused (when given) are exactly 0."""
    if used is None:
        return
    start = 0
    for n, u in zip(lens, used.tolist()):
        assert (x[start + min(n, u):start + n] == 0).all(), "gradient past seqused"
        start += n


@pytest.mark.parametrize("causal", [False, True])
def test_dense_seqused(causal):
    """seqused_q/k without cu_seqlens (padded batch), forward and backward, direct calls."""
    from fa3.ampere.flash_bwd_sm80 import flash_bwd_sm80
    from fa3.ampere.flash_fwd_sm80 import flash_fwd_sm80

    b, sq, sk, h, hk, d, dtype = 4, 300, 257, 4, 2, 128, torch.bfloat16
    torch.manual_seed(11 + causal)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    g = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    su_q = torch.tensor([300, 0, 1, 177], dtype=torch.int32, device="cuda")
    su_k = torch.tensor([100, 257, 0, 64], dtype=torch.int32, device="cuda")
    scale = 1 / math.sqrt(d)
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(b, h, sq, device="cuda"))
    flash_fwd_sm80(q, k, v, out, lse, scale, causal, seqused_q=su_q, seqused_k=su_k)
    kw = dict(causal=causal, seqused_q=su_q, seqused_k=su_k)
    out_ref, lse_ref = attention_ref(q, k, v, **kw)
    out_pt, _ = attention_ref(q, k, v, upcast=False, reorder_ops=True, **kw)
    _check_out_lse(out, lse, out_ref, lse_ref, out_pt, dtype)

    poison_allocator()
    dq, dk, dv = flash_bwd_sm80(g, q, k, v, out, lse, scale, causal, seqused_q=su_q,
                                seqused_k=su_k)
    _, *ref = grads(lambda q, k, v: attention_ref(q, k, v, **kw)[0], q, k, v, g)
    _, *pt = grads(lambda q, k, v: attention_ref(q, k, v, upcast=False, reorder_ops=True, **kw)[0],
                   q, k, v, g)
    _check_grads((dq, dk, dv), ref, pt, dtype)
    for i in range(b):
        assert (dq[i, su_q[i]:] == 0).all() and (dk[i, su_k[i]:] == 0).all()
        assert (dv[i, su_k[i]:] == 0).all()


def test_varlen_all_empty_and_single_rows():
    """Every sequence of length 0 or 1 (grid of one tile; zero-length q and k sequences)."""
    lens_q, lens_k = [1, 0, 1, 1], [1, 1, 0, 2]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    h, d, dtype = 2, 64, torch.bfloat16
    torch.manual_seed(5)
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), h, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), h, d, device="cuda", dtype=dtype)
    g = torch.randn_like(q)
    poison_allocator()
    out, dq, dk, dv = grads(lambda q, k, v: fa3.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 1, 2, causal=True, backend="sm80"), q, k, v, g)
    out_ref, *ref = grads(lambda q, k, v: attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True)[0],
                          q, k, v, g)
    out_pt, *pt = grads(lambda q, k, v: attention_varlen_ref(
        q, k, v, cu_q, cu_k, causal=True, upcast=False, reorder_ops=True)[0], q, k, v, g)
    assert not torch.isnan(out).any()
    assert_fa_close(out, out_ref, out_pt, atol=rounding_atol(dtype))
    _check_grads((dq, dk, dv), ref, pt, dtype)
    rows = slice(cu_q[2].item(), cu_q[3].item())  # sequence 2 has no keys (packed row 1)
    assert (out[rows] == 0).all() and (dq[rows] == 0).all()
