"""Pieces the two Hopper forward kernels (fwd_kernel.py: bf16/fp16, fwd_fp8_kernel.py: e4m3) share.

Both kernels follow the same FA3 plan: one producer warp issues TMA loads of Q, K and V into
mbarrier-guarded smem rings; consumer warpgroups of 64 query rows each run the wgmma GEMMs,
optionally taking turns (pingpong). What differs between them (V's smem layout, block scales,
masking features, the O store) stays in each kernel; this module holds only the code that is
the same to the letter, so that a change to the pipeline protocol is made once. Everything here is
traced inline into the caller's kernel, and the generated code is the same as when it was written
out in each kernel: the PTX of every variant of both kernels was diffed before and after the move.
The producer's K/V loop itself stays in each kernel: a shared loop that returned the ring state
changed the PTX (loop-carried registers in another order), so it was left out.
"""
from types import SimpleNamespace

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync

from fa3.hopper.wgmma_utils import DescFrag, acc_to_mn, gemm, gemm_desc

BAR_PINGPONG = 2  # named barriers 2 + consumer warpgroup index (0, 1[, 2]); 0 is __syncthreads

# setmaxnreg per role, by number of consumer warpgroups (FA3's split; 64K registers per SM in all)
REGS = {2: (24, 240), 3: (32, 160)}  # consumers: (producer, consumer)


def regs_fit(split: tuple[int, int], consumers: int) -> bool:
    """Whether a (producer, consumer) setmaxnreg split fits the registers the CTA launched with:
    65536 / threads per thread, rounded down to a multiple of 8 (384 threads: 168, so the pool
    is 504 per lane of a warpgroup, not 512). A consumer's setmaxnreg.inc past the pool never
    returns: 32 / 240 / 240 hung the backward on an H100 (s13)."""
    warpgroups = consumers + 1
    launch = 65536 // (128 * warpgroups) // 8 * 8
    return split[0] + consumers * split[1] <= launch * warpgroups


assert all(regs_fit(split, n) for n, split in REGS.items())


def make_qkv_pipes(storage, num_consumers: int, stages: int, bytes_q: int, bytes_k: int,
                   bytes_v: int, q_stages: int = 1):
    """Full/empty mbarrier rings for Q (`q_stages`), K and V (`stages` each): one producer thread,
    the consumer warps (4 per warpgroup) release. Ends with the init fence and a CTA barrier."""
    producer = pipeline.CooperativeGroup(pipeline.Agent.Thread, 1)
    consumers = pipeline.CooperativeGroup(pipeline.Agent.Thread, 4 * num_consumers)  # warps
    pipes = []
    for bar, n, nbytes in ((storage.mbar_q, q_stages, bytes_q), (storage.mbar_k, stages, bytes_k),
                           (storage.mbar_v, stages, bytes_v)):
        pipes.append(pipeline.PipelineTmaAsync.create(
            barrier_storage=bar.data_ptr(), num_stages=n, producer_group=producer,
            consumer_group=consumers, tx_count=nbytes, defer_sync=True))
    cute.arch.mbarrier_init_fence()
    cute.arch.sync_threads()
    return pipes


def tma_tiles(tma, s: cute.Tensor, g: cute.Tensor):
    """(smem, gmem) TMA views of one operand for a single-CTA (no multicast) copy."""
    return cpasync.tma_partition(tma, 0, cute.make_layout(1), cute.group_modes(s, 0, 2),
                                 cute.group_modes(g, 0, 2))


@cute.jit
def tma_load(tma, src, dst, pipe, state):
    """Wait for the ring slot `state` to be free, then TMA src -> dst arriving on its full barrier."""
    pipe.producer_acquire(state)
    cute.copy(tma, src, dst, tma_bar_ptr=pipe.producer_get_barrier(state))


@cute.jit
def tma_load_block(tma, tXg, tXs, n, pipe, state):
    """tma_load of KV block n into ring slot `state`. The views are sliced after the acquire, as
    written inline before: slicing first changes the generated instruction order."""
    pipe.producer_acquire(state)
    cute.copy(tma, tXg[None, n], tXs[None, state.index], tma_bar_ptr=pipe.producer_get_barrier(state))


class PingpongMixin:
    """Consumer warpgroups take turns issuing their GEMMs (round robin over named barriers), so one
    warpgroup's softmax hides under another's tensor-core work. Needs cfg.pingpong, num_consumers."""

    @cute.jit
    def pingpong_start(self, wg: Int32):
        if const_expr(self.cfg.pingpong):
            if wg == 0:  # warpgroup 0 issues its GEMMs first
                cute.arch.barrier_arrive(barrier_id=BAR_PINGPONG, number_of_threads=256)

    @cute.jit
    def pingpong_sync(self, wg: Int32):
        if const_expr(self.cfg.pingpong):
            cute.arch.barrier(barrier_id=BAR_PINGPONG + wg, number_of_threads=256)

    @cute.jit
    def pingpong_arrive(self, wg: Int32):
        if const_expr(self.cfg.pingpong):
            cute.arch.barrier_arrive(barrier_id=BAR_PINGPONG + (wg + 1) % self.num_consumers,
                                    number_of_threads=256)


