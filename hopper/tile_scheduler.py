"""Static persistent tile scheduler: CTA i takes tiles i, i + grid, i + 2*grid, ...

A tile is (m_block, head, batch). Non-causal tiles all cost the same: m_block varies fastest, so the
CTAs running at one time share a head and its K/V stay in L2. Causal tiles differ in cost (the last
query block sees every key): the heaviest m_block goes first (longest-processing-time first), all
heads and batches of it before the next lighter one, so the tail of the schedule is short tiles; and
CTAs walk the rounds in snake order (tile_index) so each CTA's sum of work stays even.
With persistent=False the grid covers every tile and the loop body runs once per CTA.
The producer and the consumers walk the same sequence independently: no shared state, no atomics.
"""
from __future__ import annotations


def num_tiles(seqlen_q: int, tile_m: int, heads: int, batch: int) -> int:
    return -(-seqlen_q // tile_m) * heads * batch


def grid_size(total_tiles: int, num_sms: int, persistent: bool) -> int:
    return max(1, min(total_tiles, num_sms) if persistent else total_tiles)


def decode_tile(tile, num_m_blocks, num_heads, num_hb, lpt: bool):
    """Linear tile index -> (m_block, head, batch). Traced DSL code (Int32 arithmetic)."""
    if lpt:
        m_block = num_m_blocks - 1 - tile // num_hb
        hb = tile % num_hb
    else:
        m_block = tile % num_m_blocks
        hb = tile // num_m_blocks
    return m_block, hb % num_heads, hb // num_heads


def tile_index(rnd, cta, grid, snake: bool):
    """Tile of CTA `cta` in round `rnd`. With `snake` (causal, tiles sorted heaviest first) odd
    rounds run backwards, so a CTA that got a heavier tile in one round gets a lighter one in the
    next and the static split stays balanced. Strictly increasing in rnd for a fixed CTA."""
    if snake:
        odd = rnd % 2
        return rnd * grid + cta + odd * (grid - 1 - 2 * cta)
    return rnd * grid + cta
