"""The static tile order's host-checkable properties (decode_tile is plain integer arithmetic)."""
import pytest

from fa3.hopper.tile_scheduler import decode_tile, tile_index


@pytest.mark.parametrize("m, heads, batch, group", [(8, 16, 16, 64), (8, 16, 16, 5), (128, 16, 1, 4),
                                                    (3, 7, 2, 4), (1, 1, 1, 1), (5, 3, 1, 9)])
def test_lpt_groups_cover_every_tile_heaviest_first(m, heads, batch, group):
    hb = heads * batch
    group = min(group, hb)  # as lpt_group clamps it
    tiles = [decode_tile(t, m, heads, hb, True, group) for t in range(m * hb)]
    assert len(set(tiles)) == m * hb  # a permutation of (m_block, head, batch)
    for start in range(0, m * hb, group * m):  # each group: its pairs, m_blocks descending
        chunk = tiles[start:start + group * m]
        pairs = {(h, b) for _, h, b in chunk}
        assert len(pairs) == min(group, hb - start // m)
        blocks = [mb for mb, _, _ in chunk]
        assert blocks == sorted(blocks, reverse=True)
        assert len(chunk) == len(pairs) * m


def test_snake_rounds_visit_each_tile_once():
    grid, total = 7, 60
    seen = []
    for cta in range(grid):
        rnd, t = 0, tile_index(0, cta, grid, True)
        while t < total:
            seen.append(t)
            rnd += 1
            t = tile_index(rnd, cta, grid, True)
    assert sorted(seen) == list(range(total))
