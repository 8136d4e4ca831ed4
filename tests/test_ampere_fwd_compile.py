"""sm80 attention forward: every shipped sm_80 variant (and one sm_90 build, the cubin the lent Hopper
GPU runs) cross-compiles on the CPU, and the PTX is the FA2 recipe: mma.sync m16n8k16, ldmatrix,
cp.async, ex2.approx, nothing in local memory. Also the config rules (no DSL needed)."""
import pytest

from _compile_check import check_varlen_coverage
from fa3.ampere import flash_fwd_sm80 as f

SM80 = list(f.variants("sm_80"))


def _check_ptx(cfg, tmp_path):
    ptx = f.build(cfg, f"--keep-ptx --dump-dir {tmp_path}").__ptx__
    assert f".target {cfg.arch}" in ptx
    for needle in ("mma.sync.aligned.m16n8k16", "ldmatrix", "cp.async", "ex2.approx"):
        assert needle in ptx, needle
    assert ".local" not in ptx  # nothing placed in local memory
    return ptx


@pytest.mark.compile
@pytest.mark.parametrize("cfg", SM80, ids=str)
def test_compiles_for_sm80(cfg, tmp_path):
    ptx = _check_ptx(cfg, tmp_path)
    assert "ldmatrix.sync.aligned.m8n8.x4.trans" in ptx  # V^T for O += P V
    assert "cp.async.wait_group" in ptx


@pytest.mark.compile
@pytest.mark.parametrize("cfg", [f.default_config(128, "bfloat16", True, "sm_90"),
                                 f.default_config(256, "float16", False, "sm_86")], ids=str)
def test_compiles_for_other_archs(cfg, tmp_path):
    _check_ptx(cfg, tmp_path)


@pytest.mark.compile
@pytest.mark.parametrize("cfg", [f.default_config(64, "bfloat16", False, "sm_80", local=True),
                                 f.default_config(128, "float16", True, "sm_80", softcap=True),
                                 f.default_config(192, "bfloat16", False, "sm_80", local=True,
                                                  softcap=True)], ids=str)
def test_window_softcap_variants_compile(cfg, tmp_path):
    ptx = f.build(cfg, f"--keep-ptx --dump-dir {tmp_path}").__ptx__
    assert ("tanh.approx" in ptx) == cfg.softcap


VARLEN = list(f.varlen_variants("sm_80")) + [
    f.default_config(128, "bfloat16", True, "sm_90", varlen=True, seqused_q=True)]


@pytest.mark.compile
@pytest.mark.parametrize("cfg", VARLEN, ids=str)
def test_varlen_seqused_variants_compile(cfg, tmp_path):
    """Every varlen / seqused build (varlen_variants, and the one the lent Hopper GPU runs most)."""
    ptx = _check_ptx(cfg, tmp_path)
    assert ("tanh.approx" in ptx) == cfg.softcap


def test_varlen_variants_cover_the_switches():
    check_varlen_coverage(VARLEN, SM80, "seqused_k")


def test_window_and_softcap_scales():
    from fa3.hopper.mask import UNBOUNDED

    assert f.kernel_scales(True, None, 0.0, 0.1) == (True, False, 0, 0, 0.1, 1.0)
    assert f.kernel_scales(True, (64, -1), 0.0, 0.1)[:4] == (False, True, 64, 0)  # causal: right 0
    assert f.kernel_scales(False, (-1, 16), 0.0, 0.1)[:4] == (False, True, UNBOUNDED, 16)
    causal, local, _, _, scale, pre = f.kernel_scales(False, None, 20.0, 0.1)
    assert (causal, local, scale) == (False, False, 20.0) and abs(pre - 0.1 / 20.0) < 1e-12


def test_shipped_tiles():
    for cfg in SM80:
        assert (cfg.tile_m, cfg.tile_n) == ((128, 64) if cfg.d <= 128 else (64, 64))
    assert {cfg.d for cfg in SM80} == set(f.HEAD_DIMS)
    assert len(SM80) == len(set(SM80)) == 20


@pytest.mark.parametrize("arch", f.ARCHS)
@pytest.mark.parametrize("d", f.HEAD_DIMS)
def test_default_config_fits_smem(arch, d):
    cfg = f.default_config(d, "bfloat16", False, arch)  # __post_init__ checks the smem limit
    assert cfg.stages in (1, 2)
    if cfg.stages == 1:  # a second stage must be what costs the second CTA per SM (or not fit)
        two = f.smem_bytes(cfg.tile_m, cfg.tile_n, d, 2)
        assert two > f._SMEM[arch][0] or f.ctas_per_sm(two, arch) < 2


def test_stage_choice_examples():
    # A100 hd128: 2 stages (96 KB) would leave 1 CTA/SM, 1 stage (64 KB) keeps 2
    assert f.default_config(128, "float16", False, "sm_80").stages == 1
    assert f.default_config(128, "float16", False, "sm_90").stages == 2
    assert f.default_config(64, "float16", True, "sm_80").stages == 2
    assert f.default_config(256, "float16", False, "sm_80").stages == 2  # 1 CTA/SM either way
    assert f.default_config(256, "float16", False, "sm_89").stages == 1  # 160 KB > 99 KB


def test_config_rejects_bad_input():
    with pytest.raises(ValueError, match="head dim"):
        f.FwdSm80Config(80, "bfloat16", False, 128, 64, 1, "sm_80")
    with pytest.raises(ValueError, match="dtype"):
        f.FwdSm80Config(64, "float32", False, 128, 64, 1, "sm_80")
    with pytest.raises(ValueError, match="arch"):
        f.FwdSm80Config(64, "bfloat16", False, 128, 64, 1, "sm_70")
    with pytest.raises(ValueError, match="shared memory"):
        f.FwdSm80Config(256, "bfloat16", False, 64, 64, 2, "sm_86")


def test_import_does_not_load_dsl():
    import subprocess
    import sys

    code = ("import sys, fa3.ampere.flash_fwd_sm80 as m; m.default_config(128, 'bfloat16', True, 'sm_80');"
            "assert 'cutlass' not in sys.modules, 'DSL imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
