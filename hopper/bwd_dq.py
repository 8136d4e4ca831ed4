"""The dQ roles of the Hopper backward (FlashBwdSm90 inherits them; see bwd_kernel.py's docstring):
warp 1 bulk-adds each query block's dQ tile to the fp32 dQaccum (in order, deterministic), and
with BwdConfig.fuse_post warps 2-3 turn finished tiles into dQ."""
import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32, const_expr

from fa3.hopper import mask as mask_mod
from fa3.hopper.flash_bwd import SEMS_PER_TILE
from fa3.hopper.mem_ops import atom_add, bulk_g2s, bulk_reduce_add_f32, ld_acquire, red_release_add

# Named barriers (bwd_kernel.py holds the others)
BAR_DQ_EMPTY = 2  # + warpgroup: the dQ warp has read the smem dQ chunk
BAR_DQ_FULL = 4  # + warpgroup: the chunk holds this m block's dQ
CONV_STAGES = 8  # fuse_post: dQ warp -> converter warps signal ring (a slot per m block added)


def dq_copy(cfg):
    """Register <-> flat fp32 dQ chunk copy: thread t of warpgroup w holds 4-float vectors at
    w * chunk + j * 512 + t * 4 (consumers write smem this way; the postprocess reads gmem)."""
    atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Float32, num_bits_per_copy=128)
    return cute.make_tiled_copy_tv(atom, cute.make_layout((128, 2)), cute.make_layout(4))


