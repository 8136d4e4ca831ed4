"""Layout helpers for sm80 warp-level MMA (mma.sync m16n8k16) and cp.async tiles (traced DSL code).

The accumulator of one m16n8k16 atom holds, per thread, values ((2 cols, 2 rows), MMA_M, MMA_N):
two adjacent columns of row g and of row g + 8. The 4 threads of a quad share a row, which is what
fa3.hopper.softmax assumes, so its online softmax runs unchanged on the (rows, cols) view below.
"""

import cutlass
import cutlass.cute as cute


def smem_layout_atom(dtype, cols: int):
    """8-row swizzled atom, as wide as the row allows (128 B -> 64 halves, else 64 B -> 32 halves),
    so that 16-byte cp.async writes and ldmatrix reads of 8 consecutive rows hit distinct banks."""
    row_bytes = cols * dtype.width // 8
    width_bytes = 128 if row_bytes % 128 == 0 else 64
    assert row_bytes % width_bytes == 0, f"unsupported head dim {cols}"
    elems = width_bytes * 8 // dtype.width
    bits = 3 if width_bytes == 128 else 2  # log2 of 16-byte chunks per atom row
    return cute.make_composed_layout(
        cute.make_swizzle(bits, 3, 3), 0, cute.make_layout((8, elems), stride=(elems, 1)))


def acc_to_mn(acc: cute.Tensor) -> cute.Tensor:
    """((2, 2), MMA_M, MMA_N) accumulator -> (rows, cols) = ((2, MMA_M), (2, MMA_N))."""
    l = cute.make_layout(acc.layout.shape)
    mn = cute.make_layout(
        ((l.shape[0][1], l.shape[1]), (l.shape[0][0], l.shape[2])),
        stride=((l.stride[0][1], l.stride[1]), (l.stride[0][0], l.stride[2])))
    return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))


def acc_to_frag_a(acc: cute.Tensor) -> cute.Tensor:
    """A 16-bit copy of the S accumulator ((2, 2), MMA_M, MMA_N) viewed as the A operand of the next
    m16n8k16, ((2, 2, 2), MMA_M, MMA_N / 2): two n8 accumulator tiles side by side are exactly the
    k0-7 / k8-15 halves of an A fragment, so P never leaves registers."""
    l = cute.logical_divide(acc.layout, (None, None, 2))
    layout = cute.make_layout(
        ((l.shape[0], l.shape[2][0]), l.shape[1], l.shape[2][1]),
        stride=((l.stride[0], l.stride[2][0]), l.stride[1], l.stride[2][1]))
    return cute.make_tensor(acc.iterator, layout)


def transpose_view(t: cute.Tensor) -> cute.Tensor:
    """Swap the first two modes of an smem tensor: V (n, d[, stages]) -> V^T (d, n[, stages])."""
    shape = (t.shape[1], t.shape[0], *t.shape[2:])
    order = (1, 0, *range(2, cute.rank(t)))
    return cute.composition(t, cute.make_ordered_layout(shape, order=order))


def _check_b_steps(tCrB: cute.Tensor, rB: cute.Tensor, n_per_j: int):
    """Trace-time proof that ldmatrix j of B fills exactly the registers of MMA n-tiles
    [j * n_per_j, (j + 1) * n_per_j): gemm() issues each MMA right after its own ldmatrix."""
    def regs(t, i, k):
        return {cute.crd2idx((v, i, k), t.layout) for v in range(cute.size(t, mode=[0]))}

    for k in range(cute.size(tCrB, mode=[2])):
        for j in range(cute.size(rB, mode=[1])):
            mma = set().union(*(regs(tCrB, n, k) for n in range(j * n_per_j, (j + 1) * n_per_j)))
            assert regs(rB, j, k) == mma, f"ldmatrix {j} of k-block {k} does not match its MMAs"


