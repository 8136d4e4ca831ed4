"""Static persistent tile scheduler: CTA i takes tiles i, i + grid, i + 2*grid, ...

A tile is (m_block, head, batch). Non-causal tiles all cost the same: m_block varies fastest, so the
CTAs running at one time share a head and its K/V stay in L2. Causal tiles differ in cost (the last
query block sees every key): the heaviest m_block goes first (longest-processing-time first), all
heads and batches of it before the next lighter one, so the tail of the schedule is short tiles; and
CTAs walk the rounds in snake order (tile_index) so each CTA's sum of work stays even. The LPT order
runs within groups of (batch, head) pairs whose K/V fit in L2 (lpt_group), one group after another.
With persistent=False the grid covers every tile and the loop body runs once per CTA.
The producer and the consumers walk the same sequence independently: no shared state, no atomics.

Varlen (cu_seqlens): tiles are numbered sequence by sequence, ceil(len_b / tile_m) * heads tiles for
sequence b (zero for an empty one), and CTAs stride through them persistently as above, so a
long-tailed mix of lengths still spreads over every SM (a CTA's work differs from another's by at
most about one tile). Each warp finds a tile's sequence itself, 32 sequences at a time: every lane
counts the tiles of one sequence, a warp prefix sum and a ballot locate the tile (varlen_decode);
the 32-sequence window is kept across tiles (a CTA's tiles only increase), so a walk through B
sequences reads cu_seqlens once per 32 of them. Inside a sequence: m_block fastest (non-causal, one
head's K/V shared in L2) or heaviest m_block first, heads adjacent (causal/local).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Int32


_SMS = {}


def num_sms(device) -> int:
    """The device's SM count (cached: the property query costs microseconds every call)."""
    import torch

    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def num_tiles(seqlen_q: int, tile_m: int, heads: int, batch: int) -> int:
    return -(-seqlen_q // tile_m) * heads * batch


def grid_size(total_tiles: int, num_sms: int, persistent: bool) -> int:
    return max(1, min(total_tiles, num_sms) if persistent else total_tiles)


# K/V bytes that the (batch, head) pairs of one causal LPT group may share through L2 (H100 has
# 50 MB, H200 60 MB; FA3 assumes 32 MB).
L2_GROUP_BYTES = 32 << 20


# With the static persistent split, groups only pay off with few query blocks per head (short
# sequences: many (batch, head) pairs, each re-read from HBM). With many blocks a group spans
# rounds whose tiles differ a lot in cost, and the jump from one group's lightest tiles to the next
# group's heaviest unbalances the static split (H100, fp8 hd256 causal 16k: 1083 -> 973 TFLOP/s),
# so there all heads form one group. With one CTA per tile the hardware hands out tiles as SMs free
# up, so nothing unbalances and groups stay on at any length (FA4's LPT order does the same).
MAX_GROUPED_M_BLOCKS = 32


def lpt_group(seqlen_k, bytes_per_key: int, qhead_per_kvhead, num_hb, num_m_blocks,
              group_bytes: int = L2_GROUP_BYTES, static_split: bool = True):
    """(batch, head) pairs per causal LPT group: as many as keep their K/V within group_bytes
    (query heads sharing a kv head count once), at least one, at most all; with static_split
    (persistent kernels), all of them above MAX_GROUPED_M_BLOCKS query blocks per head."""
    kv_heads = cutlass.max(Int32(group_bytes) // cutlass.max(seqlen_k * bytes_per_key, 1), 1)
    group = cutlass.min(kv_heads * qhead_per_kvhead, num_hb)
    if static_split:
        group = cutlass.select_(num_m_blocks > MAX_GROUPED_M_BLOCKS, num_hb, group)
    return Int32(group)


def decode_tile(tile, num_m_blocks, num_heads, num_hb, lpt: bool, group=None):
    """Linear tile index -> (m_block, head, batch). Traced DSL code (Int32 arithmetic).
    lpt with ``group`` (lpt_group): heaviest m_block first within each group of that many
    (batch, head) pairs, group after group, so the CTAs running at one time read the K/V of a
    few heads (L2 hits) instead of one block of every head (each re-read from HBM per m_block:
    short causal sequences were memory-bound on the H100 that way)."""
    if lpt and group is not None:
        per = group * num_m_blocks
        grp = tile // per
        r = tile - grp * per
        g0 = grp * group
        gc = cutlass.max(cutlass.min(group, num_hb - g0), 1)  # the last group may be short
        m_block = num_m_blocks - 1 - r // gc
        hb = g0 + r % gc
    elif lpt:
        m_block = num_m_blocks - 1 - tile // num_hb
        hb = tile % num_hb
    else:
        m_block = tile % num_m_blocks
        hb = tile // num_m_blocks
    return m_block, hb % num_heads, hb // num_heads


def _select(cond, a, b):
    """cutlass.select_ in traced code; the plain choice on host ints (the CPU tests)."""
    if isinstance(cond, bool):
        return a if cond else b
    return cutlass.select_(cond, Int32(a), Int32(b))


def decode_kv_block(cta, num_n_blocks, num_heads, num_hb, group):
    """Causal backward (one CTA per KV block): linear CTA index -> (n_block, head, batch). Block
    n = 0, which the most query blocks see, first: all (batch, head) pairs of a group before the
    next lighter block, group after group. As many groups as ``group`` (lpt_group, sized by the
    rows' Q / dO / dQaccum bytes) pairs each would make, their sizes within one of each other: a
    short last group would leave its heaviest blocks for the grid's end. The hardware hands CTAs
    out in index order, so the grid ends on light blocks."""
    count = (num_hb + group - 1) // group
    small = num_hb // count  # pairs of a group; the first num_hb % count groups have one more
    big_ctas = (num_hb % count) * (small + 1) * num_n_blocks
    in_big = cta < big_ctas
    size = _select(in_big, small + 1, small)
    rel = _select(in_big, cta, cta - big_ctas)
    g = rel // (size * num_n_blocks)
    first = _select(in_big, g * (small + 1), (num_hb % count) * (small + 1) + g * small)
    r = rel - g * size * num_n_blocks
    n_block = r // size
    hb = first + r - n_block * size
    return n_block, hb % num_heads, hb // num_heads


def tile_index(rnd, cta, grid, snake: bool):
    """Tile of CTA `cta` in round `rnd`. With `snake` (causal, tiles sorted heaviest first) odd
    rounds run backwards, so a CTA that got a heavier tile in one round gets a lighter one in the
    next and the static split stays balanced. Strictly increasing in rnd for a fixed CTA."""
    if snake:
        odd = rnd % 2
        return rnd * grid + cta + odd * (grid - 1 - 2 * cta)
    return rnd * grid + cta


@cute.jit
def varlen_window(base_b: Int32, mCuSeqlensQ: cute.Tensor, tile_m: cutlass.Constexpr[int],
                  num_heads: Int32, qpk: cutlass.Constexpr[int] = 1) -> Int32:
    """Inclusive prefix sum, over lanes, of the tile counts of sequences base_b + lane (0 past the
    last sequence). qpk > 1 (pack_gqa): a sequence has len * qpk rows, heads are kv heads."""
    lane = cute.arch.lane_idx()
    b = base_b + lane
    cnt = Int32(0)
    if b < mCuSeqlensQ.shape[0] - 1:
        seqlen = mCuSeqlensQ[b + 1] - mCuSeqlensQ[b]
        cnt = (seqlen * qpk + (tile_m - 1)) // tile_m * num_heads
    for i in cutlass.range_constexpr(5):
        up = cute.arch.shuffle_sync_up(cnt, 1 << i)
        if lane >= (1 << i):
            cnt = cnt + up
    return cnt


@cute.jit
def varlen_decode(tile: Int32, base_b: Int32, base_tiles: Int32, incl: Int32,
                  mCuSeqlensQ: cute.Tensor, tile_m: cutlass.Constexpr[int], num_heads: Int32,
                  lpt: cutlass.Constexpr[bool], qpk: cutlass.Constexpr[int] = 1,
                  group_bytes: cutlass.Constexpr[int] = 0, bytes_per_key: cutlass.Constexpr[int] = 0,
                  qhead_per_kvhead=1):
    """Tile -> (m_block, head, batch, valid, base_b, base_tiles, incl): the last three are the
    32-sequence window (loop-carried by the caller; start with base_b = base_tiles = 0 and
    incl = varlen_window(0, ...)). Whole warp, uniform result. group_bytes > 0 (with lpt): a
    sequence's heads run in lpt_group groups sized by its own length (its query length stands
    for its key length: only the order depends on it), so a long document's heaviest query
    blocks read the K/V of a few heads at a time instead of all of them."""
    num_batch = mCuSeqlensQ.shape[0] - 1
    while base_b < num_batch and tile >= base_tiles + cute.arch.shuffle_sync(incl, 31):
        base_tiles = base_tiles + cute.arch.shuffle_sync(incl, 31)
        base_b = base_b + 32
        incl = varlen_window(base_b, mCuSeqlensQ, tile_m, num_heads, qpk)
    valid = base_b < num_batch
    # lanes whose sequences end at or before the tile: the tile is in the next one
    lane = cute.arch.popc(cute.arch.vote_ballot_sync(base_tiles + incl <= tile))
    batch = base_b + lane
    prev = cute.arch.shuffle_sync(incl, cutlass.max(lane - 1, 0))
    start = base_tiles + (prev if lane > 0 else Int32(0))
    seqlen = Int32(0)
    if valid:
        seqlen = mCuSeqlensQ[batch + 1] - mCuSeqlensQ[batch]
    num_m = cutlass.max((seqlen * qpk + (tile_m - 1)) // tile_m, 1)
    local = tile - start
    m_block = local % num_m
    head = local // num_m
    if cutlass.const_expr(lpt and group_bytes > 0):
        group = lpt_group(seqlen, bytes_per_key, qhead_per_kvhead, num_heads, num_m, group_bytes,
                          static_split=False)
        m_block, head, _ = decode_tile(local, num_m, num_heads, num_heads, True, group)
    elif cutlass.const_expr(lpt):
        m_block = num_m - 1 - local // num_heads
        head = local % num_heads
    return m_block, head, batch, valid, base_b, base_tiles, incl