class DqRoles:
    """Needs the kernel's cfg, tile_m / tile_n / d, causal, m_at and walk_start."""

    @cute.jit
    def dq_writer(self, mdQacc, mSem, sdQ, n_block, head, batch, m_min, m_max, lane, seqlen_q,
                  seqlen_k, window_left, fused):
        """Warp 1: bulk-add each m block's dQ chunks (one per consumer warpgroup) to dQaccum.
        fuse_post: once a block's adds are done in L2, signal the converter warps (cfg.fuse_lag
        blocks behind, so the wait overlaps the next blocks' GEMMs)."""
        if const_expr(self.cfg.pdl):
            cute.arch.griddepcontrol_wait()  # the preprocess zeroes dQaccum (and semaphores)
        chunk = self.tile_m * self.d // 2
        acc_row = mdQacc[batch, head, None]
        sem_row = mSem[batch, head, None]
        fuse = const_expr(self.cfg.fuse_post)
        per_tile = SEMS_PER_TILE if const_expr(fuse) else 1  # the turn is the first
        cstate = None
        if const_expr(fuse):
            cstate = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, CONV_STAGES)
        m_nomask = self.walk_start(seqlen_q, seqlen_k, n_block, m_min, m_max)
        for p in cutlass.range(m_min, m_max, unroll=1):
            m = self.m_at(p, m_nomask, m_max, n_block)
            for wg in cutlass.range_constexpr(2):
                if const_expr(not self.cfg.deterministic):
                    # the previous add from this chunk has read smem (deterministic: waited below)
                    cute.arch.cp_async_bulk_wait_group(1 - wg, read=True)
                cute.arch.barrier_arrive(barrier_id=BAR_DQ_EMPTY + wg, number_of_threads=160)
            if const_expr(self.cfg.deterministic):
                # KV blocks 0 .. n_max(m)-1 meet block m (every mask here is a suffix in n); they
                # add in order n = 0, 1, ... (spt: n_max(m)-1 down to 0; local: n_min(m) up)
                turn = n_block
                if const_expr(self.cfg.local):
                    turn = n_block - mask_mod.n_block_min_local_bwd(
                        seqlen_q, seqlen_k, m, self.tile_m, self.tile_n, window_left)
                if const_expr(self.cfg.spt):
                    turn = mask_mod.n_block_max(seqlen_q, seqlen_k, m, self.tile_m, self.tile_n,
                                                True) - 1 - n_block
                if lane == 0:
                    seen = Int32(-1)
                    while seen != turn:
                        seen = ld_acquire(sem_row.iterator + m * per_tile)
                cute.arch.sync_warp()
            for wg in cutlass.range_constexpr(2):
                cute.arch.barrier(barrier_id=BAR_DQ_FULL + wg, number_of_threads=160)
                if lane == 0:
                    bulk_reduce_add_f32(acc_row.iterator + (m * 2 + wg) * chunk,
                                        sdQ[None, wg].iterator, chunk * 4)
                cute.arch.cp_async_bulk_commit_group()
            if const_expr(self.cfg.deterministic):
                cute.arch.cp_async_bulk_wait_group(0, read=False)  # the adds are done in L2
                if lane == 0:
                    red_release_add(sem_row.iterator + m * per_tile, 1)
                    if const_expr(fuse):
                        cstate = self.signal(fused[3], cstate)
            elif const_expr(fuse):
                lag = self.cfg.fuse_lag
                if p >= m_min + lag:
                    # the adds of the block `lag` steps back are done (2 groups a block)
                    cute.arch.cp_async_bulk_wait_group(2 * lag, read=False)
                    if lane == 0:
                        cstate = self.signal(fused[3], cstate)
        if const_expr(fuse and not self.cfg.deterministic):
            cute.arch.cp_async_bulk_wait_group(0, read=False)
            if lane == 0:
                for _ in cutlass.range(cutlass.min(m_max - m_min, self.cfg.fuse_lag), unroll=1):
                    cstate = self.signal(fused[3], cstate)
        cute.arch.cp_async_bulk_wait_group(0, read=True)

    @cute.jit
    def signal(self, pipe_conv, cstate):
        """fuse_post: tell the converter warps the next block of the walk has landed."""
        pipe_conv.producer_acquire(cstate)
        pipe_conv.producer_commit(cstate)
        cstate.advance()
        return cstate

    @cute.jit
    def dq_converter(self, mdQacc, mSem, dq, fused, softmax_scale, n_block, head, batch, m_min,
                     m_max, warp, lane, seqlen_q, seqlen_k):
        """fuse_post, warps 2 and 3 (chunk `warp` of each dQ tile, as consumer warpgroup `warp`
        added it): for each block of the walk whose adds have landed (signalled by the dQ warp,
        or with dq_red by every consumer thread), lane 0 counts it on the chunk's semaphore with
        an acq_rel atomic; the one CTA whose count completes the tile (every KV block's adds
        ordered before it) turns the fp32 chunk into dQ (times softmax_scale), so no postprocess
        kernel reads dQaccum back from memory. (A plain read of a count that others also
        increment let several CTAs convert the same tile: H100, 0.78-0.92x.)"""
        mdQ, sX, mbar_x, pipe_conv = fused
        if const_expr(self.cfg.pdl):
            cute.arch.griddepcontrol_wait()
        tm, d = self.tile_m, self.d
        chunk = tm * d // 2
        parts = self.cfg.post_parts
        part = chunk // parts  # floats a warp copies at a time
        acc_row = mdQacc[batch, head, None]
        sem_row = mSem[batch, head, None]
        gdQ = mdQ[None, None, head, batch]
        total = (seqlen_k + (self.tile_n - 1)) // self.tile_n  # KV blocks adding to each tile
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, CONV_STAGES)
        phase = Int32(0)
        m_nomask = self.walk_start(seqlen_q, seqlen_k, n_block, m_min, m_max)
        for p in cutlass.range(m_min, m_max, unroll=1):
            m = self.m_at(p, m_nomask, m_max, n_block)
            pipe_conv.consumer_wait(state)
            pipe_conv.consumer_release(state)
            state.advance()
            if const_expr(self.causal):
                total = mask_mod.n_block_max(seqlen_q, seqlen_k, m, tm, self.tile_n, True)
            seen = Int32(0)
            if lane == 0:
                # dQ warp: its bulk adds completed (wait_group) before it signalled, so they are
                # in L2 before this count; dq_red: the consumers' red.global adds have no
                # completion to wait on, so the count releases them (MEMBAR.GPU)
                seen = atom_add(sem_row.iterator + m * SEMS_PER_TILE + 1 + warp, 1,
                                "acq_rel" if const_expr(self.cfg.dq_red) else "acquire")
            seen = cute.arch.shuffle_sync(seen, 0)
            if seen == total - 1:
                for q in cutlass.range_constexpr(parts):
                    if lane == 0:
                        # the bulk copy (async proxy) reads what the atomic acquired
                        cute.arch.fence_proxy("async.global")
                        cute.arch.mbarrier_arrive_and_expect_tx(mbar_x + warp, part * 4)
                        bulk_g2s(sX[None, warp].iterator,
                                 acc_row.iterator + (m * 2 + warp) * chunk + q * part, part * 4,
                                 mbar_x + warp)
                    cute.arch.mbarrier_wait(mbar_x + warp, phase)
                    phase ^= 1
                    self.convert_part(sX, cute.local_tile(gdQ, (tm, d), (m, 0)), dq,
                                      softmax_scale, warp, lane, q, seqlen_q - m * tm)
                    cute.arch.sync_warp()
                    # this warp's generic reads of sX before the next bulk copy overwrites it
                    cute.arch.fence_proxy("async.shared", space="cta")

    @cute.jit
    def convert_part(self, sX, gdQ, dq, softmax_scale, warp, lane, q: cutlass.Constexpr[int],
                     rows):
        """Part q of consumer warpgroup `warp`'s dQ chunk (its registers in dq_copy order, in
        column `warp` of sX) -> the dQ tile gdQ, rows below `rows`; one 4-float vector at a time
        (the producer warpgroup has 24 registers: bwd_kernel.REGS)."""
        dtype = gdQ.element_type
        for i in cutlass.range(4, unroll=1):  # the warpgroup's 128 threads, a warp at a time
            vt = warp * 128 + i * 32 + lane
            # ((4, 1), vectors of this part, 1): vector j of the part is the thread's j + q * nj
            tg = dq_copy(self.cfg).get_slice(vt).partition_S(sX)
            thr = dq.get_slice(vt)
            tD = thr.partition_C(gdQ)  # ((2, 2, V), 1, 1): V = vectors, 2 rows 8 apart
            tC = thr.partition_C(cute.make_identity_tensor((self.tile_m, self.d)))
            nj = cute.size(tg, mode=[1])
            for jj in cutlass.range(nj, unroll=1):
                j = jj + q * nj
                v = cute.make_rmem_tensor(cute.make_layout(4), Float32)
                cute.autovec_copy(tg[None, jj, 0], v)
                r = cute.make_rmem_tensor(cute.make_layout(4), dtype)
                r.store((v.load() * softmax_scale).to(dtype))
                for h in cutlass.range_constexpr(2):  # (row, 2 columns), (row + 8, 2 columns)
                    if tC[(0, h, j), 0, 0][0] < rows:
                        tD[(0, h, j), 0, 0] = r[2 * h]
                        tD[(1, h, j), 0, 0] = r[2 * h + 1]
