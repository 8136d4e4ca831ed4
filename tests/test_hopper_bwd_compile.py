"""Every shipped Hopper backward variant (main kernel and dQ postprocess) compiles for sm_90a on the
CPU; the main kernel's PTX is the FA3 kind (wgmma, TMA, setmaxnreg, mbarriers, the bulk dQ
reduce-add) and ptxas (when on PATH) reports no spills and no serialized wgmmas."""
import pytest
from _compile_check import check_ptx, compile_ptx

from fa3.hopper.flash_bwd import SMEM_LIMIT, BwdConfig, build, default_config, smem_bytes, variants

pytestmark = pytest.mark.compile

# dq_red (dQ added from registers, a second Q / dO stage): the hd256 default unless deterministic,
# and part of hd192's 96-key tiles (dkv_swap) (variants() covers those); here the one-stage smem
# path it replaced (an A/B switch) and hd192's 64-key tiles with it (A/B)
DQ_RED = [default_config(256, 256, "bfloat16", False, dq_red=False),
          default_config(256, 256, "bfloat16", False, stagger=True, dq_red=True),
          default_config(192, 192, "bfloat16", False, dkv_swap=False, dq_red=True),
          default_config(192, 192, "float16", True, False, True, dkv_swap=False, dq_red=True),
          default_config(192, 192, "bfloat16", False, stages=3, dkv_swap=False, dq_red=True)]
# dv_early / dk_early (GEMM issue order, swapped layout): A/B switches; dv_early only at 64-query
# tiles (hd64's 128-query S^T tile serializes the wgmmas)
EARLY = [default_config(128, 128, "bfloat16", False, dv_early=True),
         default_config(128, 128, "bfloat16", True, dk_early=True),
         default_config(128, 128, "float16", False, dv_early=True, dk_early=True),
         default_config(128, 128, "bfloat16", True, dv_early=True, dk_early=True),
         default_config(128, 128, "bfloat16", True, True, True, dv_early=True, dk_early=True),
         default_config(128, 128, "bfloat16", False, local=True, dv_early=True, dk_early=True),
         default_config(64, 64, "bfloat16", False, dk_early=True),
         default_config(64, 64, "float16", True, dk_early=True)]
# desc_hoist (wgmma smem descriptors built once, swapped layout): an A/B switch
HOIST = [default_config(128, 128, "bfloat16", False, desc_hoist=True),
         default_config(128, 128, "bfloat16", True, desc_hoist=True, dv_early=True, dk_early=True),
         default_config(128, 128, "float16", False, True, True, desc_hoist=True),
         default_config(128, 128, "bfloat16", False, local=True, softcap=True, desc_hoist=True),
         default_config(64, 64, "bfloat16", False, desc_hoist=True),
         default_config(64, 64, "bfloat16", True, desc_hoist=True, dk_early=True)]
# window_split off (every block of a sliding window masked): the A/B fallback of the default
WINDOW_SPLIT = [default_config(d, d, dt, False, det, gqa, local=True, window_split=False)
                for d in (64, 128, 256) for dt, det, gqa in (("bfloat16", False, False),
                                                             ("float16", True, True))] \
    + [default_config(96, 96, "bfloat16", False, False, True, varlen=True, local=True,
                      window_split=False)]
# shipped variants (ascending query-block walk), plus the staggered walk (an A/B switch) twice
VARIANTS = list(variants()) + [default_config(128, 128, "bfloat16", False, stagger=True),
                               default_config(256, 256, "bfloat16", True, stagger=True)] + DQ_RED \
    + EARLY + HOIST + WINDOW_SPLIT


def _id(cfg):
    if not isinstance(cfg, BwdConfig):
        return (f"post-hd{cfg.d}{'' if cfg.dv == cfg.d else f'_{cfg.dv}'}-{cfg.dtype}-{cfg.tile_m}" + ("-varlen" if cfg.varlen else "")
                + ("" if cfg.pdl else "-nopdl"))
    flags = "".join(c for c, on in (("c", cfg.causal), ("d", cfg.deterministic), ("g", cfg.gqa),
                                          ("s", cfg.spt), ("l", cfg.local),
                                          ("t", cfg.softcap), ("v", cfg.varlen),
                                          ("q", cfg.seqused_q), ("k", cfg.seqused_k),
                                          ("r", cfg.stagger), ("a", cfg.dq_red),
                                          ("E", cfg.dv_early), ("K", cfg.dk_early),
                                          ("H", cfg.desc_hoist), ("L", cfg.lpt),
                                          ("W", cfg.window_split), ("P", cfg.persistent),
                                          ("G", cfg.group_loop), ("R", cfg.dkv_red),
                                          ("X", cfg.dkv_swap),
                                          ("N", not cfg.pdl)) if on)
    hd = f"{cfg.d}" if cfg.dv == cfg.d else f"{cfg.d}_{cfg.dv}"
    return f"hd{hd}-{cfg.dtype}-{cfg.tile_m}x{cfg.tile_n}x{cfg.stages}-{flags or 'plain'}"


