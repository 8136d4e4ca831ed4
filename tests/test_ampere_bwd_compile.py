"""sm80 attention backward: every shipped sm_80 variant (main kernel and the shared preprocess kernel
built for sm_80) cross-compiles on the CPU, and one sm_90 build per head dim (what the lent Hopper GPU
runs); the PTX is the FA2 recipe: mma.sync m16n8k16, ldmatrix (.trans for the transposed operands),
cp.async, fp32 atomics for dQ, nothing in local memory at the PTX level. Also the config rules."""
import pytest

from _compile_check import check_varlen_coverage
from fa3.ampere import flash_bwd_sm80 as f

SM80 = [c for c in f.variants("sm_80") if isinstance(c, f.BwdSm80Config)]
PRE80 = [c for c in f.variants("sm_80") if isinstance(c, f.PreprocessSm80Config)]
SM90 = [f.default_config(d, dt, c, "sm_90") for d, dt, c in
        ((64, "bfloat16", True), (96, "float16", False), (128, "bfloat16", False),
         (192, "float16", True), (256, "bfloat16", True))]


def _ptx(cfg, tmp_path):
    ptx = f.build(cfg, f"--keep-ptx --dump-dir {tmp_path}").__ptx__
    assert f".target {cfg.arch}" in ptx
    return ptx


@pytest.mark.compile
@pytest.mark.parametrize("cfg", SM80 + SM90, ids=str)
def test_main_kernel_compiles(cfg, tmp_path):
    ptx = _ptx(cfg, tmp_path)
    for needle in ("mma.sync.aligned.m16n8k16", "ldmatrix.sync.aligned.m8n8.x4.trans", "cp.async",
                   "cp.async.wait_group", "ex2.approx", "atom.global.add"):
        assert needle in ptx, needle
    assert ".local" not in ptx
    # dQ atomics: 4 floats per instruction where the arch has it (sm_90), else 1
    assert ("atom.global.add.v4.f32" in ptx) == (cfg.arch == "sm_90")


FEATURES = [f.default_config(64, "bfloat16", False, "sm_80", local=True),
            f.default_config(128, "float16", True, "sm_80", softcap=True),
            f.default_config(256, "bfloat16", False, "sm_80", local=True, softcap=True),
            f.default_config(128, "bfloat16", False, "sm_90", local=True, softcap=True)]


@pytest.mark.compile
@pytest.mark.parametrize("cfg", FEATURES, ids=str)
def test_window_softcap_variants_compile(cfg, tmp_path):
    ptx = _ptx(cfg, tmp_path)
    assert ("tanh.approx" in ptx) == cfg.softcap


# the Q-tile order switch against its default: in order non-causal, rotated causal
ORDER = [f.default_config(64, "bfloat16", False, "sm_90", stagger=False),
         f.default_config(128, "float16", True, "sm_80", stagger=True)]


@pytest.mark.compile
@pytest.mark.parametrize("cfg", ORDER, ids=str)
def test_stagger_switch_compiles(cfg, tmp_path):
    ptx = _ptx(cfg, tmp_path)
    for needle in ("mma.sync.aligned.m16n8k16", "cp.async.wait_group", "atom.global.add"):
        assert needle in ptx, needle
    assert ".local" not in ptx


VARLEN = list(f.varlen_variants("sm_80")) + [
    f.default_config(128, "bfloat16", True, "sm_90", varlen=True, seqused_q=True, seqused_k=True)]


@pytest.mark.compile
@pytest.mark.parametrize("cfg", VARLEN, ids=str)
def test_varlen_seqused_variants_compile(cfg, tmp_path):
    """Every varlen / seqused build (varlen_variants, and an sm_90 one for the lent Hopper GPU)."""
    ptx = _ptx(cfg, tmp_path)
    for needle in ("mma.sync.aligned.m16n8k16", "cp.async.wait_group", "atom.global.add"):
        assert needle in ptx, needle
    assert ".local" not in ptx
    assert ("tanh.approx" in ptx) == cfg.softcap


def test_varlen_variants_cover_the_switches():
    check_varlen_coverage(VARLEN, SM80, "seqused_q")


