"""The sm80 attention backward main kernel (FA2 algorithm), traced with the CuTe DSL.

One CTA of 8 warps owns tile_n keys of one (batch, q head): K and V are loaded once into smem, then
the Q tiles that can see them are visited: first those that need the mask, in order, then the
unmasked run [m_mask_end, m_block_max), with `stagger` from an offset rot = n_block % its length,
wrapping (fa3.hopper.mask.walk_block), else in order. Non-causal, every CTA of a head would otherwise start at
tile 0 at once and walk in lockstep, all adding into the same dQ tile's lines with atomics at the
same moment; rotated, the consecutive n_blocks that run together touch consecutive, different
tiles (causal CTAs start at their own diagonal anyway: default_config leaves them in order).
Per Q tile, with
lse2 = LSE * log2(e) and D = rowsum(dO * O) from the preprocess kernel:
    S  = Q K^T                  P  = exp2(S * scale * log2 e - lse2)   (masked scores -> P = 0)
    dP = dO V^T                 dS = P * (dP - D)
    dV += P^T dO                dK += dS^T Q                          (registers, fp32)
    dQ  = scale * dS K          -> fp32 atomics into dq_acc (one Q tile, so other CTAs add theirs)
A second kernel launched right after (dq_kernel, one CTA per Q tile) turns dq_acc into dQ.
Every GEMM is mma.sync m16n8k16 fed by ldmatrix (.trans for the transposed operands P^T, dS^T,
dO^T, Q^T, K^T, read as views of the same smem tiles). P and dS go through smem (16-bit) because
the dK/dV GEMMs need them transposed and split over warps differently from S/dP.

Q/dO ring (`stages` deep, one cp.async group per Q tile, K/V in the group before them), indexed by
the visit position i (slot i % stages), never by the tile number, so any visit order works:
  prologue  K+V, then Q/dO of the tiles of positions 0 .. stages - 2
  step i    wait until the tile of step i landed (<= stages - 2 groups pending) + CTA barrier,
            which also proves every warp is done with step i-1 (its ring slot, sP, sdS); then load
            the tile of step i + stages - 1 into the slot step i-1 freed. With 1 stage the load of
            step i is issued after that barrier and waited for at once (no overlap; only where 2
            do not fit).
Rows past seqlen_q read as zeros with lse2 = +inf, so their P, dS, and dQ rows are 0; columns past
seqlen_k and above the causal diagonal are masked to -inf before the exp2 (fa3.hopper.mask).
Epilogue: dK * scale, dV -> dtype -> smem (K/V's buffers) -> 16-byte coalesced stores.

Compile-time features, as in the sm80 forward: `softcap` (t = tanh(S * scale / cap) replaces S,
P = exp2(t * cap * log2 e - lse2), and dS gains the factor 1 - t^2), `local` (sliding window: only
the Q tiles of rows that see a key of this tile, every one masked), `varlen` (cu_seqlens: one
packed batch; grids over max_seqlen_k / max_seqlen_q, CTAs past their sequence's end do nothing;
each sequence's dQ partials start at row cu_seqlens_q[i] + i * tile_m of dq_acc, FA2's padding, so
its Q tiles never share a chunk with the next sequence's), `seqused_q/k` (valid lengths: loads,
masks, lse2/D reads use them; rows and keys past them get zero gradients).
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

NUM_THREADS = 256
LOG2_E = 1.4426950408889634
LOOKAHEAD = 4  # ldmatrix of B in flight ahead of the MMAs (see sm80_utils.gemm)


class FlashBwdSm80:
    def __init__(self, cfg):
        self.cfg = cfg
        self.tile_m, self.tile_n, self.d, self.stages = cfg.tile_m, cfg.tile_n, cfg.d, cfg.stages
        self.causal = cfg.causal
        self.local, self.softcap = cfg.local, cfg.softcap
        self.varlen = cfg.varlen
        assert not (self.causal and self.local), "causal with a window is local with right = 0"

    def _mma(self, dtype, warps_m: int):
        w = NUM_THREADS // 32
        return cute.make_tiled_mma(warp.MmaF16BF16Op(dtype, Float32, (16, 8, 16)),
                                   (warps_m, w // warps_m, 1),
                                   permutation_mnk=(warps_m * 16, w // warps_m * 16, 16))

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mdO: cute.Tensor,
                 mLSE2: cute.Tensor, mD: cute.Tensor, mdQacc: cute.Tensor, mdQ: cute.Tensor,
                 mdK: cute.Tensor, mdV: cute.Tensor, softmax_scale: Float32, exp_scale: Float32,
                 softcap_pre: Float32, window_left: Int32, window_right: Int32,
                 mCuSeqlensQ: Optional[cute.Tensor], mCuSeqlensK: Optional[cute.Tensor],
                 mSeqUsedQ: Optional[cute.Tensor], mSeqUsedK: Optional[cute.Tensor],
                 max_seqlen_q: Optional[Int32], max_seqlen_k: Optional[Int32], stream):
        """Dense: (b, s, h, d) tensors, (b, h, sq) lse2/D, dq_acc (b, h, m_blocks * tile_m * d).
        varlen: b = 1 (packed rows), cu_seqlens_q/k (n + 1,), max_seqlen_q/k, dq_acc
        (1, h, (total_q + n * tile_m) * d); seqused_q/k (n,) or None."""
        dtype = mQ.element_type
        self.dtype = dtype
        tile_m, tile_n, d, stages = self.tile_m, self.tile_n, self.d, self.stages
        atom = su.smem_layout_atom(dtype, d)
        sQ_layout = cute.tile_to_shape(atom, (tile_m, d, stages), (0, 1, 2))
        sK_layout = cute.tile_to_shape(atom, (tile_n, d), (0, 1))
        sP_layout = cute.tile_to_shape(su.smem_layout_atom(dtype, tile_n), (tile_m, tile_n), (0, 1))

        @cute.struct
        class SharedStorage:
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sdO: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sK_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sP_layout)], 1024]
            sdS: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sP_layout)], 1024]

        # gmem <-> smem: 16 bytes per thread, threads along the swizzle atom's row (coalesced)
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

        mma_sdp = self._mma(dtype, self.cfg.warps_m_sdp)
        mma_dkv = self._mma(dtype, self.cfg.warps_n_dkv)
        mma_dq = self._mma(dtype, self.cfg.warps_m_dq)

        seq = (mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK)
        n_blocks, m_blocks = cute.ceil_div(mK.shape[1], tile_n), cute.ceil_div(mQ.shape[1], tile_m)
        num_batch = cute.size(mQ.shape[0])
        if const_expr(self.varlen):  # FA2: every sequence gets the longest one's tiles
            n_blocks = (max_seqlen_k + (tile_n - 1)) // tile_n
            m_blocks = (max_seqlen_q + (tile_m - 1)) // tile_m
            num_batch = cute.size(mCuSeqlensQ.shape[0]) - 1
        self.kernel(mQ, mK, mV, mdO, mLSE2, mD, mdQacc, mdK, mdV, softmax_scale, exp_scale,
                    softcap_pre, window_left, window_right, *seq, sQ_layout,
                    sK_layout, sP_layout, gmem_copy_in, gmem_copy_out, mma_sdp, mma_dkv, mma_dq,
                    SharedStorage).launch(
            grid=[n_blocks, cute.size(mQ.shape[2]), num_batch],
            block=[NUM_THREADS, 1, 1], smem=SharedStorage.size_in_bytes(), stream=stream)

        sdQ_layout = cute.tile_to_shape(atom, (tile_m, d), (0, 1))

        @cute.struct
        class DqStorage:
            sdQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sdQ_layout)], 1024]

        self.dq_kernel(mdQacc, mdQ, mK.shape[1], *seq, sdQ_layout, gmem_copy_out, mma_dq,
                       DqStorage).launch(
            grid=[m_blocks, cute.size(mQ.shape[2]), num_batch],
            block=[NUM_THREADS, 1, 1], smem=DqStorage.size_in_bytes(), stream=stream)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mdO: cute.Tensor,
               mLSE2: cute.Tensor, mD: cute.Tensor, mdQacc: cute.Tensor, mdK: cute.Tensor,
               mdV: cute.Tensor, softmax_scale: Float32, exp_scale: Float32, softcap_pre: Float32,
               window_left: Int32, window_right: Int32, mCuSeqlensQ: Optional[cute.Tensor],
               mCuSeqlensK: Optional[cute.Tensor], mSeqUsedQ: Optional[cute.Tensor],
               mSeqUsedK: Optional[cute.Tensor], sQ_layout: cute.ComposedLayout,
               sK_layout: cute.ComposedLayout, sP_layout: cute.ComposedLayout,
               gmem_copy_in: cute.TiledCopy, gmem_copy_out: cute.TiledCopy,
               mma_sdp: cute.TiledMma, mma_dkv: cute.TiledMma, mma_dq: cute.TiledMma,
               SharedStorage: cutlass.Constexpr):
        n_block, head, batch = cute.arch.block_idx()
        offset_q, offset_k, seqlen_q, _, seqlen_k, store_k, bidx = su.seq_info(
            batch, mQ.shape[1], mK.shape[1], mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK)
        seq = SimpleNamespace(offset_q=offset_q, offset_k=offset_k, seqlen_q=seqlen_q,
                              seqlen_k=seqlen_k, store_k=store_k, bidx=bidx, head=head,
                              acc_row0=self.acc_row0(batch, offset_q))
        args = (mQ, mK, mV, mdO, mLSE2, mD, mdQacc, mdK, mdV, softmax_scale, exp_scale, softcap_pre,
                window_left, window_right, sQ_layout, sK_layout, sP_layout, gmem_copy_in,
                gmem_copy_out, mma_sdp, mma_dkv, mma_dq, SharedStorage)
        if const_expr(self.varlen):
            if n_block * self.tile_n < store_k:  # else this tile is past its sequence's end
                self.kv_tile(seq, n_block, *args)
        else:
            self.kv_tile(seq, n_block, *args)

    def acc_row0(self, batch, offset_q):
        """First dq_acc row of a sequence's Q tiles: FA2's cu_seqlens_q[i] + i * tile_m (the padding
        keeps the last, partial tile of one sequence off the next one's first); 0 when dense."""
        return offset_q + batch * self.tile_m if const_expr(self.varlen) else 0

    @cute.jit
    def kv_tile(self, seq, n_block: Int32, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
                mdO: cute.Tensor, mLSE2: cute.Tensor, mD: cute.Tensor, mdQacc: cute.Tensor,
                mdK: cute.Tensor, mdV: cute.Tensor, softmax_scale: Float32, exp_scale: Float32,
                softcap_pre: Float32, window_left: Int32, window_right: Int32,
                sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout,
                sP_layout: cute.ComposedLayout, gmem_copy_in: cute.TiledCopy,
                gmem_copy_out: cute.TiledCopy, mma_sdp: cute.TiledMma, mma_dkv: cute.TiledMma,
                mma_dq: cute.TiledMma, SharedStorage: cutlass.Constexpr):
        """One KV tile of one (sequence, q head); seq: its offsets and lengths (kernel)."""
        tidx, _, _ = cute.arch.thread_idx()
        seqlen_q, seqlen_k, head = seq.seqlen_q, seq.seqlen_k, seq.head
        head_kv = head // (mQ.shape[2] // mK.shape[2])  # GQA/MQA
        tile_m, tile_n, d = self.tile_m, self.tile_n, self.d

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sQ = storage.sQ.get_tensor(sQ_layout)
        sdO = storage.sdO.get_tensor(sQ_layout)
        sK = storage.sK.get_tensor(sK_layout)
        sV = storage.sV.get_tensor(sK_layout)
        sP = storage.sP.get_tensor(sP_layout)
        sdS = storage.sdS.get_tensor(sP_layout)
        sQt, sdOt, sKt = su.transpose_view(sQ), su.transpose_view(sdO), su.transpose_view(sK)
        sPt, sdSt = su.transpose_view(sP), su.transpose_view(sdS)

        # gmem -> smem partitions
        thr_in = gmem_copy_in.get_slice(tidx)
        gQ = cute.local_tile(su.seq_rows(mQ, seq.bidx, head, seq.offset_q), (tile_m, d), (None, 0))
        gdO = cute.local_tile(su.seq_rows(mdO, seq.bidx, head, seq.offset_q), (tile_m, d), (None, 0))
        gK = cute.local_tile(su.seq_rows(mK, seq.bidx, head_kv, seq.offset_k), (tile_n, d),
                             (n_block, 0))
        gV = cute.local_tile(su.seq_rows(mV, seq.bidx, head_kv, seq.offset_k), (tile_n, d),
                             (n_block, 0))
        tQcQ = thr_in.partition_S(cute.make_identity_tensor((tile_m, d)))
        tKcK = thr_in.partition_S(cute.make_identity_tensor((tile_n, d)))

        # MMA partitions: fragments, and ldmatrix copies (plain for K-major operands, .trans for
        # the transposed views)
        ld = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), self.dtype)
        ld_t = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=True, num_matrices=4), self.dtype)
        thr_sdp = mma_sdp.get_slice(tidx)
        thr_dkv = mma_dkv.get_slice(tidx)
        thr_dq = mma_dq.get_slice(tidx)
        cpy_a_sdp = cute.make_tiled_copy_A(ld, mma_sdp).get_slice(tidx)
        cpy_b_sdp = cute.make_tiled_copy_B(ld, mma_sdp).get_slice(tidx)
        cpy_a_dkv = cute.make_tiled_copy_A(ld_t, mma_dkv).get_slice(tidx)
        cpy_b_dkv = cute.make_tiled_copy_B(ld_t, mma_dkv).get_slice(tidx)
        cpy_a_dq = cute.make_tiled_copy_A(ld, mma_dq).get_slice(tidx)
        cpy_b_dq = cute.make_tiled_copy_B(ld_t, mma_dq).get_slice(tidx)

        acc_dK = cute.make_rmem_tensor(thr_dkv.partition_shape_C((tile_n, d)), Float32)
        acc_dV = cute.make_rmem_tensor(thr_dkv.partition_shape_C((tile_n, d)), Float32)
        acc_dK.fill(0.0)
        acc_dV.fill(0.0)

        # S-tile coordinates: this thread's rows (for lse2 / D) and thread 0's (for the masks)
        cS = cute.make_identity_tensor((tile_m, tile_n))
        tScS_mn = su.acc_to_mn(thr_sdp.partition_C(cS))
        t0ScS_mn = su.acc_to_mn(mma_sdp.get_slice(0).partition_C(cS))

        st = SimpleNamespace(
            gmem_copy_in=gmem_copy_in, tQgQ=thr_in.partition_S(gQ),
            tQsQ=thr_in.partition_D(sQ), tdOgdO=thr_in.partition_S(gdO),
            tdOsdO=thr_in.partition_D(sdO), tQcQ=tQcQ,
            mma_sdp=mma_sdp, mma_dkv=mma_dkv, mma_dq=mma_dq, thr_sdp=thr_sdp, thr_dq=thr_dq,
            tSrQ=thr_sdp.make_fragment_A(thr_sdp.partition_A(sQ[None, None, 0])),
            tSrK=thr_sdp.make_fragment_B(thr_sdp.partition_B(sK)),
            tdPrdO=thr_sdp.make_fragment_A(thr_sdp.partition_A(sdO[None, None, 0])),
            tdPrV=thr_sdp.make_fragment_B(thr_sdp.partition_B(sV)),
            tdVrPt=thr_dkv.make_fragment_A(thr_dkv.partition_A(sPt)),
            tdVrdOt=thr_dkv.make_fragment_B(thr_dkv.partition_B(sdOt[None, None, 0])),
            tdKrdSt=thr_dkv.make_fragment_A(thr_dkv.partition_A(sdSt)),
            tdKrQt=thr_dkv.make_fragment_B(thr_dkv.partition_B(sQt[None, None, 0])),
            tdQrdS=thr_dq.make_fragment_A(thr_dq.partition_A(sdS)),
            tdQrKt=thr_dq.make_fragment_B(thr_dq.partition_B(sKt)),
            tSsQ=cpy_a_sdp.partition_S(sQ), tSsK=cpy_b_sdp.partition_S(sK),
            tdPsdO=cpy_a_sdp.partition_S(sdO), tdPsV=cpy_b_sdp.partition_S(sV),
            tdVsPt=cpy_a_dkv.partition_S(sPt), tdVsdOt=cpy_b_dkv.partition_S(sdOt),
            tdKsdSt=cpy_a_dkv.partition_S(sdSt), tdKsQt=cpy_b_dkv.partition_S(sQt),
            tdQsdS=cpy_a_dq.partition_S(sdS), tdQsKt=cpy_b_dq.partition_S(sKt),
            cpy_a_sdp=cpy_a_sdp, cpy_b_sdp=cpy_b_sdp, cpy_a_dkv=cpy_a_dkv, cpy_b_dkv=cpy_b_dkv,
            cpy_a_dq=cpy_a_dq, cpy_b_dq=cpy_b_dq, sP=sP, sdS=sdS,
            acc_dK=acc_dK, acc_dV=acc_dV, tScS_mn=tScS_mn, t0ScS_mn=t0ScS_mn,
            seqlen_q_mask=seqlen_q - tScS_mn[0, 0][0], seqlen_k_mask=seqlen_k - tScS_mn[0, 0][1],
            seqlen_q=seqlen_q, seqlen_k=seqlen_k, n_block=n_block, seq=seq,
            mLSE2=mLSE2, mD=mD, mdQacc=mdQacc, softmax_scale=softmax_scale,
            scale_log2=exp_scale * Float32(LOG2_E), softcap_pre=softcap_pre,
            window_left=window_left, window_right=window_right)

        # the Q tiles that see this key tile, and how many of them need the mask
        m_block_max = (seqlen_q + tile_m - 1) // tile_m
        m_block_min = Int32(0)
        m_mask_end = Int32(0)
        if const_expr(self.causal):
            # key n_block * tile_n is visible to row q iff q >= n_block * tile_n - (sk - sq)
            m_block_min = cutlass.max(n_block * tile_n - seqlen_k + seqlen_q, 0) // tile_m
            # tile m is fully visible iff its first row sees the last key of this tile
            first_full = cutlass.max((n_block + 1) * tile_n - 1 - seqlen_k + seqlen_q, 0)
            m_mask_end = (first_full + tile_m - 1) // tile_m
        if const_expr(self.local):
            # rows q that see a key of this tile: n*tn - diag - right <= q <= (n+1)*tn-1 - diag + left
            diag = seqlen_k - seqlen_q
            m_block_min = cutlass.max(n_block * tile_n - diag - window_right, 0) // tile_m
            last_row = (n_block + 1) * tile_n - 1 - diag + window_left
            m_block_max = cutlass.min(m_block_max, (cutlass.max(last_row, -1) + tile_m) // tile_m)
            m_mask_end = m_block_max  # every tile masked (the window path is not tuned)
        if (n_block + 1) * tile_n > seqlen_k:  # the seqlen_k tail: every tile masks columns
            m_mask_end = m_block_max
        if const_expr(self.varlen or self.cfg.seqused_k):
            if n_block * tile_n >= seqlen_k:  # keys past seqused_k only: zero dK/dV, no work
                m_block_max = m_block_min
        m_mask_end = cutlass.max(cutlass.min(m_mask_end, m_block_max), m_block_min)
        st.m_mask_end, st.rot = m_mask_end, None
        if const_expr(self.cfg.stagger):
            # consecutive n_blocks (the CTAs that run together) start at consecutive unmasked tiles
            st.rot = n_block % cutlass.max(m_block_max - m_mask_end, 1)

        # the loops run over positions pos = m_block_min + i of the visit order (q_order)
        if m_block_min < m_block_max:
            # prologue: K and V (rows past seqlen_k zeroed), then the first Q/dO tiles
            kv_limit = seqlen_k - n_block * tile_n
            su.copy_rows(gmem_copy_in, thr_in.partition_S(gK), thr_in.partition_D(sK), tKcK,
                         kv_limit, True)
            su.copy_rows(gmem_copy_in, thr_in.partition_S(gV), thr_in.partition_D(sV), tKcK,
                         kv_limit, True)
            cute.arch.cp_async_commit_group()
            for s in cutlass.range_constexpr(self.stages - 1):
                if m_block_min + s < m_block_max:
                    self.load_q_do(st, self.q_order(st, m_block_min + s, m_block_max), s)
                cute.arch.cp_async_commit_group()
            for pos in cutlass.range(m_block_min, m_mask_end, unroll=1):
                self.m_tile(st, pos, m_block_min, m_block_max, True)
            for pos in cutlass.range(m_mask_end, m_block_max, unroll=1):
                self.m_tile(st, pos, m_block_min, m_block_max, False)

        self.epilogue(acc_dK, acc_dV, mdK, mdV, sK, sV, gmem_copy_out, mma_dkv, tidx, n_block,
                      seq, softmax_scale)

    def q_order(self, st, pos, m_block_max):
        """The Q tile of position pos (mask.walk_block; pos itself when not staggered)."""
        if const_expr(self.cfg.stagger):
            return mask_mod.walk_block(pos, st.m_mask_end, m_block_max, st.rot)
        return pos

    @cute.jit
    def load_q_do(self, st, m_block: Int32, slot: Int32):
        limit = st.seqlen_q - m_block * self.tile_m
        su.copy_rows(st.gmem_copy_in, st.tQgQ[None, None, None, m_block],
                     st.tQsQ[None, None, None, slot], st.tQcQ, limit, True)
        su.copy_rows(st.gmem_copy_in, st.tdOgdO[None, None, None, m_block],
                     st.tdOsdO[None, None, None, slot], st.tQcQ, limit, True)

    @cute.jit
    def m_tile(self, st, pos: Int32, m_block_min: Int32, m_block_max: Int32,
               masked: cutlass.Constexpr[bool]):
        """One Q tile, the one of position pos (step pos - m_block_min): S, P, dP, dS, then dV,
        dK += ..., dQ atomics."""
        stages = self.stages
        # the masked run is visited in order: only unmasked positions need the mapping
        m_block = pos
        if const_expr(not masked):
            m_block = self.q_order(st, pos, m_block_max)
        slot = Int32(0)
        if const_expr(stages > 1):
            slot = (pos - m_block_min) % stages
        if const_expr(stages == 1):
            cute.arch.barrier()  # every warp is done with the previous tile's smem
            self.load_q_do(st, m_block, 0)
            cute.arch.cp_async_commit_group()
            cute.arch.cp_async_wait_group(0)
            cute.arch.barrier()
        else:
            cute.arch.cp_async_wait_group(stages - 2)  # this step's tile (and K/V) landed
            cute.arch.barrier()  # ... for every thread; every warp is done with the previous step
            nxt = pos + stages - 1
            if nxt < m_block_max:
                self.load_q_do(st, self.q_order(st, nxt, m_block_max), (nxt - m_block_min) % stages)
            cute.arch.cp_async_commit_group()

        # this thread's rows of lse2 / D (rows past seqlen_q: P = 0 via lse2 = +inf)
        tScS_mn = st.tScS_mn
        n_rows = cute.size(tScS_mn, mode=[0])
        lse2 = cute.make_rmem_tensor((n_rows,), Float32)
        dpsum = cute.make_rmem_tensor((n_rows,), Float32)
        for r in cutlass.range_constexpr(n_rows):
            row = m_block * self.tile_m + tScS_mn[r, 0][0]
            lse2[r] = Float32.inf
            dpsum[r] = Float32(0.0)
            if row < st.seqlen_q:
                lse2[r] = st.mLSE2[st.seq.bidx, st.seq.head, st.seq.offset_q + row]
                dpsum[r] = st.mD[st.seq.bidx, st.seq.head, st.seq.offset_q + row]

        thr_sdp = st.thr_sdp
        acc_S = cute.make_rmem_tensor(thr_sdp.partition_shape_C((self.tile_m, self.tile_n)), Float32)
        acc_S.fill(0.0)
        su.gemm(st.mma_sdp, acc_S, st.tSrQ, st.tSrK, st.tSsQ[None, None, None, slot],
                st.tSsK, st.cpy_a_sdp, st.cpy_b_sdp, False, LOOKAHEAD)
        acc_dP = cute.make_rmem_tensor(thr_sdp.partition_shape_C((self.tile_m, self.tile_n)), Float32)
        acc_dP.fill(0.0)
        su.gemm(st.mma_sdp, acc_dP, st.tdPrdO, st.tdPrV, st.tdPsdO[None, None, None, slot],
                st.tdPsV, st.cpy_a_sdp, st.cpy_b_sdp, False, LOOKAHEAD)

        S = su.acc_to_mn(acc_S)
        dP = su.acc_to_mn(acc_dP)
        if const_expr(self.softcap):  # t = tanh(S * scale / cap), before the mask
            sm.apply_softcap(S, st.softcap_pre)
        if const_expr(masked):
            mask_mod.apply_mask(S, st.t0ScS_mn, st.seqlen_q_mask, st.seqlen_k_mask,
                                m_block, st.n_block, self.tile_m, self.tile_n, self.causal,
                                self.local, st.window_left, st.window_right)
        c = st.scale_log2
        for r in cutlass.range_constexpr(n_rows):
            for j in cutlass.range_constexpr(cute.size(S, mode=[1])):
                p = cute.arch.exp2(S[r, j] * c - lse2[r])  # FFMA + EX2
                ds = p * (dP[r, j] - dpsum[r])
                if const_expr(self.softcap):  # d(cap * t)/d(S * scale) = 1 - t^2 (t = -inf: p = 0)
                    ds = ds * (Float32(1.0) - S[r, j] * S[r, j]) if p != Float32(0.0) else Float32(0.0)
                S[r, j] = p
                dP[r, j] = ds
        rP = cute.make_rmem_tensor_like(acc_S, self.dtype)
        rP.store(acc_S.load().to(self.dtype))
        rdS = cute.make_rmem_tensor_like(acc_dP, self.dtype)
        rdS.store(acc_dP.load().to(self.dtype))
        st_pair = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype, num_bits_per_copy=32)
        r2s = cute.make_tiled_copy_C(st_pair, st.mma_sdp).get_slice(cute.arch.thread_idx()[0])
        cute.copy(st_pair, r2s.retile(rP), r2s.partition_D(st.sP))
        cute.copy(st_pair, r2s.retile(rdS), r2s.partition_D(st.sdS))
        cute.arch.barrier()  # P and dS visible to every warp

        su.gemm(st.mma_dkv, st.acc_dV, st.tdVrPt, st.tdVrdOt, st.tdVsPt,
                st.tdVsdOt[None, None, None, slot], st.cpy_a_dkv, st.cpy_b_dkv, False,
                LOOKAHEAD)
        # FA2's order: dQ (and its atomics, which drain under the dK GEMM) before dK
        if const_expr(self.cfg.dq_first):
            self.dq_gemm_atomics(st, m_block)
        su.gemm(st.mma_dkv, st.acc_dK, st.tdKrdSt, st.tdKrQt, st.tdKsdSt,
                st.tdKsQt[None, None, None, slot], st.cpy_a_dkv, st.cpy_b_dkv, False,
                LOOKAHEAD)
        if const_expr(not self.cfg.dq_first):
            self.dq_gemm_atomics(st, m_block)

    @cute.jit
    def dq_gemm_atomics(self, st, m_block: Int32):
        acc_dQ = cute.make_rmem_tensor(st.thr_dq.partition_shape_C((self.tile_m, self.d)), Float32)
        acc_dQ.fill(0.0)
        su.gemm(st.mma_dq, acc_dQ, st.tdQrdS, st.tdQrKt, st.tdQsdS, st.tdQsKt,
                st.cpy_a_dq, st.cpy_b_dq, False, LOOKAHEAD)
        tdQgdQ = self.dq_acc_view(st.mdQacc, acc_dQ, m_block, st.seq.head, st.seq.bidx,
                                  st.seq.acc_row0)
        scale = st.softmax_scale
        vec = self.cfg.dq_vec
        for i in cutlass.range_constexpr(0, cute.size(acc_dQ) if self.cfg.dq_atomics else 0, vec):
            ptr = (tdQgdQ.iterator + cute.crd2idx(i, tdQgdQ.layout)).llvm_ptr
            if const_expr(vec == 1):
                cute.arch.atomic_add(ptr, acc_dQ[i] * scale)
            else:  # red.global.add.v4.f32 (sm_90): a quarter of the atomic instructions
                v = cute.make_rmem_tensor((vec,), Float32)
                for j in cutlass.range_constexpr(vec):
                    v[j] = acc_dQ[i + j] * scale
                cute.arch.atomic_add(ptr, v.load())

    @cute.jit
    def dq_acc_view(self, mdQacc: cute.Tensor, acc_dQ: cute.Tensor, m_block: Int32, head: Int32,
                    bidx: Int32, acc_row0) -> cute.Tensor:
        """This thread's slots of one Q tile's dQ partials: with v = dq_vec, value i of thread t at
        (i // v) * threads * v + t * v + i % v, so each warp-wide atomic covers 32 * v consecutive
        floats (v = 1: one 128-byte line, FA2's layout) instead of 8 rows of the MMA layout;
        dq_kernel reads it back with the same mapping. acc_row0: the sequence's first row."""
        tidx, _, _ = cute.arch.thread_idx()
        v = self.cfg.dq_vec
        acc = mdQacc[bidx, head, None]
        if const_expr(self.varlen):
            acc = cute.domain_offset((acc_row0 * self.d,), acc)
        g = cute.local_tile(acc, (self.tile_m * self.d,), (m_block,))
        return cute.make_tensor(g.iterator + tidx * v, cute.make_layout(
            (v, cute.size(acc_dQ) // v), stride=(1, NUM_THREADS * v)))

    @cute.kernel
    def dq_kernel(self, mdQacc: cute.Tensor, mdQ: cute.Tensor, seqlen_k: Int32,
                  mCuSeqlensQ: Optional[cute.Tensor], mCuSeqlensK: Optional[cute.Tensor],
                  mSeqUsedQ: Optional[cute.Tensor], mSeqUsedK: Optional[cute.Tensor],
                  sdQ_layout: cute.ComposedLayout, gmem_copy_out: cute.TiledCopy,
                  mma_dq: cute.TiledMma, DqStorage: cutlass.Constexpr):
        """dQ partial sums (fp32, already scaled) of one Q tile -> dtype -> smem -> 16-byte stores;
        rows below the sequence's store_q (rows past seqused_q have zero partials)."""
        m_block, head, batch = cute.arch.block_idx()
        offset_q, _, _, store_q, _, _, bidx = su.seq_info(
            batch, mdQ.shape[1], seqlen_k, mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK)
        if const_expr(self.varlen):
            if m_block * self.tile_m < store_q:  # else this tile is past its sequence's end
                self.dq_tile(mdQacc, mdQ, m_block, head, bidx, offset_q, store_q,
                             self.acc_row0(batch, offset_q), sdQ_layout, gmem_copy_out, mma_dq,
                             DqStorage)
        else:
            self.dq_tile(mdQacc, mdQ, m_block, head, bidx, offset_q, store_q, 0, sdQ_layout,
                         gmem_copy_out, mma_dq, DqStorage)

    @cute.jit
    def dq_tile(self, mdQacc: cute.Tensor, mdQ: cute.Tensor, m_block: Int32, head: Int32, bidx,
                offset_q, store_q: Int32, acc_row0, sdQ_layout: cute.ComposedLayout,
                gmem_copy_out: cute.TiledCopy, mma_dq: cute.TiledMma, DqStorage: cutlass.Constexpr):
        tidx, _, _ = cute.arch.thread_idx()
        acc = cute.make_rmem_tensor(mma_dq.get_slice(tidx).partition_shape_C((self.tile_m, self.d)),
                                    Float32)
        src = self.dq_acc_view(mdQacc, acc, m_block, head, bidx, acc_row0)
        for i in cutlass.range_constexpr(cute.size(acc)):
            acc[i] = src[i]
        rdQ = cute.make_rmem_tensor_like(acc, self.dtype)
        rdQ.store(acc.load().to(self.dtype))
        storage = cutlass.utils.SmemAllocator().allocate(DqStorage)
        sdQ = storage.sdQ.get_tensor(sdQ_layout)
        st_pair = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype, num_bits_per_copy=32)
        thr_s = cute.make_tiled_copy_C(st_pair, mma_dq).get_slice(tidx)
        cute.copy(st_pair, thr_s.retile(rdQ), thr_s.partition_D(sdQ))
        cute.arch.barrier()
        self.store_rows(sdQ, su.seq_rows(mdQ, bidx, head, offset_q), gmem_copy_out, tidx,
                        self.tile_m, m_block, store_q - m_block * self.tile_m)

    @cute.jit
    def epilogue(self, acc_dK: cute.Tensor, acc_dV: cute.Tensor, mdK: cute.Tensor, mdV: cute.Tensor,
                 sK: cute.Tensor, sV: cute.Tensor, gmem_copy_out: cute.TiledCopy,
                 mma_dkv: cute.TiledMma, tidx: Int32, n_block: Int32, seq,
                 softmax_scale: Float32):
        tile_n, d = self.tile_n, self.d
        rdK = cute.make_rmem_tensor_like(acc_dK, self.dtype)
        rdK.store((acc_dK.load() * softmax_scale).to(self.dtype))
        rdV = cute.make_rmem_tensor_like(acc_dV, self.dtype)
        rdV.store(acc_dV.load().to(self.dtype))
        cute.arch.barrier()  # every warp is done reading sK / sV
        st_pair = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype, num_bits_per_copy=32)
        thr_s = cute.make_tiled_copy_C(st_pair, mma_dkv).get_slice(tidx)
        cute.copy(st_pair, thr_s.retile(rdK), thr_s.partition_D(sK))
        cute.copy(st_pair, thr_s.retile(rdV), thr_s.partition_D(sV))
        cute.arch.barrier()

        row_limit = seq.store_k - n_block * tile_n  # keys past seqused_k: dK = dV = 0
        self.store_rows(sK, su.seq_rows(mdK, seq.bidx, seq.head, seq.offset_k), gmem_copy_out, tidx,
                        tile_n, n_block, row_limit)
        self.store_rows(sV, su.seq_rows(mdV, seq.bidx, seq.head, seq.offset_k), gmem_copy_out, tidx,
                        tile_n, n_block, row_limit)

    @cute.jit
    def store_rows(self, s_src: cute.Tensor, m_dst: cute.Tensor, gmem_copy_out: cute.TiledCopy,
                   tidx: Int32, rows: cutlass.Constexpr[int], block: Int32, row_limit: Int32):
        """(rows, d) smem tile -> registers (16 bytes per thread) -> its valid rows of m_dst
        ((seqlen, d) of one sequence and head)."""
        thr_out = gmem_copy_out.get_slice(tidx)
        tcd = thr_out.partition_D(cute.make_identity_tensor((rows, self.d)))
        g = cute.local_tile(m_dst, (rows, self.d), (block, 0))
        ts = thr_out.partition_S(s_src)
        tg = thr_out.partition_D(g)
        tr = cute.make_rmem_tensor_like(ts, self.dtype)
        cute.autovec_copy(ts, tr)
        for m in cutlass.range_constexpr(cute.size(tr, mode=[1])):
            if tcd[0, m, 0][0] < row_limit:
                cute.copy(gmem_copy_out, tr[None, m, None], tg[None, m, None])
