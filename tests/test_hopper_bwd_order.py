"""CPU check of the sm90 backward's query-block walk (mask.walk_block with rot = n_block % length, as the
producer, consumer and dQ warp trace, here on Python ints) and of the config switch:

* for every bounds and KV block, the walk is a permutation of [m_min, m_max): the masked blocks
  first and ascending, then the unmasked run rotated to start at m_nomask + n_block % its length;
* KV blocks with the same bounds (the non-causal CTAs of a head, running together) never visit the
  same query block at the same step while there are no more of them than unmasked blocks;
* stagger is an opt-in switch (measured neutral on the H100), refused when deterministic."""
import itertools

import pytest

from fa3.hopper.flash_bwd import default_config
from fa3.hopper.mask import walk_block


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
