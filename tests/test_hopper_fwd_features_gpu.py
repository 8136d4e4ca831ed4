"""Hopper forward features through the public API vs the fp32 oracle (FA's rule), on the lent GPU.

Sliding window, softcap, learnable sink, GQA/MQA, head dims 96/192 and 192/128, seqused_k (KV
cache), varlen with empty sequences and seqused_q/k. Every case checks O and LSE (fully masked
rows: O = 0 and LSE = -inf, or the sink with one; NaN never passes: outputs are poisoned first).
CASES is plain data so tools can precompile exactly these kernels (see case_config).
"""
import math
import zlib

import pytest
import torch

import fa3
from fa3.reference import attention_ref, attention_varlen_ref
from fa3.testing import assert_fa_close, max_err, rounding_atol

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                       reason="needs a Hopper (sm_90) GPU"),
]

BF16, FP16 = "bfloat16", "float16"
SEQLENS = [(113, 203), (1024, 1024), (799, 3), (3, 1100), (300, 2048)]


def _dense(d=128, dv=None, dtype=BF16, causal=False, window=(-1, -1), softcap=0.0, sink=False,
           h=4, hk=2, b=2, seqlens=None):
    return dict(kind="dense", d=d, dv=dv or d, dtype=dtype, causal=causal, window=window,
                softcap=softcap, sink=sink, h=h, hk=hk, b=b, seqlens=seqlens or SEQLENS)


CASES = {
    # sliding window, alone and with causal; (0, 0) sees only the diagonal key
    "win128-32": _dense(window=(128, 32)),
    "win-left-unbounded": _dense(window=(-1, 48)),
    "win-right-unbounded": _dense(window=(256, -1)),
    "win00": _dense(window=(0, 0)),
    "causal-win64": _dense(causal=True, window=(64, 0)),
    "causal-win300-fp16": _dense(causal=True, window=(300, 0), dtype=FP16),
    "win-hd64": _dense(d=64, window=(100, 20)),
    "win-hd256-causal": _dense(d=256, causal=True, window=(200, 0)),
    # softcap, with the masks
    "softcap": _dense(softcap=30.0),
    "softcap5-causal": _dense(softcap=5.0, causal=True),
    "softcap-win-fp16": _dense(softcap=30.0, window=(128, 16), dtype=FP16),
    # learnable sink (gpt-oss: with a causal sliding window)
    "sink": _dense(sink=True),
    "sink-causal-win": _dense(sink=True, causal=True, window=(128, 0)),
    "sink-softcap-causal": _dense(sink=True, softcap=20.0, causal=True),
    # GQA / MQA at several ratios
    "gqa8": _dense(h=16, hk=2, b=1, seqlens=[(1024, 1024), (113, 203)]),
    "mqa-causal": _dense(h=8, hk=1, causal=True, seqlens=[(1024, 1024), (113, 203)]),
    "gqa3-win": _dense(h=6, hk=2, window=(64, 64), seqlens=[(1024, 1024), (3, 1100)]),
    # head dims 96, 192 and 192/128
    **{f"hd{d}-{dv}-{dt[:2]}-{'c' if c else 'f'}": _dense(d=d, dv=dv, dtype=dt, causal=c)
       for d, dv in ((96, 96), (192, 192), (192, 128)) for dt in (BF16, FP16) for c in (False, True)},
    "hd192-win": _dense(d=192, window=(100, 0), causal=True),
}

# varlen: lengths with empty sequences (q and/or k), k shorter than q (fully masked rows), one long
VARLEN_Q = [0, 17, 128, 300, 0, 1, 513, 64, 1000]
VARLEN_K = [5, 17, 200, 300, 0, 64, 513, 0, 1100]


def _varlen(d=128, dv=None, dtype=BF16, causal=False, window=(-1, -1), softcap=0.0, sink=False,
            h=4, hk=2, seqused=False):
    return dict(kind="varlen", d=d, dv=dv or d, dtype=dtype, causal=causal, window=window,
                softcap=softcap, sink=sink, h=h, hk=hk, seqused=seqused)


