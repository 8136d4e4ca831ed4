"""sm80 attention backward vs the fp32 oracle's autograd, by FA's rule, on a GPU of capability >= 8.0
(on the lent Hopper GPU the same kernels are built for sm_90), through the public API
(fa3.flash_attn_func(..., backend="sm80")) and through flash_bwd_sm80 directly.

For each of dq, dk, dv: max|g - g_ref| <= 2 * max|g_pt - g_ref| + atol, g_ref from the fp32
reference, g_pt from the same-precision PyTorch attention, atol FA's (a few ulps of the gradient's
magnitude in the input dtype). Outputs are allocated by the kernel wrapper, so the caching allocator
is poisoned (a NaN-filled block freed just before) to make unwritten elements show up as NaN.
"""
import math

import pytest
import torch

import fa3
from fa3.reference import attention_ref
from fa3.testing import assert_fa_close, max_err, rounding_atol

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)),
                       reason="needs a CUDA GPU with compute capability >= 8.0"),
]

SEQLENS = [(1, 1), (113, 203), (799, 3), (3, 1100), (1024, 1024)]
BHS = [(2, 4, 4), (1, 6, 2)]  # (batch, heads, kv heads): MHA and GQA


def poison_allocator(nbytes=256 << 20):
    torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).fill_(float("nan"))


def grad_atol(ref, dtype):
    # FA's tests: twice the rounding step of the reference gradient's values in the input dtype
    r = ref.to(dtype)
    return max(2 * (r + 0.3 - 0.3 - r).abs().max().item(), rounding_atol(dtype))


def grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return out, q.grad, k.grad, v.grad


def check(b, h, hk, sq, sk, d, dtype, causal, make=None, window_size=(-1, -1), softcap=0.0,
          bwd_overrides=None):
    """bwd_overrides: call flash_fwd_sm80 / flash_bwd_sm80 directly with these BwdSm80Config
    fields (e.g. the sm_80 build's scalar dQ atomics on the Hopper GPU), else the public API."""
    torch.manual_seed(sq * 7 + sk + d + h + causal)
    if make is None:
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    else:
        q, k, v = make(b, h, hk, sq, sk, d, dtype)
    g = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    feat = dict(window_size=window_size, softcap=softcap)
    poison_allocator()
    if bwd_overrides is None:
        out, dq, dk, dv = grads(lambda q, k, v: fa3.flash_attn_func(q, k, v, causal=causal,
                                                                    backend="sm80", **feat), q, k, v, g)
    else:
        out, dq, dk, dv = direct(q, k, v, g, causal, bwd_overrides)
    out_ref, *ref = grads(lambda q, k, v: attention_ref(q, k, v, causal=causal, **feat)[0], q, k, v, g)
    out_pt, *pt = grads(lambda q, k, v: attention_ref(q, k, v, causal=causal, upcast=False,
                                                      reorder_ops=True, **feat)[0], q, k, v, g)
    assert_fa_close(out, out_ref, out_pt, atol=rounding_atol(dtype))
    for name, x, x_ref, x_pt in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, pt):
        assert not torch.isnan(x).any(), f"{name} has NaN (unwritten or bad math)"
        assert_fa_close(x, x_ref, x_pt, atol=grad_atol(x_ref, dtype), name=name)
    return dq, dk, dv


def direct(q, k, v, g, causal, overrides):
    from fa3.ampere.flash_bwd_sm80 import flash_bwd_sm80
    from fa3.ampere.flash_fwd_sm80 import flash_fwd_sm80

    b, sq, h, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, sq, device=q.device)
    flash_fwd_sm80(q, k, v, out, lse, 1 / math.sqrt(d), causal)
    poison_allocator()
    return (out, *flash_bwd_sm80(g, q, k, v, out, lse, 1 / math.sqrt(d), causal,
                                 cfg_overrides=overrides))


