"""Online softmax on wgmma accumulators, in the log2 domain (traced DSL code).

Each thread holds a few rows of S; the 4 threads of a quad share a row, so row reductions are a
register loop plus two butterfly shuffles. With c = softmax_scale * log2(e):
  m' = max(m, rowmax(S));  P = exp2(S*c - m'*c)  (one FFMA + one MUFU.EX2 per element)
  l  = l * exp2((m - m')*c) + rowsum(P)  (l stays a per-thread partial sum until finalize)
  O *= exp2((m - m')*c)
A row that has seen only masked keys keeps m = -inf; it uses 0 in place of m'*c so exp2 gives 0
(never inf - inf = NaN), and finalize turns l = 0 into O = 0, LSE = -inf.
"""
from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32


@cute.jit
def quad_max(x: Float32) -> Float32:
    x = cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=2))
    return cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=1))


@cute.jit
def quad_sum(x: Float32) -> Float32:
    x = x + cute.arch.shuffle_sync_bfly(x, offset=2)
    return x + cute.arch.shuffle_sync_bfly(x, offset=1)


@cute.jit
def row_max_of(acc_mn: cute.Tensor, r: cutlass.Constexpr[int], init: Float32) -> Float32:
    """max over a row with 4 independent chains (a single chain is 40+ dependent FMNMX)."""
    n = cute.size(acc_mn, mode=[1])
    acc = [acc_mn[r, 0], acc_mn[r, 1], acc_mn[r, 2], acc_mn[r, 3]]
    for c in cutlass.range_constexpr(4, n):
        acc[c % 4] = cute.arch.fmax(acc[c % 4], acc_mn[r, c])
    return cute.arch.fmax(cute.arch.fmax(acc[0], acc[1]),
                          cute.arch.fmax(cute.arch.fmax(acc[2], acc[3]), init))


@cute.jit
def online_softmax(acc_mn: cute.Tensor, row_max: cute.Tensor, row_sum: cute.Tensor,
                   row_scale: cute.Tensor, scale_log2: Float32):
    """Turn S (acc_mn, rows x cols) into unnormalized P in place; update row_max/row_sum and write the
    factor O must be multiplied by into row_scale."""
    n = cute.size(acc_mn, mode=[1])
    for r in cutlass.range_constexpr(cute.size(acc_mn, mode=[0])):
        m = quad_max(row_max_of(acc_mn, r, row_max[r]))
        m_scaled = m * scale_log2 if m != -Float32.inf else Float32(0.0)
        row_scale[r] = cute.arch.exp2(row_max[r] * scale_log2 - m_scaled)
        row_max[r] = m
        s = [Float32(0.0), Float32(0.0), Float32(0.0), Float32(0.0)]
        for c in cutlass.range_constexpr(n):
            p = cute.arch.exp2(acc_mn[r, c] * scale_log2 - m_scaled)  # FFMA + EX2
            acc_mn[r, c] = p
            s[c % 4] = s[c % 4] + p
        row_sum[r] = row_sum[r] * row_scale[r] + ((s[0] + s[1]) + (s[2] + s[3]))


@cute.jit
def rescale_o(acc_o_mn: cute.Tensor, row_scale: cute.Tensor):
    for r in cutlass.range_constexpr(cute.size(acc_o_mn, mode=[0])):
        for c in cutlass.range_constexpr(cute.size(acc_o_mn, mode=[1])):
            acc_o_mn[r, c] = acc_o_mn[r, c] * row_scale[r]


@cute.jit
def finalize(row_max: cute.Tensor, row_sum: cute.Tensor, row_scale: cute.Tensor, lse: cute.Tensor,
             softmax_scale: Float32):
    """row_scale <- 1/l (0 for an empty row); lse <- m*scale + ln(l) (-inf for an empty row)."""
    for r in cutlass.range_constexpr(cute.size(row_sum)):
        l = quad_sum(row_sum[r])
        empty = l == Float32(0.0) or l != l
        row_scale[r] = Float32(0.0) if empty else cute.arch.rcp_approx(l)
        lse[r] = (-Float32.inf if empty
                  else row_max[r] * softmax_scale + cute.math.log2(l, fastmath=True) * math.log(2.0))