CASES.update({
    "varlen": _varlen(),
    "varlen-causal": _varlen(causal=True),
    "varlen-causal-fp16-mqa": _varlen(causal=True, dtype=FP16, h=4, hk=1),
    "varlen-win-softcap-sink": _varlen(window=(64, 8), softcap=30.0, sink=True),
    "varlen-seqused": _varlen(seqused=True, causal=True),
    "varlen-hd64": _varlen(d=64, causal=True),
    "varlen-hd256": _varlen(d=256),
    "varlen-hd192-128": _varlen(d=192, dv=128, causal=True),
})

# KV cache with per-batch lengths (seqused_k) through flash_attn_with_kvcache
KVCACHE = {"kvcache": dict(causal=False), "kvcache-causal-win": dict(causal=True, window=(64, 0))}


def _dtype(name):
    return getattr(torch, name)


def _sink(c, h):
    return torch.randn(h, device="cuda", dtype=torch.float32) * 2 if c["sink"] else None


def _check(out, lse, out_ref, lse_ref, out_pt, dtype):
    assert_fa_close(out, out_ref, out_pt, atol=rounding_atol(dtype))
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin), "LSE finite where the reference is not (or v.v.)"
    assert not torch.isnan(lse).any() and not torch.isnan(out).any()
    if fin.any():
        err = max_err(lse[fin], lse_ref[fin])
        assert err <= 1e-3 * (1 + lse_ref[fin].abs().max().item()), f"lse error {err}"
    assert lse[~fin].eq(-math.inf).all()  # fully masked rows (no sink): -inf, never NaN


def _poison_pool():
    """Leave NaN in the allocator's free blocks so an output the kernel never writes (the API
    allocates it) cannot pass by holding stale values."""
    torch.empty(64 << 20, device="cuda", dtype=torch.uint8).fill_(0xFF)


def _run_dense(c, sq, sk):
    dtype = _dtype(c["dtype"])
    b, h, hk = c["b"], c["h"], c["hk"]
    q = torch.randn(b, sq, h, c["d"], device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, c["d"], device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, c["dv"], device="cuda", dtype=dtype)
    sink = _sink(c, h)
    _poison_pool()
    out, lse = fa3.flash_attn_func(q, k, v, causal=c["causal"], window_size=c["window"],
                                   softcap=c["softcap"], learnable_sink=sink,
                                   return_attn_probs=True, backend="sm90")
    kw = dict(causal=c["causal"], window_size=c["window"], softcap=c["softcap"], sink=sink)
    out_ref, lse_ref = attention_ref(q, k, v, **kw)
    out_pt, _ = attention_ref(q, k, v, upcast=False, **kw)
    _check(out, lse, out_ref, lse_ref, out_pt, dtype)
    out2, lse2 = fa3.flash_attn_func(q, k, v, causal=c["causal"], window_size=c["window"],
                                     softcap=c["softcap"], learnable_sink=sink,
                                     return_attn_probs=True, backend="sm90")
    assert torch.equal(out, out2) and torch.equal(lse, lse2), "reruns differ"


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")


def _run_varlen(c):
    dtype = _dtype(c["dtype"])
    h, hk = c["h"], c["hk"]
    cu_q, cu_k = _cu(VARLEN_Q), _cu(VARLEN_K)
    tq, tk = sum(VARLEN_Q), sum(VARLEN_K)
    # padding rows past the last sequence must stay untouched by the kernel's tiles
    q = torch.randn(tq + 7, h, c["d"], device="cuda", dtype=dtype)
    k = torch.randn(tk + 5, hk, c["d"], device="cuda", dtype=dtype)
    v = torch.randn(tk + 5, hk, c["dv"], device="cuda", dtype=dtype)
    sink = _sink(c, h)
    su_q = su_k = None
    if c["seqused"]:
        su_q = torch.tensor([max(0, n - 5) for n in VARLEN_Q], dtype=torch.int32, device="cuda")
        su_k = torch.tensor([max(0, n - 9) for n in VARLEN_K], dtype=torch.int32, device="cuda")
    kw = dict(causal=c["causal"], window_size=c["window"], softcap=c["softcap"])
    _poison_pool()
    out, lse = fa3.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(VARLEN_Q), max(VARLEN_K), seqused_q=su_q, seqused_k=su_k,
        learnable_sink=sink, return_attn_probs=True, backend="sm90", **kw)
    ref = dict(seqused_q=su_q, seqused_k=su_k, sink=sink, **kw)
    out_ref, lse_ref = attention_varlen_ref(q, k, v, cu_q, cu_k, **ref)
    out_pt, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, **ref)
    _check(out[:tq], lse[:, :tq], out_ref[:tq], lse_ref[:, :tq], out_pt[:tq], dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_fwd_feature(name):
    c = CASES[name]
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)
    if c["kind"] == "varlen":
        _run_varlen(c)
        return
    for sq, sk in c["seqlens"]:
        _run_dense(c, sq, sk)