@pytest.mark.parametrize("bhs", BHS, ids=lambda x: "b%dh%dhk%d" % x)
@pytest.mark.parametrize("sq,sk", SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
def test_bwd_bf16(d, causal, sq, sk, bhs):
    check(*bhs, sq, sk, d, torch.bfloat16, causal)


@pytest.mark.parametrize("sq,sk", [(113, 203), (799, 3), (1024, 1024)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
def test_bwd_fp16(d, causal, sq, sk):
    check(1, 6, 2, sq, sk, d, torch.float16, causal)


def test_bwd_long_causal_mqa():
    check(1, 4, 1, 2177, 2177, 128, torch.bfloat16, True)


def test_mqa_large_batch():
    check(9, 3, 1, 65, 129, 64, torch.float16, True)


def _strided(b, h, hk, sq, sk, d, dtype):
    q = torch.randn(b, sq, h + 2, d, device="cuda", dtype=dtype)[:, :, 1:-1]
    kv = torch.randn(b, sk, 2, hk, d + 8, device="cuda", dtype=dtype)[..., :d]
    return q, kv[:, :, 0], kv[:, :, 1]


@pytest.mark.parametrize("d", [64, 128])
def test_bwd_strided_inputs(d):
    check(2, 4, 2, 300, 517, d, torch.bfloat16, True, make=_strided)


def test_direct_call_reruns_equal_dkdv():
    """dK/dV come from registers of one CTA (bitwise stable); dQ sums atomics in any order."""
    from fa3.ampere.flash_bwd_sm80 import flash_bwd_sm80
    from fa3.ampere.flash_fwd_sm80 import flash_fwd_sm80

    b, sq, sk, h, d = 2, 300, 400, 4, 128
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for s in (sq, sk, sk, sq))
    out = torch.empty_like(q)
    lse = torch.empty(b, h, sq, device="cuda")
    flash_fwd_sm80(q, k, v, out, lse, 1 / math.sqrt(d), True)
    r1 = flash_bwd_sm80(do, q, k, v, out, lse, 1 / math.sqrt(d), True)
    r2 = flash_bwd_sm80(do, q, k, v, out, lse, 1 / math.sqrt(d), True)
    assert torch.equal(r1[1], r2[1]) and torch.equal(r1[2], r2[2])
    assert max_err(r1[0], r2[0]) <= 2 * rounding_atol(torch.bfloat16) * r1[0].abs().max().item()
    with pytest.raises(NotImplementedError, match="deterministic"):
        flash_bwd_sm80(do, q, k, v, out, lse, 1 / math.sqrt(d), True, deterministic=True)


# The sm_80 build's dQ path (scalar atomics; the sm_90 build defaults to 4-wide ones), its hd64
# tile (64 x 128; the sm_90 build's is 128 x 128) and the dQ-after-dK order, run on this GPU by
# overriding the config.
SM80_HD64_TILE = dict(tile_m=64, tile_n=128, warps_m_sdp=2, warps_m_dq=2)


@pytest.mark.parametrize("over", [dict(dq_vec=1), dict(dq_first=False), SM80_HD64_TILE], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk,d", [(113, 203, 64), (799, 640, 128), (257, 1100, 256)])
def test_bwd_config_paths(sq, sk, d, causal, over):
    if "tile_m" in over and d != 64:
        pytest.skip("the hd64 tiles differ by arch only")
    check(2, 4, 2, sq, sk, d, torch.bfloat16, causal, bwd_overrides=over)


FEATURES = [dict(window_size=(64, 0)), dict(window_size=(64, 0), causal=True),
            dict(window_size=(32, 48)), dict(window_size=(-1, 16)), dict(window_size=(100, -1)),
            dict(softcap=15.0), dict(softcap=15.0, causal=True),
            dict(window_size=(100, 7), softcap=30.0)]


@pytest.mark.parametrize("feat", FEATURES, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
@pytest.mark.parametrize("sq,sk", [(113, 203), (799, 640), (1024, 1024), (3, 1100)])
@pytest.mark.parametrize("d", [64, 128])
def test_bwd_window_softcap(d, sq, sk, feat):
    feat = dict(feat)
    causal = feat.pop("causal", False)
    check(1, 4, 2, sq, sk, d, torch.bfloat16, causal, **feat)


def test_window_softcap_fp16_hd256():
    check(1, 2, 1, 300, 517, 256, torch.float16, False, window_size=(50, 20), softcap=20.0)
