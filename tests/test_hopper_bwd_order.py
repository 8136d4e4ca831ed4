"""CPU check of the sm90 backward's query-block walk (mask.walk_block with rot = n_block % length, as the
producer, consumer and dQ warp trace, here on Python ints) and of the config switch:

* for every bounds and KV block, the walk is a permutation of [m_min, m_max): the masked blocks
  first and ascending, then the unmasked run rotated to start at m_nomask + n_block % its length;
* KV blocks with the same bounds (the non-causal CTAs of a head, running together) never visit the
  same query block at the same step while there are no more of them than unmasked blocks;
* stagger is an opt-in switch (measured neutral on the H100), refused when deterministic;
* a sliding window's unmasked query blocks (window_split) are exactly the blocks inside it;
* the persistent grid is on where it measured a gain and refused where its tiles do not apply."""
import itertools
import random

import pytest

from fa3.hopper.flash_bwd import default_config
from fa3.hopper.mask import UNBOUNDED, walk_block, window_nomask_range_bwd


def walk(m_min, m_nomask, m_max, n_block):
    rot = n_block % max(m_max - m_nomask, 1)  # bwd_kernel.m_at
    return [walk_block(p, m_nomask, m_max, rot) for p in range(m_min, m_max)]


def test_walk_is_masked_first_then_rotated():
    for m_min, n_masked, cnt, n_block in itertools.product(range(4), range(4), range(9), range(20)):
        m_nomask, m_max = m_min + n_masked, m_min + n_masked + cnt
        seq = walk(m_min, m_nomask, m_max, n_block)
        assert sorted(seq) == list(range(m_min, m_max))
        assert seq[:n_masked] == list(range(m_min, m_nomask))
        if cnt:
            rot = n_block % cnt
            run = list(range(m_nomask, m_max))
            assert seq[n_masked:] == run[rot:] + run[:rot]


def test_concurrent_kv_blocks_never_collide():
    for cnt in range(1, 17):
        walks = [walk(0, 0, cnt, n) for n in range(cnt)]
        for step in range(cnt):
            assert len({w[step] for w in walks}) == cnt


def test_large_bounds():
    # long sequences: 64-row tiles of 128k queries, a causal diagonal part in front
    seq = walk(100, 103, 2048, 5000)
    assert seq[:3] == [100, 101, 102] and seq[3] == 103 + 5000 % 1945
    assert sorted(seq) == list(range(100, 2048))


@pytest.mark.parametrize("d", [64, 128, 256])
def test_stagger_default(d):
    for causal, gqa in itertools.product((False, True), repeat=2):
        assert not default_config(d, d, "bfloat16", causal, False, gqa).stagger
        assert not default_config(d, d, "bfloat16", causal, True, gqa).stagger
    assert default_config(d, d, "bfloat16", False, stagger=True).stagger
    with pytest.raises(AssertionError):
        default_config(d, d, "bfloat16", False, True, stagger=True)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_lpt_switch(d):
    """Heaviest-first KV blocks: opt-in (measured mixed on the H100), causal only, not with
    deterministic (spt orders those) or varlen."""
    for causal, det, gqa in itertools.product((False, True), repeat=3):
        assert not default_config(d, d, "bfloat16", causal, det, gqa).lpt
    assert default_config(d, d, "bfloat16", True, lpt=True).lpt
    for bad in (dict(causal=False), dict(deterministic=True), dict(varlen=True)):
        args = dict(causal=True, deterministic=False) | bad
        with pytest.raises(AssertionError):
            default_config(d, d, "bfloat16", args.pop("causal"), args.pop("deterministic"),
                           lpt=True, **args)


def _visible(q, k, sq, sk, left, right):
    return k < sk and q + sk - sq - left <= k <= q + sk - sq + right


