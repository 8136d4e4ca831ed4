"""Every shipped Hopper forward variant compiles for sm_90a on the CPU, and the PTX is the FA3 kind:
wgmma, TMA (cp.async.bulk.tensor), setmaxnreg, mbarriers; no local-memory spills (when ptxas is
on PATH to report them; hd64 causal with three consumer warpgroups at 160 registers keeps one
4-byte value in local memory across a tile, outside the main loop, which is tolerated)."""
import dataclasses

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


@pytest.mark.parametrize("desc_hoist", [True, False])
def test_compile_fwd_diag_half(desc_hoist, tmp_path):
    """diag_half adds an S = Q K^T wgmma of half the key block (n64 at hd128, where every other
    wgmma is n128) beside the full one, and ptxas keeps every wgmma unserialized (check_ptx)."""
    cfg = dataclasses.replace(default_config(128, 128, "bfloat16", True), diag_half=True,
                              desc_hoist=desc_hoist)
    _, ptx_path, ptx = compile_ptx(build, cfg, tmp_path)
    check_ptx(ptx_path, ptx, tmp_path, ("wgmma.mma_async.sync.aligned.m64n64k16",
                                        "wgmma.mma_async.sync.aligned.m64n128k16"))
    (tmp_path / "plain").mkdir()
    _, _, plain = compile_ptx(build, dataclasses.replace(cfg, diag_half=False), tmp_path / "plain")
    assert "m64n64k16" not in plain