@pytest.mark.parametrize("cfg", VARIANTS, ids=_id)
def test_compile_bwd(cfg, tmp_path):
    if not isinstance(cfg, BwdConfig):
        assert build(cfg) is not None
        return
    _, ptx_path, ptx = compile_ptx(build, cfg, tmp_path)
    # softcap keeps 1 - tanh^2 of the S tile in registers: hd128 spills ~100 bytes; sliding
    # windows up to 24 bytes (hd128 GQA deterministic); everything else spills nothing
    dq_add = "red.global.add.v4.f32" if cfg.dq_red else "cp.reduce.async.bulk"
    check_ptx(ptx_path, ptx, tmp_path, ("wgmma.mma_async", "cp.async.bulk.tensor", "setmaxnreg",
                                        "mbarrier", dq_add),
              spill_limit=160 if cfg.softcap else 32 if cfg.local else 0)
    if cfg.dq_red:  # no smem dQ path left (its bulk add is the only cp.reduce in this kernel)
        assert "cp.reduce.async.bulk" not in ptx
    # PDL: waits on the preprocess and lets the postprocess launch early, only when switched on
    assert ("griddepcontrol.wait" in ptx) == ("griddepcontrol.launch_dependents" in ptx) == cfg.pdl


def test_dq_red_config():
    """dq_red frees the fp32 dQ tile's smem: hd256 gets two Q / dO stages by default (one without
    it, as deterministic keeps), and the switch is refused where its adds would break a promise
    (deterministic) or where it was never tested (the swapped hd <= 128 layout)."""
    cfg = default_config(256, 256, "bfloat16", False)
    assert cfg.dq_red and cfg.stages == 2
    for gqa in (False, True):
        cfg = default_config(256, 256, "float16", True, True, gqa)
        assert not cfg.dq_red and cfg.stages == 1
    assert default_config(256, 256, "bfloat16", False, dq_red=False).stages == 1
    assert not default_config(192, 192, "bfloat16", False, dkv_swap=False).dq_red
    assert smem_bytes(64, 64, 256, 2, False) > SMEM_LIMIT
    assert smem_bytes(64, 64, 256, 2, False, dq_red=True) <= SMEM_LIMIT
    assert default_config(192, 192, "bfloat16", False, dkv_swap=False, dq_red=True).stages == 2
    for bad in (dict(d=256, deterministic=True), dict(d=128)):
        d = bad.pop("d")
        with pytest.raises(AssertionError):
            default_config(d, d, "bfloat16", False, dq_red=True, **bad)


def test_spt_default():
    """Deterministic causal adds dQ last-block-first (spt) by default; not varlen (it reverses the
    grid, not each sequence), never without deterministic or causal."""
    for d in (64, 128, 256):
        assert default_config(d, d, "bfloat16", True, True).spt
        assert default_config(d, d, "float16", True, True, True).spt
        assert not default_config(d, d, "bfloat16", True, False).spt
        assert not default_config(d, d, "bfloat16", False, True).spt
        assert not default_config(d, d, "bfloat16", True, True, varlen=True).spt
        assert not default_config(d, d, "bfloat16", False, True, local=True).spt


def test_early_config():
    """dk_early / desc_hoist are off by default, dv_early on only at hd128 MHA without a mask or
    softcap (where it was measured to win; with dK / dV stored from registers it spills); all
    are refused where they do not apply: the unswapped layout (P / dS through smem), and dv_early
    with hd64's 128-query tile."""
    for d in (64, 128, 192, 256):
        for causal in (False, True):
            for det in (False, True):
                for gqa in (False, True):
                    cfg = default_config(d, d, "bfloat16", causal, det, gqa)
                    assert cfg.dv_early == (d == 128 and not causal and not gqa)
                    assert not cfg.dk_early and not cfg.desc_hoist
    for feat in ("local", "softcap", "varlen", "seqused_k"):
        assert not default_config(128, 128, "bfloat16", False, **{feat: True}).dv_early
    for bad in (dict(d=64, dv_early=True), dict(d=256, dv_early=True), dict(d=192, dk_early=True),
                dict(d=256, desc_hoist=True)):
        d = bad.pop("d")
        with pytest.raises(AssertionError):
            default_config(d, d, "bfloat16", False, **bad)


