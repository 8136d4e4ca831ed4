"""The sm80 attention forward kernel (FA2 algorithm), traced with the CuTe DSL.

One CTA of 4 warps owns tile_m query rows of one (batch, head); each warp owns tile_m / 4 rows, so
softmax row statistics never leave a warp. Q is loaded once into smem; K and V stream through
`stages`-deep smem rings filled by cp.async; S = Q K^T and O += P V are mma.sync m16n8k16 with
operands read from smem by ldmatrix (V with ldmatrix.trans), P stays in registers.

KV blocks are walked from the last one down (see fa3.hopper.mask): the first block pays for the
seqlen_k tail and the diagonal, further diagonal blocks (causal) for the diagonal, the rest run
with no mask code. cp.async groups per block i, in commit order:
  prologue  Q, K_0, V_0, ..., K_{s-2}, V_{s-2}, K_{s-1}
  block i   V_{i+s-1} (into the slot V_{i-1} just freed), then K_{i+s} (into K_i's slot)
so "wait until at most 2s-2 groups are pending" is, every time, exactly "K_i landed" (before S)
and "V_i landed" (before PV); each wait is followed by a CTA barrier, which also proves every
warp is done with the slot about to be refilled. Blocks below 0 commit empty groups to keep
that count.
Epilogue: O /= l, O -> smem (Q's buffer) -> 16-byte coalesced stores of the valid rows; LSE.

Compile-time features: `softcap` (S <- tanh(S * scale / cap) before the mask; the host passes cap
as the softmax scale, fa3.hopper.softmax), `local` (sliding window, runtime left/right with
mask.UNBOUNDED for -1: only the blocks [n_min, n_max) of fa3.hopper.mask.kv_block_range are walked,
every one masked; loads stop at n_min instead of 0), `varlen` (cu_seqlens: q/k/v/out are one packed
batch; the grid covers max_seqlen_q, each CTA moves its base pointers to its sequence's first row
and CTAs past their sequence's end do nothing; FA2's scheme), `seqused_q/k` (valid lengths per
sequence: loads, masks and the causal diagonal use them; rows past seqused_q get O = 0 and
LSE = -inf). Every load and store is already predicated on a length, so the per-sequence lengths
only replace the tensors' (sm80_utils.seq_info).
"""

from types import SimpleNamespace
from typing import Optional

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync, warp

from fa3.ampere import sm80_utils as su
from fa3.hopper import mask as mask_mod
from fa3.hopper import softmax as sm

NUM_THREADS = 128
LOG2_E = 1.4426950408889634
LOOKAHEAD = 4  # ldmatrix of B in flight ahead of the MMAs (see sm80_utils.gemm)