@pytest.mark.compile
@pytest.mark.parametrize("cfg", PRE80[:2] + [f.PreprocessSm80Config("float16", 256, "sm_90")], ids=str)
def test_preprocess_builds_for_the_family_arch(cfg, tmp_path):
    _ptx(cfg, tmp_path)  # the shared kernel's own default is sm_90a


def test_shipped_variants():
    assert {c.d for c in SM80} == set(f.HEAD_DIMS) and len(SM80) == len(set(SM80)) == 20
    assert len(PRE80) == 10
    tiles = {c.d: (c.tile_m, c.tile_n, c.stages) for c in SM80}
    assert tiles[64] == (64, 128, 2) and tiles[128] == (64, 128, 2) and tiles[256] == (64, 64, 1)
    assert f.default_config(256, "bfloat16", False, "sm_90").stages == 2  # 208 KB fits 227 KB
    # the sm_90 build (measured on the H100) takes FA2's 128 x 128 at hd64, split 4 x 2
    c90 = f.default_config(64, "bfloat16", True, "sm_90")
    assert (c90.tile_m, c90.tile_n, c90.stages, c90.warps_m_sdp, c90.warps_m_dq) == (128, 128, 2, 4, 4)
    # the rotated Q-tile order where CTAs would otherwise walk in lockstep: non-causal only
    assert all(c.stagger == (not c.causal) for c in SM80)
    assert not f.default_config(64, "bfloat16", False, "sm_80", local=True).stagger


@pytest.mark.parametrize("arch", f.ARCHS)
def test_configs_fit_every_arch(arch):
    for d in f.HEAD_DIMS:
        if f.fits(d, arch):
            f.default_config(d, "float16", True, arch)  # __post_init__ checks smem and warp grids
    assert f.fits(128, arch)
    assert f.fits(256, arch) == (arch not in ("sm_86", "sm_89"))


def test_config_rejects_bad_input():
    base = dict(d=128, dtype="bfloat16", causal=False, tile_m=64, tile_n=128, stages=2,
                warps_m_sdp=2, warps_n_dkv=4, warps_m_dq=2, arch="sm_80")
    f.BwdSm80Config(**base)
    with pytest.raises(ValueError, match="head dim"):
        f.BwdSm80Config(**{**base, "d": 80})
    with pytest.raises(ValueError, match="warps"):
        f.BwdSm80Config(**{**base, "d": 96})  # 96 columns over 4 warps of 16
    with pytest.raises(ValueError, match="shared memory"):
        f.BwdSm80Config(**{**base, "arch": "sm_86"})
    with pytest.raises(ValueError, match="stages"):
        f.BwdSm80Config(**{**base, "stages": 3})
    with pytest.raises(ValueError, match="dq_vec"):
        f.BwdSm80Config(**{**base, "dq_vec": 4})  # vector fp32 atomics are sm_90 only
    with pytest.raises(ValueError, match="causal with a window"):
        f.BwdSm80Config(**{**base, "causal": True, "local": True})


def test_bwd_missing_names_features():
    import torch

    from fa3._dispatch import FwdRequest

    r = FwdRequest(torch.bfloat16, 128, 128, True, (-1, 0), 0.0, False, False, False, False)
    assert f.bwd_missing(r) is None
    assert f.bwd_missing(FwdRequest(torch.bfloat16, 128, 128, False, (8, 8), 5.0,
                                    False, False, False, False)) is None  # window + softcap
    assert f.bwd_missing(FwdRequest(torch.bfloat16, 128, 128, True, (-1, 0), 0.0,
                                    True, False, True, False)) is None  # varlen + seqused
    assert "sink" in f.bwd_missing(FwdRequest(torch.bfloat16, 128, 128, False, (-1, -1), 0.0,
                                               False, True, False, False))


def test_import_does_not_load_dsl():
    import subprocess
    import sys

    code = ("import sys, fa3.ampere.flash_bwd_sm80 as m; list(m.variants('sm_80'));"
            "assert 'cutlass' not in sys.modules, 'DSL imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