def test_tile80_config():
    """80 query rows (hd128, dQ transposed): an A/B switch, off by default; it takes neither
    early stats nor early dV (ptxas serializes every wgmma there, C7512), and refuses dv_early
    when asked; its build is among the compiled variants, postprocess included."""
    from fa3.hopper.bwd_kernel import dq_tile_shape, dq_transposed
    from fa3.hopper.flash_bwd import post_config, variants

    for causal in (False, True):
        assert default_config(128, 128, "bfloat16", causal).tile_m == 64
    cfg = default_config(128, 128, "bfloat16", False, tile_m=80)
    assert dq_transposed(cfg) and dq_tile_shape(cfg) == (128, 80)
    assert not cfg.stats_early and not cfg.dv_early
    assert not dq_transposed(default_config(128, 128, "bfloat16", False))
    with pytest.raises(AssertionError):
        default_config(128, 128, "bfloat16", False, tile_m=80, dv_early=True)
    built = list(variants())
    assert cfg in built and post_config(cfg) in built


def test_hd192_128_config_and_gate():
    """q/k 192 with v 128: the unswapped layout with dV's own GEMM (its smem counted with dv),
    compiled among the variants and accepted (GPU-verified); other d != dv pairs stay refused
    outright."""
    import torch

    from fa3._dispatch import FwdRequest
    from fa3.hopper import flash_bwd as fb

    cfg = default_config(192, 128, "bfloat16", False)
    assert (cfg.d, cfg.dv, cfg.swap, cfg.tile_m, cfg.tile_n) == (192, 128, False, 64, 96)
    assert fb.smem_bytes(64, 64, 192, 2, False, dv=128) < fb.smem_bytes(64, 64, 192, 2, False)
    assert cfg in list(fb.variants())
    req = lambda d, dv: FwdRequest(torch.bfloat16, d, dv, False, (-1, -1), 0.0, False, False,
                                   False, False)
    assert fb.bwd_missing(req(192, 192)) is None
    assert fb.bwd_missing(req(192, 128)) is None
    assert "!=" in fb.bwd_missing(req(128, 64))
    with pytest.raises(AssertionError):
        default_config(128, 64, "bfloat16", False)  # swapped layout: d == dv only


def test_dkv_swap_config():
    """hd192 (and 192 / 128) not deterministic: 96-key tiles with dK^T / dV^T (dkv_swap) and dQ
    added from registers (its smem staging does not fit beside two Q / dO stages), features
    included; deterministic and group_loop keep 64-key tiles and the dQ warp; refused where
    deterministic (dq_red's unordered adds), on the swapped layout and the persistent grid; 96
    keys unswapped need it."""
    for dv in (192, 128):
        for causal, gqa in ((False, False), (True, True)):
            for feat in ({}, dict(local=True), dict(softcap=True), dict(varlen=True)):
                if causal and "local" in feat:
                    continue
                cfg = default_config(192, dv, "bfloat16", causal, False, gqa, **feat)
                assert (cfg.tile_n, cfg.dkv_swap, cfg.dq_red, cfg.stages) == (96, True, True, 2)
                assert smem_bytes(64, 96, 192, 2, False, dq_red=True, dv=dv) <= SMEM_LIMIT
            det = default_config(192, dv, "bfloat16", causal, True, gqa)
            assert (det.tile_n, det.dkv_swap, det.dq_red) == (64, False, False)
        gl = default_config(192, dv, "bfloat16", False, False, True, group_loop=True)
        assert (gl.tile_n, gl.dkv_swap, gl.dq_red) == (64, False, False)
        off = default_config(192, dv, "bfloat16", False, dkv_swap=False)
        assert (off.tile_n, off.dkv_swap, off.dq_red) == (64, False, False)
    assert smem_bytes(64, 96, 192, 2, False) > SMEM_LIMIT  # (the dQ warp's staging)
    for d in (64, 96, 128, 256):
        assert not default_config(d, d, "bfloat16", False).dkv_swap
    for bad in (dict(d=128, dkv_swap=True), dict(d=192, dkv_swap=True, persistent=True),
                dict(d=192, dkv_swap=True, deterministic=True),
                dict(d=192, tile_n=96, dkv_swap=False, dq_red=True)):
        d = bad.pop("d")
        det = bad.pop("deterministic", False)
        with pytest.raises(AssertionError):
            default_config(d, d, "bfloat16", False, det, **bad)


def test_register_splits_fit_launch_pool():
    """Every setmaxnreg split in use fits the CTA's launch registers; the one that hung does not."""
    from fa3.hopper.bwd_kernel import REGS
    from fa3.hopper.fwd_common import REGS as FWD_REGS, regs_fit
    assert regs_fit(REGS, 2)
    assert all(regs_fit(split, n) for n, split in FWD_REGS.items())
    assert not regs_fit((32, 240), 2)  # 512 per lane > 3 x 168
    assert not regs_fit((40, 160), 3)  # 520 > 4 x 128
