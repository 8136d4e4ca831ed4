"""Hopper backward vs the fp32 oracle's autograd, by FA's rule, on the lent GPU (skipped elsewhere).

For each of dQ, dK, dV: max|g - g_ref| <= 2 * max|g_pt - g_ref| + atol, where g_ref comes from the
fp32 reference and g_pt from the same reference run in the inputs' precision. Gradient outputs are
NaN-poisoned buffers filled by the kernels (flash_bwd allocates them with torch.empty, and the
empty_like memory is poisoned first by the test's allocator pass below). deterministic=True must
give bitwise-equal gradients run to run.
"""
import math

import pytest
import torch

from fa3.reference import attention_ref
from fa3.testing import assert_fa_close, hopper_available, random_qkv, rounding_atol

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not hopper_available(), reason="needs a Hopper (sm_90) GPU")]

SEQLENS = [(1, 1), (113, 203), (799, 3), (3, 1100), (1024, 1024), (1000, 1357)]
BHS = [(2, 4, 4), (1, 6, 2)]  # (batch, heads, kv heads): MHA and GQA


def _poison_allocator():
    """Fill the caching allocator's free blocks with NaN so torch.empty inside flash_bwd returns
    NaN-filled memory: an element the kernels never write then fails the check."""
    x = torch.empty(64 << 20, device="cuda", dtype=torch.float32).fill_(float("nan"))
    del x


def grads_ref(q, k, v, do, causal, upcast, window=(-1, -1), softcap=0.0):
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, _ = attention_ref(qr, kr, vr, causal=causal, upcast=upcast, window_size=window,
                           softcap=softcap)
    out.backward(do)
    return qr.grad, kr.grad, vr.grad


def run_bwd(q, k, v, do, causal, deterministic=False, window=None, softcap=0.0, **cfg):
    """The backward kernels alone: out and LSE come from the oracle (rounded to the dtype), so a
    forward bug cannot mask or fake a backward one (the API test covers the pair)."""
    from fa3.hopper.flash_bwd import flash_bwd

    out, lse = attention_ref(q, k, v, causal=causal, window_size=window or (-1, -1), softcap=softcap)
    scale = 1.0 / math.sqrt(q.shape[-1])
    _poison_allocator()
    feats = {}
    if window is not None:
        feats.update(window=window, allow_unverified=True)
    if softcap:
        feats.update(softcap=softcap, allow_unverified=True)
    return flash_bwd(do, q, k, v, out, lse, scale, causal, deterministic, cfg_overrides=cfg, **feats)


def make(b, h, hk, sq, sk, d, dtype):
    q, k, v = random_qkv(b, h, hk, sq, sk, d, dtype)
    do = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    return q, k, v, do


def check(b, h, hk, sq, sk, d, dtype, causal, deterministic=False, window=None, softcap=0.0, **cfg):
    q, k, v, do = make(b, h, hk, sq, sk, d, dtype)
    got = run_bwd(q, k, v, do, causal, deterministic, window, softcap, **cfg)
    ref = grads_ref(q, k, v, do, causal, True, window or (-1, -1), softcap)
    pt = grads_ref(q, k, v, do, causal, False, window or (-1, -1), softcap)
    for name, g, r, p in zip(("dq", "dk", "dv"), got, ref, pt):
        assert g.dtype == q.dtype and g.shape == r.shape
        assert_fa_close(g, r, p, atol=rounding_atol(dtype), name=name)
    return q, k, v, do, got


