"""CPU check of the sm80 backward's Q-tile visit order (fa3.hopper.mask.walk_block, the function
the kernel traces, here on Python ints) and of the Q/dO ring indexed by visit position:

* the order is a permutation of [m_block_min, m_block_max), the masked tiles first and ascending,
  the unmasked run rotated by rot = n_block % its length (what kv_tile computes);
* replaying the kernel's prologue / per-step prefetch, every step finds its own tile in slot
  i % stages, and no prefetch overwrites the slot the step is reading;
* consecutive n_blocks with the same bounds (non-causal CTAs running together) never visit the
  same tile at the same step.
The replay mirrors kv_tile / m_tile by hand: change one, change the other."""
import itertools

from fa3.hopper.mask import walk_block


def rot_of(n_block, m_mask_end, m_block_max):
    return n_block % max(m_block_max - m_mask_end, 1)  # kv_tile's st.rot


def order(m_block_min, m_mask_end, m_block_max, n_block):
    rot = rot_of(n_block, m_mask_end, m_block_max)
    return [walk_block(pos, m_mask_end, m_block_max, rot) for pos in range(m_block_min, m_block_max)]


def replay_ring(m_block_min, m_mask_end, m_block_max, n_block, stages):
    """The tiles each step reads, loaded the way the kernel loads them (slot of position pos:
    (pos - m_block_min) % stages)."""
    rot = rot_of(n_block, m_mask_end, m_block_max)

    def tile(pos):
        return walk_block(pos, m_mask_end, m_block_max, rot)

    slots = [None] * stages
    for s in range(stages - 1):  # prologue
        if m_block_min + s < m_block_max:
            slots[s] = tile(m_block_min + s)
    seen = []
    for pos in range(m_block_min, m_block_max):
        slot = (pos - m_block_min) % stages
        if stages == 1:
            slots[0] = tile(pos)
        else:
            nxt = pos + stages - 1
            if nxt < m_block_max:
                nslot = (nxt - m_block_min) % stages
                assert nslot != slot, "prefetch into the slot being read"
                slots[nslot] = tile(nxt)
        seen.append(slots[slot])
    return seen


CASES = [(lo, me, hi, n) for hi in range(0, 9) for lo in range(0, hi + 1) for me in range(lo, hi + 1)
         for n in range(0, 11)]


def test_order_is_masked_first_then_rotated_unmasked_run():
    for lo, me, hi, n in CASES:
        seq = order(lo, me, hi, n)
        assert sorted(seq) == list(range(lo, hi)), (lo, me, hi, n, seq)
        assert seq[:me - lo] == list(range(lo, me)), (lo, me, hi, n, seq)
        cnt = hi - me
        if cnt:
            rot = n % cnt
            assert seq[me - lo:] == [me + (j + rot) % cnt for j in range(cnt)], (lo, me, hi, n, seq)


def test_no_rotation_is_ascending():
    for lo, me, hi, _ in CASES:
        assert [walk_block(p, me, hi, 0) for p in range(lo, hi)] == list(range(lo, hi))


def test_ring_delivers_each_steps_tile():
    for (lo, me, hi, n), stages in itertools.product(CASES, (1, 2, 3)):
        assert replay_ring(lo, me, hi, n, stages) == order(lo, me, hi, n), (lo, me, hi, n, stages)


def test_concurrent_ctas_visit_different_tiles():
    # non-causal: every CTA of a head has the same bounds; up to cnt consecutive n_blocks (the
    # CTAs that run together) are at different tiles at every step
    for cnt, first in itertools.product(range(1, 12), range(0, 20)):
        seqs = [order(0, 0, cnt, n) for n in range(first, first + cnt)]
        for step in range(cnt):
            assert len({s[step] for s in seqs}) == cnt, (cnt, first, step)