class StagedGemmMixin:
    """The consumers' two GEMMs, S = Q K^T and O += P V, with K / V from a ring slot. With
    cfg.desc_hoist their smem operands are wgmma descriptors taken once (hoist_descs), not
    rebuilt by the DSL in every KV block. ctx: consumer_fragments' operands and tiled MMAs."""

    def hoist_descs(self, ctx):
        if const_expr(self.cfg.desc_hoist):
            ctx.dQ, ctx.dK, ctx.dV = DescFrag(ctx.tSrQ), DescFrag(ctx.tSrK), DescFrag(ctx.tOrV)

    @cute.jit
    def gemm_qk(self, ctx, acc_S, stage, wait: cutlass.Constexpr[int]):
        """acc_S = Q K^T with K from ring slot `stage` (and Q from slot ctx.q_stage, if given:
        a double-buffered Q)."""
        q_stage = getattr(ctx, "q_stage", None)
        if const_expr(self.cfg.desc_hoist):
            gemm_desc(ctx.tiled_mma_qk, acc_S, ctx.dQ, ctx.dK, stage, True, wait, stage_a=q_stage)
        elif const_expr(q_stage is not None):
            gemm(ctx.tiled_mma_qk, acc_S, ctx.tSrQ[None, None, None, q_stage],
                 ctx.tSrK[None, None, None, stage], True, wait)
        else:
            gemm(ctx.tiled_mma_qk, acc_S, ctx.tSrQ, ctx.tSrK[None, None, None, stage], True, wait)

    @cute.jit
    def gemm_pv(self, ctx, stage, wait: cutlass.Constexpr[int]):
        """acc_O += P V with P in registers and V (fp8: Vt) from ring slot `stage`."""
        if const_expr(self.cfg.desc_hoist):
            gemm_desc(ctx.tiled_mma_pv, ctx.acc_O, ctx.tOrP, ctx.dV, stage, False, wait)
        else:
            gemm(ctx.tiled_mma_pv, ctx.acc_O, ctx.tOrP, ctx.tOrV[None, None, None, stage], False, wait)


def consumer_fragments(tiled_mma_qk, tiled_mma_pv, sQ, sK, sV_B, tidx, tile_m: int, tile_n: int,
                       dv: int):
    """A consumer thread's wgmma operands and accumulators. sV_B: V's smem as the PV GEMM's B
    operand (a transposed view of V for 16-bit, Vt as stored for fp8). Row state (max, sum, rescale
    factor) has one entry per accumulator row this thread holds."""
    wg = cute.arch.make_warp_uniform(tidx // 128)
    wg_mma_qk = tiled_mma_qk.get_slice(wg * 128)
    wg_mma_pv = tiled_mma_pv.get_slice(wg * 128)
    thr_mma_qk = tiled_mma_qk.get_slice(tidx)
    thr_mma_pv = tiled_mma_pv.get_slice(tidx)
    f = SimpleNamespace(wg=wg)
    f.tSrQ = wg_mma_qk.make_fragment_A(wg_mma_qk.partition_A(sQ))
    f.tSrK = wg_mma_qk.make_fragment_B(wg_mma_qk.partition_B(sK))
    f.tOrV = wg_mma_pv.make_fragment_B(wg_mma_pv.partition_B(sV_B))
    f.tOrP = wg_mma_pv.make_fragment_A(wg_mma_pv.partition_shape_A((tile_m, tile_n)))
    f.shape_S = wg_mma_qk.partition_shape_C((tile_m, tile_n))
    f.acc_O = cute.make_rmem_tensor(wg_mma_pv.partition_shape_C((tile_m, dv)), Float32)
    f.acc_O_mn = acc_to_mn(f.acc_O)
    # (row, col) tile coordinates of this thread's S and O accumulators
    f.tScS_mn = acc_to_mn(thr_mma_qk.partition_C(cute.make_identity_tensor((tile_m, tile_n))))
    f.tOcO_mn = acc_to_mn(thr_mma_pv.partition_C(cute.make_identity_tensor((tile_m, dv))))
    f.n_rows = cute.size(f.acc_O_mn, mode=[0])
    f.row_max = cute.make_rmem_tensor((f.n_rows,), Float32)
    f.row_sum = cute.make_rmem_tensor((f.n_rows,), Float32)
    f.row_scale = cute.make_rmem_tensor((f.n_rows,), Float32)
    return f


@cute.jit
def store_o_rows(rO, gO, tOcO_mn, tiled_mma_pv, tidx, m_block, tile_m: cutlass.Constexpr[int],
                 row_limit, qpk: cutlass.Constexpr[int]):
    """O straight from registers to its global tile gO (no smem, no TMA); rows at or past
    row_limit * qpk are skipped (a register store cannot be clipped like a TMA store). qpk: query
    heads packed per row position (pack_gqa), 1 otherwise. The products are formed here, per row,
    as they were inline: precomputing them in the caller changed the varlen pack_gqa PTX."""
    tOgO_mn = acc_to_mn(tiled_mma_pv.get_slice(tidx).partition_C(gO))
    rO_mn = acc_to_mn(rO)
    for r in cutlass.range_constexpr(cute.size(rO_mn, mode=[0])):
        if m_block * tile_m + tOcO_mn[r, 0][0] < row_limit * qpk:
            for c in cutlass.range_constexpr(cute.size(rO_mn, mode=[1])):
                tOgO_mn[r, c] = rO_mn[r, c]


@cute.jit
def store_lse(lse, mLSE, tOcO_mn, m_block, tile_m: cutlass.Constexpr[int], row_limit,
              qpk: cutlass.Constexpr[int], row_offset, head, bidx):
    """LSE of a tile's rows: the thread holding column 0 of a row writes it; rows at or past
    row_limit * qpk are not written. row_offset: the sequence's first row (varlen); qpk as in
    store_o_rows."""
    if tOcO_mn[0, 0][1] == 0:
        for r in cutlass.range_constexpr(cute.size(lse)):
            row = m_block * tile_m + tOcO_mn[r, 0][0]
            if row < row_limit * qpk:
                mLSE[row_offset * qpk + row, head, bidx] = lse[r]