@pytest.mark.parametrize("bhs", BHS, ids=lambda x: "b%dh%dhk%d" % x)
@pytest.mark.parametrize("sq,sk", SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_bwd(d, dtype, causal, sq, sk, bhs):
    check(*bhs, sq, sk, d, dtype, causal)


@pytest.mark.parametrize("d,causal,det,bhs", [(64, False, False, (2, 4, 4)), (128, True, False, (1, 6, 2)),
                                              (128, False, True, (2, 4, 4)), (256, False, False, (2, 4, 4)),
                                              (256, True, True, (1, 6, 2))])
def test_bwd_pdl(d, causal, det, bhs):
    """Dependent launches (BwdConfig.pdl, off by default): each kernel waits for the one before
    it (preprocess -> main -> postprocess) before touching its output; dq_red and deterministic
    included (the adds and the semaphores need the preprocess's zeros)."""
    check(*bhs, 1000, 1357, d, torch.bfloat16, causal, deterministic=det, pdl=True)


TILE80 = dict(tile_m=80)  # (default_config turns stats_early and dv_early off there)


@pytest.mark.parametrize("bhs", BHS, ids=lambda x: "b%dh%dhk%d" % x)
@pytest.mark.parametrize("sq,sk", SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bwd_tile80(dtype, causal, sq, sk, bhs):
    """80-query tiles at hd128 (FA3's non-causal choice): dQ computed transposed (dQ^T = K^T dS^T)
    and mapped back by the postprocess; ragged tails at 80-row granularity."""
    check(*bhs, sq, sk, 128, dtype, causal, **TILE80)


@pytest.mark.parametrize("causal", [False, True])
def test_bwd_tile80_deterministic(causal):
    q, k, v, do, first = check(2, 4, 4, 1000, 1357, 128, torch.bfloat16, causal, deterministic=True,
                               **TILE80)
    for _ in range(10):
        again = run_bwd(q, k, v, do, causal, deterministic=True, **TILE80)
        for a, g in zip(first, again):
            assert torch.equal(a, g), "deterministic backward differs between runs"


@pytest.mark.parametrize("bhs", BHS, ids=lambda x: "b%dh%dhk%d" % x)
@pytest.mark.parametrize("sq,sk", SEQLENS)
@pytest.mark.parametrize("d,causal", [(128, True), (64, False)], ids=["hd128-causal", "hd64"])
def test_bwd_stats_early(d, causal, sq, sk, bhs):
    """LSE / D loaded into registers under the S GEMM (BwdConfig.stats_early) where the default
    loads them after it: causal hd128 (masked blocks included) and hd64's 128-query tile."""
    check(*bhs, sq, sk, d, torch.bfloat16, causal, stats_early=True)


@pytest.mark.parametrize("bhs", BHS, ids=lambda x: "b%dh%dhk%d" % x)
@pytest.mark.parametrize("sq,sk", SEQLENS + [(2000, 4100)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 96, 128])
def test_bwd_persistent(d, causal, sq, sk, bhs):
    """One CTA per SM walking KV tiles (BwdConfig.persistent): the next tile's K / V, Q and dO
    load while a tile stores dK / dV (staged in the dS / dQ buffers; GQA from registers); causal
    takes its tiles from the global counter (KV blocks no query sees included)."""
    check(*bhs, sq, sk, d, torch.bfloat16, causal, persistent=True)


@pytest.mark.parametrize("bhs", BHS, ids=lambda x: "b%dh%dhk%d" % x)
@pytest.mark.parametrize("sq,sk", SEQLENS + [(2000, 4100)])
@pytest.mark.parametrize("causal", [False, True])
def test_bwd_persistent_tile80(causal, sq, sk, bhs):
    """The persistent grid with 80-query tiles at hd128 (FA4's non-causal tile; dQ transposed):
    dK / dV staged in the 80 x 128 dS ring and the 80-row dQ buffer."""
    check(*bhs, sq, sk, 128, torch.bfloat16, causal, persistent=True, **TILE80)


GROUP_BHS = [(2, 8, 2), (1, 6, 1), (1, 4, 4)]  # (batch, heads, kv heads): 4:1, MQA 6:1, MHA


@pytest.mark.parametrize("bhs", GROUP_BHS, ids=lambda x: "b%dh%dhk%d" % x)
@pytest.mark.parametrize("sq,sk", SEQLENS + [(2000, 4100)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_bwd_group_loop(d, causal, sq, sk, bhs):
    """GQA with one CTA per KV head walking its group's query heads (BwdConfig.group_loop): dK / dV
    summed over the group in registers and stored once in the input dtype; dQ per query head."""
    check(*bhs, sq, sk, d, torch.float16 if causal else torch.bfloat16, causal, group_loop=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_bwd_group_loop_default(d, causal):
    """GQA with enough KV-head CTAs for an H100's / H200's 132 SMs (16 x 8 = 128 non-causal, 32 x
    8 x 2 = 512 causal) takes group_loop with no override (flash_bwd.group_loop_wins); the ragged
    last KV block included."""
    from fa3.hopper import flash_bwd as fb

    fb._PLANS.clear()
    if causal:
        check(2, 16, 8, 4096, 4000, d, torch.bfloat16, causal)
    else:
        check(1, 16, 8, 2048, 2000, d, torch.bfloat16, causal)
    assert [p.cfg.group_loop for p in fb._PLANS.values()] == [True]


@pytest.mark.parametrize("bhs", GROUP_BHS[:2], ids=lambda x: "b%dh%dhk%d" % x)
@pytest.mark.parametrize("sq,sk", [(113, 203), (1000, 1357), (2000, 4100)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_bwd_group_loop_persistent(d, causal, sq, sk, bhs):
    """group_loop on the persistent grid: tiles over KV heads (causal: from the counter)."""
    check(*bhs, sq, sk, d, torch.bfloat16, causal, group_loop=True, persistent=True)


@pytest.mark.parametrize("bhs", GROUP_BHS[:2], ids=lambda x: "b%dh%dhk%d" % x)
@pytest.mark.parametrize("sq,sk", [(1, 1), (113, 203), (799, 3), (1000, 1357), (2000, 4100)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_bwd_dkv_red(d, causal, sq, sk, bhs):
    """GQA's dK / dV added from every query head's CTA into per-KV-head fp32 accumulators
    (BwdConfig.dkv_red, red.global.add.v2.f32), then converted; ragged KV tails skipped."""
    check(*bhs, sq, sk, d, torch.float16 if causal else torch.bfloat16, causal, group_loop=False,
          dkv_red=True)


@pytest.mark.parametrize("sq,sk", [(113, 203), (1000, 1357)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_bwd_gqa_partials(d, causal, sq, sk):
    """GQA's per-query-head fp32 partials summed over the group (dkv_red off: what deterministic
    and the features use)."""
    check(2, 8, 2, sq, sk, d, torch.bfloat16, causal, group_loop=False, dkv_red=False)


@pytest.mark.parametrize("causal", [False, True])
def test_bwd_group_loop_deterministic(causal):
    """group_loop keeps the semaphores' order per (query head, m): bitwise equal runs."""
    q, k, v, do, first = check(2, 8, 2, 1000, 1357, 128, torch.bfloat16, causal, deterministic=True,
                               group_loop=True)
    for _ in range(10):
        again = run_bwd(q, k, v, do, causal, deterministic=True, group_loop=True)
        for a, g in zip(first, again):
            assert torch.equal(a, g)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_bwd_persistent_many_tiles(d, causal):
    """Many tiles per CTA (4 x 16 heads x 33 ragged KV blocks over the SMs), fp16, run twice:
    the pipelines' phases, the tile ring and the dQ buffer's handover carry across tiles, and
    the counter restarts from the preprocess's zero."""
    q, k, v, do, first = check(4, 16, 16, 700, 4200, d, torch.float16, causal, persistent=True)
    again = run_bwd(q, k, v, do, causal, persistent=True)
    for a, g in zip(first, again):
        assert not torch.isnan(g).any()
        assert (a.float() - g.float()).abs().max() <= 1e-2 * a.float().abs().max() + 1e-3


@pytest.mark.parametrize("d,b,h,hk,sq,sk", [(64, 2, 16, 16, 4224, 4224), (128, 2, 20, 4, 2000, 2100),
                                             (256, 3, 8, 8, 1024, 1357)])
def test_bwd_lpt_groups(d, b, h, hk, sq, sk):
    """Causal KV blocks heaviest first over several L2 groups of heads (BwdConfig.lpt; the grid
    tests above fit one group), uneven group sizes included."""
    from fa3.hopper.tile_scheduler import L2_GROUP_BYTES

    group = min(max(L2_GROUP_BYTES // (sq * 8 * d), 1), b * h)  # the kernel's lpt_group
    assert -(-b * h // group) >= 2
    check(b, h, hk, sq, sk, d, torch.bfloat16, True, lpt=True)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bhs", [(2, 4, 4), (1, 6, 2)], ids=["mha", "gqa"])
def test_bwd_deterministic(d, causal, bhs):
    """deterministic=True: correct, and bitwise equal over repeated runs (100 for hd128 MHA)."""
    q, k, v, do, first = check(*bhs, 1000, 1357, d, torch.bfloat16, causal, deterministic=True)
    reps = 100 if (d == 128 and bhs[1] == bhs[2]) else 10
    for _ in range(reps):
        again = run_bwd(q, k, v, do, causal, deterministic=True)
        for a, g in zip(first, again):
            assert torch.equal(a, g), "deterministic backward differs between runs"


@pytest.mark.parametrize("sq,sk", [(1000, 1357), (4224, 4224), (1357, 1000)])
def test_bwd_deterministic_spt(sq, sk):
    """spt (causal, KV blocks added last-first) is deterministic and correct too."""
    q, k, v, do, first = check(2, 4, 4, sq, sk, 128, torch.bfloat16, True, deterministic=True,
                               spt=True)
    for _ in range(10):
        again = run_bwd(q, k, v, do, True, deterministic=True, spt=True)
        for a, g in zip(first, again):
            assert torch.equal(a, g), "deterministic backward differs between runs"


@pytest.mark.parametrize("bhs", [(2, 4, 4), (1, 6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("sq,sk", [(113, 203), (1024, 1024), (1000, 1357)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [192, 256])
def test_bwd_dq_red(d, causal, sq, sk, bhs):
    """BwdConfig.dq_red (dQ added from registers; hd256 then runs two Q / dO stages; hd192's
    default has it with 96-key tiles (dkv_swap): here its 64-key layout)."""
    check(*bhs, sq, sk, d, torch.bfloat16, causal, dq_red=True,
          **(dict(dkv_swap=False) if d == 192 else {}))


@pytest.mark.parametrize("feat", [dict(window=(100, 50)), dict(softcap=30.0), dict(stages=3)],
                         ids=["window", "softcap", "stages3"])
@pytest.mark.parametrize("d", [192, 256])
def test_bwd_dq_red_features(d, feat):
    """dq_red with a sliding window, softcap (GQA), and hd192's third Q / dO stage (at 64-key
    tiles: with hd192's default 96, dkv_swap, three do not fit)."""
    if "stages" in feat and d == 256:
        pytest.skip("three hd256 stages do not fit in smem")
    if "stages" in feat:
        feat = dict(feat, dkv_swap=False)
    check(1, 6, 2, 1000, 1357, d, torch.bfloat16, False, dq_red=True, **feat)


EARLY = [dict(dv_early=True), dict(dk_early=True), dict(dv_early=True, dk_early=True),
         dict(desc_hoist=True), dict(desc_hoist=True, dv_early=True, dk_early=True),
         dict(desc_hoist=True, dk_early=True)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d,sw", [(128, 0), (128, 1), (128, 2), (128, 3), (128, 4), (64, 1), (64, 5)],
                         ids=["hd128-dv", "hd128-dk", "hd128-dvdk", "hd128-hoist", "hd128-all",
                              "hd64-dk", "hd64-hoistdk"])
def test_bwd_early(d, sw, causal):
    """BwdConfig.dv_early / dk_early (GEMM issue order in the swapped layout) and desc_hoist:
    ragged, square and long-K shapes; the combinations with GQA too."""
    bhs = [(2, 4, 4), (1, 6, 2)] if sw in (2, 4, 5) else [(2, 4, 4)]
    for b, h, hk in bhs:
        for sq, sk in [(113, 203), (1024, 1024), (1000, 1357)]:
            check(b, h, hk, sq, sk, d, torch.bfloat16, causal, **EARLY[sw])


@pytest.mark.parametrize("feat", [dict(window=(100, 50)), dict(deterministic=True)],
                         ids=["window", "deterministic"])
def test_bwd_early_features(feat):
    """All three switches with a sliding window, and deterministic causal (spt) fp16."""
    causal = "deterministic" in feat
    check(1, 6, 2, 1000, 1357, 128, torch.float16, causal, **feat, **EARLY[4])


WINDOWS = [(64, 0), (100, 50), (-1, 32), (0, 0), (256, -1)]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: "w%d_%d" % w)
@pytest.mark.parametrize("sq,sk", [(113, 203), (799, 3), (3, 1100), (1000, 1357), (1024, 1024)])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_bwd_window(d, sq, sk, window):
    """Sliding window (a feature users get only while these pass: VERIFIED_FEATURES)."""
    check(1, 6, 2, sq, sk, d, torch.bfloat16, False, window=window)


@pytest.mark.parametrize("window", [(100, 50), (-1, 32), (256, -1), (300, 200), (700, 0)],
                         ids=lambda w: "w%d_%d" % w)
@pytest.mark.parametrize("sq,sk", [(113, 203), (3, 1100), (1000, 1357), (2048, 1500)])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_bwd_window_split(d, sq, sk, window):
    """The window's all-masked walk (BwdConfig.window_split=False, the A/B fallback; the default
    runs the blocks inside the window unmasked, between masked blocks on both edges); MHA (dK /
    dV by TMA) and GQA."""
    bhs = (2, 4, 4) if sq % 2 else (1, 6, 2)
    check(*bhs, sq, sk, d, torch.bfloat16, False, window=window, window_split=False)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_bwd_window_split_deterministic(d):
    q, k, v, do, first = check(2, 4, 4, 1000, 1357, d, torch.float16, False, deterministic=True,
                               window=(300, 200), window_split=False)
    again = run_bwd(q, k, v, do, False, deterministic=True, window=(300, 200), window_split=False)
    for a, g in zip(first, again):
        assert torch.equal(a, g), "deterministic backward differs between runs"


@pytest.mark.parametrize("d", [64, 128, 256])
def test_bwd_window_deterministic(d):
    q, k, v, do, first = check(2, 4, 4, 1000, 1357, d, torch.bfloat16, False, deterministic=True,
                               window=(200, 100))
    for _ in range(10):
        again = run_bwd(q, k, v, do, False, deterministic=True, window=(200, 100))
        for a, g in zip(first, again):
            assert torch.equal(a, g), "deterministic backward differs between runs"


@pytest.mark.parametrize("window", [None, (100, 50)], ids=["nowin", "win"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(113, 203), (1000, 1357), (3, 1100)])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_bwd_softcap(d, sq, sk, causal, window):
    """softcap 30 on scores scaled up 3x (so tanh saturates for some), GQA (VERIFIED_FEATURES lists
    softcap because these pass)."""
    if causal and window is not None:
        pytest.skip("causal + window is the window (left, 0), covered by test_bwd_window")
    q, k, v, do = make(1, 6, 2, sq, sk, d, torch.bfloat16)
    got = run_bwd(q * 3, k, v, do, causal, window=window, softcap=30.0)
    for name, g, r, p in zip(("dq", "dk", "dv"), got,
                             grads_ref(q * 3, k, v, do, causal, True, window or (-1, -1), 30.0),
                             grads_ref(q * 3, k, v, do, causal, False, window or (-1, -1), 30.0)):
        assert_fa_close(g, r, p, atol=rounding_atol(torch.bfloat16), name=name)


@pytest.mark.parametrize("causal", [False, True])
def test_autograd_through_api(causal):
    """fa3.flash_attn_func(...).backward() on sm90 gives the oracle's gradients (and under
    torch.compile(fullgraph=True) too)."""
    import fa3

    q, k, v, do = make(2, 4, 2, 333, 517, 128, torch.bfloat16)
    ref = grads_ref(q, k, v, do, causal, True)
    pt = grads_ref(q, k, v, do, causal, False)
    f = lambda q, k, v: fa3.flash_attn_func(q, k, v, causal=causal)
    for fn in (f, torch.compile(f, fullgraph=True)):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        fn(qg, kg, vg).backward(do)
        for name, g, r, p in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), ref, pt):
            assert_fa_close(g, r, p, atol=rounding_atol(torch.bfloat16), name=name)
