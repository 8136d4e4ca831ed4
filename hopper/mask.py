"""Attention masks on an S tile held in wgmma accumulator registers (traced DSL code).

Causal is aligned bottom-right: key k is visible to query q iff k <= q + (seqlen_k - seqlen_q).
The main loop walks KV blocks from the last one down and splits into: the first (highest) block,
masked for the ragged seqlen_k tail and the diagonal; further blocks that cross the diagonal
(causal only), masked; and all remaining blocks, which run with no mask code at all.
Rows past seqlen_q are computed like any other and clipped by the TMA store.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32


@cute.jit
def n_block_max(seqlen_q: Int32, seqlen_k: Int32, m_block: Int32, tile_m: cutlass.Constexpr[int],
                tile_n: cutlass.Constexpr[int], causal: cutlass.Constexpr[bool]) -> Int32:
    """One past the last KV block any row of this Q tile can see (0: the tile sees no key)."""
    n_max = (seqlen_k + (tile_n - 1)) // tile_n
    if cutlass.const_expr(causal):
        # last visible key of the tile's last row, plus one
        end = (m_block + 1) * tile_m + seqlen_k - seqlen_q
        n_max = cutlass.min(n_max, (cutlass.max(end, 0) + (tile_n - 1)) // tile_n)
    return n_max


@cute.jit
def n_block_min_causal_mask(seqlen_q: Int32, seqlen_k: Int32, m_block: Int32,
                            tile_m: cutlass.Constexpr[int], tile_n: cutlass.Constexpr[int]) -> Int32:
    """KV blocks below this index are fully visible to every row of the Q tile (no mask needed)."""
    # block n is fully visible to the tile's first row iff (n + 1) * tile_n - 1 <= m_block*tile_m + sk - sq
    c1 = m_block * tile_m + seqlen_k - seqlen_q + 1
    return cutlass.max(c1, 0) // tile_n


@cute.jit
def apply_mask(acc_mn: cute.Tensor, coord_mn: cute.Tensor, seqlen_q: Int32, seqlen_k: Int32,
               m_block: Int32, n_block: Int32, tile_m: cutlass.Constexpr[int],
               tile_n: cutlass.Constexpr[int], causal: cutlass.Constexpr[bool]):
    """Set masked scores to -inf. acc_mn / coord_mn: (rows, cols) views of this thread's accumulators
    and of their (row, col) coordinates inside the tile."""
    col_limit = seqlen_k - n_block * tile_n  # tile columns >= this are past seqlen_k
    if cutlass.const_expr(not causal):
        for c in cutlass.range_constexpr(cute.size(acc_mn, mode=[1])):
            oob = coord_mn[0, c][1] >= col_limit
            for r in cutlass.range_constexpr(cute.size(acc_mn, mode=[0])):
                acc_mn[r, c] = -Float32.inf if oob else acc_mn[r, c]
    else:
        # visible iff n_block*tile_n + col <= m_block*tile_m + row + sk - sq
        diag = m_block * tile_m - n_block * tile_n + seqlen_k - seqlen_q + 1
        for r in cutlass.range_constexpr(cute.size(acc_mn, mode=[0])):
            limit = cutlass.min(coord_mn[r, 0][0] + diag, col_limit)
            for c in cutlass.range_constexpr(cute.size(acc_mn, mode=[1])):
                acc_mn[r, c] = -Float32.inf if coord_mn[r, c][1] >= limit else acc_mn[r, c]
