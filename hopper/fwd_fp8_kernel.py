"""The Hopper FP8 (e4m3) attention forward kernel, traced with the CuTe DSL.

Same warp-specialized FA3 design as the bf16 kernel (fwd_kernel.py; producer warpgroup issuing TMA,
2-3 consumer warpgroups, intra-warpgroup overlap of S_{j-1} = Q K^T with softmax_j, optional
pingpong), written separately so the fp8 parts stay readable. It imports no code from fwd_kernel.py;
it shares fwd_common.py (pipelines, TMA producer steps, pingpong, consumer fragments), softmax.py
(row reductions, O rescale), mask.py, wgmma_utils.py and tile_scheduler.py.

What differs from bf16:

* Both wgmma operands must be K-major in fp8. S = Q K^T is (Q, K are d-contiguous). For O += P V the
  B operand must be seqlen-contiguous: V arrives as Vt (b, h_kv, dv, s_pad), produced outside the
  kernel (flash_fwd_fp8.vt_layout), so the kernel needs no smem transpose.
* P goes from the fp32 S accumulator into the fp8 A-operand registers with no shuffle. A thread's
  accumulator holds, per row and 32-key chunk, keys {2q, 2q+1} + 8j (q = lane % 4, j = 0..3); the fp8
  A fragment wants it to hold k-slots {4q..4q+3, 16+4q..16+4q+3}. The PV GEMM contracts over keys,
  so the keys may be relabelled: slot 16h + 4q + 2a + c holds key 16h + 8a + 2q + c. Each 32-bit
  A register is then four accumulator values of one row packed in place (two cvt e4m3x2), and Vt's
  keys are permuted the same way inside each 32-key group when Vt is built (KEY_PERM there).
* P is scaled by 2^8 before its cast (e4m3 holds up to 448; P <= 1 would waste 8 binades): the
  exponent offset is folded into the softmax FFMA, exp2(S c - m + 8), and cancels against the
  row sum l, which is accumulated from the same fp32 values.
* Scales: one per (tile_m query rows, head) for Q, per (tile_n key rows, kv head) for K and V
  (FA3's per-(batch, kv head) descales are the special case of equal block scales). S's block
  scale s_q s_k is folded into the softmax constant c = softmax_scale log2(e) s_q s_k; the running
  max m is kept in these scaled log2 units (c > 0, so max(c S) = c max(S): one multiply per row).
  V's block scale is folded into O's rescale: O is kept in units of the current block's s_v, and
  moving to block n multiplies O by exp2(m_old - m_new) * s_v(prev) / s_v(n); the epilogue multiplies
  by s_v(last) / l. Exact in real arithmetic; in fp32 it adds one rounding per block.
* Lazy rescale (cfg.lazy_rescale, default): that rescale touches all of O (dv/2 FMULs per thread) in
  every block. Instead O is kept in units of ref = the largest V scale the tile has seen, and block n's
  ratio r = s_v(n) / ref <= 1 goes into P's exponent: P = exp2(c S + 8 - m + log2 r), l += sum(P) / r.
  The running max moves only when a block exceeds it by more than LAZY_TAU log2 units, so P stays
  below 2^(8 + tau) < 448. O is rescaled only where ref grows or a row's max moves, and a warp whose
  factors are all exactly 1 skips it (sm.rescale_o's vote). The epilogue multiplies by ref / l. The
  fused path quantizes V with power-of-two block scales (fp8_vt), so r is a power of two and P rounds
  to e4m3 exactly as without it, except small entries that r pushes into e4m3's subnormals (+0.1-1.5%
  RMSE, emulated); with other V scales a row's largest P, 256 r, often sits on a rounding tie.
Epilogue: O (bf16) straight from registers to global memory (rows past seqlen_q skipped), LSE from
registers: LSE = ln(2) (m + log2(l) - 8).
"""
import math
from types import SimpleNamespace

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass.utils.hopper_helpers import make_trivial_tiled_mma

from fa3.hopper import mask as mask_mod
from fa3.hopper import softmax as sm
from fa3.hopper.fwd_common import (REGS, PingpongMixin, StagedGemmMixin, consumer_fragments,
                                   make_qkv_pipes, store_lse, store_o_rows, tma_load, tma_load_block,
                                   tma_tiles)
