"""Hopper backward features on the lent GPU (skipped elsewhere): learnable-sink gradient, varlen
(packed sequences, long-tailed mixes with empty and length-1 sequences), seqused_q/k (varlen and
dense), head dims 96 and 192. FA's rule for every gradient vs the fp32 oracle's autograd
(tests/test_hopper_bwd_gpu.py explains it); out and LSE come from the oracle so a forward bug
cannot mask a backward one, except in the API test, which runs the pair. Gradient buffers that
flash_bwd allocates with torch.empty come from NaN-poisoned memory; rows and keys past seqused
must be exactly 0.
"""
import math

import pytest
import torch

from fa3.reference import attention_ref, attention_varlen_ref
from fa3.testing import assert_fa_close, hopper_available, random_qkv, rounding_atol

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not hopper_available(), reason="needs a Hopper (sm_90) GPU")]

# long-tailed mixes: empty and length-1 sequences, ragged tails, one long sequence
MIX_Q = [0, 1, 77, 300, 5, 1024, 129, 1]
MIX_K = [3, 1, 200, 300, 0, 1100, 64, 700]


def _poison_allocator():
    x = torch.empty(64 << 20, device="cuda", dtype=torch.float32).fill_(float("nan"))
    del x


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.int32)


def _grads(fn, tensors, do):
    """Autograd of fn(*tensors)[0] against do: the gradients of every tensor, in order."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)[0]
    out.backward(do)
    return [t.grad for t in leaves]


def _check(got, ref, pt, names, dtype):
    for name, g, r, p in zip(names, got, ref, pt):
        assert g.shape == r.shape, name
        atol = rounding_atol(dtype)
        if name == "dsink":  # a sum over every row: scale the rounding term with it
            atol *= max(1.0, float(r.abs().max()))
        assert_fa_close(g.float(), r.float(), p.float(), atol=atol, name=name)


def _flash_bwd(do, q, k, v, out, lse, causal, deterministic=False, **features):
    from fa3.hopper.flash_bwd import flash_bwd

    _poison_allocator()
    return flash_bwd(do, q, k, v, out, lse, 1.0 / math.sqrt(q.shape[-1]), causal, deterministic,
                     allow_unverified=True, **features)


def _varlen_case(lens_q, lens_k, h, hk, d, dtype, causal, deterministic=False, used_q=None,
                 used_k=None, sink=False, window=None, cfg=None, dv=None):
    torch.manual_seed(sum(lens_q) + 3 * sum(lens_k) + d + h)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(tk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(tk, hk, dv or d, device="cuda", dtype=dtype)
    do = torch.randn(tq, h, dv or d, device="cuda", dtype=dtype)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    s = torch.randn(h, device="cuda", dtype=torch.float32) if sink else None
    opt = dict(seqused_q=used_q, seqused_k=used_k, window_size=window or (-1, -1))

    def ref(upcast):
        def fn(q, k, v, *sk):
            return attention_varlen_ref(q, k, v, cu_q, cu_k, causal=causal, upcast=upcast,
                                        sink=sk[0] if sk else None, **opt)
        return _grads(fn, (q, k, v) + ((s,) if sink else ()), do)

    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=causal, sink=s, **opt)
    feats = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
                 max_seqlen_k=max(lens_k))
    for name, t in (("seqused_q", used_q), ("seqused_k", used_k), ("sink", s), ("window", window)):
        if t is not None:
            feats[name] = t
    got = _flash_bwd(do, q, k, v, out, lse, causal, deterministic, cfg_overrides=cfg, **feats)
    names = ("dq", "dk", "dv", "dsink")[:len(got)]
    _check(got, ref(True), ref(False), names, dtype)
    return got, (q, k, v, out, lse, do, feats)


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_varlen(d, causal, gqa):
    _varlen_case(MIX_Q, MIX_K, 6, 2 if gqa else 6, d, torch.bfloat16, causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [192, 256])
def test_varlen_dq_red(d, causal):
    """BwdConfig.dq_red: dQ reductions from registers land in the per-sequence padded rows."""
    _varlen_case(MIX_Q, MIX_K, 6, 2, d, torch.bfloat16, causal, cfg=dict(dq_red=True))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_tile80(causal):
    """80-query tiles (dQ transposed) in the per-sequence padded rows, GQA."""
    _varlen_case(MIX_Q, MIX_K, 6, 2, 128, torch.bfloat16, causal,
                 cfg=dict(tile_m=80))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_varlen_group_loop(d, causal):
    """GQA's group of query heads walked in one CTA (BwdConfig.group_loop) over packed
    sequences: dK / dV in the input dtype, keys outside every sequence zero."""
    _varlen_case(MIX_Q, MIX_K, 8, 2, d, torch.bfloat16, causal, cfg=dict(group_loop=True))


def test_varlen_window_tile80():
    _varlen_case(MIX_Q, MIX_K, 4, 2, 128, torch.bfloat16, False, sink=True, window=(100, 30),
                 cfg=dict(tile_m=80))


@pytest.mark.parametrize("d", [96, 192])
def test_varlen_hd96_192(d):
    _varlen_case(MIX_Q, MIX_K, 4, 2, d, torch.float16, True)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_seqused(causal):
    """seqused_q/k below the sequences' lengths (and 0 for some): rows / keys past them get
    exactly zero gradients."""
    used_q = torch.tensor([0, 1, 50, 300, 0, 700, 129, 1], device="cuda", dtype=torch.int32)
    used_k = torch.tensor([3, 0, 150, 299, 0, 1024, 1, 700], device="cuda", dtype=torch.int32)
    (dq, dk, dv), _ = _varlen_case(MIX_Q, MIX_K, 4, 2, 128, torch.bfloat16, causal,
                                   used_q=used_q, used_k=used_k)
    cq, ck = _cu(MIX_Q).tolist(), _cu(MIX_K).tolist()
    for i in range(len(MIX_Q)):
        assert not dq[cq[i] + int(used_q[i]):cq[i + 1]].any()
        assert not dk[ck[i] + int(used_k[i]):ck[i + 1]].any()
        assert not dv[ck[i] + int(used_k[i]):ck[i + 1]].any()


def test_varlen_deterministic():
    got, (q, k, v, out, lse, do, feats) = _varlen_case(MIX_Q, MIX_K, 4, 4, 128, torch.bfloat16,
                                                       True, deterministic=True)
    for _ in range(5):
        again = _flash_bwd(do, q, k, v, out, lse, True, True, **feats)
        for a, g in zip(got, again):
            assert torch.equal(a, g), "deterministic varlen backward differs between runs"


def test_varlen_window_sink():
    """The features together: sliding window, sink (its gradient too), GQA, varlen."""
    _varlen_case(MIX_Q, MIX_K, 4, 2, 128, torch.bfloat16, False, sink=True, window=(100, 30))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d,dv", [(64, 64), (192, 128)])
def test_dense_seqused(causal, d, dv):
    """(192 / 128: the plain preprocess with seqused, padding filled by the caller)"""
    b, h, hk, sq, sk = 3, 4, 2, 300, 517
    q, k, v = random_qkv(b, h, hk, sq, sk, d, torch.bfloat16)
    v = v[..., :dv].contiguous()
    do = torch.randn(b, sq, h, dv, device="cuda", dtype=torch.bfloat16)
    used_q = torch.tensor([300, 0, 77], device="cuda", dtype=torch.int32)
    used_k = torch.tensor([1, 517, 200], device="cuda", dtype=torch.int32)

    def fn(upcast):
        return lambda q, k, v: attention_ref(q, k, v, causal=causal, upcast=upcast,
                                             seqused_q=used_q, seqused_k=used_k)

    out, lse = fn(True)(q, k, v)
    got = _flash_bwd(do, q, k, v, out, lse, causal, seqused_q=used_q, seqused_k=used_k)
    _check(got, _grads(fn(True), (q, k, v), do), _grads(fn(False), (q, k, v), do),
           ("dq", "dk", "dv"), torch.bfloat16)
    for i in range(b):
        assert not got[0][i, int(used_q[i]):].any()
        assert not got[1][i, int(used_k[i]):].any() and not got[2][i, int(used_k[i]):].any()


@pytest.mark.parametrize("sq,sk", [(113, 203), (1000, 1357), (799, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_sink_grad(causal, sq, sk):
    """Dense, GQA: dq/dk/dv unchanged by the sink's handling, and dsink by FA's rule."""
    h, hk, d = 6, 2, 128
    q, k, v = random_qkv(2, h, hk, sq, sk, d, torch.bfloat16)
    do = torch.randn_like(q)
    sink = torch.randn(h, device="cuda", dtype=torch.float32)

    def fn(upcast):
        return lambda q, k, v, s: attention_ref(q, k, v, causal=causal, upcast=upcast, sink=s)

    out, lse = fn(True)(q, k, v, sink)
    got = _flash_bwd(do, q, k, v, out, lse, causal, sink=sink)
    assert len(got) == 4 and got[3].shape == (h,) and got[3].dtype == torch.float32
    _check(got, _grads(fn(True), (q, k, v, sink), do), _grads(fn(False), (q, k, v, sink), do),
           ("dq", "dk", "dv", "dsink"), torch.bfloat16)


@pytest.mark.parametrize("bhs", [(2, 4, 4), (1, 6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("sq,sk", [(1, 1), (113, 203), (799, 3), (3, 1100), (1000, 1357)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d,dv", [(96, 96), (192, 192), (192, 128)])
def test_hd96_192(d, dv, causal, sq, sk, bhs):
    """(192 / 128, DeepSeek's: dV its own GEMM over dv's columns, the preprocess's D over dv,
    dQaccum rows of d floats zeroed by the caller)"""
    b, h, hk = bhs
    q, k, v = random_qkv(b, h, hk, sq, sk, d, torch.bfloat16)
    v = v[..., :dv].contiguous()
    do = torch.randn(b, sq, h, dv, device="cuda", dtype=torch.bfloat16)

    def fn(upcast):
        return lambda q, k, v: attention_ref(q, k, v, causal=causal, upcast=upcast)

    out, lse = fn(True)(q, k, v)
    got = _flash_bwd(do, q, k, v, out, lse, causal)
    _check(got, _grads(fn(True), (q, k, v), do), _grads(fn(False), (q, k, v), do),
           ("dq", "dk", "dv"), torch.bfloat16)


@pytest.mark.parametrize("feat", [{}, dict(dkv_red=True), dict(window=(100, 50)),
                                  dict(softcap=20.0)], ids=["plain", "dkv_red", "window", "softcap"])
@pytest.mark.parametrize("bhs", [(2, 4, 4), (1, 6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("sq,sk", [(1, 1), (113, 203), (799, 3), (1000, 1357), (1024, 1024)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d,dv", [(192, 192), (192, 128)])
def test_hd192_dkv_swap(d, dv, causal, sq, sk, bhs, feat):
    """BwdConfig.dkv_swap: 96-key tiles, dK^T / dV^T stored transposed (by TMA for MHA, from
    registers for GQA's partials, added for dkv_red), dQ added from registers."""
    b, h, hk = bhs
    if "dkv_red" in feat and hk == h or causal and "window" in feat:
        pytest.skip("dkv_red is GQA's; a window replaces causal")
    q, k, v = random_qkv(b, h, hk, sq, sk, d, torch.bfloat16)
    v = v[..., :dv].contiguous()
    do = torch.randn(b, sq, h, dv, device="cuda", dtype=torch.bfloat16)
    feat = dict(feat)
    cfg = dict(dkv_swap=True, **({"dkv_red": feat.pop("dkv_red")} if "dkv_red" in feat else {}))
    window, cap = feat.get("window", (-1, -1)), feat.get("softcap", 0.0)

    def fn(upcast):
        return lambda q, k, v: attention_ref(q, k, v, causal=causal, upcast=upcast,
                                             window_size=window, softcap=cap)

    out, lse = fn(True)(q, k, v)
    got = _flash_bwd(do, q, k, v, out, lse, causal, cfg_overrides=cfg, **feat)
    _check(got, _grads(fn(True), (q, k, v), do), _grads(fn(False), (q, k, v), do),
           ("dq", "dk", "dv"), torch.bfloat16)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dv", [192, 128])
def test_varlen_hd192_dkv_swap(dv, causal):
    """dkv_swap over packed sequences (dK^T / dV^T from registers, keys past a sequence skipped)."""
    _varlen_case(MIX_Q, MIX_K, 6, 2, 192, torch.bfloat16, causal, cfg=dict(dkv_swap=True), dv=dv)


@pytest.mark.parametrize("sq,sk", [(113, 203), (1000, 1357)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d,dv", [(96, 96), (192, 192), (192, 128)])
def test_hd96_192_dkv_red(d, dv, causal, sq, sk):
    """GQA's dK / dV added into per-KV-head fp32 accumulators (BwdConfig.dkv_red, on request at
    hd96 and on hd192's 64-key tiles; hd192's default 96-key tiles: test_hd192_dkv_swap). H100,
    s20: 12 passed (hd192 then on 64-key tiles, as pinned here)."""
    q, k, v = random_qkv(2, 8, 2, sq, sk, d, torch.bfloat16)
    v = v[..., :dv].contiguous()
    do = torch.randn(2, sq, 8, dv, device="cuda", dtype=torch.bfloat16)

    def fn(upcast):
        return lambda q, k, v: attention_ref(q, k, v, causal=causal, upcast=upcast)

    out, lse = fn(True)(q, k, v)
    cfg = dict(dkv_red=True, **(dict(dkv_swap=False) if d == 192 else {}))
    got = _flash_bwd(do, q, k, v, out, lse, causal, cfg_overrides=cfg)
    _check(got, _grads(fn(True), (q, k, v), do), _grads(fn(False), (q, k, v), do),
           ("dq", "dk", "dv"), torch.bfloat16)


@pytest.mark.parametrize("d", [96, 192])
def test_hd96_192_deterministic(d):
    q, k, v = random_qkv(1, 6, 2, 1000, 1357, d, torch.float16)
    do = torch.randn_like(q)
    out, lse = attention_ref(q, k, v, causal=True)
    first = _flash_bwd(do, q, k, v, out, lse, True, True)
    ref = _grads(lambda q, k, v: attention_ref(q, k, v, causal=True), (q, k, v), do)
    pt = _grads(lambda q, k, v: attention_ref(q, k, v, causal=True, upcast=False), (q, k, v), do)
    _check(first, ref, pt, ("dq", "dk", "dv"), torch.float16)
    for _ in range(5):
        for a, g in zip(first, _flash_bwd(do, q, k, v, out, lse, True, True)):
            assert torch.equal(a, g)


def test_hd192_128_deterministic_varlen():
    got, (q, k, v, out, lse, do, feats) = _varlen_case(MIX_Q, MIX_K, 4, 2, 192, torch.float16,
                                                       True, deterministic=True, dv=128)
    for _ in range(5):
        for a, g in zip(got, _flash_bwd(do, q, k, v, out, lse, True, True, **feats)):
            assert torch.equal(a, g)


def test_hd192_128_varlen_window():
    _varlen_case(MIX_Q, MIX_K, 4, 4, 192, torch.bfloat16, False, window=(100, 30), dv=128)


def test_api_varlen_sink_autograd(monkeypatch):
    """fa3.flash_attn_varlen_func(..., learnable_sink=s).backward(): forward + backward kernels,
    sink.grad included (the features are let through the VERIFIED_FEATURES gate here)."""
    import fa3
    from fa3.hopper import flash_bwd as fb

    monkeypatch.setattr(fb, "VERIFIED_FEATURES", fb.IMPLEMENTED_FEATURES)
    lens_q, lens_k = [0, 1, 300, 77], [5, 1, 333, 0]
    h, hk, d = 4, 2, 128
    torch.manual_seed(1)
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    do = torch.randn_like(q)
    sink = torch.randn(h, device="cuda", dtype=torch.float32)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    for causal in (False, True):
        def api(q, k, v, s):
            return (fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                               causal=causal, learnable_sink=s),)

        def ref(upcast):
            return lambda q, k, v, s: attention_varlen_ref(q, k, v, cu_q, cu_k, causal=causal,
                                                           sink=s, upcast=upcast)

        got = _grads(api, (q, k, v, sink), do)
        _check(got, _grads(ref(True), (q, k, v, sink), do), _grads(ref(False), (q, k, v, sink), do),
               ("dq", "dk", "dv", "dsink"), torch.bfloat16)
