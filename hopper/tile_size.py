"""The one tile-size heuristic for the Hopper forward kernel.

Each consumer warpgroup owns 64 query rows: B_r = 128 (two) or 192 (three, hd64); B_c is then bounded by
registers (S is B_r x B_c fp32 per warpgroup, plus a second S tile with intra-warpgroup overlap, plus O)
and by shared memory (Q + stages x (K + V) must fit in 227 KB, plus O's staging buffer where it fits).
"""
from __future__ import annotations

SMEM_LIMIT = 227 * 1024


def smem_bytes(tile_m: int, tile_n: int, d: int, dv: int, stages: int, elem_bytes: int = 2,
               q_stages: int = 1) -> int:
    return elem_bytes * (tile_m * max(d, dv) + (q_stages - 1) * tile_m * d
                         + stages * tile_n * (d + dv)) + 1024


def padding(seqlen: int, tile: int) -> float:
    """Fraction of the rows of the last tile(s) that are past seqlen, over seqlen."""
    return (-(-seqlen // tile) * tile - seqlen) / seqlen


def tile_size(d: int, dv: int, causal: bool, seqlen_q: int | None = None,
              local: bool = False, seqlen_k: int | None = None) -> tuple[int, int, int]:
    """(tile_m, tile_n, kv_stages) for bf16/fp16 inputs. seqlen_q (when known) steers causal hd64
    away from 192-row tiles where they would compute many padding rows (e.g. 1024 = 5.3 x 192: the
    last, and heaviest, tile is two-thirds padding); seqlen_k likewise picks hd256's key block."""
    tile_m = 128
    hd = max(d, dv)
    if hd <= 64:
        tile_m, tile_n = 192, 128  # three consumer warpgroups: S is small, hide more softmax
        # causal only: there the padded last tile is also the heaviest one (H200, s1024: 192 rows
        # 255 -> 128 rows 276 TFLOP/s causal; non-causal 392 -> 373, so 192 stays there)
        if causal and seqlen_q is not None and padding(seqlen_q, 192) > padding(seqlen_q, 128) + 0.05:
            tile_m = 128
        if local:  # the window mask's row bounds spill at three warpgroups' 160 registers
            tile_m = 128
    elif hd <= 128:
        # FA3's C++ ships 128 x 176 non-causal; here 128 x 128 measured faster (H200, 2026-11-21):
        # it leaves room for O's own smem buffer, so Q of the next tile loads during the epilogue.
        tile_n = 128
    elif hd <= 192:
        # hd192: FA3 ships 128 x 128, 112 when dv > 128; smem (Q + 2 x (K + V)) decides here:
        # d192/dv192 fits 112 (217 KB), d192/dv128 fits 128 (209 KB); O staged in Q's buffer.
        tile_n = 112 if dv > 128 else 128
    else:
        tile_n = 80
        # 512 keys are 6.4 blocks of 80: the padded 7th block is 9% extra work on every tile
        # (H100, s512: 464 -> 475 TFLOP/s, causal 252 -> 261; s1k: 80 stays, 589 vs 571)
        if seqlen_k is not None and padding(seqlen_k, 80) > padding(seqlen_k, 64) + 0.05:
            tile_n = 64
    stages = 2
    assert smem_bytes(tile_m, tile_n, d, dv, stages) <= SMEM_LIMIT, (d, dv, tile_n)
    return tile_m, tile_n, stages


def separate_o_fits(tile_m: int, tile_n: int, d: int, dv: int, stages: int, elem_bytes: int = 2,
                    q_stages: int = 1) -> bool:
    """Whether O's smem staging buffer (for a TMA store) fits; else O is stored from registers."""
    return (smem_bytes(tile_m, tile_n, d, dv, stages, elem_bytes, q_stages) + elem_bytes * tile_m * dv
            <= SMEM_LIMIT)
