"""Every shipped FP8 forward variant compiles for sm_90a on the CPU, and the PTX is the FP8 FA3 kind:
e4m3 wgmma for both GEMMs (PV with P from registers), the e4m3x2 cvt packing P, TMA, setmaxnreg,
mbarriers; no local memory; ptxas (when on PATH): no spills, no serialized wgmma."""
import glob
import re

import pytest
from _compile_check import check_ptx, compile_ptx

from fa3.hopper.flash_fwd_fp8 import build, variants

pytestmark = pytest.mark.compile

VARIANTS = list(variants())


def _id(cfg):
    flags = "".join(n[0] for n in ("pingpong", "persistent") if getattr(cfg, n))
    return f"hd{cfg.d}-{'causal' if cfg.causal else 'full'}-{cfg.tile_m}x{cfg.tile_n}-{flags or 'none'}"


@pytest.mark.parametrize("cfg", VARIANTS, ids=_id)
def test_compile_fp8_fwd(cfg, tmp_path):
    _, ptx_path, ptx = compile_ptx(build, cfg, tmp_path)
    qk = f"wgmma.mma_async.sync.aligned.m64n{cfg.tile_n}k32.f32.e4m3.e4m3"
    pv = re.compile(rf"wgmma\.mma_async\.sync\.aligned\.m64n{cfg.dv}k32\.f32\.e4m3\.e4m3 \{{[^}}]*\}}, \{{%r")
    assert pv.search(ptx), "PV wgmma with P (A) from registers missing"
    check_ptx(ptx_path, ptx, tmp_path, (qk, "cvt.rn.satfinite.e4m3x2.f32", "cp.async.bulk.tensor",
                                        "setmaxnreg", "mbarrier"))


from fa3.hopper import fp8_vt  # noqa: E402

VT_VARIANTS = list(fp8_vt.variants())


@pytest.mark.parametrize("cfg", VT_VARIANTS, ids=lambda c: f"{c.in_dtype}-dv{c.dv}-rows{c.block_rows}")
def test_compile_fp8_vt(cfg, tmp_path):
    """V -> Vt (copy or quantize): 16-byte global loads and stores, no local memory."""
    build_vt = fp8_vt.build(cfg, extra_options=f"--keep-ptx --dump-dir {tmp_path}")
    assert build_vt is not None
    ptx = open(glob.glob(str(tmp_path / "*.ptx"))[0]).read()
    assert "st.global.v4" in ptx and "ld.local" not in ptx and "st.local" not in ptx
    if cfg.quantize:
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
