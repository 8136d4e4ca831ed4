"""Small Hopper wgmma helpers for the forward kernel: smem layouts, accumulator views, the RS-operand
pack, and one warpgroup GEMM issue."""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32, const_expr
from cutlass._mlir.dialects import arith, llvm
from cutlass.cute.nvgpu import warpgroup
from cutlass.cute.nvgpu.tcgen05.helpers import int_to_smem_descriptor, smem_descriptor_to_int
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


def stmatrix_copy(dtype, tiled_mma: cute.TiledMma, tidx, transpose: bool = False):
    """(stmatrix copy atom, thread `tidx`'s slice of it over the accumulator of `tiled_mma`):
    16-bit accumulator registers -> smem in the accumulator's orientation, 16 bytes per lane;
    transpose: stmatrix.trans, for a destination whose contiguous mode is the accumulator's rows
    (partition a transpose_view of it)."""
    atom = cute.make_copy_atom(cute.nvgpu.warp.StMatrix8x8x16bOp(transpose=transpose, num_matrices=4),
                               dtype)
    return atom, cute.make_tiled_copy_C(atom, tiled_mma).get_slice(tidx)


@cute.jit
def schedule_fence(x: Float32):
    """A basic-block boundary (a branch on x != x: never taken for a number, harmless if taken)
    that ptxas does not schedule across. Before a wgmma wait_group it keeps the work placed
    before the wait (a softmax under an in-flight PV) from being sunk below it: ptxas otherwise
    hoists the wait to the first write of the in-flight wgmma's registers."""
    if x != x:
        cute.arch.sync_warp()


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


@dsl_user_op
def _opaque_i64(x: cutlass.Int64, *, loc=None, ip=None) -> cutlass.Int64:
    """x through a volatile move: computed where it is written, not re-derived inside loops."""
    return cutlass.Int64(llvm.inline_asm(
        T.i64(), [cutlass.Int64(x).ir_value(loc=loc, ip=ip)], "mov.b64 $0, $1;", "=l,l",
        has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


@dsl_user_op
def _zext_i64(x: Int32, *, loc=None, ip=None) -> cutlass.Int64:
    """Zero-extend: from a sign-extended slot offset ptxas splits every descriptor add in two."""
    return cutlass.Int64(arith.extui(T.i64(), Int32(x).ir_value(loc=loc, ip=ip), loc=loc, ip=ip))


class DescFrag:
    """A shared-memory wgmma operand (the DSL's descriptor view from make_fragment_A/B) held as
    its first 64-bit descriptor plus its static layout (offsets in 16-byte units).

    Slicing the DSL view by ring slot inside the main loop rebuilds the descriptor from the smem
    pointer every KV block and steps it per k-block by adds that ptxas splits around the constant
    high word: ~70 uniform-datapath instructions per KV block at hd128 (S and PV GEMMs). Here the
    descriptors are taken once, before the loops: Q's per k-block, K's / V's for slot 0, and a
    slot / k-block is one 64-bit add of a zero-extended offset (hd128: 72 -> 40 uniform ops)."""

    def __init__(self, frag: cute.Tensor, fixed_k: int = 8):
        # pinned here (an opaque move): otherwise the compilers rebuild it inside the loops
        self.base = _opaque_i64(smem_descriptor_to_int(frag.iterator))
        self.layout = frag.layout
        self.k_layout = frag[(None, None, 0) + (0,) * (cute.rank(frag) - 3)].layout
        self.num_k = cute.size(frag.shape[2])
        # an unstaged operand (Q): the first 8 k-blocks' descriptors, loop-invariant; ptxas keeps
        # them in uniform registers and the loop only fills the wgmma operands. Further k-blocks
        # (hd256) keep the DSL's slices of `frag`: 16 fixed ones spill (hd256 causal).
        self.fixed, self.frag = None, frag
        # (fixed_k = 0: none, each k-block one add to `base`, where registers are short: the
        # backward's 24 would spill)
        if cute.rank(frag) == 3 and fixed_k > 0:
            self.fixed = [_opaque_i64(self.base + cutlass.Int64(self.offset(k)))
                          for k in range(min(self.num_k, fixed_k))]

    def offset(self, k: int) -> int:
        """Static offset of k-block k (stage 0) in 16-byte units."""
        coord = (0, 0, k) + ((0,) * (cute.rank(self.layout) - 3))
        return cute.crd2idx(coord, self.layout)

    def stage_desc(self, stage) -> cutlass.Int64:
        """First descriptor of ring slot `stage` (a runtime index; unstaged: `base`)."""
        if cute.rank(self.layout) == 3:
            return self.base
        step = cute.crd2idx((0, 0, 0, 1), self.layout)
        return self.base + _zext_i64(Int32(stage * step))

    def k_views(self, stage) -> list:
        """Every k-block's view: an unstaged operand's fixed ones (then the DSL slices), else ring
        slot `stage`'s."""
        if self.fixed is not None:
            return [cute.make_tensor(int_to_smem_descriptor(self.fixed[k]), self.k_layout)
                    if k < len(self.fixed) else self.frag[None, None, k] for k in range(self.num_k)]
        desc = self.stage_desc(stage)
        return [self.view(desc, k) for k in range(self.num_k)]

    @dsl_user_op
    def view(self, desc: cutlass.Int64, k: int, *, loc=None, ip=None) -> cute.Tensor:
        """The k-block-k view of the slot whose first descriptor is `desc`."""
        desc_k = desc + cutlass.Int64(self.offset(k))
        return cute.make_tensor(int_to_smem_descriptor(desc_k, loc=loc, ip=ip), self.k_layout,
                                loc=loc, ip=ip)


@cute.jit
def gemm_desc(tiled_mma: cute.TiledMma, acc: cute.Tensor, frag_a, frag_b: DescFrag, stage,
              zero_init: cutlass.Constexpr[bool], wait: cutlass.Constexpr[int], stage_a=None):
    """gemm() with B (and A, when it is not a DSL fragment: registers or a smem view) given as
    DescFrag: a staged operand's k-blocks are taken from ring slot `stage` (the backward's dQ GEMM
    has a staged A, dS, and a fixed B, K), a staged A's from `stage_a` where given."""
    a_is_desc = const_expr(isinstance(frag_a, DescFrag))
    # every k-block's descriptors before the first wgmma: ptxas then fills the operand
    # registers of later wgmmas while earlier ones issue
    b_k = frag_b.k_views(stage)
    if const_expr(not a_is_desc):  # a DSL fragment (registers: the RS GEMM)
        a_k = [frag_a[None, None, k] for k in range(frag_b.num_k)]
    else:
        a_k = frag_a.k_views(stage if const_expr(stage_a is None) else stage_a)
    warpgroup.fence()
    atom = cute.make_mma_atom(tiled_mma.op)
    atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
    for k in cutlass.range_constexpr(frag_b.num_k):
        cute.gemm(atom, acc, a_k[k], b_k[k], acc)
        atom.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.commit_group()
    if const_expr(wait >= 0):
        warpgroup.wait_group(wait)
