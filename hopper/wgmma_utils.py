"""Small Hopper wgmma helpers for the forward kernel: smem layouts, accumulator views, the RS-operand
pack, and one warpgroup GEMM issue."""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cute.nvgpu import warpgroup
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass.tensor_utils import LayoutEnum


def smem_layout(dtype, rows: int, cols: int, stages: int | None = None, swizzle_cols: int | None = None):
    """Row-major (cols contiguous) tile with the widest wgmma swizzle, optionally staged.
    swizzle_cols: pick the widest swizzle whose atom divides it instead (a tile read as an MN-major
    operand in column slices of that width: a slice must hold whole swizzle atoms)."""
    atom = warpgroup.make_smem_layout_atom(
        sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dtype, swizzle_cols or cols), dtype)
    if stages is None:
        return cute.tile_to_shape(atom, (rows, cols), order=(0, 1))
    return cute.tile_to_shape(atom, (rows, cols, stages), order=(0, 1, 2))


def transpose_view(t: cute.Tensor) -> cute.Tensor:
    """Swap the first two modes of an smem tensor (V (n, dv) -> V^T (dv, n) for the PV B operand)."""
    shape = (t.shape[1], t.shape[0], *t.shape[2:])
    order = (1, 0, *range(2, cute.rank(t)))
    return cute.composition(t, cute.make_ordered_layout(shape, order=order))


def acc_to_mn(acc: cute.Tensor) -> cute.Tensor:
    """View a wgmma accumulator ((2, 2, V), MMA_M, MMA_N) as (rows, cols) = ((2, MMA_M), (2, V, MMA_N))."""
    l = cute.make_layout(acc.layout.shape)  # compact, to be composed with the real layout
    shape = ((l.shape[0][1], l.shape[1]), (l.shape[0][0], *l.shape[0][2:], l.shape[2]))
    stride = ((l.stride[0][1], l.stride[1]), (l.stride[0][0], *l.stride[0][2:], l.stride[2]))
    return cute.make_tensor(acc.iterator,
                            cute.composition(acc.layout, cute.make_layout(shape, stride=stride)))


def acc_to_frag_a(acc: cute.Tensor) -> cute.Tensor:
    """View an fp32 accumulator ((2, 2, N/8), MMA_M, MMA_N) as the A-operand fragment of the next
    16-bit wgmma, ((2, 2, 2), MMA_M, (N/16, MMA_N)): the register order already matches."""
    l = cute.logical_divide(acc.layout, ((None, None, 2), None, None))
    layout = cute.make_layout(
        ((l.shape[0][0], l.shape[0][1], l.shape[0][2][0]), l.shape[1], (l.shape[0][2][1], l.shape[2])),
        stride=((l.stride[0][0], l.stride[0][1], l.stride[0][2][0]), l.stride[1],
                (l.stride[0][2][1], l.stride[2])))
    return cute.make_tensor(acc.iterator, layout)


@dsl_user_op
def pack_f16x2(lo: Float32, hi: Float32, bf16: bool, *, loc=None, ip=None) -> Int32:
    """cvt.rn.{bf16x2,f16x2}.f32: two fp32 -> one 32-bit register (lo in the low half)."""
    return Int32(llvm.inline_asm(
        T.i32(), [Float32(lo).ir_value(loc=loc, ip=ip), Float32(hi).ir_value(loc=loc, ip=ip)],
        f"cvt.rn.{'bf16x2' if bf16 else 'f16x2'}.f32 $0, $2, $1;", "=r,f,f",
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


@cute.jit
def gemm(tiled_mma: cute.TiledMma, acc: cute.Tensor, frag_a: cute.Tensor, frag_b: cute.Tensor,
         zero_init: cutlass.Constexpr[bool], wait: cutlass.Constexpr[int]):
    """Issue one warpgroup GEMM (all k-blocks) as one wgmma group; wait until <= `wait` are in flight
    (wait < 0: do not wait)."""
    warpgroup.fence()
    atom = cute.make_mma_atom(tiled_mma.op)
    atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
    for k in cutlass.range_constexpr(cute.size(frag_a.shape[2])):
        cute.gemm(atom, acc, frag_a[None, None, k], frag_b[None, None, k], acc)
        atom.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.commit_group()
    if const_expr(wait >= 0):
        warpgroup.wait_group(wait)
