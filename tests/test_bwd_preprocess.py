"""Backward preprocess kernel: sm_90a compile of every variant on the CPU, and on a GPU the
results against fp32 torch math, with poisoned outputs."""
import pytest
import torch

from fa3.hopper import bwd_preprocess as bp
from fa3.testing import poison_


@pytest.mark.compile
@pytest.mark.parametrize("cfg", bp.variants(), ids=str)
def test_compiles_for_sm90a_with_vector_loads(cfg, tmp_path):
    ptx = bp.build(cfg, f"--keep-ptx --dump-dir {tmp_path}").__ptx__
    assert ".target sm_90a" in ptx
    assert "ld.global.v4" in ptx  # 16-byte loads of O and dO rows
    assert "shfl.sync.bfly" in ptx  # lane-group reduction
    assert ".local" not in ptx  # nothing spilled to local memory


def test_config_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="head_dim_v"):
        bp.PreprocessConfig("bf16", 100)
    with pytest.raises(ValueError, match="dtype"):
        bp.PreprocessConfig("fp32", 128)


def test_lanes_cover_row():
    for cfg in bp.variants():
        assert cfg.lanes * bp.VEC >= cfg.head_dim_v and cfg.lanes <= 32
        assert cfg.rows_per_cta * cfg.lanes == bp.THREADS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,s,h,dv", [(2, 1, 3, 64), (1, 1000, 4, 128), (3, 257, 2, 96),
                                      (2, 513, 2, 192), (1, 77, 5, 256)])
def test_matches_torch(b, s, h, dv, dtype):
    torch.manual_seed(s * dv)
    # non-contiguous over heads: a slice of a wider tensor
    o = torch.randn(b, s, h + 1, dv, device="cuda", dtype=dtype)[:, :, 1:]
    do = torch.randn(b, s, h, dv, device="cuda", dtype=dtype)
    lse = torch.randn(b, h, s, device="cuda") * 5
    lse[:, :, ::7] = float("-inf")  # fully masked rows
    d_ref = (o.float() * do.float()).sum(-1).transpose(1, 2)
    lse2_ref = torch.where(torch.isneginf(lse), float("inf"), lse * 1.4426950408889634)
    for _ in range(2):  # second call: cached kernel, fresh poisoned outputs
        d, lse2 = bp.bwd_preprocess(o, do, lse)
        torch.testing.assert_close(d, d_ref, atol=1e-3 * dv ** 0.5, rtol=1e-4)
        torch.testing.assert_close(lse2, lse2_ref)
        assert not torch.isnan(d).any()


@pytest.mark.gpu
def test_outputs_fully_written():
    o = torch.randn(2, 300, 3, 128, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(2, 3, 300, device="cuda")
    cfg = bp.PreprocessConfig("bf16", 128)
    d = poison_(torch.empty(2, 3, 300, device="cuda"))
    lse2 = poison_(torch.empty_like(d))
    bp.compile_preprocess(cfg)(o, o, lse, d, lse2)
    torch.cuda.synchronize()
    assert not torch.isnan(d).any() and not torch.isnan(lse2).any()
