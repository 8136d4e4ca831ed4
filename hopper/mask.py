"""Attention masks on an S tile held in wgmma accumulator registers (traced DSL code).

Causal is aligned bottom-right: key k is visible to query q iff k <= q + (seqlen_k - seqlen_q).
The main loop walks KV blocks from the last one down and splits into: the first (highest) block,
masked for the ragged seqlen_k tail and the diagonal; further blocks that cross the diagonal
(causal only), masked; and all remaining blocks, which run with no mask code at all.
Rows past seqlen_q are computed like any other and clipped by the TMA store.

Sliding window (left, right) ("local", FA's semantics): key k is visible to query q iff
  q + sk - sq - left <= k <= q + sk - sq + right  (and k < seqlen_k);
a side given as -1 is unbounded and reaches the kernel as a large value (UNBOUNDED), so one masked
code path serves every window. kv_block_range computes, once per Q tile, the blocks [n_min, n_max)
any row sees and which of them need masking: the walk from n_max-1 down runs masked blocks (right
edge / seqlen_k tail), unmasked blocks, then masked blocks again (left edge); blocks below n_min are
never loaded.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

UNBOUNDED = 1 << 30  # stands for window side -1; row + sk + UNBOUNDED stays below 2**31


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
def kv_block_range(seqlen_q: Int32, seqlen_k: Int32, m_block: Int32, tile_m: cutlass.Constexpr[int],
                   tile_n: cutlass.Constexpr[int], causal: cutlass.Constexpr[bool],
                   local: cutlass.Constexpr[bool], window_left, window_right,
                   qpk: cutlass.Constexpr[int] = 1):
    """(n_min, n_max, n_hi, n_lo) for one Q tile: blocks [n_min, n_max) are visible to some row;
    [n_hi, n_max) need the right-edge/tail mask (never empty when the range is not), [n_lo, n_hi)
    no mask, [n_min, n_lo) the left-edge mask (local only). n_max <= n_min: the tile sees no key.
    Causal is the window (UNBOUNDED, 0); window_left/right are ignored unless `local`.
    qpk > 1 (pack_gqa): tile row r is query position r // qpk."""
    if cutlass.const_expr(not (causal or local)):
        n_max = n_block_max(seqlen_q, seqlen_k, m_block, tile_m, tile_n, False)
        return 0, n_max, n_max - 1, 0
    right = 0 if cutlass.const_expr(causal) else window_right
    row_lo = m_block * tile_m
    row_hi = cutlass.min(row_lo + tile_m, seqlen_q * qpk) - 1  # last valid row of the tile
    if cutlass.const_expr(qpk > 1):
        row_lo, row_hi = row_lo // qpk, row_hi // qpk  # query positions
    diag = seqlen_k - seqlen_q
    end = cutlass.min(row_hi + diag + right + 1, seqlen_k)
    n_max = (cutlass.max(end, 0) + (tile_n - 1)) // tile_n
    # block n needs no right mask iff every row sees its last column: (n+1)*tile_n <= full_end
    full_end = cutlass.min(row_lo + diag + right + 1, seqlen_k)
    n_hi = cutlass.min(cutlass.max(full_end, 0) // tile_n, n_max - 1)
    n_min = 0
    n_lo = 0
    if cutlass.const_expr(local):
        n_min = cutlass.max(row_lo + diag - window_left, 0) // tile_n
        # block n needs no left mask iff the last row sees its first column
        n_lo = (cutlass.max(row_hi + diag - window_left, 0) + (tile_n - 1)) // tile_n
        n_hi = cutlass.max(n_hi, n_min)
        n_lo = cutlass.min(cutlass.max(n_lo, n_min), n_hi)
    return n_min, n_max, n_hi, n_lo


@cute.jit
def apply_mask(acc_mn: cute.Tensor, coord_mn: cute.Tensor, seqlen_q: Int32, seqlen_k: Int32,
               m_block: Int32, n_block: Int32, tile_m: cutlass.Constexpr[int],
               tile_n: cutlass.Constexpr[int], causal: cutlass.Constexpr[bool],
               local: cutlass.Constexpr[bool] = False, window_left=None, window_right=None,
               qpk: cutlass.Constexpr[int] = 1):
    """Set masked scores to -inf. acc_mn / coord_mn: (rows, cols) views of this thread's accumulators
    and of their (row, col) coordinates inside the tile. `local`: window (window_left, window_right)
    (causal must then be False; causal with a left window is local with right = 0).
    qpk > 1 (pack_gqa): tile row r is query position (m_block * tile_m + r) // qpk."""
    col_limit = seqlen_k - n_block * tile_n  # tile columns >= this are past seqlen_k
    if cutlass.const_expr(qpk > 1 and (causal or local)):
        # the position-based limits below, in absolute query positions
        diag = seqlen_k - seqlen_q - n_block * tile_n
        for r in cutlass.range_constexpr(cute.size(acc_mn, mode=[0])):
            row = (m_block * tile_m + coord_mn[r, 0][0]) // qpk + diag
            hi = cutlass.min(row + (0 if cutlass.const_expr(causal) else window_right) + 1, col_limit)
            lo = row - window_left if cutlass.const_expr(local) else -UNBOUNDED
            for c in cutlass.range_constexpr(cute.size(acc_mn, mode=[1])):
                col = coord_mn[r, c][1]
                acc_mn[r, c] = -Float32.inf if (col >= hi or col < lo) else acc_mn[r, c]
    elif cutlass.const_expr(local):
        # visible iff row + diag - left <= col <= row + diag + right, col < col_limit
        diag = m_block * tile_m - n_block * tile_n + seqlen_k - seqlen_q
        for r in cutlass.range_constexpr(cute.size(acc_mn, mode=[0])):
            row = coord_mn[r, 0][0] + diag
            hi = cutlass.min(row + window_right + 1, col_limit)
            lo = row - window_left
            for c in cutlass.range_constexpr(cute.size(acc_mn, mode=[1])):
                col = coord_mn[r, c][1]
                acc_mn[r, c] = -Float32.inf if (col >= hi or col < lo) else acc_mn[r, c]
    elif cutlass.const_expr(not causal):
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


# ---- backward: the query blocks one KV block meets (traced DSL code) ----------------------------
@cute.jit
def m_block_min_bwd(seqlen_q: Int32, seqlen_k: Int32, n_block: Int32, tile_m: cutlass.Constexpr[int],
                    tile_n: cutlass.Constexpr[int], causal: cutlass.Constexpr[bool]) -> Int32:
    """First Q block any key of KV block n_block is visible to (causal: the row where the block's
    first key meets the bottom-right diagonal)."""
    m_min = Int32(0)
    if cutlass.const_expr(causal):
        first_row = n_block * tile_n + seqlen_q - seqlen_k  # row i sees key j iff j <= i + sk - sq
        m_min = cutlass.max(first_row, 0) // tile_m
    return m_min


@cute.jit
def m_block_min_no_mask_bwd(seqlen_q: Int32, seqlen_k: Int32, n_block: Int32,
                            tile_m: cutlass.Constexpr[int], tile_n: cutlass.Constexpr[int]) -> Int32:
    """Causal: Q blocks from this index on see every key of KV block n_block (no mask needed)."""
    # the tile's first row sees the block's last key: (n+1)*tile_n - 1 <= m*tile_m + sk - sq
    need = (n_block + 1) * tile_n - 1 + seqlen_q - seqlen_k
    return (cutlass.max(need, 0) + (tile_m - 1)) // tile_m


@cute.jit
def m_block_nomask_bwd(seqlen_q: Int32, seqlen_k: Int32, n_block: Int32, m_min: Int32, m_max: Int32,
                       tile_m: cutlass.Constexpr[int], tile_n: cutlass.Constexpr[int],
                       causal: cutlass.Constexpr[bool], local: cutlass.Constexpr[bool]) -> Int32:
    """Query blocks [m_min, m_nomask) of KV block n_block need the mask, [m_nomask, m_max) not:
    the causal diagonal's blocks, and every block of a KV tile that ends past seqlen_k (its
    zero-filled keys would give P = exp2(-LSE), which may overflow); sliding window: all, in order
    (BwdConfig.window_split has the consumers skip the mask inside the window:
    window_nomask_range_bwd). Every role of the backward walks the blocks in this split
    (walk_block)."""
    m_nomask = m_min
    if cutlass.const_expr(causal):
        m_nomask = cutlass.max(m_min, m_block_min_no_mask_bwd(seqlen_q, seqlen_k, n_block, tile_m,
                                                              tile_n))
    if (n_block + 1) * tile_n > seqlen_k:
        m_nomask = m_max
    if cutlass.const_expr(local):
        m_nomask = m_max
    return cutlass.min(m_nomask, m_max)


def window_nomask_range_bwd(seqlen_q, seqlen_k, n_block, m_min, m_max, tile_m: int, tile_n: int,
                            window_left, window_right):
    """Sliding window: the query blocks [a, b) of [m_min, m_max) whose every row sees every key of
    KV block n_block (no mask there); the blocks before a cross the window's right edge, those from
    b on its left edge. Empty (a = b = m_max) if the KV tile ends past seqlen_k (see
    m_block_nomask_bwd). Plain arithmetic on non-negative values: traced Int32 in the kernel,
    Python ints in the CPU test."""
    diag = seqlen_k - seqlen_q
    # every key <= the first row's right edge: (n + 1) * tile_n - 1 <= m * tile_m + diag + right
    a = (cutlass.max((n_block + 1) * tile_n - 1 - diag - window_right, 0) + tile_m - 1) // tile_m
    # every key >= the last row's left edge: n * tile_n >= (m + 1) * tile_m - 1 + diag - left
    b = cutlass.max(n_block * tile_n - diag + window_left + 1, 0) // tile_m
    a = cutlass.min(cutlass.max(a, m_min), m_max)
    a = select_int((n_block + 1) * tile_n > seqlen_k, m_max, a)
    return a, cutlass.min(cutlass.max(b, a), m_max)


def select_int(cond, a, b):
    """a if cond else b: plain Python for Python values (the CPU tests of walk_block), a branch-free
    select for traced Int32."""
    if isinstance(cond, bool):
        return a if cond else b
    return Int32(cutlass.select_(cond, a, b))


def walk_block(pos, m_nomask, m_max, rot):
    """The query block a backward CTA (one KV block) visits at walk position pos of [m_min, m_max):
    the masked blocks [m_min, m_nomask) in order, then the unmasked run rotated to start at
    m_nomask + rot (0 <= rot < its length, or 0), wrapping. With rot = n_block % length, the CTAs
    of one head that run together (consecutive n_blocks; non-causal they share the bounds) add
    their dQ into different tiles instead of all into the same lines at once; causal walks start
    at their diagonals anyway. Both backward kernels trace this (stagger); two selects, no division."""
    t = pos + select_int(pos >= m_nomask, rot, 0)
    return select_int(t >= m_max, t - (m_max - m_nomask), t)


@cute.jit
def apply_mask_bwd(acc_mn: cute.Tensor, coord_mn: cute.Tensor, seqlen_q: Int32, seqlen_k: Int32,
                   m_block: Int32, n_block: Int32, tile_m: cutlass.Constexpr[int],
                   tile_n: cutlass.Constexpr[int], causal: cutlass.Constexpr[bool],
                   swap: cutlass.Constexpr[bool], local: cutlass.Constexpr[bool] = False,
                   window_left=0, window_right=0):
    """Set invisible scores to -inf in a backward S tile. swap: the tile is S^T (rows are keys,
    columns queries), else S. Keys past seqlen_k are masked too; local: keys outside the window
    [q + sk - sq - left, q + sk - sq + right]."""
    for r in cutlass.range_constexpr(cute.size(acc_mn, mode=[0])):
        for c in cutlass.range_constexpr(cute.size(acc_mn, mode=[1])):
            row, col = coord_mn[r, c]
            q_idx = m_block * tile_m + (col if cutlass.const_expr(swap) else row)
            k_idx = n_block * tile_n + (row if cutlass.const_expr(swap) else col)
            hidden = k_idx >= seqlen_k
            if cutlass.const_expr(causal):
                hidden = hidden or k_idx > q_idx + seqlen_k - seqlen_q
            if cutlass.const_expr(local):
                diag = q_idx + seqlen_k - seqlen_q
                hidden = hidden or k_idx > diag + window_right or k_idx < diag - window_left
            acc_mn[r, c] = -Float32.inf if hidden else acc_mn[r, c]


@cute.jit
def m_block_range_local_bwd(seqlen_q: Int32, seqlen_k: Int32, n_block: Int32,
                            tile_m: cutlass.Constexpr[int], tile_n: cutlass.Constexpr[int],
                            window_left, window_right):
    """Sliding window: the Q blocks [m_min, m_max) whose rows see a key of KV block n_block
    (row q sees key k iff q + sk - sq - left <= k <= q + sk - sq + right); may be empty."""
    diag = seqlen_k - seqlen_q
    m_min = cutlass.max(n_block * tile_n - diag - window_right, 0) // tile_m
    k_last = cutlass.min((n_block + 1) * tile_n, seqlen_k) - 1
    last_row = k_last + window_left - diag  # rows above it see no key of the block
    m_max = cutlass.min((seqlen_q + tile_m - 1) // tile_m, (cutlass.max(last_row, -1) + tile_m) // tile_m)
    return m_min, m_max


@cute.jit
def n_block_min_local_bwd(seqlen_q: Int32, seqlen_k: Int32, m_block: Int32,
                          tile_m: cutlass.Constexpr[int], tile_n: cutlass.Constexpr[int],
                          window_left) -> Int32:
    """Sliding window: the lowest KV block any row of Q block m_block sees (the KV blocks meeting
    m_block are contiguous from here)."""
    return cutlass.max(m_block * tile_m + seqlen_k - seqlen_q - window_left, 0) // tile_n
