"""The Hopper forward's config heuristic (pure Python, no DSL): the switches each head dim ships with.
A positional argument once shifted o_in_q into q_early, silently turning off hd256's staged O store
and every other head dim's early Q release; these pin the intended defaults."""
import dataclasses

import pytest

from fa3.hopper.flash_fwd import FwdConfig, default_config
from fa3.hopper.tile_size import separate_o_fits


@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_defaults_release_q_early_and_stage_o(d, causal):
    cfg = default_config(d, d, "bfloat16", causal, seqlen_q=4096, seqlen_k=4096)
    assert cfg.overlap and cfg.q_early and cfg.l2_group
    big = not separate_o_fits(cfg.tile_m, cfg.tile_n, d, d, cfg.stages)
    # no smem for O beside Q: O is staged in Q's buffer, one tile per CTA
    assert cfg.o_in_q == big and cfg.persistent == (not big)
    if d == 256:
        assert big and cfg.o_in_q and not cfg.persistent


def test_varlen_keeps_o_in_registers():
    cfg = default_config(256, 256, "bfloat16", False, features=dict(varlen=True))
    assert cfg.persistent and not cfg.o_in_q


def test_config_fields_are_keyword_only():
    cfg = default_config(128, 128, "bfloat16", False)
    with pytest.raises(TypeError):
        FwdConfig(*[getattr(cfg, f.name) for f in dataclasses.fields(cfg)])


@pytest.mark.parametrize("seqlen, tile_n", [(256, 64), (512, 64), (1024, 80), (4096, 80), (16384, 80)])
def test_hd256_key_block_follows_padding(seqlen, tile_n):
    assert default_config(256, 256, "bfloat16", False, seqlen_q=seqlen, seqlen_k=seqlen).tile_n == tile_n
    assert default_config(256, 256, "bfloat16", False).tile_n == 80  # seqlen unknown


@pytest.mark.parametrize("d", [64, 128, 256])
def test_causal_l2_groups_small_only_for_the_static_split(d):
    cfg = default_config(d, d, "bfloat16", True, seqlen_q=1024, seqlen_k=1024)
    assert cfg.l2_group_mb == (2 if cfg.persistent else 8)  # 1024 rows: 8 query blocks
    long = default_config(d, d, "bfloat16", True, seqlen_q=2048, seqlen_k=2048)
    assert long.l2_group_mb == (2 if long.persistent else 32)


def test_short_causal_hd128_uses_1mb_groups():
    """4 query blocks or fewer at hd128 causal (persistent): 1 MB groups; hd64 keeps 2 MB."""
    for s, mb in ((512, 1), (256, 1), (640, 2)):
        cfg = default_config(128, 128, "bfloat16", True, seqlen_q=s, seqlen_k=s)
        assert cfg.persistent and cfg.l2_group_mb == mb, (s, cfg)
    assert default_config(64, 64, "bfloat16", True, seqlen_q=512, seqlen_k=512).l2_group_mb == 2
    assert default_config(128, 128, "bfloat16", False, seqlen_q=512, seqlen_k=512).l2_group_mb == 2


@pytest.mark.parametrize("d, seqlen", [(64, 8192), (64, 32768), (128, 8192), (128, 16384), (256, 8192), (256, 16384)])
def test_long_causal_one_cta_per_tile_uses_16mb_groups(d, seqlen):
    cfg = default_config(d, d, "bfloat16", True, seqlen_q=seqlen, seqlen_k=seqlen)
    assert not cfg.persistent and cfg.l2_group and cfg.l2_group_mb == 16  # > 32 query blocks


@pytest.mark.parametrize("seqlen", [4096, 16384])
def test_hd64_non_causal_stays_persistent(seqlen):
    assert default_config(64, 64, "bfloat16", False, seqlen_q=seqlen, seqlen_k=seqlen).persistent
    assert default_config(64, 64, "bfloat16", True, seqlen_q=4096, seqlen_k=4096).persistent


@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
def test_wg_epilogue_where_o_has_its_own_buffer(d):
    """Per-warpgroup O stores need O's own smem buffer: on for the head dims that have one, off
    for hd192/256 (O from registers or in Q's buffer), for varlen (O from registers), and dropped
    where an override leaves no room (hd128 with 176-key blocks)."""
    cfg = default_config(d, d, "bfloat16", False, seqlen_q=512, seqlen_k=512)
    has_o = separate_o_fits(cfg.tile_m, cfg.tile_n, d, d, cfg.stages)
    assert cfg.wg_epilogue == has_o and has_o == (d <= 128)
    assert not default_config(d, d, "bfloat16", True, features=dict(varlen=True)).wg_epilogue
    if d == 128:
        assert not default_config(d, d, "bfloat16", False, tile_n=176).wg_epilogue


def test_q_double_buffer_fits_beside_o():
    """q_stages=2 (an ablation switch) keeps O's buffer at hd64 (192-row tiles) and hd128."""
    for d, tile_m in ((64, 192), (128, 128)):
        assert separate_o_fits(tile_m, 128, d, d, 2, q_stages=2)
        assert default_config(d, d, "bfloat16", False, q_stages=2).wg_epilogue


def test_window_bounds_the_keys_a_tile_reads():
    """hd128 at 32k keys launches one CTA per tile (long KV); a 4096 window reads 33 key blocks
    a tile, so it keeps the persistent walk, and a window wider than the sequence does not."""
    from fa3.hopper.mask import UNBOUNDED

    def cfg(window):
        return default_config(128, 128, "bfloat16", False, seqlen_q=32768, seqlen_k=32768,
                              features=dict(local=window is not None), window=window)

    assert not cfg(None).persistent
    assert cfg((4096, 0)).persistent and cfg((2048, 2048)).persistent
    assert not cfg((UNBOUNDED, 0)).persistent and not cfg((8192, 0)).persistent
