"""The Hopper attention forward kernel (FA3): warp-specialized TMA + wgmma, traced with the CuTe DSL.

Threads: warpgroup 0 is the producer (one warp issues TMA: Q once per tile, K_j and V_j into a
`stages`-deep smem ring, each guarded by full/empty mbarriers); warpgroups 1..tile_m/64 (2 or 3) are
consumers that own 64 query rows each. The producer gives registers back with setmaxnreg, the
consumers take them.

Consumer main loop over KV blocks j (walked from the last block down, see mask.py):
  S = Q K_j^T (wgmma SS) -> mask (boundary blocks only) -> online softmax -> P in registers as the
  A operand of O += P V_j (wgmma RS).
Switches (FwdConfig): `overlap` issues S_{j+1} = Q K_{j+1}^T and O += P_j V_j back to back and does
softmax(S_{j+1}) while PV_j runs (FA3 Alg. 2); `pingpong` makes the consumer warpgroups take turns
(round robin) issuing their GEMMs (named barriers), so one warpgroup's softmax hides under another's
GEMMs; `rescale_early` moves O's rescale under the next S GEMM;
`persistent` launches one CTA per SM walking tiles (tile_scheduler.py); `diag_half` (causal)
gives a warpgroup whose rows see only the lower half of the tile's first (diagonal) block
half-width GEMMs there.
Features (compile-time switches, so the plain path compiles as before): `local` (sliding window,
runtime (left, right)), `softcap` (S <- tanh(S * scale / cap), scale becomes cap), `sink` (per-head
logit in the denominator), `varlen` (cu_seqlens: per-sequence row offsets into packed tensors,
tiles walked by the varlen scheduler, O stored from registers with row predicates since a TMA
store cannot clip at a sequence's end), `seqused_q/k` (valid lengths; rows past seqused_q are
fully masked rows), `pack_gqa` (qpk > 1 query heads per kv head share a Q tile).
Epilogue: O /= l; O -> its own smem buffer -> TMA store (clips rows past seqlen_q) where that fits
(wg_epilogue: each consumer warpgroup its own 64-row slice and store, with no barrier across them),
else (hd256) with `o_in_q` O -> Q's smem buffer -> TMA store (Q released after the store when
persistent), or O straight from registers to global memory; LSE from registers.
"""
from types import SimpleNamespace
from typing import Optional

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.utils.hopper_helpers import make_trivial_tiled_mma

from fa3.hopper import mask as mask_mod
from fa3.hopper import softmax as sm
from fa3.hopper.fwd_common import (BAR_PINGPONG, REGS, PingpongMixin, StagedGemmMixin,
                                   consumer_fragments, make_qkv_pipes, store_lse, store_o_rows,
                                   tma_load, tma_load_block, tma_tiles)
from fa3.hopper.tile_scheduler import decode_tile, lpt_group, tile_index, varlen_decode, varlen_window
from fa3.hopper.tile_size import separate_o_fits
from fa3.hopper.wgmma_utils import (acc_to_frag_a, acc_to_mn, pack_f16x2, schedule_fence, smem_layout,
                                    stmatrix_copy, transpose_view)

# Named barriers (0 is __syncthreads; BAR_PINGPONG.. in fwd_common, one per consumer warpgroup).
BAR_EPILOGUE = 1
BAR_EPILOGUE_WG = BAR_PINGPONG + 3  # + consumer warpgroup index (wg_epilogue)
assert BAR_EPILOGUE < BAR_PINGPONG and BAR_EPILOGUE_WG + 3 <= 16


