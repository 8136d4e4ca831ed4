"""Every shipped Hopper forward variant compiles for sm_90a on the CPU, and the PTX is the FA3 kind:
wgmma, TMA (cp.async.bulk.tensor), setmaxnreg, mbarriers; no local-memory spills (when ptxas is
on PATH to report them; hd64 causal with three consumer warpgroups at 160 registers keeps one
4-byte value in local memory across a tile, outside the main loop, which is tolerated)."""
import dataclasses
import shutil
import subprocess

import pytest
from _compile_check import check_ptx, compile_ptx

from fa3.hopper.flash_fwd import FEATURES, build, default_config, variants

pytestmark = pytest.mark.compile

VARIANTS = list(variants())


def _id(cfg):
    flags = "".join(n[0] for n in ("overlap", "pingpong", "persistent") if getattr(cfg, n))
    feats = "".join(f"-{n}" for n in FEATURES if getattr(cfg, n))
    hd = f"hd{cfg.d}" + (f"v{cfg.dv}" if cfg.dv != cfg.d else "")
    return f"{hd}-{cfg.dtype}-{'causal' if cfg.causal else 'full'}-{cfg.tile_m}x{cfg.tile_n}-{flags or 'none'}{feats}"


@pytest.mark.parametrize("cfg", VARIANTS, ids=_id)
def test_compile_fwd(cfg, tmp_path):
    _, ptx_path, ptx = compile_ptx(build, cfg, tmp_path)
    check_ptx(ptx_path, ptx, tmp_path, ("wgmma.mma_async", "cp.async.bulk.tensor", "setmaxnreg", "mbarrier"),
              spill_limit=8)


# desc_hoist is on by default (the variants above); its off path (the DSL's own descriptors, kept
# for A/B) on the main-loop shapes it changes: head dims, causal, fp16, features
DESC_OFF = [dataclasses.replace(c, desc_hoist=False) for c in (
    default_config(128, 128, "bfloat16", False), default_config(256, 256, "float16", True),
    default_config(64, 64, "bfloat16", False, features=dict(
        local=True, softcap=True, sink=True, varlen=True, seqused_q=True, seqused_k=True)))]


@pytest.mark.parametrize("cfg", DESC_OFF, ids=_id)
def test_compile_fwd_desc_off(cfg, tmp_path):
    _, ptx_path, ptx = compile_ptx(build, cfg, tmp_path)
    check_ptx(ptx_path, ptx, tmp_path, ("wgmma.mma_async",), spill_limit=8)


@pytest.mark.parametrize("diag_half,desc_hoist", [(1, True), (2, True), (2, False)])
def test_compile_fwd_diag_half(diag_half, desc_hoist, tmp_path):
    """diag_half adds an S = Q K^T wgmma of half the key block (n64 at hd128, where every other
    wgmma is n128) beside the full one (and with 2, PV wgmmas over half the keys: n128 still),
    and ptxas keeps every wgmma unserialized (check_ptx's C7512 / C7519, and C7511 here)."""
    cfg = dataclasses.replace(default_config(128, 128, "bfloat16", True), diag_half=diag_half,
                              desc_hoist=desc_hoist)
    assert cfg.persistent  # (the tile loop around it is what pressed the registers)
    _, ptx_path, ptx = compile_ptx(build, cfg, tmp_path)
    check_ptx(ptx_path, ptx, tmp_path, ("wgmma.mma_async.sync.aligned.m64n64k16",
                                        "wgmma.mma_async.sync.aligned.m64n128k16"))
    ptxas = shutil.which("ptxas")
    if ptxas and desc_hoist:  # C7511: every wgmma waited on alone (a second set of K descriptors
        # held across the persistent tile loop did that; the half GEMM now reuses the full one's)
        rep = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx_path, "-o", str(tmp_path / "h.cubin")],
                             capture_output=True, text=True)
        assert "C7511" not in rep.stderr, rep.stderr[-1500:]
    (tmp_path / "plain").mkdir()
    _, _, plain = compile_ptx(build, dataclasses.replace(cfg, diag_half=0), tmp_path / "plain")
    assert "m64n64k16" not in plain