from fa3.hopper.tile_scheduler import decode_tile, lpt_group, tile_index
from fa3.hopper.wgmma_utils import acc_to_mn, schedule_fence, smem_layout

P_EXP_OFFSET = 8.0  # P is computed as 2^8 * softmax numerator (uses e4m3's range; exact power of 2
LAZY_TAU = 0.75  # lazy rescale: a row's max moves only past this (log2 units); 2^(8 + tau) < 448

# Register layouts this kernel's P packing relies on (checked at trace time): the fp32 accumulator
# thread/value layout of an m64nNk32 fp8 wgmma, and the fp8 A operand from registers.
_TV_C_THR = "((4,8,4),"
_TV_C_VAL_STRIDE = ":((128,1,16),(64,8,512))"
_TV_A = "((4,8,4),(4,2,2)):((256,1,16),(64,8,1024))"


@dsl_user_op
def pack_e4m3x4(b0: Float32, b1: Float32, b2: Float32, b3: Float32, *, loc=None, ip=None) -> Int32:
    """Four fp32 -> four e4m3 (round to nearest even, saturate) in one 32-bit register, b0 lowest."""
    args = [Float32(x).ir_value(loc=loc, ip=ip) for x in (b0, b1, b2, b3)]
    return Int32(llvm.inline_asm(
        T.i32(), args,
        "{ .reg .b16 lo, hi;\n"
        "cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"
        "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n"
        "mov.b32 $0, {lo, hi}; }",
        "=r,f,f,f,f", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT))


@dsl_user_op
def pow2_ceil(x: Float32, *, loc=None, ip=None) -> Float32:
    """Positive normal x -> the smallest power of two >= x, exactly (fp8_emulation.pow2_ceil)."""
    return Float32(llvm.inline_asm(
        T.f32(), [Float32(x).ir_value(loc=loc, ip=ip)],
        "{ .reg .b32 b, m, e; .reg .pred p;\n"
        "mov.b32 b, $1;\n"
        "and.b32 m, b, 8388607;\n"
        "and.b32 e, b, 2139095040;\n"
        "add.u32 e, e, 8388608;\n"
        "setp.ne.u32 p, m, 0;\n"
        "selp.b32 b, e, b, p;\n"
        "mov.b32 $0, b; }",
        "=f,f", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT))


