"""Inline-PTX memory operations of the Hopper backward that the DSL does not wrap: bulk copies and
reductions without a tensor map, 16-byte vector reductions, and gpu-scope semaphore atomics."""
import cutlass.cute as cute
from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op


@dsl_user_op
def bulk_g2s(smem_ptr: cute.Pointer, gmem_ptr: cute.Pointer, nbytes: int, mbar_ptr: cute.Pointer, *,
             loc=None, ip=None):
    """cp.async.bulk global -> shared (no tensor map), completing tx bytes on an mbarrier."""
    llvm.inline_asm(
        None, [smem_ptr.toint(loc=loc, ip=ip).ir_value(), gmem_ptr.toint(loc=loc, ip=ip).ir_value(),
               Int32(nbytes).ir_value(), mbar_ptr.toint(loc=loc, ip=ip).ir_value()],
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1], $2, [$3];",
        "r,l,r,r", has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)


@dsl_user_op
def bulk_reduce_add_f32(gmem_ptr: cute.Pointer, smem_ptr: cute.Pointer, nbytes: int, *, loc=None,
                        ip=None):
    """cp.reduce.async.bulk .add.f32 shared -> global (bulk_group completion)."""
    llvm.inline_asm(
        None, [gmem_ptr.toint(loc=loc, ip=ip).ir_value(), smem_ptr.toint(loc=loc, ip=ip).ir_value(),
               Int32(nbytes).ir_value()],
        "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [$0], [$1], $2;",
        "l,r,r", has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)


@dsl_user_op
def red_add_f32(gmem_ptr: cute.Pointer, *vals: Float32, loc=None, ip=None):
    """red.global.add{,.v2,.v4}.f32: one, two or four fp32 adds into that many aligned fp32 words
    of global memory (the vector forms sm_90+), no return value."""
    n = len(vals)
    assert n in (1, 2, 4), n
    regs = ", ".join(f"${i + 1}" for i in range(n))
    op = "red.global.add.f32 [$0], $1;" if n == 1 else f"red.global.add.v{n}.f32 [$0], {{{regs}}};"
    llvm.inline_asm(
        None, [gmem_ptr.toint(loc=loc, ip=ip).ir_value()]
        + [Float32(v).ir_value(loc=loc, ip=ip) for v in vals],
        op, "l" + ",f" * n, has_side_effects=True,
        is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)


@dsl_user_op
def ld_acquire(ptr: cute.Pointer, *, loc=None, ip=None) -> Int32:
    return Int32(llvm.inline_asm(
        T.i32(), [ptr.toint(loc=loc, ip=ip).ir_value()], "ld.global.acquire.gpu.b32 $0, [$1];",
        "=r,l", has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


@dsl_user_op
def red_release_add(ptr: cute.Pointer, val: int, *, loc=None, ip=None):
    llvm.inline_asm(
        None, [ptr.toint(loc=loc, ip=ip).ir_value(), Int32(val).ir_value()],
        "red.release.gpu.global.add.s32 [$0], $1;", "l,r", has_side_effects=True,
        is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)


@dsl_user_op
def atom_add_s32(ptr: cute.Pointer, val: int, *, loc=None, ip=None) -> Int32:
    """atom.global.add.s32 (relaxed, gpu scope): the old value (a work counter, no data behind it)."""
    return Int32(llvm.inline_asm(
        T.i32(), [ptr.toint(loc=loc, ip=ip).ir_value(), Int32(val).ir_value()],
        "atom.global.add.s32 $0, [$1], $2;", "=r,l,r", has_side_effects=True, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT))
