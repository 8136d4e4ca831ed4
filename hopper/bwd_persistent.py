"""The persistent grid of the Hopper backward (BwdConfig.persistent; FlashBwdSm90 inherits these
roles, see bwd_kernel.py's docstring): one CTA per SM walks KV tiles instead of one CTA per tile.

Every role (producer warp, dQ warp, consumer warpgroups) walks the same tiles and carries its
pipeline states from one to the next. The consumers release K / V once a tile's last GEMMs are
done and stage dK / dV in the dS and dQ buffers (the dQ warp hands its buffer over once per tile,
bwd_dq.dq_writer's `handover`), so the next tile's K / V, Q and dO load while a tile stores dK /
dV, and no CTA launches between tiles. Tile order: non-causal tiles cost the same, CTA i takes
tiles i, i + grid, ... (n_block fastest, the order the one-CTA-per-tile grid runs); causal ones
do not (dyn_tiles), so after tile i a CTA takes grid + the next value of a global counter when
its producer warp has issued a tile's loads, and passes it to the other warps through a 2-slot
smem ring (tile_pipe: an mbarrier pipeline, one arrive per reading warp).
"""
import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Int32, const_expr

from fa3.hopper import mask as mask_mod
from fa3.hopper.mem_ops import atom_add_s32


class PersistentRoles:
    """Needs the kernel's cfg, tile sizes, causal, dyn_tiles, stages, regs (the setmaxnreg split)
    and its producer / dq_writer / consumer / m_blocks / store_dkv."""

    @cute.jit
    def persistent_roles(self, mQ, mK, mV, mdO, mLSE2, mD, mdQacc, mdK, mdV, mSem, sQ, sK, sV, sdO,
                         sP, sdS, sLSE, sD, sdQ, tma_Q, tma_K, tma_V, tma_dO, sdp, dkv, dq, pipe_q,
                         pipe_do, pipe_kv, softmax_scale, window_left, window_right, softcap,
                         warp_idx, tidx, tma_dK, tma_dV, sdK, sdV, tile_pipe):
        """BwdConfig.persistent: CTA i takes KV tiles i, i + grid, i + 2 grid, ... in the order
        the one-CTA-per-tile grid runs them (n_block fastest); causal (dyn_tiles, tiles of unequal
        cost): tile i first, then grid + the next value of a global counter (mSem[0], zeroed by
        the preprocess) whenever the producer warp starts loading the next tile, passed to the
        other roles through a 2-slot smem ring (tile_pipe). Every role walks the same tiles and
        carries its pipeline states over, so the next tile's K / V (released after the last m
        block's GEMMs) and Q / dO load while this tile stores dK / dV, and no CTA launches."""
        seqlen_q, seqlen_k = mQ.shape[0], mK.shape[0]
        num_n = (seqlen_k + (self.tile_n - 1)) // self.tile_n
        num_h = mK.shape[2] if const_expr(self.cfg.group_loop) else mQ.shape[2]  # tiles' heads
        total = num_n * num_h * mQ.shape[3]
        cta, grid = cute.arch.block_idx()[0], cute.arch.grid_dim()[0]
        m_max = (seqlen_q + (self.tile_m - 1)) // self.tile_m
        tiles = (cta, total, grid, num_n, num_h, tile_pipe)
        if warp_idx < 4:
            cute.arch.setmaxregister_decrease(self.regs[0])
            if warp_idx == 0:
                qpk = mQ.shape[2] // mK.shape[2]
                states = (pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1),
                          pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer,
                                                       self.stages))
                if const_expr(self.dyn_tiles):
                    tstate = self.publish_tile(tile_pipe, pipeline.make_pipeline_state(
                        pipeline.PipelineUserType.Producer, 2), cta)
                    t = cta
                    while t < total:
                        states = self.producer_tile(t, num_n, num_h, qpk, m_max, states, mQ, mK,
                                                    mV, mdO, mLSE2, mD, sQ, sK, sV, sdO, sLSE, sD,
                                                    tma_Q, tma_K, tma_V, tma_dO, pipe_q, pipe_do,
                                                    pipe_kv)
                        t = grid + self.counter_next(mSem.iterator)
                        tstate = self.publish_tile(tile_pipe, tstate, t)
                else:
                    for t in cutlass.range(cta, total, grid, unroll=1):
                        states = self.producer_tile(t, num_n, num_h, qpk, m_max, states, mQ, mK,
                                                    mV, mdO, mLSE2, mD, sQ, sK, sV, sdO, sLSE, sD,
                                                    tma_Q, tma_K, tma_V, tma_dO, pipe_q, pipe_do,
                                                    pipe_kv)
            if warp_idx == 1:
                if const_expr(self.dyn_tiles):
                    t, rstate = self.read_tile(tile_pipe, pipeline.make_pipeline_state(
                        pipeline.PipelineUserType.Consumer, 2))
                    while t < total:
                        self.dq_writer_tile(t, num_n, num_h, m_max, seqlen_q, seqlen_k, mdQacc,
                                            mSem, sdQ, tidx, window_left)
                        t, rstate = self.read_tile(tile_pipe, rstate)
                else:
                    for t in cutlass.range(cta, total, grid, unroll=1):
                        self.dq_writer_tile(t, num_n, num_h, m_max, seqlen_q, seqlen_k, mdQacc,
                                            mSem, sdQ, tidx, window_left)
        else:
            cute.arch.setmaxregister_increase(self.regs[1])
            zero = Int32(0)
            self.consumer(mdQacc, mdK, mdV, sQ, sK, sV, sdO, sP, sdS, sLSE, sD, sdQ, sdp, dkv, dq,
                          pipe_q, pipe_do, pipe_kv, softmax_scale, tidx - 128, zero, zero, zero,
                          zero, m_max, seqlen_q, seqlen_k, window_left, window_right, softcap,
                          (tma_dK, tma_dV, sdK, sdV), tiles)

    @cute.jit
    def producer_tile(self, t, num_n, num_h, qpk, m_max, states, mQ, mK, mV, mdO, mLSE2, mD, sQ,
                      sK, sV, sdO, sLSE, sD, tma_Q, tma_K, tma_V, tma_dO, pipe_q, pipe_do, pipe_kv):
        n_block, head, batch = self.kv_tile(t, num_n, num_h)
        seqlen_q, seqlen_k = mQ.shape[0], mK.shape[0]
        m_min = mask_mod.m_block_min_bwd(seqlen_q, seqlen_k, n_block, self.tile_m, self.tile_n,
                                         self.causal)
        head_kv = head if const_expr(self.cfg.group_loop) else head // qpk
        return self.producer(mQ, mK, mV, mdO, mLSE2, mD, sQ, sK, sV, sdO, sLSE, sD, tma_Q, tma_K,
                             tma_V, tma_dO, pipe_q, pipe_do, pipe_kv, n_block, head, head_kv,
                             batch, m_min, m_max, seqlen_q, seqlen_k, states)

    @cute.jit
    def dq_writer_tile(self, t, num_n, num_h, m_max, seqlen_q, seqlen_k, mdQacc, mSem, sdQ, tidx,
                       window_left):
        n_block, head, batch = self.kv_tile(t, num_n, num_h)
        m_min = mask_mod.m_block_min_bwd(seqlen_q, seqlen_k, n_block, self.tile_m, self.tile_n,
                                         self.causal)
        self.dq_writer(mdQacc, mSem, sdQ, n_block, head, batch, m_min, m_max, tidx % 32, seqlen_q,
                       seqlen_k, window_left, handover=self.cfg.dkv_tma,
                       qpk=mdQacc.shape[1] // num_h)

    @cute.jit
    def counter_next(self, ptr):
        """The global tile counter's next value, taken by lane 0, in every lane."""
        v = Int32(0)
        if cute.arch.lane_idx() == 0:
            v = atom_add_s32(ptr, 1)
        return cute.arch.shuffle_sync(v, 0)

    @cute.jit
    def publish_tile(self, tile_pipe, tstate, t):
        """Producer warp: tile t into the next ring slot (lane 0 writes and arrives)."""
        pipe, sTile = tile_pipe
        pipe.producer_acquire(tstate)
        if cute.arch.lane_idx() == 0:
            sTile[tstate.index] = t
            pipe.producer_commit(tstate)
        tstate.advance()
        return tstate

    @cute.jit
    def read_tile(self, tile_pipe, rstate):
        """A reading warp: the next tile index (every lane), its slot released once all lanes
        have read it (lane 0 arrives for the warp)."""
        pipe, sTile = tile_pipe
        pipe.consumer_wait(rstate)
        t = sTile[rstate.index]
        cute.arch.sync_warp()
        if cute.arch.lane_idx() == 0:
            pipe.consumer_release(rstate)
        rstate.advance()
        return t, rstate

    @cute.jit
    def kv_tile(self, t, num_n, num_h):
        """Persistent tile t -> (n_block, head, batch), n_block fastest: tile_scheduler.decode_tile's
        non-causal order, written with one division less (its `t % num_n` made hd128's persistent
        dv_early build spill, checked in s14)."""
        hb = t // num_n
        return t - hb * num_n, hb % num_h, hb // num_h

    @cute.jit
    def consumer_tiles(self, tiles, state, kv_state, tile):
        """The consumers' walk over their tiles (tile: consumer_tile's per-kernel arguments)."""
        cta, total, grid, num_n, num_h, tile_pipe = tiles
        if const_expr(self.dyn_tiles):
            t, rstate = self.read_tile(tile_pipe, pipeline.make_pipeline_state(
                pipeline.PipelineUserType.Consumer, 2))
            while t < total:
                state, kv_state = self.consumer_tile(t, state, kv_state, *tile, num_n, num_h)
                t, rstate = self.read_tile(tile_pipe, rstate)
        else:
            for t in cutlass.range(cta, total, grid, unroll=1):
                state, kv_state = self.consumer_tile(t, state, kv_state, *tile, num_n, num_h)

    @cute.jit
    def consumer_tile(self, t, state, kv_state, ctx, acc_dK, acc_dV, pipe_kv, m_max, seqlen_q,
                      seqlen_k, window_left, window_right, softmax_scale, mdK, mdV, dkv, dvm,
                      dkv_out, tidx, wg, num_n, num_h):
        """Persistent consumers: KV tile t, from the K / V wait to the dK / dV store."""
        n_block, head, batch = self.kv_tile(t, num_n, num_h)
        m_min = mask_mod.m_block_min_bwd(seqlen_q, seqlen_k, n_block, self.tile_m, self.tile_n,
                                         self.causal)
        tile_ctx = dict(ctx, n_block=n_block)  # (a store into ctx would make the loop carry it)
        acc_dV.fill(0.0)
        acc_dK.fill(0.0)
        pipe_kv.consumer_wait(kv_state)
        state = self.m_blocks_group(tile_ctx, state, n_block, m_min, m_max, seqlen_q, seqlen_k,
                                    window_left, window_right)
        # every GEMM of the tile has completed (each block ends with wait_group(0)): K / V may be
        # overwritten by the next tile's while dK / dV are stored
        pipe_kv.consumer_release(kv_state)
        kv_state.advance()
        self.store_dkv(acc_dK, acc_dV, softmax_scale, mdK, mdV, dkv, dvm, dkv_out, tidx, wg,
                       n_block, head, batch, seqlen_k)
        return state, kv_state
