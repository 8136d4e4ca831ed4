"""The static tile order's host-checkable properties (decode_tile is plain integer arithmetic)."""
import pytest

from fa3.hopper.tile_scheduler import decode_kv_block, decode_tile, tile_index


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


@pytest.mark.parametrize("n, heads, batch, group", [(32, 16, 4, 8), (8, 16, 16, 32), (32, 12, 3, 8),
                                                    (16, 24, 5, 16), (3, 7, 2, 4), (1, 1, 1, 1),
                                                    (5, 3, 1, 3), (4, 5, 1, 1)])
def test_bwd_kv_blocks_heaviest_first_in_even_groups(n, heads, batch, group):
    hb = heads * batch
    group = min(group, hb)  # as lpt_group clamps it
    ctas = [decode_kv_block(i, n, heads, hb, group) for i in range(n * hb)]
    assert sorted(ctas) == sorted((nb, h, b) for nb in range(n) for h in range(heads)
                                  for b in range(batch))  # a permutation of the grid
    count = -(-hb // group)  # groups: as many as `group` pairs each would make
    sizes = [hb // count + (i < hb % count) for i in range(count)]
    assert max(sizes) <= group
    start, seen = 0, set()
    for size in sizes:  # each group: block 0 of its pairs, then block 1, ...
        chunk = ctas[start:start + size * n]
        assert [nb for nb, _, _ in chunk] == [nb for nb in range(n) for _ in range(size)]
        pairs = {(h, b) for _, h, b in chunk}
        assert len(pairs) == size and not pairs & seen
        seen |= pairs
        start += size * n
