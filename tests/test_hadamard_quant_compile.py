"""Compile every hadamard_quant variant for sm_90a on the CPU and check the PTX holds what it should."""
import os
import re

import pytest

from fa3.hopper import hadamard_quant as hq

pytestmark = pytest.mark.compile
VARIANTS = list(hq.variants())


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hq_ptx"))  # must exist before compiling, or no PTX is kept


def _ptx(cfg, dump_dir):
    pytest.importorskip("cutlass")
    compiled = hq.build(cfg, extra_options=f"--keep-ptx --dump-dir {dump_dir}")
    ptx = compiled.__ptx__
    assert ".entry" in ptx, f"no PTX kept (got {ptx[:200]!r})"
    return ptx


def _count(ptx, opcode):
    return len(re.findall(r"^\s*(?:@!?%p\d+\s+)?" + re.escape(opcode), ptx, flags=re.M))


@pytest.mark.parametrize("cfg", VARIANTS, ids=str)
def test_ptx(cfg, dump_dir):
    ptx = _ptx(cfg, dump_dir)
    K, NP = cfg.chunks, cfg.passes
    values = NP * K * 8  # fp32 values of the tile per thread
    lane_stages = cfg.lanes_per_row.bit_length() - 1
    # tiles arrive by 16-byte cp.async into smem (prologue: STAGES tiles, then one refill per tile);
    # the only global loads left are the float32 signs (2 per chunk of 8, once per CTA)
    assert _count(ptx, "cp.async.cg.shared.global") == (hq.STAGES + 1) * NP * K
    assert _count(ptx, "cp.async.commit_group") == hq.STAGES + 1
    assert _count(ptx, "cp.async.wait_group") == 1
    assert _count(ptx, "ld.global.v4.b32") == (2 if cfg.rotate else 0)
    assert _count(ptx, "st.global.v2.b32") == NP * K  # 8-byte fp8 stores, 8 * lanes bytes per row
    assert _count(ptx, "cvt.rn.satfinite.e4m3x2.f32") == values // 2
    assert _count(ptx, "max.xorsign.abs.f32") == values + 7  # one per element, 8 lanes, then a tree
    # butterflies: lane_stages cross-lane stages per value, 5 for the warp amax
    assert _count(ptx, "shfl.sync.bfly.b32") == 5 + (lane_stages * values if cfg.rotate else 0)
    if cfg.rotate:
        assert _count(ptx, "fma.rn.f32") == lane_stages * values  # the cross-lane butterfly adds
        assert _count(ptx, "xor.b32") >= values // 2  # sign flips on packed 16-bit pairs
    # x' * inv per element; 1/sqrt(d) is a separate multiply only at d = 128 (elsewhere folded)
    fold = cfg.rotate and cfg.head_dim in (64, 256)
    assert _count(ptx, "mul.f32") == values * (2 if cfg.rotate and not fold else 1) + (2 if fold else 0)
    assert _count(ptx, "div.rn.f32") == 2
    assert "div.approx" not in ptx and "div.full" not in ptx
    assert "rcp.approx" not in ptx
    assert ".ftz" not in ptx  # denormals behave as in torch's CPU emulation
    assert "ld.local" not in ptx and "st.local" not in ptx  # the block fits in registers
    assert _count(ptx, "bar.sync") == (2 if cfg.rotate else 1)  # sign-mask table, then one per tile
    # bf16 widens with a shift and an AND; fp16 converts (the full-tile and ragged-tile read-backs
    # may share the conversions)
    assert _count(ptx, "cvt.f32.bf16") == 0
    n_f16 = _count(ptx, "cvt.f32.f16")
    assert (values <= n_f16 <= 2 * values) if cfg.dtype == "float16" else n_f16 == 0


def test_compile_cache_roundtrip(tmp_path, monkeypatch):
    """get_kernel compiles, exports to the disk cache, and a fresh process-level lookup reloads it."""
    pytest.importorskip("cutlass")
    from fa3 import _compile

    monkeypatch.setenv("FA3_CACHE_DIR", str(tmp_path))
    cfg = hq.HadamardQuantConfig("bfloat16", 64, 64, True)
    _compile._MEM.pop((cfg, _compile.DEFAULT_ARCH), None)
    fn = _compile.get_kernel(cfg, hq.build)
    assert fn is not None
    entries = list((tmp_path / f"dsl-{_compile.dsl_version()}").glob("*.o"))
    assert len(entries) == 1, os.listdir(tmp_path)
    _compile._MEM.pop((cfg, _compile.DEFAULT_ARCH), None)
    assert _compile.get_kernel(cfg, lambda c: pytest.fail("rebuilt instead of loading")) is not None
    _compile._MEM.pop((cfg, _compile.DEFAULT_ARCH), None)
