"""Online softmax on wgmma accumulators, in the log2 domain (traced DSL code).

Each thread holds a few rows of S; the 4 threads of a quad share a row, so row reductions are a
register loop plus two butterfly shuffles. With c = softmax_scale * log2(e):
  m' = max(m, rowmax(S));  P = exp2(S*c - m'*c)  (one FFMA + one MUFU.EX2 per element)
  l  = l * exp2((m - m')*c) + rowsum(P)  (l stays a per-thread partial sum until finalize)
  O *= exp2((m - m')*c)
Lazy rescale (threshold tau, log2 units): m' stays m unless rowmax(S)*c exceeds m*c + tau, so P is
bounded by 2^tau instead of 1 and most blocks leave every row's factor at exactly 1; warps whose
rows all have 1 then skip O's rescale (a vote). Exact in real arithmetic (O, l and m stay
consistent); P's 16-bit rounding is relative, so no worse.
A row that has seen only masked keys keeps m = -inf; it uses 0 in place of m'*c so exp2 gives 0
(never inf - inf = NaN), and finalize turns l = 0 into O = 0, LSE = -inf.
exp2 emulation (emu_every = k): one column in k gets 2^x from FMA-pipe arithmetic (exp2_poly)
instead of MUFU.EX2 (16 lanes per SM), as FA4 does on sm100. On an H100 it loses (FwdConfig.exp2_emu).
Softcap S <- cap * tanh(S * scale / cap) is folded into the scales: the kernel multiplies S by
scale / cap, takes tanh, and runs the softmax above with scale = cap. A learnable sink (one logit
per head, natural-log units) joins only the denominator, in finalize.
"""
from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

LOG2_E = math.log2(math.e)


