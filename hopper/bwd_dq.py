"""The dQ role of the Hopper backward (FlashBwdSm90 inherits it; see bwd_kernel.py's docstring):
warp 1 bulk-adds each query block's dQ tile to the fp32 dQaccum (in order, deterministic)."""
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from fa3.hopper import mask as mask_mod
from fa3.hopper.mem_ops import bulk_reduce_add_f32, ld_acquire, red_release_add

# Named barriers (bwd_kernel.py holds the others)
BAR_DQ_EMPTY = 2  # + warpgroup: the dQ warp has read the smem dQ chunk
BAR_DQ_FULL = 4  # + warpgroup: the chunk holds this m block's dQ


def dq_copy(cfg):
    """Register <-> flat fp32 dQ chunk copy: thread t of warpgroup w holds 4-float vectors at
    w * chunk + j * 512 + t * 4 (consumers write smem this way; the postprocess reads gmem)."""
    atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Float32, num_bits_per_copy=128)
    return cute.make_tiled_copy_tv(atom, cute.make_layout((128, 2)), cute.make_layout(4))


class DqRoles:
    """Needs the kernel's cfg, tile_m / tile_n / d, causal, m_at and walk_start."""

    @cute.jit
    def dq_writer(self, mdQacc, mSem, sdQ, n_block, head, batch, m_min, m_max, lane, seqlen_q,
                  seqlen_k, window_left, handover: cutlass.Constexpr[bool] = False, qpk=None):
        """Warp 1: bulk-add each m block's dQ chunks (one per consumer warpgroup) to dQaccum.
        handover (persistent, dK / dV staged by TMA): after the tile's last adds have read smem,
        lend the dQ buffer to the consumers for dV (one more EMPTY / FULL round per tile).
        group_loop: head is the KV head; the walk runs for each of its qpk query heads."""
        if const_expr(self.cfg.pdl):
            cute.arch.griddepcontrol_wait()  # the preprocess zeroes dQaccum (and semaphores)
        walk = (mdQacc, mSem, sdQ, n_block, batch, m_min, m_max, lane, seqlen_q, seqlen_k,
                window_left)
        if const_expr(self.cfg.group_loop):
            for hg in cutlass.range(qpk, unroll=1):
                self.dq_adds(head * qpk + hg, *walk)
        else:
            self.dq_adds(head, *walk)
        cute.arch.cp_async_bulk_wait_group(0, read=True)
        if const_expr(handover):
            for wg in cutlass.range_constexpr(2):
                cute.arch.barrier_arrive(barrier_id=BAR_DQ_EMPTY + wg, number_of_threads=160)
            for wg in cutlass.range_constexpr(2):  # the consumers' dV store has read it
                cute.arch.barrier(barrier_id=BAR_DQ_FULL + wg, number_of_threads=160)

    @cute.jit
    def dq_adds(self, head, mdQacc, mSem, sdQ, n_block, batch, m_min, m_max, lane, seqlen_q,
                seqlen_k, window_left):
        """One query head's walk of dq_writer."""
        chunk = self.tile_m * self.d // 2
        acc_row = mdQacc[batch, head, None]
        sem_row = mSem[batch, head, None]
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
                        seen = ld_acquire(sem_row.iterator + m)
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
                    red_release_add(sem_row.iterator + m, 1)
