"""sm80 attention forward vs the fp32 oracle, by FA's rule, on a GPU of capability >= 8.0 (on the lent
Hopper GPU the same kernel is built for sm_90).

max|out - ref| <= 2 * max|out_pt - ref| + atol (out_pt: same-precision PyTorch attention, q scaled
first); outputs poisoned with NaN before each launch; LSE vs the oracle's; reruns bitwise equal.
"""
import math

import pytest
import torch

from fa3.reference import attention_ref
from fa3.testing import assert_fa_close, max_err, poison_, rounding_atol

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)),
                       reason="needs a CUDA GPU with compute capability >= 8.0"),
]

SEQLENS = [(1, 1), (113, 203), (799, 3), (1024, 1024), (3, 1100)]
BHS = [(2, 4, 4), (1, 6, 2)]  # (batch, heads, kv heads): MHA and GQA


def run_fwd(q, k, v, causal, **cfg):
    from fa3.ampere.flash_fwd_sm80 import flash_fwd_sm80

    b, sq, h, d = q.shape
    out = poison_(torch.empty(b, sq, h, d, dtype=q.dtype, device=q.device))
    lse = poison_(torch.empty(b, h, sq, dtype=torch.float32, device=q.device))
    flash_fwd_sm80(q, k, v, out, lse, 1.0 / math.sqrt(d), causal, **cfg)
    return out, lse


def check(b, h, hk, sq, sk, d, dtype, causal, make=None, **cfg):
    torch.manual_seed(sq * 7 + sk + d + h)
    if make is None:
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    else:
        q, k, v = make(b, h, hk, sq, sk, d, dtype)
    out, lse = run_fwd(q, k, v, causal, **cfg)
    out_ref, lse_ref = attention_ref(q, k, v, causal=causal)
    out_pt, _ = attention_ref(q, k, v, causal=causal, upcast=False, reorder_ops=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_fa_close(out, out_ref, out_pt, atol=rounding_atol(dtype))
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse)), "fully masked rows must have LSE = -inf"
    assert (lse[~fin] == -math.inf).all()
    assert (out.float().permute(0, 2, 1, 3)[~fin] == 0).all(), "fully masked rows must have O = 0"
    scale = 1 + (lse_ref[fin].abs().max().item() if fin.any() else 0)
    lse_err = max_err(lse, lse_ref)
    assert lse_err <= 1e-3 * scale, f"lse error {lse_err}"
    out2, lse2 = run_fwd(q, k, v, causal, **cfg)
    assert torch.equal(out, out2) and torch.equal(lse, lse2), "reruns differ"


@pytest.mark.parametrize("bhs", BHS, ids=lambda x: "b%dh%dhk%d" % x)
@pytest.mark.parametrize("sq,sk", SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
def test_fwd(d, dtype, causal, sq, sk, bhs):
    check(*bhs, sq, sk, d, dtype, causal)


def test_fwd_long():
    check(1, 2, 1, 4224, 4224, 128, torch.bfloat16, True)


# Both pipeline depths on every head dim, whatever the defaults for this GPU are (1 and 2 stages
# take different code paths for the K/V refills); 3 stages where it fits.
@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(113, 203), (1024, 1024), (799, 3), (200, 450)])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_fwd_stages(d, sq, sk, causal, stages):
    from fa3.ampere import flash_fwd_sm80 as f

    arch = f.device_arch(torch.device("cuda"))
    tile_m, tile_n = (128, 64) if d <= 128 else (64, 64)
    if f.smem_bytes(tile_m, tile_n, d, stages) > f._SMEM[arch][0]:
        pytest.skip(f"{stages} stages of hd{d} do not fit {arch}")
    check(2, 4, 2, sq, sk, d, torch.float16, causal, stages=stages)


def _strided(b, h, hk, sq, sk, d, dtype):
    """Non-contiguous inputs: head-sliced views of wider tensors, seq-major K/V with padding."""
    q = torch.randn(b, sq, h + 2, d, device="cuda", dtype=dtype)[:, :, 1:-1]
    kv = torch.randn(b, sk, 2, hk, d + 8, device="cuda", dtype=dtype)[..., :d]
    return q, kv[:, :, 0], kv[:, :, 1]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 192])
def test_fwd_strided(d, causal):
    check(2, 4, 2, 300, 517, d, torch.bfloat16, causal, make=_strided)


def test_mqa_and_large_batch_heads():
    check(3, 8, 1, 65, 129, 128, torch.float16, True)
    check(17, 3, 3, 33, 70, 64, torch.bfloat16, False)


def test_large_logits_stay_finite():
    """Scores of magnitude ~1e3: exp2 must be taken after the max shift (no inf/NaN)."""
    def make(b, h, hk, sq, sk, d, dtype):
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype) * 8
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype) * 8
        return q, k, torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    check(1, 2, 2, 257, 300, 128, torch.bfloat16, True, make=make)


def test_sk_zero_and_empty_batch():
    from fa3.ampere.flash_fwd_sm80 import flash_fwd_sm80

    q = torch.randn(2, 5, 2, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 0, 2, 64, device="cuda", dtype=torch.float16)
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(2, 2, 5, device="cuda"))
    flash_fwd_sm80(q, k, k, out, lse, 0.125, False)
    assert (out == 0).all() and (lse == -math.inf).all()