class FlashFwdSm90(PingpongMixin, StagedGemmMixin):
    def __init__(self, cfg):
        self.cfg = cfg
        self.tile_m, self.tile_n, self.stages = cfg.tile_m, cfg.tile_n, cfg.stages
        self.d, self.dv = cfg.d, cfg.dv
        self.causal = cfg.causal
        self.local = cfg.local
        self.lazy = cfg.rescale_threshold is not None  # softmax.py: lazy rescale
        assert not (self.causal and self.local), "causal with a window is local with right = 0"
        self.lpt = self.causal  # heaviest tiles first (and snake rounds) where tiles differ in cost
        # pack_gqa: the qpk query heads of a kv head are folded into the rows of one Q tile (row r =
        # position r // qpk, head r % qpk), so K/V are loaded once per group and short sequences
        # fill the tile; Q/O/LSE are viewed as ((qpk, seqlen), ..., kv heads, batch)
        self.qpk = cfg.pack_gqa
        assert self.tile_m % self.qpk == 0
        self.num_consumers = cfg.tile_m // 64  # each consumer warpgroup owns 64 query rows
        self.num_threads = 128 * (1 + self.num_consumers)
        assert self.tile_m == 64 * self.num_consumers
        assert self.tile_n % 16 == 0 and self.d % 16 == 0 and self.dv % 16 == 0

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mO: cute.Tensor,
                 mLSE: cute.Tensor, softmax_scale: Float32, grid_ctas: Int32,
                 mCuSeqlensQ: Optional[cute.Tensor], mCuSeqlensK: Optional[cute.Tensor],
                 mSeqUsedQ: Optional[cute.Tensor], mSeqUsedK: Optional[cute.Tensor],
                 mSink: Optional[cute.Tensor], softcap_pre: Optional[Float32],
                 window_left: Optional[Int32], window_right: Optional[Int32], stream):
        """Varlen: q/k/v/o come as (1, total, h, d) and LSE as (1, h, total_q). With softcap the
        host passes softmax_scale = cap and softcap_pre = scale / cap. Unused optional inputs are
        None (compiled out)."""
        dtype = mQ.element_type
        self.dtype = dtype
        # (b, s, h, d) -> (s, d, h, b): TMA/tile modes first; LSE (b, h, s) -> (s, h, b)
        mQ, mK, mV, mO = [cute.make_tensor(t.iterator, cute.select(t.layout, mode=[1, 3, 2, 0]))
                          for t in (mQ, mK, mV, mO)]
        mLSE = cute.make_tensor(mLSE.iterator, cute.select(mLSE.layout, mode=[2, 1, 0]))
        tiler_q, tiler_o = (self.tile_m, self.d), (self.tile_m, self.dv)
        if const_expr(self.qpk > 1):
            mQ, mO, mLSE = self.pack_heads(mQ, 2), self.pack_heads(mO, 2), self.pack_heads(mLSE, 1)
            rows = (self.qpk, self.tile_m // self.qpk)
            tiler_q, tiler_o = (rows, self.d), (rows, self.dv)

        tiled_mma_qk = make_trivial_tiled_mma(
            dtype, dtype, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.K, Float32,
            (self.num_consumers, 1, 1), (64, self.tile_n))
        tiled_mma_pv = make_trivial_tiled_mma(
            dtype, dtype, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN, Float32,
            (self.num_consumers, 1, 1), (64, self.dv), warpgroup.OperandSource.RMEM)

        self.q_stages = self.cfg.q_stages
        sQ_layout = smem_layout(dtype, self.tile_m, self.d, self.q_stages if self.q_stages > 1 else None)
        sK_layout = smem_layout(dtype, self.tile_n, self.d, self.stages)
        sV_layout = smem_layout(dtype, self.tile_n, self.dv, self.stages)
        # O is staged in its own smem buffer for a TMA store when it fits; else (hd256) each thread
        # stores its registers straight to global memory. Either way Q is released right after the
        # last S = Q K^T, so the next tile's Q loads while this tile finishes (persistent mode).
        self.separate_o = (separate_o_fits(self.tile_m, self.tile_n, self.d, self.dv, self.stages,
                                           q_stages=self.q_stages)
                           and not self.cfg.varlen)
        # wg_epilogue: O's buffer as one 64-row slice per consumer warpgroup, each stored by TMA
        self.wg_epi = self.cfg.wg_epilogue and self.separate_o
        if const_expr(self.wg_epi):
            sO_layout = smem_layout(dtype, 64, self.dv, self.num_consumers)
            tiler_o = self.rows_tiler(self.dv, 64)
        else:
            sO_layout = smem_layout(dtype, self.tile_m, self.dv)
        # else, with o_in_q, O is staged in Q's buffer (Q is then released only after the store)
        self.o_in_q = self.cfg.o_in_q and not self.separate_o and not self.cfg.varlen
        assert not (self.o_in_q and self.q_stages > 1)
        # Q released after the tile's last S GEMM (not when O is later staged in Q's buffer)
        self.q_early = self.cfg.q_early and self.cfg.overlap and not self.o_in_q
        self.tma_o = self.separate_o or self.o_in_q
        sQO_elems = cute.cosize(sQ_layout)
        if const_expr(self.o_in_q):
            sQO_elems = max(sQO_elems, cute.cosize(sO_layout))
        sO_elems = cute.cosize(sO_layout) if const_expr(self.separate_o) else 0

        g2s = cpasync.CopyBulkTensorTileG2SOp()
        sQ_one = cute.select(sQ_layout, mode=[0, 1]) if const_expr(self.q_stages > 1) else sQ_layout
        sO_one = cute.select(sO_layout, mode=[0, 1]) if const_expr(self.wg_epi) else sO_layout
        tma_Q, tQ = cpasync.make_tiled_tma_atom(g2s, mQ, sQ_one, tiler_q)
        tma_K, tK = cpasync.make_tiled_tma_atom(
            g2s, mK, cute.select(sK_layout, mode=[0, 1]), (self.tile_n, self.d))
        tma_V, tV = cpasync.make_tiled_tma_atom(
            g2s, mV, cute.select(sV_layout, mode=[0, 1]), (self.tile_n, self.dv))
        tma_O, tO = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileS2GOp(), mO, sO_one, tiler_o)
        self.bytes_q = cute.size_in_bytes(dtype, sQ_one)
        self.bytes_k = cute.size_in_bytes(dtype, cute.select(sK_layout, mode=[0, 1]))
        self.bytes_v = cute.size_in_bytes(dtype, cute.select(sV_layout, mode=[0, 1]))

        stages = self.stages

        @cute.struct
        class SharedStorage:
            mbar_q: cute.struct.MemRange[cutlass.Int64, 2 * self.q_stages]
            mbar_k: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            mbar_v: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, sQO_elems], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sV_layout)], 1024]

        @cute.struct
        class SharedStorageWithO:
            mbar_q: cute.struct.MemRange[cutlass.Int64, 2 * self.q_stages]
            mbar_k: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            mbar_v: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, sQO_elems], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sV_layout)], 1024]
            sO: cute.struct.Align[cute.struct.MemRange[dtype, sO_elems], 1024]

        self.shared_storage = SharedStorageWithO if const_expr(self.separate_o) else SharedStorage

        num_m_blocks = (cute.size(mQ, mode=[0]) + (self.tile_m - 1)) // self.tile_m
        self.kernel(tQ, tK, tV, tO, mO, mLSE, tma_Q, tma_K, tma_V, tma_O, tiled_mma_qk, tiled_mma_pv,
                    sQ_layout, sK_layout, sV_layout, sO_layout, softmax_scale, num_m_blocks,
                    mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK, mSink, softcap_pre,
                    window_left, window_right).launch(
            grid=[grid_ctas, 1, 1], block=[self.num_threads, 1, 1], stream=stream,
            min_blocks_per_mp=1)

    def pack_heads(self, t: cute.Tensor, head_mode: int) -> cute.Tensor:
        """(seqlen, ..., heads, batch) -> ((qpk, seqlen), ..., heads / qpk, batch): query head
        kv_head * qpk + g at position i becomes row g + qpk * i of kv head kv_head."""
        qpk, sh = self.qpk, t.stride[head_mode]
        shape = [(qpk, t.shape[0])] + [t.shape[i] for i in range(1, cute.rank(t))]
        stride = [(sh, t.stride[0])] + [t.stride[i] for i in range(1, cute.rank(t))]
        shape[head_mode], stride[head_mode] = t.shape[head_mode] // qpk, sh * qpk
        return cute.make_tensor(t.iterator, cute.make_layout(tuple(shape), stride=tuple(stride)))

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mO: cute.Tensor,
               mO_raw: cute.Tensor, mLSE: cute.Tensor, tma_Q: cute.CopyAtom, tma_K: cute.CopyAtom, tma_V: cute.CopyAtom,
               tma_O: cute.CopyAtom, tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma,
               sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout,
               sV_layout: cute.ComposedLayout, sO_layout: cute.ComposedLayout,
               softmax_scale: Float32, num_m_blocks: Int32, mCuSeqlensQ: Optional[cute.Tensor],
               mCuSeqlensK: Optional[cute.Tensor], mSeqUsedQ: Optional[cute.Tensor],
               mSeqUsedK: Optional[cute.Tensor], mSink: Optional[cute.Tensor],
               softcap_pre: Optional[Float32], window_left: Optional[Int32],
               window_right: Optional[Int32]):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        if warp_idx == 0:
            for atom in (tma_Q, tma_K, tma_V, tma_O):
                cpasync.prefetch_descriptor(atom)

        storage = cutlass.memory.SmemAllocator().allocate(self.shared_storage)
        pipe_q, pipe_k, pipe_v = make_qkv_pipes(storage, self.num_consumers, self.stages,
                                                self.bytes_q, self.bytes_k, self.bytes_v,
                                                self.q_stages)

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        if const_expr(self.separate_o):
            sO = storage.sO.get_tensor(sO_layout.outer, swizzle=sO_layout.inner)
        elif const_expr(self.o_in_q):
            sO = storage.sQ.get_tensor(sO_layout.outer, swizzle=sO_layout.inner)
        else:
            sO = sQ  # unused: O goes from registers straight to global memory
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)

        seqlen_q, seqlen_k = mQ.shape[0], mK.shape[0]
        if const_expr(self.qpk > 1):
            seqlen_q = mQ.shape[0][1]
        num_heads, num_hb = mQ.shape[2], mQ.shape[2] * mQ.shape[3]
        qhead_per_kvhead = mQ.shape[2] // mK.shape[2]
        total_tiles = num_m_blocks * num_hb
        group = None
        if const_expr(self.lpt and self.cfg.l2_group and not self.cfg.varlen):
            group = lpt_group(seqlen_k, (self.d + self.dv) * 2,  # 16-bit K and V
                              qhead_per_kvhead, num_hb, num_m_blocks, self.cfg.l2_group_mb << 20,
                              static_split=self.cfg.persistent)
        # per-call inputs of the features; loop-invariant
        feat = SimpleNamespace(cu_q=mCuSeqlensQ, cu_k=mCuSeqlensK, used_q=mSeqUsedQ, used_k=mSeqUsedK,
                               sink=mSink, softcap_pre=softcap_pre, window_left=window_left,
                               window_right=window_right, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                               num_m_blocks=num_m_blocks, num_heads=num_heads, num_hb=num_hb,
                               total_tiles=total_tiles, lpt_group=group, qhead_per_kvhead=qhead_per_kvhead)

        if warp_idx < 4:
            cute.arch.setmaxregister_decrease(REGS[self.num_consumers][0])
            if warp_idx == 0:
                self.producer(mQ, mK, mV, sQ, sK, sV, tma_Q, tma_K, tma_V, pipe_q, pipe_k, pipe_v,
                              qhead_per_kvhead, feat)
        else:
            cute.arch.setmaxregister_increase(REGS[self.num_consumers][1])
            self.consumer(mO, mO_raw, mLSE, sQ, sK, sV, sO, tma_O, tiled_mma_qk, tiled_mma_pv, pipe_q,
                          pipe_k, pipe_v, softmax_scale, tidx - 128, feat)

    # ------------------------------------------------------------------------------------------
    @cute.jit
    def first_work(self, feat):
        """(tile, varlen window state) to start this CTA's walk; see next_work."""
        tile = cute.arch.block_idx()[0]
        c_b, c_t, c_incl = Int32(0), Int32(0), Int32(0)
        if const_expr(self.cfg.varlen):
            c_incl = varlen_window(c_b, feat.cu_q, self.tile_m, feat.num_heads, self.qpk)
        return tile, c_b, c_t, c_incl

    @cute.jit
    def next_work(self, tile, c_b, c_t, c_incl, feat):
        """Tile -> (m_block, head, batch, valid, c_b, c_t, c_incl); c_* carry the varlen
        scheduler's window from tile to tile (unused otherwise)."""
        if const_expr(self.cfg.varlen):
            return varlen_decode(tile, c_b, c_t, c_incl, feat.cu_q, self.tile_m, feat.num_heads,
                                 self.lpt, self.qpk, self.cfg.l2_group_mb << 20 if self.cfg.l2_group else 0,
                                 (self.d + self.dv) * 2, feat.qhead_per_kvhead)
        m_block, head, batch = decode_tile(tile, feat.num_m_blocks, feat.num_heads, feat.num_hb,
                                           self.lpt, feat.lpt_group)
        return m_block, head, batch, tile < feat.total_tiles, c_b, c_t, c_incl

    @cute.jit
    def seq_info(self, batch, feat):
        """(offset_q, offset_k, seqlen_q, store_q, seqlen_k, batch index into the tensors):
        seqlen_q/k are the valid lengths that the masks use, store_q the rows O/LSE own."""
        offset_q, offset_k, bidx = 0, 0, batch
        store_q, seqlen_k = feat.seqlen_q, feat.seqlen_k
        if const_expr(self.cfg.varlen):
            offset_q, offset_k, bidx = feat.cu_q[batch], feat.cu_k[batch], 0
            store_q = feat.cu_q[batch + 1] - offset_q
            seqlen_k = feat.cu_k[batch + 1] - offset_k
        seqlen_q = store_q
        if const_expr(self.cfg.seqused_q):
            seqlen_q = cutlass.min(feat.used_q[batch], store_q)
        if const_expr(self.cfg.seqused_k):
            seqlen_k = cutlass.min(feat.used_k[batch], seqlen_k)
        return offset_q, offset_k, seqlen_q, store_q, seqlen_k, bidx

    def rows_tiler(self, cols: int, rows: int | None = None):
        """Tile shape of Q/O rows (default tile_m) x cols (pack_gqa: rows as (qpk heads, positions))."""
        rows = rows or self.tile_m
        if self.qpk > 1:
            return ((self.qpk, rows // self.qpk), cols)
        return (rows, cols)

    def q_slot(self, tQs, q_state):
        """Q's TMA destination: its ring slot when Q is double-buffered (q_stages = 2)."""
        if const_expr(self.q_stages > 1):
            return tQs[None, q_state.index]
        return tQs

    def row_offset(self, offset_q):
        """Domain offset of a varlen sequence's first row in the (packed) row mode."""
        return (0, offset_q) if self.qpk > 1 else offset_q

    @cute.jit
    def kv_range(self, seqlen_q, seqlen_k, m_block, feat):
        return mask_mod.kv_block_range(seqlen_q, seqlen_k, m_block, self.tile_m, self.tile_n,
                                       self.causal, self.local, feat.window_left, feat.window_right,
                                       self.qpk)

    # ------------------------------------------------------------------------------------------
    @cute.jit
    def producer(self, mQ, mK, mV, sQ, sK, sV, tma_Q, tma_K, tma_V, pipe_q, pipe_k, pipe_v,
                 qhead_per_kvhead, feat):
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        cta = cute.arch.block_idx()[0]
        grid = cute.arch.grid_dim()[0]
        rnd = Int32(0)
        tile, c_b, c_t, c_incl = self.first_work(feat)
        m_block, head, batch, valid, c_b, c_t, c_incl = self.next_work(tile, c_b, c_t, c_incl, feat)
        while valid:
            offset_q, offset_k, seqlen_q, store_q, seqlen_k, bidx = self.seq_info(batch, feat)
            head_kv = head // qhead_per_kvhead
            mQ_cur, mK_cur, mV_cur = mQ[None, None, head, bidx], mK[None, None, head_kv, bidx], mV[None, None, head_kv, bidx]
            if const_expr(self.cfg.varlen):  # the sequence's rows start at its cu_seqlens offset
                mQ_cur = cute.domain_offset((self.row_offset(offset_q), 0), mQ_cur)
                mK_cur = cute.domain_offset((offset_k, 0), mK_cur)
                mV_cur = cute.domain_offset((offset_k, 0), mV_cur)
            gQ = cute.local_tile(mQ_cur, self.rows_tiler(self.d), (m_block, 0))
            gK = cute.local_tile(mK_cur, (self.tile_n, self.d), (None, 0))
            gV = cute.local_tile(mV_cur, (self.tile_n, self.dv), (None, 0))
            tQs, tQg = tma_tiles(tma_Q, sQ, gQ)
            tKs, tKg = tma_tiles(tma_K, sK, gK)
            tVs, tVg = tma_tiles(tma_V, sV, gV)
            n_min, n_max, _, _ = self.kv_range(seqlen_q, seqlen_k, m_block, feat)
            # Q is loaded even for a tile that sees no key: the consumers always wait for it,
            # which keeps the Q ring's phases simple. When Q's buffer is freed only after the
            # previous tile's O store (o_in_q, persistent), the first K goes ahead of Q.
            k_first = const_expr(self.o_in_q and self.cfg.persistent and self.cfg.overlap)
            if const_expr(not k_first):
                tma_load(tma_Q, tQg, self.q_slot(tQs, q_state), pipe_q, q_state)
                q_state.advance()
            else:
                if n_max <= n_min:
                    tma_load(tma_Q, tQg, self.q_slot(tQs, q_state), pipe_q, q_state)
                    q_state.advance()
            if n_max > n_min:
                if const_expr(not self.cfg.overlap):
                    for i in cutlass.range(n_max - n_min, unroll=1):
                        n = n_max - 1 - i
                        tma_load_block(tma_K, tKg, tKs, n, pipe_k, kv_state)
                        tma_load_block(tma_V, tVg, tVs, n, pipe_v, kv_state)
                        kv_state.advance()
                else:
                    # consumers need K_{j+1} before V_j: load in that order
                    # written out, not tma_load_block: passing n_max - 1 as an argument changes
                    # the varlen variants' address arithmetic (PTX differs, checked)
                    pipe_k.producer_acquire(kv_state)
                    cute.copy(tma_K, tKg[None, n_max - 1], tKs[None, kv_state.index],
                              tma_bar_ptr=pipe_k.producer_get_barrier(kv_state))
                    if const_expr(k_first):
                        tma_load(tma_Q, tQg, self.q_slot(tQs, q_state), pipe_q, q_state)
                        q_state.advance()
                    for i in cutlass.range(n_max - 1 - n_min, unroll=1):
                        n = n_max - 2 - i
                        v_state = kv_state.clone()
                        kv_state.advance()
                        tma_load_block(tma_K, tKg, tKs, n, pipe_k, kv_state)
                        tma_load_block(tma_V, tVg, tVs, n + 1, pipe_v, v_state)
                    tma_load_block(tma_V, tVg, tVs, n_min, pipe_v, kv_state)
                    kv_state.advance()
            rnd += 1
            tile = tile_index(rnd, cta, grid, self.lpt)
            m_block, head, batch, valid, c_b, c_t, c_incl = self.next_work(tile, c_b, c_t, c_incl, feat)

    # ------------------------------------------------------------------------------------------
    @cute.jit
    def consumer(self, mO, mO_raw, mLSE, sQ, sK, sV, sO, tma_O, tiled_mma_qk, tiled_mma_pv, pipe_q, pipe_k,
                 pipe_v, softmax_scale, tidx, feat):
        f = consumer_fragments(tiled_mma_qk, tiled_mma_pv, sQ, sK, transpose_view(sV), tidx,
                               self.tile_m, self.tile_n, self.dv)
        wg, tSrQ, tSrK, tOrV, tOrP, shape_S = f.wg, f.tSrQ, f.tSrK, f.tOrV, f.tOrP, f.shape_S
        acc_O, acc_O_mn, tScS_mn, tOcO_mn = f.acc_O, f.acc_O_mn, f.tScS_mn, f.tOcO_mn
        n_rows, row_max, row_sum, row_scale = f.n_rows, f.row_max, f.row_sum, f.row_scale
        lse = cute.make_rmem_tensor((n_rows,), Float32)
        scale_log2 = softmax_scale * Float32(1.4426950408889634)

        self.pingpong_start(wg)

        ctx = SimpleNamespace(
            tiled_mma_qk=tiled_mma_qk, tiled_mma_pv=tiled_mma_pv, tSrQ=tSrQ, tSrK=tSrK, tOrP=tOrP,
            tOrV=tOrV, shape_S=shape_S, acc_O=acc_O, acc_O_mn=acc_O_mn, tScS_mn=tScS_mn,
            row_max=row_max, row_sum=row_sum, row_scale=row_scale, scale_log2=scale_log2,
            pipe_k=pipe_k, pipe_v=pipe_v, wg=wg, feat=feat)
        self.hoist_descs(ctx)
        if const_expr(self.cfg.diag_half):
            self.half_fragments(ctx, sK)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        cta = cute.arch.block_idx()[0]
        grid = cute.arch.grid_dim()[0]
        rnd = Int32(0)
        tile, c_b, c_t, c_incl = self.first_work(feat)
        m_block, head, batch, valid, c_b, c_t, c_incl = self.next_work(tile, c_b, c_t, c_incl, feat)
        while valid:
            offset_q, _, seqlen_q, store_q, seqlen_k, bidx = self.seq_info(batch, feat)
            # a per-tile view (mutating ctx here would make it loop-carried state)
            tctx = SimpleNamespace(seqlen_q=seqlen_q, seqlen_k=seqlen_k, **vars(ctx))
            if const_expr(self.q_stages > 1):
                tctx.q_stage = q_state.index
            n_min, n_max, n_hi, n_lo = self.kv_range(seqlen_q, seqlen_k, m_block, feat)
            acc_O.fill(0.0)
            row_max.fill(-Float32.inf)
            row_sum.fill(0.0)
            pipe_q.consumer_wait(q_state)

            if n_max > n_min:
                # walk down: [n_hi, n_max) masked (right edge / tail), [n_lo, n_hi) unmasked,
                # [n_min, n_lo) masked (left window edge; local only)
                if const_expr(not self.cfg.overlap):
                    for i in cutlass.range(n_max - n_hi, unroll=1):
                        kv_state = self.block_plain(tctx, kv_state, m_block, n_max - 1 - i, True)
                    for i in cutlass.range(n_hi - n_lo, unroll=1):
                        kv_state = self.block_plain(tctx, kv_state, m_block, n_hi - 1 - i, False)
                    if const_expr(self.local):
                        for i in cutlass.range(n_lo - n_min, unroll=1):
                            kv_state = self.block_plain(tctx, kv_state, m_block, n_lo - 1 - i, True)
                else:
                    # first half: S of the highest block, softmax, P ready; no PV yet
                    pipe_k.consumer_wait(kv_state)
                    acc_S = cute.make_rmem_tensor(shape_S, Float32)
                    half = None  # diag_half: this warpgroup sees only the block's lower half
                    if const_expr(self.cfg.diag_half):
                        half = self.sees_lower_half(tctx, m_block, n_max - 1)
                        if half:
                            self.gemm_qk_half(tctx, acc_S, kv_state.index)
                        else:
                            self.gemm_qk(tctx, acc_S, kv_state.index, 0)
                    else:
                        self.gemm_qk(tctx, acc_S, kv_state.index, 0)
                    pipe_k.consumer_release(kv_state)
                    if const_expr(self.q_early):
                        if n_max - 1 == n_min:  # that was the tile's only S GEMM
                            pipe_q.consumer_release(q_state)
                    self.softmax_block(tctx, acc_S, m_block, n_max - 1, True)
                    self.to_p(tctx, acc_S)
                    if const_expr(self.cfg.diag_half < 2):
                        for i in cutlass.range(n_max - 1 - n_hi, unroll=1):
                            kv_state = self.block_overlap(tctx, kv_state, m_block, n_max - 2 - i, True,
                                                          pipe_q, q_state, n_min)
                        for i in cutlass.range(n_hi - n_lo, unroll=1):
                            kv_state = self.block_overlap(tctx, kv_state, m_block, n_hi - 1 - i, False,
                                                          pipe_q, q_state, n_min)
                        if const_expr(self.local):
                            for i in cutlass.range(n_lo - n_min, unroll=1):
                                kv_state = self.block_overlap(tctx, kv_state, m_block, n_lo - 1 - i,
                                                              True, pipe_q, q_state, n_min)
                    else:
                        kv_state = self.walk_peeled(tctx, kv_state, m_block, n_min, n_max, n_hi,
                                                    pipe_q, q_state, half)
                    # last half: PV of the lowest block
                    if const_expr(self.cfg.rescale_early):
                        sm.rescale_o(acc_O_mn, row_scale, self.lazy)
                    pipe_v.consumer_wait(kv_state)
                    if const_expr(self.cfg.diag_half > 1):
                        if half & (n_max - 1 == n_min):  # the lowest block is the first one
                            self.gemm_pv_half(tctx, kv_state.index, 0)
                        else:
                            self.gemm_pv(tctx, kv_state.index, 0)
                    else:
                        self.gemm_pv(tctx, kv_state.index, 0)
                    pipe_v.consumer_release(kv_state)
                    kv_state.advance()

            # Q is free once every S = Q K^T of this tile is done, unless O is staged in its
            # buffer and another tile's Q may follow (persistent): then after the O store.
            q_late = const_expr(self.o_in_q and self.cfg.persistent)
            if const_expr(not q_late and not self.q_early):
                pipe_q.consumer_release(q_state)
            if const_expr(self.q_early):
                if n_max <= n_min:  # no S GEMM ran: nothing released Q yet
                    pipe_q.consumer_release(q_state)
            if const_expr(self.cfg.seqused_q):
                # rows past seqused_q (but inside the output) are fully masked rows
                for r in cutlass.range_constexpr(n_rows):
                    if (m_block * self.tile_m + tOcO_mn[r, 0][0]) // self.qpk >= seqlen_q:
                        row_max[r] = -Float32.inf
                        row_sum[r] = Float32(0.0)
            sink = None
            if const_expr(self.cfg.sink and self.qpk == 1):
                sink = Float32(feat.sink[head])
            elif const_expr(self.cfg.sink):  # one query head per row
                sink = [Float32(feat.sink[head * self.qpk
                                          + (m_block * self.tile_m + tOcO_mn[r, 0][0]) % self.qpk])
                        for r in range(n_rows)]
            sm.finalize(row_max, row_sum, row_scale, lse, softmax_scale, sink)
            sm.rescale_o(acc_O_mn, row_scale)
            self.epilogue(acc_O, lse, mO, mO_raw, mLSE, sO, tOcO_mn, tma_O, tiled_mma_pv, tidx, m_block,
                          head, batch, bidx, offset_q, store_q)
            if const_expr(q_late):
                if tidx < 32:  # the TMA store has read O out of Q's buffer
                    cute.arch.cp_async_bulk_wait_group(0, read=True)
                cute.arch.barrier(barrier_id=BAR_EPILOGUE, number_of_threads=self.num_consumers * 128)
                pipe_q.consumer_release(q_state)
            q_state.advance()
            rnd += 1
            tile = tile_index(rnd, cta, grid, self.lpt)
            m_block, head, batch, valid, c_b, c_t, c_incl = self.next_work(tile, c_b, c_t, c_incl, feat)
        if const_expr(self.tma_o):
            store_warp = tidx < 32
            if const_expr(self.wg_epi):  # one storing warp per warpgroup
                store_warp = tidx % 128 < 32
            if store_warp:
                cute.arch.cp_async_bulk_wait_group(0, read=True)  # smem must outlive the last store

    def half_fragments(self, ctx, sK):
        """diag_half: an S = Q K^T wgmma of N = tile_n / 2 over the first half of each K slot."""
        ctx.mma_half = make_trivial_tiled_mma(
            self.dtype, self.dtype, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.K,
            Float32, (self.num_consumers, 1, 1), (64, self.tile_n // 2))
        wg_mma = ctx.mma_half.get_slice(ctx.wg * 128)
        if const_expr(not self.cfg.desc_hoist):  # (desc_hoist: K's descriptors, see gemm_qk_half)
            sK_lo = cute.local_tile(sK, (self.tile_n // 2, self.d, self.stages), (0, 0, 0))
            ctx.tSrK_half = wg_mma.make_fragment_B(wg_mma.partition_B(sK_lo))
        ctx.shape_S_half = wg_mma.partition_shape_C((self.tile_m, self.tile_n // 2))

    @cute.jit
    def sees_lower_half(self, ctx, m_block, n):
        """(causal) Whether every row of this warpgroup sees only keys in the lower half of KV block
        n: the mask's right edge (diagonal or seqlen_k) of its last row, as apply_mask has it."""
        hi = ctx.seqlen_k - n * self.tile_n  # block columns >= hi are invisible to every row
        last = (m_block * self.tile_m + ctx.wg * 64 + 63) // self.qpk  # its last query position
        hi = cutlass.min(hi, last + ctx.seqlen_k - ctx.seqlen_q - n * self.tile_n + 1)
        return hi <= self.tile_n // 2

    @cute.jit
    def gemm_qk_half(self, ctx, acc_S, stage):
        """S = Q K^T into the first tile_n / 2 columns of acc_S (the accumulator's first registers:
        a wgmma's registers run column block by column block), and wait for it."""
        acc = cute.make_tensor(acc_S.iterator, cute.make_layout(ctx.shape_S_half))
        num_k = cute.size(ctx.tSrQ.shape[2])
        if const_expr(self.cfg.desc_hoist):
            # K's descriptors as the full GEMM's: a K-major operand's descriptor holds no N (the
            # wgmma reads its first tile_n / 2 rows); no second set kept live across the tiles
            a_k, b_k = ctx.dQ.k_views(0), ctx.dK.k_views(stage)
        else:
            a_k = [ctx.tSrQ[None, None, k] for k in range(num_k)]
            b_k = [ctx.tSrK_half[None, None, k, stage] for k in range(num_k)]
        warpgroup.fence()
        atom = cute.make_mma_atom(ctx.mma_half.op)
        atom.set(warpgroup.Field.ACCUMULATE, False)
        for k in cutlass.range_constexpr(num_k):
            cute.gemm(atom, acc, a_k[k], b_k[k], acc)
            atom.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()
        warpgroup.wait_group(0)

    @cute.jit
    def gemm_pv_half(self, ctx, stage, wait: cutlass.Constexpr[int]):
        """O += P V over the first tile_n / 2 keys (P is 0 past them: the mask cleared S there)."""
        warpgroup.fence()
        atom = cute.make_mma_atom(ctx.tiled_mma_pv.op)
        atom.set(warpgroup.Field.ACCUMULATE, True)
        if const_expr(self.cfg.desc_hoist):
            b_k = ctx.dV.k_views(stage)
        else:
            b_k = [ctx.tOrV[None, None, k, stage] for k in range(cute.size(ctx.tOrV.shape[2]))]
        for k in cutlass.range_constexpr(self.tile_n // 32):
            cute.gemm(atom, ctx.acc_O, ctx.tOrP[None, None, k], b_k[k], ctx.acc_O)
        warpgroup.commit_group()
        if const_expr(wait >= 0):
            warpgroup.wait_group(wait)

    @cute.jit
    def walk_peeled(self, ctx, kv_state, m_block, n_min, n_max, n_hi, pipe_q, q_state, half):
        """diag_half > 1 (causal: no left window edge, so [n_min, n_hi) is unmasked): the blocks
        below the tile's first one, the next one peeled off to issue the first block's PV, half-width
        where `half`. It takes the mask path whatever its kind (the mask is exact on any block); the
        loops after it walk what is left of each kind."""
        first = n_max - 2
        if first >= n_min:
            kv_state = self.block_overlap(ctx, kv_state, m_block, first, True, pipe_q, q_state, n_min,
                                          pv_half=half)
        hi = cutlass.min(n_hi, first)
        for i in cutlass.range(cutlass.max(first - n_hi, 0), unroll=1):
            kv_state = self.block_overlap(ctx, kv_state, m_block, first - 1 - i, True, pipe_q,
                                          q_state, n_min)
        for i in cutlass.range(cutlass.max(hi - n_min, 0), unroll=1):
            kv_state = self.block_overlap(ctx, kv_state, m_block, hi - 1 - i, False, pipe_q, q_state,
                                          n_min)
        return kv_state

    @cute.jit
    def softmax_block(self, ctx, acc_S, m_block, n, masked: cutlass.Constexpr[bool]):
        acc_S_mn = acc_to_mn(acc_S)
        if const_expr(self.cfg.softcap):
            sm.apply_softcap(acc_S_mn, ctx.feat.softcap_pre)
        if const_expr(masked):
            mask_mod.apply_mask(acc_S_mn, ctx.tScS_mn, ctx.seqlen_q, ctx.seqlen_k, m_block, n,
                                self.tile_m, self.tile_n, self.causal, self.local,
                                ctx.feat.window_left, ctx.feat.window_right, self.qpk)
        sm.online_softmax(acc_S_mn, ctx.row_max, ctx.row_sum, ctx.row_scale, ctx.scale_log2,
                          self.cfg.rescale_threshold, self.cfg.exp2_emu)

    @cute.jit
    def to_p(self, ctx, acc_S):
        """fp32 P -> 16-bit A operand of the PV wgmma, in registers (no smem round trip). Packs two
        values per 32-bit register here, before the wgmma fence: packing them later (as a generic
        convert does) makes ptxas serialize every RS wgmma (warning C7519)."""
        src = acc_to_frag_a(acc_S)
        dst = cute.recast_tensor(ctx.tOrP, Int32)
        for i in cutlass.range_constexpr(cute.size(dst)):
            dst[i] = pack_f16x2(src[2 * i], src[2 * i + 1], self.dtype is cutlass.BFloat16)

    @cute.jit
    def block_plain(self, ctx, kv_state, m_block, n, masked: cutlass.Constexpr[bool]):
        """One KV block without intra-warpgroup overlap: S, softmax, rescale O, O += P V, in order."""
        ctx.pipe_k.consumer_wait(kv_state)
        self.pingpong_sync(ctx.wg)
        acc_S = cute.make_rmem_tensor(ctx.shape_S, Float32)
        self.gemm_qk(ctx, acc_S, kv_state.index, -1)
        self.pingpong_arrive(ctx.wg)
        warpgroup.wait_group(0)
        ctx.pipe_k.consumer_release(kv_state)
        self.softmax_block(ctx, acc_S, m_block, n, masked)
        self.to_p(ctx, acc_S)
        sm.rescale_o(ctx.acc_O_mn, ctx.row_scale, self.lazy)
        ctx.pipe_v.consumer_wait(kv_state)
        self.gemm_pv(ctx, kv_state.index, 0)
        ctx.pipe_v.consumer_release(kv_state)
        kv_state.advance()
        return kv_state

    @cute.jit
    def block_overlap(self, ctx, kv_state, m_block, n, masked: cutlass.Constexpr[bool], pipe_q, q_state,
                      n_min, pv_half=None):
        """FA3 Alg. 2 step: issue S_n = Q K_n^T and O += P_{n+1} V_{n+1} back to back; softmax(S_n)
        runs while the PV wgmma is still in flight; then rescale O and convert P_n."""
        v_state = kv_state.clone()
        kv_state.advance()
        ctx.pipe_k.consumer_wait(kv_state)
        self.pingpong_sync(ctx.wg)
        acc_S = cute.make_rmem_tensor(ctx.shape_S, Float32)
        self.gemm_qk(ctx, acc_S, kv_state.index, -1)
        if const_expr(self.cfg.rescale_early):
            # O *= scale of the previous softmax while S = Q K^T runs on the tensor cores (pays off
            # when O is large, dv > 128, and no other warpgroup's GEMM hides the FMULs)
            sm.rescale_o(ctx.acc_O_mn, ctx.row_scale, self.lazy)
        ctx.pipe_v.consumer_wait(v_state)
        if const_expr(pv_half is None):
            self.gemm_pv(ctx, v_state.index, -1)
        else:
            if pv_half:  # (walk_peeled) the previous block's P is zero past its first half
                self.gemm_pv_half(ctx, v_state.index, -1)
            else:
                self.gemm_pv(ctx, v_state.index, -1)
        self.pingpong_arrive(ctx.wg)
        warpgroup.wait_group(1)  # S_n done, PV may still run
        ctx.pipe_k.consumer_release(kv_state)
        if const_expr(self.q_early):
            if n == n_min:  # the tile's last S GEMM: Q's buffer is free
                pipe_q.consumer_release(q_state)
        self.softmax_block(ctx, acc_S, m_block, n, masked)
        if const_expr(self.cfg.p_after_wait):
            schedule_fence(ctx.row_sum[0])
        warpgroup.wait_group(0)  # PV done: P's registers and V's stage are free
        ctx.pipe_v.consumer_release(v_state)
        self.to_p(ctx, acc_S)
        if const_expr(not self.cfg.rescale_early):
            sm.rescale_o(ctx.acc_O_mn, ctx.row_scale, self.lazy)
        return kv_state

    @cute.jit
    def epilogue(self, acc_O, lse, mO, mO_raw, mLSE, sO, tOcO_mn, tma_O, tiled_mma_pv, tidx, m_block,
                 head, batch, bidx, offset_q, store_q):
        """O and LSE of one tile; rows at or past store_q (the rows this sequence owns) are not
        written. bidx/offset_q: batch index into the tensors and row offset (varlen)."""
        rO = cute.make_rmem_tensor_like(acc_O, self.dtype)
        rO.store(acc_O.load().to(self.dtype))
        if const_expr(self.wg_epi):
            self.epilogue_wg(rO, mO, sO, tma_O, tidx, m_block, head, batch)
        elif const_expr(self.tma_o):
            # the previous tile's O store must have read sO before it is rewritten; with O in Q's
            # buffer this barrier also orders every warpgroup's last wgmma read of Q before it
            if tidx < 32:
                cute.arch.cp_async_bulk_wait_group(0, read=True)
            cute.arch.barrier(barrier_id=BAR_EPILOGUE, number_of_threads=self.num_consumers * 128)
            copy_atom, thr_copy = stmatrix_copy(self.dtype, tiled_mma_pv, tidx)
            cute.copy(copy_atom, thr_copy.retile(rO), thr_copy.partition_D(sO))
            cute.arch.fence_view_async_shared()  # generic-proxy smem writes -> TMA (async proxy)
            cute.arch.barrier(barrier_id=BAR_EPILOGUE, number_of_threads=self.num_consumers * 128)
            if tidx < 32:
                gO = cute.local_tile(mO[None, None, head, batch], self.rows_tiler(self.dv), (m_block, 0))
                tOs, tOg = tma_tiles(tma_O, sO, gO)
                cute.copy(tma_O, tOs, tOg)  # rows past seqlen_q are clipped by the TMA unit
                cute.arch.cp_async_bulk_commit_group()
        else:
            # straight from registers (pairs of 16-bit values), rows past seqlen_q skipped
            mO_cur = mO_raw[None, None, head, bidx]
            if const_expr(self.cfg.varlen):
                mO_cur = cute.domain_offset((self.row_offset(offset_q), 0), mO_cur)
            gO = cute.local_tile(mO_cur, self.rows_tiler(self.dv), (m_block, 0))
            store_o_rows(rO, gO, tOcO_mn, tiled_mma_pv, tidx, m_block, self.tile_m, store_q,
                         self.qpk)
        store_lse(lse, mLSE, tOcO_mn, m_block, self.tile_m, store_q, self.qpk, offset_q, head,
                  bidx)

    @cute.jit
    def epilogue_wg(self, rO, mO, sO, tma_O, tidx, m_block, head, batch):
        """wg_epilogue: this warpgroup's 64 rows of O through its own smem slice and TMA store;
        only its own 128 threads meet (at its own named barrier)."""
        wg = cute.arch.make_warp_uniform(tidx // 128)
        wtid = tidx % 128
        bar = BAR_EPILOGUE_WG + wg
        if wtid < 32:  # this warpgroup's previous store must have read its slice
            cute.arch.cp_async_bulk_wait_group(0, read=True)
        cute.arch.barrier(barrier_id=bar, number_of_threads=128)
        # one warpgroup's view of the PV GEMM: its accumulator layout is the same as this
        # thread's slice of the full tiled MMA
        mma_wg = make_trivial_tiled_mma(
            self.dtype, self.dtype, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN,
            Float32, (1, 1, 1), (64, self.dv), warpgroup.OperandSource.RMEM)
        copy_atom, thr_copy = stmatrix_copy(self.dtype, mma_wg, wtid)
        sO_wg = sO[None, None, wg]
        cute.copy(copy_atom, thr_copy.retile(rO), thr_copy.partition_D(sO_wg))
        cute.arch.fence_view_async_shared()  # generic-proxy smem writes -> TMA (async proxy)
        cute.arch.barrier(barrier_id=bar, number_of_threads=128)
        if wtid < 32:
            gO = cute.local_tile(mO[None, None, head, batch], self.rows_tiler(self.dv, 64),
                                 (m_block * self.num_consumers + wg, 0))
            tOs, tOg = tma_tiles(tma_O, sO_wg, gO)
            cute.copy(tma_O, tOs, tOg)  # rows past seqlen_q are clipped by the TMA unit
            cute.arch.cp_async_bulk_commit_group()