@pytest.mark.parametrize("name", list(KVCACHE))
def test_fwd_kvcache_seqused_k(name):
    c = KVCACHE[name]
    torch.manual_seed(3)
    b, sq, s_cache, h, hk, d = 3, 64, 700, 4, 2, 128
    q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b, s_cache, hk, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.tensor([700, 65, 0], dtype=torch.int32, device="cuda")
    window = c.get("window", (-1, -1))
    _poison_pool()
    out, lse = fa3.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=c["causal"],
                                           window_size=window, return_softmax_lse=True,
                                           backend="sm90")
    kw = dict(causal=c["causal"], window_size=window, seqused_k=lens)
    out_ref, lse_ref = attention_ref(q, kc, vc, **kw)
    out_pt, _ = attention_ref(q, kc, vc, upcast=False, **kw)
    _check(out, lse, out_ref, lse_ref, out_pt, torch.bfloat16)


@pytest.mark.parametrize("varlen", [False, True])
def test_pack_gqa_matches_unpacked(varlen):
    """pack_gqa (chosen by default for GQA) and the unpacked kernel (config override) agree with
    the oracle on the same inputs; both run with a causal window, softcap and sink."""
    from fa3.hopper.flash_fwd import flash_fwd

    torch.manual_seed(11)
    h, hk, d = 8, 2, 128
    lens = [0, 37, 300, 1]
    cu = _cu(lens)
    shape = (sum(lens),) if varlen else (2, 300)
    q = torch.randn(*shape, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(*shape, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sink = torch.randn(h, device="cuda")
    kw = dict(window=(64, 0), softcap=20.0, sink=sink)
    if varlen:
        kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=300, max_seqlen_k=300)
    ref_kw = dict(causal=True, window_size=(64, 0), softcap=20.0, sink=sink)
    if varlen:
        out_ref, lse_ref = attention_varlen_ref(q, k, v, cu, cu, **ref_kw)
        out_pt, _ = attention_varlen_ref(q, k, v, cu, cu, upcast=False, **ref_kw)
    else:
        out_ref, lse_ref = attention_ref(q, k, v, **ref_kw)
        out_pt, _ = attention_ref(q, k, v, upcast=False, **ref_kw)
    for over in (None, dict(pack_gqa=1)):
        out = torch.full((*shape, h, d), float("nan"), device="cuda", dtype=torch.bfloat16)
        lse_shape = (h, shape[0]) if varlen else (2, h, 300)
        lse = torch.full(lse_shape, float("nan"), device="cuda")
        flash_fwd(q, k, v, out, lse, d ** -0.5, True, config_overrides=over, **kw)
        _check(out, lse, out_ref, lse_ref, out_pt, torch.bfloat16)


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("pack_gqa", [4, 1])
def test_varlen_l2_groups(persistent, pack_gqa):
    """Varlen causal with L2 groups inside each sequence (tile_scheduler.varlen_decode): 1 MB
    groups so the long sequences split their heads into several groups; every tile must be
    visited exactly once (outputs start as NaN)."""
    from fa3.hopper.flash_fwd import flash_fwd

    torch.manual_seed(12)
    h, hk, d = 8, 2, 128
    lens = [0, 37, 3000, 1, 700, 2100]
    cu = _cu(lens)
    q = torch.randn(sum(lens), h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lens), hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out_ref, lse_ref = attention_varlen_ref(q, k, v, cu, cu, causal=True)
    out_pt, _ = attention_varlen_ref(q, k, v, cu, cu, causal=True, upcast=False)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((h, sum(lens)), float("nan"), device="cuda")
    over = dict(l2_group=True, l2_group_mb=1, persistent=persistent, pack_gqa=pack_gqa)
    flash_fwd(q, k, v, out, lse, d ** -0.5, True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3000,
              max_seqlen_k=3000, config_overrides=over)
    _check(out, lse, out_ref, lse_ref, out_pt, torch.bfloat16)
