"""Backward postprocess: dQaccum (fp32, in the main kernel's register order per tile) -> dQ in the
input dtype, times softmax_scale.

One CTA of 256 threads per (m block, head, batch): thread t reads exactly the 16-byte vectors that
consumer thread t of the main kernel added (dq_copy), and the dQ tiled MMA tells it which (row,
column) each value is (transposed, 80-row tiles: (head dim, row), bwd_kernel.dq_transposed); rows
past seqlen_q are skipped. Where whole 16-byte row pieces tile the CTA (head dim 64, 128, 256; not
transposed) the dQ tile goes through smem first (stmatrix, rows padded by 16 bytes: no bank
conflicts) so that each thread stores 16 contiguous bytes of a row instead of 4-byte pairs
scattered over 8 rows per warp instruction (FA4's postprocess stages dQ through smem too).
Varlen: one CTA per (m block of the longest sequence, head, sequence); dQaccum is in the main
kernel's per-sequence padded row layout, dQ packed (1, total_q, h, d); CTAs past a sequence's end
exit. Rows past seqused_q have dQaccum = 0, so they get dQ = 0.
"""
from typing import Optional

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from fa3.hopper.bwd_dq import dq_copy
from fa3.hopper.bwd_kernel import dq_tile_shape, dq_transposed, tiled_mmas
from fa3.hopper.wgmma_utils import acc_to_mn, stmatrix_copy, transpose_view

THREADS = 256