@dsl_user_op
def tanh_approx(x: Float32, *, loc=None, ip=None) -> Float32:
    """tanh.approx.f32: one MUFU op (max relative error ~2^-11), what FA uses for softcap."""
    return Float32(llvm.inline_asm(
        T.f32(), [Float32(x).ir_value(loc=loc, ip=ip)], "tanh.approx.f32 $0, $1;", "=f,f",
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


# 2^f on [0, 1) = 1 + f (C1 + f (C2 + f C3)): relative minimax fit with the constant term pinned to 1
# (so 2^-127 * p(0) cancels to exactly +0 below). Max relative error 8.6e-5 in fp32, under a sixth
# of fp16's half ulp (4.9e-4) and a twentieth of bf16's: P is rounded to 16 bits after this anyway.
EXP2_POLY = ("0f3F31F32D", "0f3E691BBB", "0f3D9DD565")  # C1, C2, C3 = 0.69511682, 0.22764485, 0.07706717


@dsl_user_op
def exp2_poly(x: Float32, *, loc=None, ip=None) -> Float32:
    """2^x for x <= 127 with no MUFU op (~9 ALU/FMA instructions): x is clamped at -127, floor(x)
    is taken by adding 1.5 * 2^23 rounding down (the integer lands in the mantissa's low bits), the
    fraction goes through EXP2_POLY and the integer is added to the result's exponent field.
    x <= -127 (a masked -inf included) gives exactly +0; NaN gives +0 too (MUFU would give NaN)."""
    c1, c2, c3 = EXP2_POLY
    asm = ("{\n\t.reg .f32 xc, jr, jf, fr, p;\n\t.reg .b32 ji, pi;\n\t"
           "max.ftz.f32 xc, $1, 0fC2FE0000;\n\t"
           "add.rm.ftz.f32 jr, xc, 0f4B400000;\n\t"
           "sub.rn.ftz.f32 jf, jr, 0f4B400000;\n\t"
           "sub.rn.ftz.f32 fr, xc, jf;\n\t"
           f"fma.rn.ftz.f32 p, fr, {c3}, {c2};\n\t"
           f"fma.rn.ftz.f32 p, p, fr, {c1};\n\t"
           "fma.rn.ftz.f32 p, p, fr, 0f3F800000;\n\t"
           "mov.b32 ji, jr;\n\tmov.b32 pi, p;\n\t"
           "shl.b32 ji, ji, 23;\n\tadd.s32 pi, pi, ji;\n\t"
           "mov.b32 $0, pi;\n\t}")
    return Float32(llvm.inline_asm(
        T.f32(), [Float32(x).ir_value(loc=loc, ip=ip)], asm, "=f,f",
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


def exp2_mixed(x: Float32, c: int, emu_every: int) -> Float32:
    """exp2 of column c's value (c, emu_every: Python ints at trace time): exp2_poly for one column
    in emu_every (0: never), else MUFU."""
    if emu_every > 0 and c % emu_every == emu_every - 1:
        return exp2_poly(x)
    return cute.arch.exp2(x)


@cute.jit
def apply_softcap(acc_mn: cute.Tensor, pre_scale: Float32):
    """S <- tanh(S * pre_scale) in place, pre_scale = softmax_scale / cap (before any mask: a
    masked -inf must stay -inf, tanh would make it -1)."""
    for r in cutlass.range_constexpr(cute.size(acc_mn, mode=[0])):
        for c in cutlass.range_constexpr(cute.size(acc_mn, mode=[1])):
            acc_mn[r, c] = tanh_approx(acc_mn[r, c] * pre_scale)


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
                   row_scale: cute.Tensor, scale_log2: Float32, threshold=None,
                   emu_every: cutlass.Constexpr[int] = 0):
    """Turn S (acc_mn, rows x cols) into unnormalized P in place; update row_max/row_sum and write the
    factor O must be multiplied by into row_scale. threshold: None, or tau of the lazy rescale
    (module doc); then row_scale is exactly 1 for a row whose max stays. emu_every: exp2_mixed."""
    n = cute.size(acc_mn, mode=[1])
    for r in cutlass.range_constexpr(cute.size(acc_mn, mode=[0])):
        m = quad_max(row_max_of(acc_mn, r, row_max[r]))
        if cutlass.const_expr(threshold is not None):
            # m >= row_max; -inf - -inf is NaN, so a row that is still empty takes m (-inf too)
            keep = (m - row_max[r]) * scale_log2 <= Float32(threshold)
            m = row_max[r] if keep else m
        m_scaled = m * scale_log2 if m != -Float32.inf else Float32(0.0)
        if cutlass.const_expr(threshold is not None):
            row_scale[r] = Float32(1.0) if keep else cute.arch.exp2(row_max[r] * scale_log2 - m_scaled)
        else:
            row_scale[r] = cute.arch.exp2(row_max[r] * scale_log2 - m_scaled)
        row_max[r] = m
        # 4 partial sums that start at the first 4 P values: 0 + p is an FADD the compiler keeps
        # (it cannot assume p != -0); p >= +0, so the sums are the same
        s = [None, None, None, None]
        for c in cutlass.range_constexpr(n):
            p = exp2_mixed(acc_mn[r, c] * scale_log2 - m_scaled, c, emu_every)  # FFMA + EX2
            acc_mn[r, c] = p
            s[c % 4] = p if c < 4 else s[c % 4] + p
        row_sum[r] = row_sum[r] * row_scale[r] + ((s[0] + s[1]) + (s[2] + s[3]))


@cute.jit
def rescale_o(acc_o_mn: cute.Tensor, row_scale: cute.Tensor, lazy: cutlass.Constexpr[bool] = False):
    """O *= row_scale per row. lazy: skipped by every warp whose rows all have factor 1."""
    if cutlass.const_expr(lazy):
        need = row_scale[0] != Float32(1.0)
        for r in cutlass.range_constexpr(1, cute.size(row_scale)):
            need = need | (row_scale[r] != Float32(1.0))
        if cute.arch.vote_any_sync(need):
            _scale_rows(acc_o_mn, row_scale)
    else:
        _scale_rows(acc_o_mn, row_scale)


@cute.jit
def _scale_rows(acc_o_mn: cute.Tensor, row_scale: cute.Tensor):
    for r in cutlass.range_constexpr(cute.size(acc_o_mn, mode=[0])):
        for c in cutlass.range_constexpr(cute.size(acc_o_mn, mode=[1])):
            acc_o_mn[r, c] = acc_o_mn[r, c] * row_scale[r]


@cute.jit
def finalize(row_max: cute.Tensor, row_sum: cute.Tensor, row_scale: cute.Tensor, lse: cute.Tensor,
             softmax_scale: Float32, sink=None):
    """row_scale <- 1/l (0 for an empty row); lse <- m*scale + ln(l) (-inf for an empty row).
    With `sink` (Float32 logit, natural log): the denominator gains exp(sink), so with
    M = max(m*scale, sink): l' = l*exp(m*scale - M) + exp(sink - M), O *= exp(m*scale - M)/l',
    lse = M + ln(l'); an empty row gets O = 0 and lse = sink (FA4's and fa3.reference's rule).
    `sink` may be a list with one value per row (pack_gqa: rows of several heads)."""
    for r in cutlass.range_constexpr(cute.size(row_sum)):
        l = quad_sum(row_sum[r])
        sink_r = sink[r] if isinstance(sink, list) else sink
        if cutlass.const_expr(sink is None):
            empty = l == Float32(0.0) or l != l
            row_scale[r] = Float32(0.0) if empty else cute.arch.rcp_approx(l)
            lse[r] = (-Float32.inf if empty
                      else row_max[r] * softmax_scale + cute.math.log2(l, fastmath=True) * math.log(2.0))
        else:
            ms = row_max[r] * (softmax_scale * LOG2_E)  # log2 units; -inf for an empty row
            mx = cute.arch.fmax(ms, sink_r * LOG2_E)
            w = cute.arch.exp2(ms - mx)
            l_tot = l * w + cute.arch.exp2(sink_r * LOG2_E - mx)
            row_scale[r] = w * cute.arch.rcp_approx(l_tot)
            lse[r] = (mx + cute.math.log2(l_tot, fastmath=True)) * math.log(2.0)