class FlashFwdSm80:
    def __init__(self, cfg):
        self.cfg = cfg
        self.tile_m, self.tile_n, self.stages = cfg.tile_m, cfg.tile_n, cfg.stages
        self.d = cfg.d
        self.causal = cfg.causal
        self.local, self.softcap = cfg.local, cfg.softcap
        self.varlen, self.seqused_q, self.seqused_k = cfg.varlen, cfg.seqused_q, cfg.seqused_k
        assert not (self.causal and self.local), "causal with a window is local with right = 0"
        assert self.tile_m % (16 * 4) == 0 and self.tile_n % 16 == 0 and self.d % 32 == 0

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mO: cute.Tensor,
                 mLSE: cute.Tensor, softmax_scale: Float32, softcap_pre: Float32,
                 window_left: Int32, window_right: Int32, mCuSeqlensQ: Optional[cute.Tensor],
                 mCuSeqlensK: Optional[cute.Tensor], mSeqUsedQ: Optional[cute.Tensor],
                 mSeqUsedK: Optional[cute.Tensor], max_seqlen_q: Optional[Int32], stream):
        """Dense: q (b, sq, h, d), k/v (b, sk, h_kv, d), lse (b, h, sq). varlen: the same with
        b = 1 (packed rows), cu_seqlens_q/k (n + 1,), max_seqlen_q; seqused_q/k (n,) or None."""
        dtype = mQ.element_type
        self.dtype = dtype
        atom = su.smem_layout_atom(dtype, self.d)
        sQ_layout = cute.tile_to_shape(atom, (self.tile_m, self.d), (0, 1))
        sKV_layout = cute.tile_to_shape(atom, (self.tile_n, self.d, self.stages), (0, 1, 2))

        @cute.struct
        class SharedStorage:
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sKV_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sKV_layout)], 1024]

        # gmem <-> smem: 16 bytes per thread per copy, threads laid along the swizzle atom's row so
        # a warp covers whole 128/64-byte row segments (coalesced, conflict-free after swizzle)
        vec = 128 // dtype.width
        thr_per_row = atom.outer.shape[1] // vec
        thr_layout = cute.make_layout((NUM_THREADS // thr_per_row, thr_per_row),
                                      stride=(thr_per_row, 1))
        val_layout = cute.make_layout((1, vec))
        g2s = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL),
                                  dtype, num_bits_per_copy=128)
        gmem_copy_in = cute.make_tiled_copy_tv(g2s, thr_layout, val_layout)
        st = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dtype, num_bits_per_copy=128)
        gmem_copy_out = cute.make_tiled_copy_tv(st, thr_layout, val_layout)

        # 4 warps stacked along M; N/K tiles of 16 so one ldmatrix.x4 feeds two n8 MMAs of B
        tiled_mma = cute.make_tiled_mma(warp.MmaF16BF16Op(dtype, Float32, (16, 8, 16)),
                                        (NUM_THREADS // 32, 1, 1),
                                        permutation_mnk=(NUM_THREADS // 32 * 16, 16, 16))

        num_m_blocks = cute.ceil_div(mQ.shape[1], self.tile_m)
        num_batch = cute.size(mQ.shape[0])
        if const_expr(self.varlen):  # FA2: max_seqlen_q's tiles for every sequence
            num_m_blocks = (max_seqlen_q + (self.tile_m - 1)) // self.tile_m
            num_batch = cute.size(mCuSeqlensQ.shape[0]) - 1
        self.kernel(mQ, mK, mV, mO, mLSE, softmax_scale, softcap_pre, window_left, window_right,
                    mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK, sQ_layout, sKV_layout,
                    gmem_copy_in, gmem_copy_out, tiled_mma, SharedStorage).launch(
            grid=[num_m_blocks, cute.size(mQ.shape[2]), num_batch],
            block=[NUM_THREADS, 1, 1], smem=SharedStorage.size_in_bytes(), stream=stream)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mO: cute.Tensor,
               mLSE: cute.Tensor, softmax_scale: Float32, softcap_pre: Float32,
               window_left: Int32, window_right: Int32, mCuSeqlensQ: Optional[cute.Tensor],
               mCuSeqlensK: Optional[cute.Tensor], mSeqUsedQ: Optional[cute.Tensor],
               mSeqUsedK: Optional[cute.Tensor], sQ_layout: cute.ComposedLayout,
               sKV_layout: cute.ComposedLayout, gmem_copy_in: cute.TiledCopy,
               gmem_copy_out: cute.TiledCopy, tiled_mma: cute.TiledMma,
               SharedStorage: cutlass.Constexpr):
        bx, head, batch = cute.arch.block_idx()
        m_block = bx
        if const_expr(self.causal):  # the longest rows (most KV blocks) are scheduled first
            m_block = cute.arch.grid_dim()[0] - 1 - bx
        head_kv = head // (mQ.shape[2] // mK.shape[2])  # GQA/MQA
        offset_q, offset_k, seqlen_q, store_q, seqlen_k, _, bidx = su.seq_info(
            batch, mQ.shape[1], mK.shape[1], mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK)
        # O and LSE are sliced only in the epilogue: their addresses would stay live across the
        # main loop (d = 96/128 sit at the 255-register limit)
        rows = SimpleNamespace(
            q=su.seq_rows(mQ, bidx, head, offset_q), k=su.seq_rows(mK, bidx, head_kv, offset_k),
            v=su.seq_rows(mV, bidx, head_kv, offset_k), mO=mO, mLSE=mLSE, bidx=bidx, head=head,
            offset_q=offset_q)
        if const_expr(self.varlen):
            if m_block * self.tile_m < store_q:  # else this tile is past its sequence's end
                self.tile(rows, m_block, seqlen_q, store_q, seqlen_k, softmax_scale, softcap_pre,
                          window_left, window_right, sQ_layout, sKV_layout, gmem_copy_in,
                          gmem_copy_out, tiled_mma, SharedStorage)
        else:
            self.tile(rows, m_block, seqlen_q, store_q, seqlen_k, softmax_scale, softcap_pre,
                      window_left, window_right, sQ_layout, sKV_layout, gmem_copy_in,
                      gmem_copy_out, tiled_mma, SharedStorage)

    @cute.jit
    def tile(self, rows, m_block: Int32, seqlen_q: Int32, store_q: Int32, seqlen_k: Int32,
             softmax_scale: Float32, softcap_pre: Float32, window_left: Int32, window_right: Int32,
             sQ_layout: cute.ComposedLayout, sKV_layout: cute.ComposedLayout,
             gmem_copy_in: cute.TiledCopy, gmem_copy_out: cute.TiledCopy,
             tiled_mma: cute.TiledMma, SharedStorage: cutlass.Constexpr):
        """One Q tile of one (sequence, head). rows: (rows, d) views of the sequence's q, k, v, o
        and its lse row; seqlen_q/k the valid lengths, store_q the rows of o/lse it owns."""
        tidx, _, _ = cute.arch.thread_idx()
        tile_m, tile_n, d, stages = self.tile_m, self.tile_n, self.d, self.stages

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sQ = storage.sQ.get_tensor(sQ_layout)
        sK = storage.sK.get_tensor(sKV_layout)
        sV = storage.sV.get_tensor(sKV_layout)
        sVt = su.transpose_view(sV)  # (d, tile_n, stages): B operand of O += P V

        gQ = cute.local_tile(rows.q, (tile_m, d), (m_block, 0))
        gK = cute.local_tile(rows.k, (tile_n, d), (None, 0))
        gV = cute.local_tile(rows.v, (tile_n, d), (None, 0))
        thr_in = gmem_copy_in.get_slice(tidx)
        tQgQ, tQsQ = thr_in.partition_S(gQ), thr_in.partition_D(sQ)
        tKgK, tKsK = thr_in.partition_S(gK), thr_in.partition_D(sK)
        tVgV, tVsV = thr_in.partition_S(gV), thr_in.partition_D(sV)
        tQcQ = thr_in.partition_S(cute.make_identity_tensor((tile_m, d)))
        tKVcKV = thr_in.partition_S(cute.make_identity_tensor((tile_n, d)))

        thr_mma = tiled_mma.get_slice(tidx)
        tSrQ = thr_mma.make_fragment_A(thr_mma.partition_A(sQ))
        tSrK = thr_mma.make_fragment_B(thr_mma.partition_B(sK[None, None, 0]))
        tOrVt = thr_mma.make_fragment_B(thr_mma.partition_B(sVt[None, None, 0]))
        acc_O = cute.make_rmem_tensor(thr_mma.partition_shape_C((tile_m, d)), Float32)
        acc_O.fill(0.0)
        acc_O_mn = su.acc_to_mn(acc_O)

        ld = warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4)
        ld_t = warp.LdMatrix8x8x16bOp(transpose=True, num_matrices=4)
        copy_Q = cute.make_tiled_copy_A(cute.make_copy_atom(ld, self.dtype), tiled_mma).get_slice(tidx)
        copy_K = cute.make_tiled_copy_B(cute.make_copy_atom(ld, self.dtype), tiled_mma).get_slice(tidx)
        copy_V = cute.make_tiled_copy_B(cute.make_copy_atom(ld_t, self.dtype), tiled_mma).get_slice(tidx)

        n_rows = cute.size(acc_O_mn, mode=[0])
        row_max = cute.make_rmem_tensor((n_rows,), Float32)
        row_sum = cute.make_rmem_tensor((n_rows,), Float32)
        row_scale = cute.make_rmem_tensor((n_rows,), Float32)
        lse = cute.make_rmem_tensor((n_rows,), Float32)
        row_max.fill(-Float32.inf)
        row_sum.fill(0.0)

        # Masks compare thread 0's (compile-time) S coordinates against limits shifted by this
        # thread's offset, so no per-element coordinate stays live in registers across the loop.
        cS = cute.make_identity_tensor((tile_m, tile_n))
        tScS_mn = su.acc_to_mn(thr_mma.partition_C(cS))
        t0ScS_mn = su.acc_to_mn(tiled_mma.get_slice(0).partition_C(cS))
        ctx = SimpleNamespace(
            tiled_mma=tiled_mma, thr_mma=thr_mma, gmem_copy_in=gmem_copy_in,
            tKgK=tKgK, tKsK=tKsK, tVgV=tVgV, tVsV=tVsV, tKVcKV=tKVcKV,
            tSrQ=tSrQ, tSrK=tSrK, tOrVt=tOrVt, tSsQ=copy_Q.partition_S(sQ),
            tSsK=copy_K.partition_S(sK), tOsVt=copy_V.partition_S(sVt),
            copy_Q=copy_Q, copy_K=copy_K, copy_V=copy_V, acc_O=acc_O, acc_O_mn=acc_O_mn,
            t0ScS_mn=t0ScS_mn, seqlen_q_mask=seqlen_q - tScS_mn[0, 0][0],
            seqlen_k_mask=seqlen_k - tScS_mn[0, 0][1],
            row_max=row_max, row_sum=row_sum, row_scale=row_scale,
            scale_log2=softmax_scale * Float32(LOG2_E), seqlen_q=seqlen_q, seqlen_k=seqlen_k,
            m_block=m_block, softcap_pre=softcap_pre, window_left=window_left,
            window_right=window_right, n_min=Int32(0))

        n_max = mask_mod.n_block_max(seqlen_q, seqlen_k, m_block, tile_m, tile_n, self.causal)
        if const_expr(self.local):  # the window's blocks [n_min, n_max), every one masked
            n_min, n_max, _, _ = mask_mod.kv_block_range(seqlen_q, seqlen_k, m_block, tile_m, tile_n,
                                                         False, True, window_left, window_right)
            ctx.n_min = n_min
        if const_expr(self.seqused_q):  # a tile past seqused_q sees nothing (O = 0, LSE = -inf)
            if m_block * tile_m >= seqlen_q:
                n_max = ctx.n_min
        if n_max > ctx.n_min:  # else every row of the tile is fully masked: O = 0, LSE = -inf
            su.copy_rows(gmem_copy_in, tQgQ, tQsQ, tQcQ, seqlen_q - m_block * tile_m, True)
            cute.arch.cp_async_commit_group()
            for s in cutlass.range_constexpr(stages):
                if const_expr(s == 0):
                    self.load_kv(ctx, ctx.tKgK, ctx.tKsK, n_max - 1, 0, True)
                elif n_max - 1 - s >= ctx.n_min:
                    self.load_kv(ctx, ctx.tKgK, ctx.tKsK, n_max - 1 - s, s, False)
                cute.arch.cp_async_commit_group()
                if const_expr(s < stages - 1):
                    if const_expr(s == 0):
                        self.load_kv(ctx, ctx.tVgV, ctx.tVsV, n_max - 1, 0, True)
                    elif n_max - 1 - s >= ctx.n_min:
                        self.load_kv(ctx, ctx.tVgV, ctx.tVsV, n_max - 1 - s, s, False)
                    cute.arch.cp_async_commit_group()

            n_mask_min = n_max - 1
            if const_expr(self.causal):
                n_mask_min = cutlass.min(n_mask_min, mask_mod.n_block_min_causal_mask(
                    seqlen_q, seqlen_k, m_block, tile_m, tile_n))
            slot = Int32(0)
            if const_expr(self.local):
                n_mask_min = ctx.n_min
            slot = self.kv_block(ctx, n_max - 1, slot, True, True)
            if const_expr(self.causal or self.local):
                for i in cutlass.range(n_max - 1 - n_mask_min, unroll=1):
                    slot = self.kv_block(ctx, n_max - 2 - i, slot, False, True)
            for i in cutlass.range(n_mask_min - ctx.n_min, unroll=1):
                slot = self.kv_block(ctx, n_mask_min - 1 - i, slot, False, False)

        if const_expr(self.seqused_q):  # rows past seqused_q: fully masked (O = 0, LSE = -inf)
            for r in cutlass.range_constexpr(n_rows):
                if m_block * tile_m + tScS_mn[r, 0][0] >= seqlen_q:
                    row_max[r] = -Float32.inf
                    row_sum[r] = Float32(0.0)
        sm.finalize(row_max, row_sum, row_scale, lse, softmax_scale)
        sm.rescale_o(acc_O_mn, row_scale)
        self.epilogue(acc_O, lse, rows, sQ, gmem_copy_out, tiled_mma, tidx, m_block, store_q)

    @cute.jit
    def load_kv(self, ctx, tXgX: cute.Tensor, tXsX: cute.Tensor, n_block: Int32, slot: Int32,
                tail: cutlass.Constexpr[bool]):
        """cp.async KV block n_block into ring slot `slot`; `tail`: rows past seqlen_k are zeroed
        (V's must be: 0 * garbage in P V could be NaN)."""
        su.copy_rows(ctx.gmem_copy_in, tXgX[None, None, None, n_block], tXsX[None, None, None, slot],
                     ctx.tKVcKV, ctx.seqlen_k - n_block * self.tile_n, tail)

    @cute.jit
    def refill_k_single(self, ctx, n_block: Int32):
        cute.arch.cp_async_wait_group(0)  # V_i landed
        cute.arch.barrier()  # ... for every thread, and every warp is done reading K_i
        if n_block - 1 >= ctx.n_min:
            self.load_kv(ctx, ctx.tKgK, ctx.tKsK, n_block - 1, 0, False)
        cute.arch.cp_async_commit_group()

    @cute.jit
    def kv_block(self, ctx, n_block: Int32, slot: Int32, first: cutlass.Constexpr[bool],
                 masked: cutlass.Constexpr[bool]) -> Int32:
        """One KV block: S = Q K^T, mask, online softmax, O = O * scale + P V; refills the rings.
        Returns the next ring slot."""
        s = self.stages
        pending = 2 * s - 2
        prev = slot
        nxt = slot
        if const_expr(s > 1):
            prev = slot - 1 if slot > 0 else Int32(s - 1)
            nxt = slot + 1 if slot < s - 1 else Int32(0)

        cute.arch.cp_async_wait_group(pending)  # K_i (and Q) landed
        cute.arch.barrier()  # ... for every thread; and everyone is done with V_{i-1}'s slot
        if const_expr(s == 1):
            self.load_kv(ctx, ctx.tVgV, ctx.tVsV, n_block, 0, first)
        elif n_block - (s - 1) >= ctx.n_min:
            self.load_kv(ctx, ctx.tVgV, ctx.tVsV, n_block - (s - 1), prev, False)
        cute.arch.cp_async_commit_group()

        acc_S = cute.make_rmem_tensor(ctx.thr_mma.partition_shape_C((self.tile_m, self.tile_n)),
                                      Float32)
        acc_S.fill(0.0)
        su.gemm(ctx.tiled_mma, acc_S, ctx.tSrQ, ctx.tSrK, ctx.tSsQ, ctx.tSsK[None, None, None, slot],
                ctx.copy_Q, ctx.copy_K, False, LOOKAHEAD)

        # Single buffer: refill K as soon as every warp is done with it, under the softmax; in masked
        # blocks only after the softmax (mask + softmax + the refill's addresses together spill).
        if const_expr(s == 1 and not masked):
            self.refill_k_single(ctx, n_block)

        acc_S_mn = su.acc_to_mn(acc_S)
        if const_expr(self.softcap):  # before the mask: tanh(-inf) would be -1
            sm.apply_softcap(acc_S_mn, ctx.softcap_pre)
        if const_expr(masked):
            mask_mod.apply_mask(acc_S_mn, ctx.t0ScS_mn, ctx.seqlen_q_mask, ctx.seqlen_k_mask,
                                ctx.m_block, n_block, self.tile_m, self.tile_n, self.causal,
                                self.local, ctx.window_left, ctx.window_right)
        sm.online_softmax(acc_S_mn, ctx.row_max, ctx.row_sum, ctx.row_scale, ctx.scale_log2)
        if const_expr(not first):  # O is still 0 before the first block
            sm.rescale_o(ctx.acc_O_mn, ctx.row_scale)
        rP = cute.make_rmem_tensor_like(acc_S, self.dtype)
        rP.store(acc_S.load().to(self.dtype))

        if const_expr(s == 1 and masked):
            self.refill_k_single(ctx, n_block)
        if const_expr(s > 1):  # as late as possible: V_i had the whole S GEMM + softmax to land
            cute.arch.cp_async_wait_group(pending)
            cute.arch.barrier()  # ... and every warp is done reading K_i's slot
            if n_block - s >= ctx.n_min:
                self.load_kv(ctx, ctx.tKgK, ctx.tKsK, n_block - s, slot, False)
            cute.arch.cp_async_commit_group()

        su.gemm(ctx.tiled_mma, ctx.acc_O, su.acc_to_frag_a(rP), ctx.tOrVt, None,
                ctx.tOsVt[None, None, None, slot], None, ctx.copy_V, True, LOOKAHEAD)
        return nxt

    @cute.jit
    def epilogue(self, acc_O: cute.Tensor, lse: cute.Tensor, rows, sQ: cute.Tensor,
                 gmem_copy_out: cute.TiledCopy, tiled_mma: cute.TiledMma, tidx: Int32,
                 m_block: Int32, store_q: Int32):
        """O and LSE of the tile's rows below store_q (rows: see kernel)."""
        tile_m, d = self.tile_m, self.d
        rO = cute.make_rmem_tensor_like(acc_O, self.dtype)
        rO.store(acc_O.load().to(self.dtype))
        sO = sQ  # Q's buffer, same (tile_m, d) swizzled layout
        cute.arch.barrier()  # every warp is done reading sQ (its last S GEMM)
        st_pair = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype, num_bits_per_copy=32)
        thr_s = cute.make_tiled_copy_C(st_pair, tiled_mma).get_slice(tidx)
        cute.copy(st_pair, thr_s.retile(rO), thr_s.partition_D(sO))
        cute.arch.barrier()

        # rows back out of smem 16 bytes per thread, so the global stores are full 16-byte vectors
        mO = su.seq_rows(rows.mO, rows.bidx, rows.head, rows.offset_q)
        gO = cute.local_tile(mO, (tile_m, d), (m_block, 0))
        thr_out = gmem_copy_out.get_slice(tidx)
        tOsO = thr_out.partition_S(sO)
        tOgO = thr_out.partition_D(gO)
        tOcO = thr_out.partition_D(cute.make_identity_tensor((tile_m, d)))
        tOrO = cute.make_rmem_tensor_like(tOsO, self.dtype)
        cute.autovec_copy(tOsO, tOrO)
        row_limit = store_q - m_block * tile_m
        for m in cutlass.range_constexpr(cute.size(tOrO, mode=[1])):
            if tOcO[0, m, 0][0] < row_limit:
                cute.copy(gmem_copy_out, tOrO[None, m, None], tOgO[None, m, None])

        # LSE: the thread holding column 0 of each of its rows writes it (valid rows only)
        tOcO_mn = su.acc_to_mn(tiled_mma.get_slice(tidx).partition_C(
            cute.make_identity_tensor((tile_m, d))))
        mLSE = rows.mLSE[rows.bidx, rows.head, None]
        if const_expr(self.varlen):
            mLSE = cute.domain_offset((rows.offset_q,), mLSE)
        if tOcO_mn[0, 0][1] == 0:
            for r in cutlass.range_constexpr(cute.size(lse)):
                row = tOcO_mn[r, 0][0]
                if row < row_limit:
                    mLSE[m_block * tile_m + row] = lse[r]