def p_pack_sources(n_regs: int):
    """For A register i of P (order: row half, k half, 32-key chunk), the accumulator indices of its
    four bytes. Accumulator index = col parity + 2 * row half + 4 * (8-col group j); the A register
    (row half rh, k half kh, chunk kb) byte b holds key 16 kh + 8 (b // 2) + 2 q + b % 2 of the chunk,
    i.e. group j = 4 kb + 2 kh + b // 2, col parity b % 2."""
    out = []
    for i in range(n_regs):
        rh, kh, kb = i % 2, (i // 2) % 2, i // 4
        out.append(tuple((b % 2) + 2 * rh + 4 * (4 * kb + 2 * kh + b // 2) for b in range(4)))
    return out


class FlashFwdFp8Sm90(PingpongMixin, StagedGemmMixin):
    def __init__(self, cfg):
        self.cfg = cfg
        self.tile_m, self.tile_n, self.stages = cfg.tile_m, cfg.tile_n, cfg.stages
        self.d, self.dv = cfg.d, cfg.dv
        self.causal = cfg.causal
        self.num_consumers = cfg.tile_m // 64
        self.num_threads = 128 * (1 + self.num_consumers)
        assert self.tile_m == 64 * self.num_consumers and self.num_consumers in REGS
        assert self.tile_n % 32 == 0 and self.d % 32 == 0 and self.dv % 16 == 0

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mVt: cute.Tensor, mO: cute.Tensor,
                 mLSE: cute.Tensor, mQs: cute.Tensor, mKs: cute.Tensor, mVs: cute.Tensor,
                 softmax_scale: Float32, grid_ctas: Int32, stream):
        f8 = mQ.element_type
        self.out_dtype = mO.element_type
        # q, k, o (b, s, h, d) -> (s, d, h, b); vt (b, h, dv, s) -> (dv, s, h, b); lse (b, h, s) -> (s, h, b)
        mQ, mK, mO = [cute.make_tensor(t.iterator, cute.select(t.layout, mode=[1, 3, 2, 0]))
                      for t in (mQ, mK, mO)]
        mVt = cute.make_tensor(mVt.iterator, cute.select(mVt.layout, mode=[2, 3, 1, 0]))
        mLSE = cute.make_tensor(mLSE.iterator, cute.select(mLSE.layout, mode=[2, 1, 0]))

        K_MAJOR = cute.nvgpu.OperandMajorMode.K
        tiled_mma_qk = make_trivial_tiled_mma(f8, f8, K_MAJOR, K_MAJOR, Float32,
                                              (self.num_consumers, 1, 1), (64, self.tile_n))
        tiled_mma_pv = make_trivial_tiled_mma(f8, f8, K_MAJOR, K_MAJOR, Float32,
                                              (self.num_consumers, 1, 1), (64, self.dv),
                                              warpgroup.OperandSource.RMEM)
        tv_c, tv_a = str(tiled_mma_qk.tv_layout_C), str(tiled_mma_pv.tv_layout_A)
        assert tv_c.startswith(_TV_C_THR) and tv_c.endswith(_TV_C_VAL_STRIDE), tv_c
        assert tv_a == _TV_A, tv_a

        sQ_layout = smem_layout(f8, self.tile_m, self.d)
        sK_layout = smem_layout(f8, self.tile_n, self.d, self.stages)
        sVt_layout = smem_layout(f8, self.dv, self.tile_n, self.stages)  # keys contiguous: K-major B

        g2s = cpasync.CopyBulkTensorTileG2SOp()
        tma_Q, tQ = cpasync.make_tiled_tma_atom(g2s, mQ, sQ_layout, (self.tile_m, self.d))
        tma_K, tK = cpasync.make_tiled_tma_atom(
            g2s, mK, cute.select(sK_layout, mode=[0, 1]), (self.tile_n, self.d))
        tma_V, tV = cpasync.make_tiled_tma_atom(
            g2s, mVt, cute.select(sVt_layout, mode=[0, 1]), (self.dv, self.tile_n))
        self.bytes_q = cute.size_in_bytes(f8, sQ_layout)
        self.bytes_k = cute.size_in_bytes(f8, cute.select(sK_layout, mode=[0, 1]))
        self.bytes_v = cute.size_in_bytes(f8, cute.select(sVt_layout, mode=[0, 1]))
        stages = self.stages

        @cute.struct
        class SharedStorage:
            mbar_q: cute.struct.MemRange[cutlass.Int64, 2]
            mbar_k: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            mbar_v: cute.struct.MemRange[cutlass.Int64, 2 * stages]
            sQ: cute.struct.Align[cute.struct.MemRange[f8, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[f8, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[f8, cute.cosize(sVt_layout)], 1024]

        self.shared_storage = SharedStorage
        num_m_blocks = (mQ.shape[0] + (self.tile_m - 1)) // self.tile_m
        self.kernel(tQ, tK, tV, mO, mLSE, mQs, mKs, mVs, tma_Q, tma_K, tma_V, tiled_mma_qk,
                    tiled_mma_pv, sQ_layout, sK_layout, sVt_layout, softmax_scale,
                    num_m_blocks).launch(grid=[grid_ctas, 1, 1], block=[self.num_threads, 1, 1],
                                         stream=stream, min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mVt: cute.Tensor, mO: cute.Tensor,
               mLSE: cute.Tensor, mQs: cute.Tensor, mKs: cute.Tensor, mVs: cute.Tensor,
               tma_Q: cute.CopyAtom, tma_K: cute.CopyAtom, tma_V: cute.CopyAtom,
               tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma,
               sQ_layout: cute.ComposedLayout, sK_layout: cute.ComposedLayout,
               sVt_layout: cute.ComposedLayout, softmax_scale: Float32, num_m_blocks: Int32):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        if warp_idx == 0:
            for atom in (tma_Q, tma_K, tma_V):
                cpasync.prefetch_descriptor(atom)

        storage = cutlass.memory.SmemAllocator().allocate(self.shared_storage)
        pipe_q, pipe_k, pipe_v = make_qkv_pipes(storage, self.num_consumers, self.stages,
                                                self.bytes_q, self.bytes_k, self.bytes_v)

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sVt = storage.sV.get_tensor(sVt_layout.outer, swizzle=sVt_layout.inner)

        seqlen_q, seqlen_k = mQ.shape[0], mK.shape[0]
        num_heads, num_hb = mQ.shape[2], mQ.shape[2] * mQ.shape[3]
        qhead_per_kvhead = mQ.shape[2] // mK.shape[2]
        total_tiles = num_m_blocks * num_hb
        # causal: heaviest-first within groups of heads whose (1-byte) K and Vt fit in L2
        group = None
        if const_expr(self.causal and self.cfg.l2_group):
            group = lpt_group(seqlen_k, self.d + self.dv, qhead_per_kvhead, num_hb, num_m_blocks)
        dims = SimpleNamespace(seqlen_q=seqlen_q, seqlen_k=seqlen_k, num_m_blocks=num_m_blocks,
                               num_heads=num_heads, num_hb=num_hb, qpk=qhead_per_kvhead,
                               total_tiles=total_tiles, lpt_group=group)
        if warp_idx < 4:
            cute.arch.setmaxregister_decrease(REGS[self.num_consumers][0])
            if warp_idx == 0:
                self.producer(mQ, mK, mVt, sQ, sK, sVt, tma_Q, tma_K, tma_V, pipe_q, pipe_k, pipe_v,
                              dims)
        else:
            cute.arch.setmaxregister_increase(REGS[self.num_consumers][1])
            self.consumer(mO, mLSE, mQs, mKs, mVs, sQ, sK, sVt, tiled_mma_qk, tiled_mma_pv,
                          pipe_q, pipe_k, pipe_v, softmax_scale, tidx - 128, dims)

    # ------------------------------------------------------------------------------------------
    @cute.jit
    def producer(self, mQ, mK, mVt, sQ, sK, sVt, tma_Q, tma_K, tma_V, pipe_q, pipe_k, pipe_v, dims):
        """Q once per tile, then K_{n_max-1}, and per step K_{n-1} before V_n: the consumers need
        the next S before the current PV (intra-warpgroup overlap)."""
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        cta = cute.arch.block_idx()[0]
        grid = cute.arch.grid_dim()[0]
        rnd = Int32(0)
        tile = cta
        while tile < dims.total_tiles:
            m_block, head, batch = decode_tile(tile, dims.num_m_blocks, dims.num_heads, dims.num_hb,
                                               self.causal, dims.lpt_group)
            head_kv = head // dims.qpk
            gQ = cute.local_tile(mQ[None, None, head, batch], (self.tile_m, self.d), (m_block, 0))
            gK = cute.local_tile(mK[None, None, head_kv, batch], (self.tile_n, self.d), (None, 0))
            gV = cute.local_tile(mVt[None, None, head_kv, batch], (self.dv, self.tile_n), (0, None))
            tQs, tQg = tma_tiles(tma_Q, sQ, gQ)
            tKs, tKg = tma_tiles(tma_K, sK, gK)
            tVs, tVg = tma_tiles(tma_V, sVt, gV)
            n_max = mask_mod.n_block_max(dims.seqlen_q, dims.seqlen_k, m_block, self.tile_m,
                                         self.tile_n, self.causal)
            tma_load(tma_Q, tQg, tQs, pipe_q, q_state)
            q_state.advance()
            if n_max > 0:
                tma_load_block(tma_K, tKg, tKs, n_max - 1, pipe_k, kv_state)
                for i in cutlass.range(n_max - 1, unroll=1):
                    n = n_max - 2 - i
                    v_state = kv_state.clone()
                    kv_state.advance()
                    tma_load_block(tma_K, tKg, tKs, n, pipe_k, kv_state)
                    tma_load_block(tma_V, tVg, tVs, n + 1, pipe_v, v_state)
                tma_load_block(tma_V, tVg, tVs, 0, pipe_v, kv_state)
                kv_state.advance()
            rnd += 1
            tile = tile_index(rnd, cta, grid, self.causal)

    # ------------------------------------------------------------------------------------------
    @cute.jit
    def consumer(self, mO, mLSE, mQs, mKs, mVs, sQ, sK, sVt, tiled_mma_qk, tiled_mma_pv, pipe_q,
                 pipe_k, pipe_v, softmax_scale, tidx, dims):
        f = consumer_fragments(tiled_mma_qk, tiled_mma_pv, sQ, sK, sVt, tidx, self.tile_m,
                               self.tile_n, self.dv)
        wg, tSrQ, tSrK, tOrV, tOrP, shape_S = f.wg, f.tSrQ, f.tSrK, f.tOrV, f.tOrP, f.shape_S
        acc_O, acc_O_mn, tScS_mn, tOcO_mn = f.acc_O, f.acc_O_mn, f.tScS_mn, f.tOcO_mn
        n_rows, row_max, row_sum, row_scale = f.n_rows, f.row_max, f.row_sum, f.row_scale
        # V scale O is expressed in (the current block's; lazy: ref, the largest seen) and its inverse
        sv_cur = cute.make_rmem_tensor((2,), Float32)
        scale_log2 = softmax_scale * Float32(math.log2(math.e))

        self.pingpong_start(wg)

        ctx = SimpleNamespace(
            tiled_mma_qk=tiled_mma_qk, tiled_mma_pv=tiled_mma_pv, tSrQ=tSrQ, tSrK=tSrK, tOrP=tOrP,
            tOrV=tOrV, shape_S=shape_S, acc_O_mn=acc_O_mn, acc_O=acc_O, tScS_mn=tScS_mn,
            row_max=row_max, row_sum=row_sum, row_scale=row_scale, sv_cur=sv_cur,
            pipe_k=pipe_k, pipe_v=pipe_v, seqlen_q=dims.seqlen_q, seqlen_k=dims.seqlen_k, wg=wg)
        self.hoist_descs(ctx)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        cta = cute.arch.block_idx()[0]
        grid = cute.arch.grid_dim()[0]
        rnd = Int32(0)
        tile = cta
        while tile < dims.total_tiles:
            m_block, head, batch = decode_tile(tile, dims.num_m_blocks, dims.num_heads, dims.num_hb,
                                               self.causal, dims.lpt_group)
            head_kv = head // dims.qpk
            n_max = mask_mod.n_block_max(dims.seqlen_q, dims.seqlen_k, m_block, self.tile_m,
                                         self.tile_n, self.causal)
            c_q = scale_log2 * mQs[batch, head, m_block]  # softmax constant before K's block scale
            acc_O.fill(0.0)
            row_max.fill(-Float32.inf)
            row_sum.fill(0.0)
            sv_cur[0] = Float32(1.0)
            pipe_q.consumer_wait(q_state)
            if n_max > 0:
                n_mask_min = n_max - 1
                if const_expr(self.causal):
                    n_mask_min = cutlass.min(n_mask_min, mask_mod.n_block_min_causal_mask(
                        dims.seqlen_q, dims.seqlen_k, m_block, self.tile_m, self.tile_n))
                # first half: S of the highest block, softmax, P ready; no PV yet
                n0 = n_max - 1
                # this (batch, kv head)'s block scales, addressed once per tile
                ks, vs = mKs[batch, head_kv, None], mVs[batch, head_kv, None]
                c0 = c_q * ks[n0]
                sv_cur[0] = vs[n0]
                sv_cur[1] = cute.arch.rcp_approx(sv_cur[0])
                pipe_k.consumer_wait(kv_state)
                acc_S = cute.make_rmem_tensor(shape_S, Float32)
                self.gemm_qk(ctx, acc_S, kv_state.index, 0)
                pipe_k.consumer_release(kv_state)
                self.softmax_block(ctx, acc_S, c0, m_block, n0, True)
                self.to_p(ctx, acc_S)
                for i in cutlass.range(n_max - 1 - n_mask_min, unroll=1):
                    kv_state = self.block_overlap(ctx, kv_state, c_q, ks, vs, m_block,
                                                  n_max - 2 - i, True)
                for i in cutlass.range(n_mask_min, unroll=1):
                    kv_state = self.block_overlap(ctx, kv_state, c_q, ks, vs, m_block,
                                                  n_mask_min - 1 - i, False)
                # last half: PV of the lowest block
                if const_expr(self.cfg.rescale_early):
                    sm.rescale_o(acc_O_mn, row_scale, self.cfg.lazy_rescale)
                pipe_v.consumer_wait(kv_state)
                self.gemm_pv(ctx, kv_state.index, 0)
                pipe_v.consumer_release(kv_state)
                kv_state.advance()
            pipe_q.consumer_release(q_state)
            q_state.advance()
            lse = cute.make_rmem_tensor((n_rows,), Float32)
            self.finalize(ctx, lse)
            sm.rescale_o(acc_O_mn, row_scale)
            self.epilogue(acc_O, lse, mO, mLSE, tOcO_mn, tiled_mma_pv, tidx, m_block, head, batch,
                          dims.seqlen_q)
            rnd += 1
            tile = tile_index(rnd, cta, grid, self.causal)

    @cute.jit
    def softmax_block(self, ctx, acc_S, c: Float32, m_block, n, masked: cutlass.Constexpr[bool],
                      lazy: cutlass.Constexpr[bool] = False, log2r=None, inv_r=None):
        """Online softmax of one S block with its own constant c = scale log2(e) s_q s_k; row_max in
        c-scaled log2 units. P = 2^8 exp2(c S - m); row_scale = exp2(m_old - m). lazy: m moves only
        past LAZY_TAU (row_scale exactly 1 otherwise), P gains the factor r = 2^log2r, l gets sum(P)/r."""
        acc_mn = acc_to_mn(acc_S)
        if const_expr(masked):
            mask_mod.apply_mask(acc_mn, ctx.tScS_mn, ctx.seqlen_q, ctx.seqlen_k, m_block, n,
                                self.tile_m, self.tile_n, self.causal)
        ncol = cute.size(acc_mn, mode=[1])
        for r in cutlass.range_constexpr(cute.size(acc_mn, mode=[0])):
            m_raw = sm.quad_max(sm.row_max_of(acc_mn, r, -Float32.inf))
            m_old = ctx.row_max[r]
            m = cute.arch.fmax(m_old, m_raw * c)
            keep = False
            if const_expr(lazy):
                # -inf - -inf is NaN and inf > tau: a row that has seen nothing never keeps
                keep = m - m_old <= Float32(LAZY_TAU)
                m = m_old if keep else m
            m_ref = m if m != -Float32.inf else Float32(0.0)  # an all-masked row: exp2(-inf) = 0
            if const_expr(lazy):
                ctx.row_scale[r] = Float32(1.0) if keep else cute.arch.exp2(m_old - m_ref)
            else:
                ctx.row_scale[r] = cute.arch.exp2(m_old - m_ref)
            ctx.row_max[r] = m
            bias = Float32(P_EXP_OFFSET) - m_ref
            if const_expr(lazy):
                bias = bias + log2r
            s = [Float32(0.0), Float32(0.0), Float32(0.0), Float32(0.0)]
            for j in cutlass.range_constexpr(ncol):
                p = sm.exp2_mixed(acc_mn[r, j] * c + bias, j, self.cfg.exp2_emu)  # FFMA + EX2
                acc_mn[r, j] = p
                s[j % 4] = s[j % 4] + p
            total = (s[0] + s[1]) + (s[2] + s[3])
            if const_expr(lazy):
                total = total * inv_r
            ctx.row_sum[r] = ctx.row_sum[r] * ctx.row_scale[r] + total

    @cute.jit
    def to_p(self, ctx, acc_S):
        """fp32 P (x 2^8) -> e4m3 A operand of the PV wgmma, packed in place (see module doc)."""
        dst = cute.recast_tensor(ctx.tOrP, Int32)
        src = cute.make_tensor(acc_S.iterator, cute.make_layout(cute.size(acc_S)))
        for i, (a, b, c, d) in enumerate(p_pack_sources(cute.size(dst))):
            dst[i] = pack_e4m3x4(src[a], src[b], src[c], src[d])

    @cute.jit
    def block_overlap(self, ctx, kv_state, c_q, ks, vs, m_block, n,
                      masked: cutlass.Constexpr[bool]):
        """Issue S_n = Q K_n^T and O += P_{n+1} V_{n+1} back to back; softmax(S_n) while PV runs;
        then O *= exp2(m_old - m_new) * s_v(n+1) / s_v(n) (lazy: * ref_old / ref_new) and P_n -> e4m3."""
        v_state = kv_state.clone()
        kv_state.advance()
        c = c_q * ks[n]  # scalar loads, in flight during the GEMMs
        sv_n = vs[n]
        lazy = const_expr(self.cfg.lazy_rescale)
        if const_expr(lazy):
            # ref (sv_cur) grows to s_v(n) if that is larger; O then needs ref_old / ref_new
            inv_sv = cute.arch.rcp_approx(sv_n)
            grow = sv_n > ctx.sv_cur[0]
            ref_ratio = ctx.sv_cur[0] * inv_sv if grow else Float32(1.0)
            inv_r = Float32(1.0) if grow else ctx.sv_cur[0] * inv_sv
            log2r = Float32(0.0) if grow else cute.math.log2(sv_n * ctx.sv_cur[1], fastmath=True)
            ctx.sv_cur[1] = inv_sv if grow else ctx.sv_cur[1]  # selects: a dynamic `if` here
            ctx.sv_cur[0] = sv_n if grow else ctx.sv_cur[0]  # would have to carry ctx
        ctx.pipe_k.consumer_wait(kv_state)
        self.pingpong_sync(ctx.wg)
        acc_S = cute.make_rmem_tensor(ctx.shape_S, Float32)
        self.gemm_qk(ctx, acc_S, kv_state.index, -1)
        if const_expr(self.cfg.rescale_early):
            # O *= the previous step's factor while S = Q K^T runs (nothing else hides it without pingpong)
            sm.rescale_o(ctx.acc_O_mn, ctx.row_scale, lazy)
        ctx.pipe_v.consumer_wait(v_state)
        self.gemm_pv(ctx, v_state.index, -1)
        self.pingpong_arrive(ctx.wg)
        warpgroup.wait_group(1)  # S_n done, PV may still run
        ctx.pipe_k.consumer_release(kv_state)
        if const_expr(lazy):
            self.softmax_block(ctx, acc_S, c, m_block, n, masked, True, log2r, inv_r)
            v_ratio = ref_ratio
        else:
            self.softmax_block(ctx, acc_S, c, m_block, n, masked)
            # s_v(n+1) / s_v(n): rcp.approx (1 ulp) instead of an IEEE division and its slow-path call
            v_ratio = ctx.sv_cur[0] * cute.arch.rcp_approx(sv_n)
            ctx.sv_cur[0] = sv_n
        for r in cutlass.range_constexpr(cute.size(ctx.row_scale)):
            ctx.row_scale[r] = ctx.row_scale[r] * v_ratio
        # keeps the softmax under the in-flight PV: ptxas would otherwise wait for that PV before
        # the first P pack it interleaves with the exp2s (the division's call used to stop it)
        if const_expr(self.cfg.p_after_wait):
            schedule_fence(ctx.row_sum[0])
        warpgroup.wait_group(0)  # PV done: P's registers and V's stage are free
        ctx.pipe_v.consumer_release(v_state)
        self.to_p(ctx, acc_S)
        if const_expr(not self.cfg.rescale_early):
            sm.rescale_o(ctx.acc_O_mn, ctx.row_scale, lazy)
        return kv_state

    @cute.jit
    def finalize(self, ctx, lse):
        """row_scale <- s_v(last) (lazy: ref) / l (0 for an empty row); lse <- ln2 (m + log2 l - 8)."""
        for r in cutlass.range_constexpr(cute.size(ctx.row_sum)):
            l = sm.quad_sum(ctx.row_sum[r])
            empty = l == Float32(0.0) or l != l
            ctx.row_scale[r] = Float32(0.0) if empty else ctx.sv_cur[0] * cute.arch.rcp_approx(l)
            lse[r] = (-Float32.inf if empty else
                      (ctx.row_max[r] + cute.math.log2(l, fastmath=True) - Float32(P_EXP_OFFSET))
                      * Float32(math.log(2.0)))

    @cute.jit
    def epilogue(self, acc_O, lse, mO, mLSE, tOcO_mn, tiled_mma_pv, tidx, m_block, head, batch,
                 seqlen_q):
        rO = cute.make_rmem_tensor_like(acc_O, self.out_dtype)
        rO.store(acc_O.load().to(self.out_dtype))
        gO = cute.local_tile(mO[None, None, head, batch], (self.tile_m, self.dv), (m_block, 0))
        store_o_rows(rO, gO, tOcO_mn, tiled_mma_pv, tidx, m_block, self.tile_m, seqlen_q, 1)
        store_lse(lse, mLSE, tOcO_mn, m_block, self.tile_m, seqlen_q, 1, 0, head, batch)