@pytest.mark.parametrize("tm,tn", [(16, 32), (32, 16), (16, 16)])
def test_window_nomask_range(tm, tn):
    """BwdConfig.window_split: [a, b) is exactly the query blocks (of those meeting KV block n)
    whose every row sees every key of the block, by brute force over small tiles (the bounds are
    the kernel's arithmetic, here on Python ints)."""
    rng = random.Random(tm * 100 + tn)
    for _ in range(300):
        sq, sk = rng.randint(1, 160), rng.randint(1, 160)
        left, right = (rng.choice([UNBOUNDED, 0, 1, 5, tm, tn, 40, 100]) for _ in range(2))
        for n in range(-(-sk // tn)):
            keys = range(n * tn, (n + 1) * tn)
            met = [m for m in range(-(-sq // tm))
                   if any(_visible(q, k, sq, sk, left, right) for q in range(m * tm, (m + 1) * tm)
                          for k in keys)]
            if not met:
                continue
            m_min, m_max = met[0], met[-1] + 1
            assert met == list(range(m_min, m_max))  # the kernel's [m_min, m_max) is a range
            a, b = window_nomask_range_bwd(sq, sk, n, m_min, m_max, tm, tn, left, right)
            assert m_min <= a <= b <= m_max
            for m in range(m_min, m_max):
                whole = all(_visible(q, k, sq, sk, left, right)
                            for q in range(m * tm, (m + 1) * tm) for k in keys)
                assert whole == (a <= m < b), (sq, sk, left, right, n, m, a, b)


def test_persistent_default_and_refusals():
    """The persistent grid: on by default exactly where it measured a gain (hd64 / hd96, non-causal,
    MHA, not deterministic, no features); an A/B switch elsewhere on swapped layouts; refused where
    a tile is not a plain (KV block, head, batch) or the walk is ordered otherwise."""
    for d in (64, 96, 128, 192, 256):
        for causal, det, gqa in itertools.product((False, True), repeat=3):
            want = d <= 96 and not (causal or det or gqa)
            assert default_config(d, d, "bfloat16", causal, det, gqa).persistent == want, (d, causal, det, gqa)
        for feat in ("local", "softcap", "varlen", "seqused_q", "seqused_k", "pdl"):
            assert not default_config(d, d, "bfloat16", False, **{feat: True}).persistent, (d, feat)
    for d, causal in ((128, False), (128, True), (64, True)):
        assert default_config(d, d, "bfloat16", causal, persistent=True).persistent
    refused = [dict(d=256), dict(d=192), dict(deterministic=True), dict(varlen=True),
               dict(local=True), dict(seqused_k=True), dict(pdl=True), dict(causal=True, lpt=True)]
    for bad in refused:
        args = dict(d=128, causal=False, deterministic=False) | bad
        d = args.pop("d")
        with pytest.raises(AssertionError):
            default_config(d, d, "bfloat16", args.pop("causal"), args.pop("deterministic"),
                           persistent=True, **args)


def test_group_loop_config():
    """group_loop (GQA, one CTA per KV head walking its group's query heads) is chosen per call
    (flash_bwd.group_loop_wins), never by default_config alone; with it the kernel writes final
    dK / dV in the input dtype, not fp32 partials, so the MHA store paths apply (dK / dV by TMA,
    dV issued early at hd128), and hd256 adds dQ through the dQ warp (dq_red's register adds
    address one query head's dQaccum); refused with dq_red; MHA has no group to walk."""
    for d in (64, 96, 128, 192, 256):
        for causal, det in itertools.product((False, True), repeat=2):
            base = default_config(d, d, "bfloat16", causal, det, True)
            assert base.gqa and not base.group_loop and not base.dkv_tma
            cfg = default_config(d, d, "bfloat16", causal, det, True, group_loop=True)
            mha = default_config(d, d, "bfloat16", causal, det, False)
            assert cfg.group_loop and not cfg.gqa and cfg.dkv_tma
            assert not cfg.dq_red and cfg.dv_early == mha.dv_early
            assert not cfg.persistent  # (with GQA: not measured)
            assert default_config(d, d, "bfloat16", causal, det, False, group_loop=True) == mha
    with pytest.raises(AssertionError):
        default_config(256, 256, "bfloat16", False, False, True, group_loop=True, dq_red=True)


def test_group_loop_default():
    """group_loop by default where it measured a gain: hd <= 128 (q/k = v), not deterministic,
    with more than half the SMs' worth of KV-head CTAs (128-key blocks x KV heads x batch), 3
    waves' worth if causal."""
    from fa3.hopper.flash_bwd import group_loop_wins

    for d in (64, 96, 128):
        assert group_loop_wins(d, d, False, False, 2048, 8, 132)  # 16 x 8 = 128 CTAs
        assert group_loop_wins(d, d, False, False, 1536, 8, 132)  # 96: measured 1.13x at hd128
        assert group_loop_wins(d, d, False, False, 1025, 8, 132)  # 9 x 8 = 72 (a ragged block)
        assert not group_loop_wins(d, d, False, False, 1024, 8, 132)  # 64: measured 0.95x
        assert not group_loop_wins(d, d, True, False, 2048, 16, 132)  # causal 256: 0.95x
        assert group_loop_wins(d, d, True, False, 2048, 32, 132)  # causal 512: hd64 1.13x
        assert not group_loop_wins(d, d, False, True, 8192, 16, 132)  # deterministic
    for d, dv in ((192, 192), (256, 256), (192, 128)):
        assert not group_loop_wins(d, dv, False, False, 8192, 16, 132), (d, dv)


def test_short_causal_persistent():
    """The persistent grid for causal hd64 MHA up to 2k keys, where it measured a gain."""
    from fa3.hopper.flash_bwd import short_causal_persistent

    assert short_causal_persistent(64, 64, True, False, 1024)
    assert short_causal_persistent(64, 64, True, False, 2048)
    assert not short_causal_persistent(64, 64, True, False, 2049)  # 4k: -1.7%
    assert not short_causal_persistent(64, 64, False, False, 1024)  # (non-causal: default_config)
    assert not short_causal_persistent(64, 64, True, True, 1024)  # deterministic: refused
    assert not short_causal_persistent(128, 128, True, False, 1024)  # hd128 causal: -0.9%
    assert default_config(64, 64, "bfloat16", True, persistent=True).persistent  # builds


def test_dkv_red_config():
    """dkv_red (GQA's dK / dV added into per-KV-head accumulators) is the default for dense,
    non-deterministic GQA without group_loop at hd64/128/256 and hd192's 96-key tiles (192/192,
    192/128); partials where order matters, for the features, and on request; hd96 and hd192's
    64-key tiles (GPU-tested with it, not measured) keep partials; refused where its order or
    tiles do not apply."""
    for d, dv, extra in ((96, 96, {}), (192, 192, dict(dkv_swap=False)),
                         (192, 128, dict(dkv_swap=False))):  # (hd192's 64-key tiles)
        assert not default_config(d, dv, "bfloat16", False, False, True, **extra).dkv_red
        assert default_config(d, dv, "bfloat16", False, False, True, dkv_red=True, **extra).dkv_red
    for d, dv in ((64, 64), (128, 128), (256, 256), (192, 192), (192, 128)):
        for causal in (False, True):
            assert default_config(d, dv, "bfloat16", causal, False, True).dkv_red
            assert not default_config(d, dv, "bfloat16", causal, False, False).dkv_red  # MHA
            assert not default_config(d, dv, "bfloat16", causal, True, True).dkv_red  # det
            assert not default_config(d, dv, "bfloat16", causal, False, True, group_loop=True).dkv_red
            assert not default_config(d, dv, "bfloat16", causal, False, True, dkv_red=False).dkv_red
            for feat in ("softcap", "varlen", "seqused_q", "seqused_k"):
                assert not default_config(d, dv, "bfloat16", causal, False, True, **{feat: True}).dkv_red
        assert not default_config(d, dv, "bfloat16", False, False, True, local=True).dkv_red
        if d <= 96:  # (persistent GQA on request: partials, as dkv_red refuses the grid)
            assert not default_config(d, dv, "bfloat16", False, False, True, persistent=True).dkv_red
    for d in (64, 128, 256):
        for bad in (dict(gqa=False), dict(deterministic=True), dict(group_loop=True),
                    dict(persistent=True)):
            args = dict(deterministic=False, gqa=True, dkv_red=True)
            args.update(bad)
            with pytest.raises(AssertionError):
                default_config(d, d, "bfloat16", False, **args)
