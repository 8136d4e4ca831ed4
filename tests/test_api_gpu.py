"""The public API end to end on a Hopper GPU: FA3 call conventions through the custom op into the
sm90 kernel, checked with FA's rule against the fp32 reference."""
import pytest
import torch

import fa3
from fa3.reference import attention_ref
from fa3.testing import assert_fa_close, hopper_available, rounding_atol

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not hopper_available(), reason="needs a Hopper (sm90) GPU")]


def rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def check(out, q, k, v, causal, lse=None):
    ref, ref_lse = attention_ref(q, k, v, causal=causal)
    pt, _ = attention_ref(q, k, v, causal=causal, upcast=False, reorder_ops=True)
    assert_fa_close(out, ref, pt, atol=rounding_atol(q.dtype))
    if lse is not None:
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin)
        torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_flash_attn_func(d, causal, dtype):
    q, k, v = rand(2, 333, 4, d, dtype=dtype), rand(2, 517, 2, d, dtype=dtype), rand(2, 517, 2, d, dtype=dtype)
    out, lse = fa3.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    check(out, q, k, v, causal, lse)
    assert isinstance(fa3.flash_attn_func(q, k, v, causal=causal), torch.Tensor)


def test_qkvpacked_and_gqa_packed():
    qkv = rand(2, 300, 3, 4, 128)
    out = fa3.flash_attn_qkvpacked_func(qkv, causal=True)
    check(out, *qkv.unbind(2), True)
    qkv = rand(1, 200, 8 + 2 * 2, 64)
    out = fa3.flash_attn_qkvpacked_func(qkv, num_heads_q=8)
    check(out, *qkv.split([8, 2, 2], dim=2), False)


def test_torch_compile_real_tensors():
    q, k, v = rand(2, 256, 4, 128), rand(2, 256, 4, 128), rand(2, 256, 4, 128)
    f = torch.compile(lambda q, k, v: fa3.flash_attn_func(q, k, v, causal=True) * 2, fullgraph=True)
    out = f(q, k, v)
    check(out / 2, q, k, v, True)


def test_unbuilt_features_raise_before_launch():
    # the FP8 forward has no softcap / window / varlen: refused by name, nothing launched
    q = rand(1, 64, 2, 128).to(torch.float8_e4m3fn)
    with pytest.raises(NotImplementedError, match="softcap"):
        fa3.flash_attn_func(q, q, q, softcap=30.0)
    with pytest.raises(NotImplementedError, match="window"):
        fa3.flash_attn_func(q, q, q, window_size=(32, 0))


def test_combine_matches_reference():
    out_p = torch.randn(3, 2, 50, 4, 64, device="cuda")
    lse_p = torch.randn(3, 2, 50, 4, device="cuda")
    lse_p[:, 0, 0, 0] = float("-inf")  # a row empty in every split stays finite (zeros)
    out, lse = fa3.flash_attn_combine(out_p, lse_p, out_dtype=torch.bfloat16)
    w = torch.softmax(lse_p[:, 0, 1, 1], 0)
    torch.testing.assert_close(out[0, 1, 1].float(), (w[:, None] * out_p[:, 0, 1, 1]).sum(0),
                               atol=1e-2, rtol=1e-2)
    assert not torch.isnan(out).any() and torch.isneginf(lse[0, 0, 0])


@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_sm80_backend_selectable_on_hopper(d, causal, monkeypatch):
    q, k, v = rand(2, 211, 4, d), rand(2, 300, 2, d), rand(2, 300, 2, d)
    out, lse = fa3.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True, backend="sm80")
    check(out, q, k, v, causal, lse)
    monkeypatch.setenv("FA3_BACKEND", "sm80")
    torch.testing.assert_close(fa3.flash_attn_func(q, k, v, causal=causal), out, atol=0, rtol=0)


def test_eager_fast_path_and_custom_op_agree():
    """Inference calls skip the op layer; grad-requiring calls use it. Same kernel, same bits."""
    q, k, v = rand(2, 300, 4, 128), rand(2, 300, 4, 128), rand(2, 300, 4, 128)
    fast = fa3.flash_attn_func(q, k, v, causal=True)
    assert fast.grad_fn is None
    slow = fa3.flash_attn_func(q.clone().requires_grad_(), k, v, causal=True)
    assert slow.grad_fn is not None
    assert torch.equal(fast, slow.detach())


@pytest.mark.parametrize("causal", [False, True])
def test_pack_gqa_off_matches_the_reference(causal):
    # GQA ratio 4 packs by default on sm90; pack_gqa=False takes the one-head-per-tile kernel
    q, k, v = rand(2, 333, 8, 128), rand(2, 401, 2, 128), rand(2, 401, 2, 128)
    out, lse = fa3.flash_attn_func(q, k, v, causal=causal, pack_gqa=False, return_attn_probs=True)
    check(out, q, k, v, causal, lse)
