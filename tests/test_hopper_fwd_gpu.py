"""Hopper forward kernel vs the fp32 oracle, by FA's rule, on the lent GPU (skipped elsewhere).

max|out - ref| <= 2 * max|out_pt - ref| + atol (out_pt: same-precision PyTorch attention); outputs are
poisoned (NaN) before each launch so an unwritten element fails; LSE checked; reruns bitwise equal.
"""
import math

import pytest
import torch

from fa3.reference import attention_ref
from fa3.testing import assert_fa_close, hopper_available, max_err, poison_, random_qkv, rounding_atol

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not hopper_available(), reason="needs a Hopper (sm_90) GPU")]

SEQLENS = [(1, 1), (113, 203), (799, 3), (1024, 1024), (4224, 4224), (3, 1100)]
BHS = [(2, 4, 4), (1, 6, 2)]  # (batch, heads, kv heads): MHA and GQA


def run_fwd(q, k, v, causal, **cfg):
    from fa3.hopper.flash_fwd import flash_fwd

    b, sq, h, _ = q.shape
    out = poison_(torch.empty(b, sq, h, v.shape[-1], dtype=q.dtype, device=q.device))
    lse = poison_(torch.empty(b, h, sq, dtype=torch.float32, device=q.device))
    flash_fwd(q, k, v, out, lse, 1.0 / math.sqrt(q.shape[-1]), causal, config_overrides=cfg)
    return out, lse


def check(b, h, hk, sq, sk, d, dtype, causal, **cfg):
    q, k, v = random_qkv(b, h, hk, sq, sk, d, dtype)
    out, lse = run_fwd(q, k, v, causal, **cfg)
    out_ref, lse_ref = attention_ref(q, k, v, causal=causal)
    out_pt, _ = attention_ref(q, k, v, causal=causal, upcast=False)
    assert_fa_close(out, out_ref, out_pt, atol=rounding_atol(dtype))
    lse_err = max_err(lse, lse_ref)
    assert lse_err <= 1e-3 * (1 + lse_ref[torch.isfinite(lse_ref)].abs().max().item()
                              if torch.isfinite(lse_ref).any() else 1), f"lse error {lse_err}"
    out2, lse2 = run_fwd(q, k, v, causal, **cfg)
    assert torch.equal(out, out2) and torch.equal(lse, lse2), "reruns differ"


@pytest.mark.parametrize("bhs", BHS, ids=lambda x: "b%dh%dhk%d" % x)
@pytest.mark.parametrize("sq,sk", SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_fwd(d, dtype, causal, sq, sk, bhs):
    check(*bhs, sq, sk, d, dtype, causal)


ABLATIONS = [dict(overlap=False), dict(pingpong=False), dict(overlap=False, pingpong=False),
             dict(persistent=False), dict(p_after_wait=False, rescale_threshold=None),
             dict(p_after_wait=True), dict(rescale_threshold=0.0)]


@pytest.mark.parametrize("cfg", ABLATIONS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(113, 203), (1024, 1024), (799, 3)])
def test_fwd_ablation(cfg, causal, sq, sk):
    check(2, 4, 2, sq, sk, 128, torch.bfloat16, causal, **cfg)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_fwd_long_kv_defaults(d, causal):
    """Past 8k keys the heuristic switches schedules (one CTA per tile at hd128 and causal hd64,
    16 MB L2 groups past 32 query blocks); a ragged length so the last tiles are partial."""
    check(1, 2, 2, 8448, 8448, d, torch.bfloat16, causal)


EXP2_EMU = [(64, torch.bfloat16, 4), (64, torch.float16, 2), (128, torch.bfloat16, 2),
            (128, torch.float16, 4), (256, torch.bfloat16, 4)]


@pytest.mark.parametrize("d,dtype,emu", EXP2_EMU, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(113, 203), (1024, 1024), (799, 3)])
def test_fwd_exp2_emu(d, dtype, emu, causal, sq, sk):
    """1 column in `emu` of P from the FMA polynomial (softmax.exp2_poly) instead of MUFU, masked
    keys (causal, ragged tails) included: FA's error rule, LSE and bitwise reruns as everywhere."""
    check(2, 4, 2, sq, sk, d, dtype, causal, exp2_emu=emu)