@cute.jit
def gemm(tiled_mma: cute.TiledMma, acc: cute.Tensor, tCrA: cute.Tensor, tCrB: cute.Tensor,
         tCsA: cute.Tensor, tCsB: cute.Tensor, copy_A: cute.TiledCopy, copy_B: cute.TiledCopy,
         a_in_regs: cutlass.Constexpr[bool], lookahead: cutlass.Constexpr[int]):
    """acc += A B, B (and A unless a_in_regs) read from smem by ldmatrix.

    Software-pipelined per ldmatrix of B, not per k-block: B's ldmatrix for step s + lookahead is
    issued before the MMAs of step s (A's whole k-block one k-block ahead). A whole k-block of B is
    d/4 registers for P V at head dim d; prefetching all of it on top of the O accumulator is what
    pushes d >= 96 past 255 registers."""
    rB = copy_B.retile(tCrB)
    num_k = cute.size(tCrB, mode=[2])
    num_j = cute.size(rB, mode=[1])  # ldmatrix per k-block of B
    n_per_j = cute.size(tCrB, mode=[1]) // num_j  # MMA n-tiles fed by one ldmatrix
    _check_b_steps(tCrB, rB, n_per_j)
    steps = num_k * num_j
    ahead = min(lookahead, steps)
    if cutlass.const_expr(not a_in_regs):
        rA = copy_A.retile(tCrA)
        cute.copy(copy_A, tCsA[None, None, 0], rA[None, None, 0])
    for s in cutlass.range_constexpr(ahead):
        cute.copy(copy_B, tCsB[None, s % num_j, s // num_j], rB[None, s % num_j, s // num_j])
    for s in cutlass.range_constexpr(steps):
        k, j = s // num_j, s % num_j
        if cutlass.const_expr(not a_in_regs and j == 0 and k + 1 < num_k):
            cute.copy(copy_A, tCsA[None, None, k + 1], rA[None, None, k + 1])
        if cutlass.const_expr(s + ahead < steps):
            t = s + ahead
            cute.copy(copy_B, tCsB[None, t % num_j, t // num_j], rB[None, t % num_j, t // num_j])
        for n in cutlass.range_constexpr(j * n_per_j, (j + 1) * n_per_j):
            cute.gemm(tiled_mma, cute.append_ones(acc[None, None, n], up_to_rank=3),
                      tCrA[None, None, k], cute.append_ones(tCrB[None, n, k], up_to_rank=2),
                      cute.append_ones(acc[None, None, n], up_to_rank=3))


@cute.jit
def copy_rows(tiled_copy: cute.TiledCopy, src: cute.Tensor, dst: cute.Tensor, coord: cute.Tensor,
              limit: cutlass.Int32, predicate: cutlass.Constexpr[bool]):
    """cp.async a (CPY, CPY_ROWS, CPY_COLS) partition; with `predicate`, rows whose tile coordinate
    (coord, same partition of an identity tensor) is >= limit are zero-filled and never read
    (src-size 0), so a tail tile neither reads out of bounds nor leaves stale smem for the MMAs."""
    if cutlass.const_expr(not predicate):
        cute.copy(tiled_copy, src, dst)
    else:
        rows = cute.size(src, mode=[1])
        pred = cute.make_rmem_tensor(
            cute.make_layout((1, rows, cute.size(src, mode=[2])), stride=(0, 1, 0)), cutlass.Boolean)
        for m in cutlass.range_constexpr(rows):
            pred[0, m, 0] = coord[0, m, 0][0] < limit
        cute.copy(tiled_copy, src, dst, pred=pred)


@cute.jit
def seq_info(batch: cutlass.Int32, seqlen_q, seqlen_k, cu_q, cu_k, used_q, used_k):
    """One sequence's rows, FA3's varlen / seqused semantics (as fa3.hopper.fwd_kernel.seq_info):
    (offset_q, offset_k, seqlen_q, store_q, seqlen_k, store_k, bidx). cu_q/cu_k (b+1,) int32 or
    None (dense: offsets 0, tensor batch `batch`; varlen: the tensors are one packed batch, bidx 0);
    used_q/used_k (b,) int32 or None clip the valid lengths seqlen_q/k that the masks use and the
    diagonal aligns to; store_q/k are the rows of the output this sequence owns (past the valid
    ones: O = 0, LSE = -inf, dQ/dK/dV = 0). Dense inputs: seqlen_q/k are the tensors' lengths."""
    offset_q, offset_k, bidx = 0, 0, batch
    store_q, store_k = seqlen_q, seqlen_k
    if cutlass.const_expr(cu_q is not None):
        offset_q, offset_k, bidx = cu_q[batch], cu_k[batch], 0
        store_q = cu_q[batch + 1] - offset_q
        store_k = cu_k[batch + 1] - offset_k
    valid_q, valid_k = store_q, store_k
    if cutlass.const_expr(used_q is not None):
        valid_q = cutlass.min(used_q[batch], store_q)
    if cutlass.const_expr(used_k is not None):
        valid_k = cutlass.min(used_k[batch], store_k)
    return offset_q, offset_k, valid_q, store_q, valid_k, store_k, bidx


def seq_rows(t: cute.Tensor, bidx, head, offset) -> cute.Tensor:
    """(rows, d) view of one (batch, head) of a (b, s, h, d) tensor, starting at row `offset` (a
    varlen sequence's first row in the packed tensor; a Python 0 adds nothing)."""
    rows = t[bidx, None, head, None]
    if isinstance(offset, int) and offset == 0:
        return rows
    return cute.domain_offset((offset, 0), rows)