class BwdPostprocess:
    def __init__(self, cfg):
        self.cfg = cfg
        self.tile_m, self.d = cfg.tile_m, cfg.d

    @cute.jit
    def __call__(self, mdQacc: cute.Tensor, mdQ: cute.Tensor, softmax_scale: Float32,
                 mCuSeqlensQ: Optional[cute.Tensor], max_seqlen_q: Optional[Int32], stream):
        dtype = mdQ.element_type
        mdQ = cute.make_tensor(mdQ.iterator, cute.select(mdQ.layout, mode=[1, 3, 2, 0]))  # (s,d,h,b)
        _, _, dq = tiled_mmas(dtype, self.cfg)
        num_m_blocks = (mdQ.shape[0] + (self.tile_m - 1)) // self.tile_m
        num_batch = mdQ.shape[3]
        if const_expr(self.cfg.varlen):
            num_m_blocks = (max_seqlen_q + (self.tile_m - 1)) // self.tile_m
            num_batch = mCuSeqlensQ.shape[0] - 1
        self.kernel(mdQacc, mdQ, dq, softmax_scale, mCuSeqlensQ).launch(
            grid=[num_m_blocks, mdQ.shape[2], num_batch], block=[THREADS, 1, 1], stream=stream,
            use_pdl=self.cfg.pdl)

    @cute.kernel
    def kernel(self, mdQacc: cute.Tensor, mdQ: cute.Tensor, dq: cute.TiledMma, softmax_scale: Float32,
               mCuSeqlensQ: Optional[cute.Tensor]):
        tidx, _, _ = cute.arch.thread_idx()
        m, head, batch = cute.arch.block_idx()
        if const_expr(self.cfg.pdl):
            cute.arch.griddepcontrol_wait()  # the main kernel's dQ adds have all landed
        if const_expr(self.cfg.varlen):  # the main kernel's layout (FlashBwdSm90.kernel)
            offset = mCuSeqlensQ[batch]
            seqlen = mCuSeqlensQ[batch + 1] - offset
            if m * self.tile_m < seqlen:
                pad = (offset + batch * self.tile_m) // self.tile_m
                self.tile(cute.domain_offset((0, 0, pad * self.tile_m * self.d), mdQacc),
                          cute.domain_offset((offset, 0, 0, 0), mdQ), dq, softmax_scale, tidx, m,
                          head, 0, seqlen)
        else:
            self.tile(mdQacc, mdQ, dq, softmax_scale, tidx, m, head, batch, None)

    @cute.jit
    def tile(self, mdQacc, mdQ, dq, softmax_scale, tidx, m, head, batch, seqlen):
        """One dQ tile; rows at or past seqlen (None: all of mdQ's rows) are skipped."""
        tm, d = self.tile_m, self.d
        chunk = tm * d // 2
        # 16-byte loads: dQaccum's base, strides and tile offsets are whole 16-byte units, which
        # the DSL cannot see through the offset. With the staged stores, H100 b16 s1k: hd256
        # 72.5 -> 68.0 us, hd64 / hd128 level (FA4's: 67-68); with the old direct stores they had
        # measured slower (73.6 -> 88.6 us at hd128)
        base = mdQacc[batch, head, None].iterator + m * tm * d
        base = cute.make_ptr(Float32, base.toint(), cute.AddressSpace.gmem, assumed_align=16)
        gacc = cute.make_tensor(base, cute.make_layout((chunk, 2)))
        tg = dq_copy(self.cfg).get_slice(tidx).partition_S(gacc)
        thr = dq.get_slice(tidx)
        shape = dq_tile_shape(self.cfg)  # (d, tm) when the main kernel computed dQ^T
        tc_mn = acc_to_mn(thr.partition_C(cute.make_identity_tensor(shape)))
        acc = cute.make_rmem_tensor(thr.partition_shape_C(shape), Float32)
        cute.autovec_copy(tg, cute.make_tensor(acc.iterator, cute.make_layout(tg.shape)))
        r = cute.make_rmem_tensor_like(acc, mdQ.element_type)
        r.store((acc.load() * softmax_scale).to(mdQ.element_type))
        gdQ = cute.local_tile(mdQ[None, None, head, batch], (tm, d), (m, 0))
        end = seqlen if const_expr(seqlen is not None) else mdQ.shape[0]
        r_mn = acc_to_mn(r)
        if const_expr(dq_transposed(self.cfg)):  # accumulator rows are head dims, columns queries
            tg_mn = acc_to_mn(thr.partition_C(transpose_view(gdQ)))
            for j in cutlass.range_constexpr(cute.size(r_mn, mode=[1])):
                if m * tm + tc_mn[0, j][1] < end:
                    for i in cutlass.range_constexpr(cute.size(r_mn, mode=[0])):
                        tg_mn[i, j] = r_mn[i, j]
        elif const_expr(staged(self.cfg)):
            self.store_staged(r, gdQ, dq, tidx, m, end)
        else:
            tg_mn = acc_to_mn(thr.partition_C(gdQ))
            for i in cutlass.range_constexpr(cute.size(r_mn, mode=[0])):
                if m * tm + tc_mn[i, 0][0] < end:
                    for j in cutlass.range_constexpr(cute.size(r_mn, mode=[1])):
                        tg_mn[i, j] = r_mn[i, j]

    @cute.jit
    def store_staged(self, r, gdQ, dq, tidx, m, end):
        """r (this thread's dQ registers, in the dQ MMA's layout) -> smem -> 16-byte row pieces
        of gdQ; rows at or past end skipped."""
        tm, d, dtype = self.tile_m, self.d, r.element_type
        smem = cutlass.utils.SmemAllocator()
        sdQ = smem.allocate_tensor(dtype, cute.make_layout((tm, d), stride=(d + 8, 1)),
                                   byte_alignment=16)
        atom, thr_st = stmatrix_copy(dtype, dq, tidx)
        cute.copy(atom, thr_st.retile(r), thr_st.partition_D(sdQ))
        cute.arch.barrier()
        vec = 128 // dtype.width
        cols = d // vec
        copy = cute.make_tiled_copy_tv(
            cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dtype, num_bits_per_copy=128),
            cute.make_layout((THREADS // cols, cols), stride=(cols, 1)), cute.make_layout((1, vec)))
        thr = copy.get_slice(tidx)
        tS, tD = thr.partition_S(sdQ), thr.partition_D(gdQ)
        tC = thr.partition_S(cute.make_identity_tensor((tm, d)))
        for k in cutlass.range_constexpr(cute.size(tS, mode=[1])):
            if m * tm + tC[0, k, 0][0] < end:
                cute.autovec_copy(tS[None, k, None], tD[None, k, None])


def staged(cfg) -> bool:
    """Whether the dQ tile is stored through smem (BwdPostprocess.store_staged)."""
    return not dq_transposed(cfg) and THREADS % (cfg.d // 8) == 0