@pytest.mark.parametrize("cfg", [{}, dict(rescale_threshold=None), dict(exp2_emu=2)],
                         ids=["lazy", "every_block", "exp2_emu2"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_fwd_rising_max(d, causal, cfg):
    """Scores that grow towards the low keys, which the kernel visits last: each row's max keeps
    rising, by more than the lazy rescale's 8 log2 units over the walk, so rows both keep a stale
    max (P up to 2^8) and rescale."""
    b, h, s = 2, 4, 1536
    q, k, v = random_qkv(b, h, h, s, s, d, torch.bfloat16)
    ramp = torch.linspace(4.0, 1.0, s, device=q.device).view(1, s, 1, 1)
    k = (k.float() * ramp).to(k.dtype)
    q = (q.float() * 2.0).to(q.dtype)
    out, lse = run_fwd(q, k, v, causal, **cfg)
    out_ref, lse_ref = attention_ref(q, k, v, causal=causal)
    out_pt, _ = attention_ref(q, k, v, causal=causal, upcast=False)
    assert_fa_close(out, out_ref, out_pt, atol=rounding_atol(torch.bfloat16))
    assert max_err(lse, lse_ref) <= 1e-3 * (1 + lse_ref.abs().max().item())


TILES = [dict(d=256, tile_n=64), dict(d=128, tile_n=176), dict(d=64, tile_m=128),
         dict(d=64, stages=3), dict(d=128, tile_n=96), dict(d=128, rescale_early=True),
         dict(d=256, rescale_early=False), dict(d=256, persistent=True),
         dict(d=256, persistent=True, o_in_q=False), dict(d=256, persistent=False, o_in_q=False),
         dict(d=64, tile_m=192), dict(d=64, persistent=False), dict(d=128, persistent=False),
         dict(d=64, tile_m=128, tile_n=192), dict(d=64, q_stages=2, wg_epilogue=True),
         dict(d=128, q_stages=2, wg_epilogue=True), dict(d=128, q_stages=2),
         dict(d=64, wg_epilogue=False), dict(d=128, wg_epilogue=False),
         dict(d=128, diag_half=1), dict(d=128, diag_half=2), dict(d=128, diag_half=2, pack_gqa=1),
         dict(d=64, tile_m=128, diag_half=2)]


@pytest.mark.parametrize("tiles", TILES, ids=lambda c: "-".join(f"{k}{int(v)}" for k, v in c.items()))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(113, 203), (1024, 1024), (799, 3), (3, 1100)])
def test_fwd_tile_variants(tiles, causal, sq, sk):
    tiles = dict(tiles)
    if tiles.get("diag_half") and not causal:
        pytest.skip("diag_half is a causal switch")
    d = tiles.pop("d")
    check(2, 4, 2, sq, sk, d, torch.bfloat16, causal, **tiles)


@pytest.mark.parametrize("cfg", [dict(), dict(q_stages=2), dict(wg_epilogue=False)],
                         ids=lambda c: "-".join(f"{k}{int(v)}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("hk", [16, 2], ids=["mha", "pack8"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_fwd_many_tiles_per_cta(d, causal, hk, cfg):
    """Several tiles per persistent CTA (384-768 tiles), so the Q ring wraps (q_stages = 2) and
    each warpgroup's O slice (wg_epilogue, the default) is rewritten while its previous TMA store
    may be in flight; a ragged length so the last tile's rows are clipped; with 8 query heads
    per kv head packed into a tile's rows, a warpgroup's O slice holds 8 positions of 8 heads."""
    check(4, 16, hk, 1000, 1000, d, torch.bfloat16, causal, **cfg)


def test_fwd_strided_views():
    """Non-contiguous q/k/v (sliced from packed qkv) and an lse with a padded seqlen stride."""
    torch.manual_seed(1)
    b, s, h, d = 2, 300, 4, 128
    qkv = torch.randn(b, s, 3, h, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    from fa3.hopper.flash_fwd import flash_fwd

    out = poison_(torch.empty(b, s, h, d, device="cuda", dtype=torch.bfloat16))
    lse_buf = poison_(torch.empty(b, h, s + 5, device="cuda", dtype=torch.float32))
    lse = lse_buf[:, :, :s]
    flash_fwd(q, k, v, out, lse, d ** -0.5, True)
    out_ref, lse_ref = attention_ref(q, k, v, causal=True)
    out_pt, _ = attention_ref(q, k, v, causal=True, upcast=False)
    assert_fa_close(out, out_ref, out_pt, atol=rounding_atol(torch.bfloat16))
    assert max_err(lse, lse_ref) < 1e-2
