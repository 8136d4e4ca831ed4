"""CPU checks of the Hopper backward's feature plumbing (no GPU, no kernel compile): the sink
gradient's formula against fp64 autograd of the reference, and sink.grad through the custom ops'
autograd on meta tensors."""
import math

import pytest
import torch

import fa3
from fa3.hopper.flash_bwd import sink_grad
from fa3.reference import attention_ref


def _buffers(lse, dsum, pad):
    """The kernel's (n, h, rows) buffers: log2 LSE and D, padded with +inf / 0 rows."""
    b, h, s = lse.shape
    lse2 = torch.full((b, h, s + pad), math.inf, dtype=torch.float32)
    d = torch.zeros((b, h, s + pad), dtype=torch.float32)
    lse2[:, :, :s] = torch.where(torch.isinf(lse), math.inf, lse * math.log2(math.e))
    d[:, :, :s] = dsum
    return lse2, d


@pytest.mark.parametrize("causal", [False, True])
def test_sink_grad_matches_autograd(causal):
    # sq > sk: causal rows at the top see no key (LSE = sink); seqused hides rows and keys, and
    # one batch element has no key at all
    torch.manual_seed(0)
    b, sq, sk, h, hk, d = 3, 37, 29, 4, 2, 16
    q = torch.randn(b, sq, h, d, dtype=torch.float64)
    k, v = torch.randn(b, sk, hk, d, dtype=torch.float64), torch.randn(b, sk, hk, d, dtype=torch.float64)
    sink = torch.randn(h, dtype=torch.float64, requires_grad=True)
    used_q, used_k = torch.tensor([30, 37, 5]), torch.tensor([0, 20, 29])
    out, lse = attention_ref(q, k, v, causal=causal, sink=sink, seqused_q=used_q, seqused_k=used_k)
    do = torch.randn_like(out)
    out.backward(do)
    dsum = (do * out).sum(-1).transpose(1, 2).float()
    got = sink_grad(sink.detach(), *_buffers(lse, dsum, 11))
    assert got.dtype == torch.float32 and got.shape == (h,)
    assert torch.allclose(got.double(), sink.grad, rtol=1e-5, atol=1e-5), (got, sink.grad)


def test_sink_grad_never_nan():
    # a -inf sink (no sink mass) and rows with LSE -inf (fully masked, no sink) give 0, not NaN
    lse = torch.tensor([[[-math.inf, 0.5]]])
    lse2, d = _buffers(lse, torch.tensor([[[0.0, 2.0]]]), 3)
    g = sink_grad(torch.tensor([-math.inf]), lse2, d)
    assert torch.equal(g, torch.zeros(1))


def test_sink_grad_reaches_autograd_meta():
    q, k, v = (torch.empty(1, 32, 4, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    sink = torch.zeros(4, device="meta", dtype=torch.bfloat16, requires_grad=True)
    fa3.flash_attn_func(q, k, v, learnable_sink=sink).sum().backward()
    assert sink.grad is not None and sink.grad.shape == (4,) and sink.grad.dtype == torch.bfloat16
    assert q.grad.shape == q.shape


@pytest.mark.compile
@pytest.mark.parametrize("varlen,seqused", [(True, False), (True, True), (False, True)])
def test_compile_preprocess_seqs(varlen, seqused):
    """The preprocess's varlen (padded per-sequence output rows) and seqused variants compile."""
    from fa3.hopper.bwd_preprocess import PreprocessConfig, build

    assert build(PreprocessConfig("bf16", 128, varlen=varlen, seqused=seqused,
                                  pad_tile=64 if varlen else 0)) is not None
    with pytest.raises(ValueError, match="pad_tile"):
        PreprocessConfig("bf16", 128, varlen=True)


@pytest.mark.compile
@pytest.mark.parametrize("pdl", [False, True])
def test_compile_preprocess_fill(pdl):
    """The sm90 backward's fill variant (zeroed dQaccum and semaphores), with and without the
    early launch of the main kernel (PDL: sm90 only, so refused outside fill)."""
    from fa3.hopper.bwd_preprocess import PreprocessConfig, build

    assert build(PreprocessConfig("bf16", 128, pad_tile=64, fill=True, sem=True, pdl=pdl)) is not None
    with pytest.raises(ValueError, match="pdl"):
        PreprocessConfig("bf16", 128, pdl=True)


@pytest.mark.parametrize("tile_m", [64, 128])
def test_varlen_padded_rows_disjoint(tile_m):
    """The padded per-sequence layout of LSE2 / D / dQaccum (bwd_kernel.py): sequence i starts at
    tile (cu_q[i] + i * tile_m) // tile_m and owns ceil(len / tile_m) tiles; they never overlap and
    fit in the (total_q // tile_m + n) tiles flash_bwd allocates."""
    g = torch.Generator().manual_seed(tile_m)
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=g))
        lens = torch.randint(0, 3 * tile_m, (n,), generator=g)
        lens[torch.rand(n, generator=g) < 0.3] = 0
        cu = [0] + lens.cumsum(0).tolist()
        end = 0
        for i in range(n):
            start = (cu[i] + i * tile_m) // tile_m
            assert start >= end
            end = start + -(-int(lens[i]) // tile_m)
        assert end <= cu[-1] // tile_m + n
