"""The Hopper attention backward main kernel (FA3 design), traced with the CuTe DSL.

One CTA per (KV block n, query head (group_loop: KV head), batch), or (BwdConfig.persistent,
persistent_roles) one per SM walking such tiles with its pipelines carried over. A tile walks the
query blocks m that see block n, the masked ones first, then (BwdConfig.stagger) the unmasked
ones rotated to start at an offset that depends on n, so the CTAs of a head that run together
bulk-add into different dQaccum tiles (same-line reductions serialise in L2); producer, consumers
and dQ warp walk the same order (mask.m_block_nomask_bwd / walk_block). Deterministic keeps the
ascending walk.
Threads: warpgroup 0 holds the producer warp (TMA: K_n and V_n once; Q_m + LSE_m and dO_m + D_m
into a `stages`-deep ring with full/empty mbarriers) and the dQ warp (adds each dQ_m tile to the
fp32 dQaccum buffer in global memory with a bulk reduce-add, cp.reduce.async.bulk); two consumer
warpgroups do the five GEMMs per query block:
  S = Q K^T, dP = dO V^T                        (wgmma SS)
  P = exp2(S * scale * log2e - LSE_log2),  dS = P * (dP - D)
  dV += P^T dO,  dK += dS^T Q                    (accumulated in registers across m)
  dQ_m = dS K                                    (fp32, to smem, bulk-added to dQaccum)
Two layouts (BwdConfig.swap):
* swap (hd <= 128, FA3's choice): S^T = K Q^T and dP^T = V dO^T, each warpgroup owning 64 keys;
  P^T and dS^T are then already the A operands of dV and dK in registers (wgmma RS), and only dS
  goes through smem (for dQ, whose reduction runs over all keys of the tile).
* not swap (hd256: dK and dV are too large to keep 64 full rows per warpgroup): S = Q K^T split by
  key columns, P and dS through smem, dV/dK/dQ split by head-dim columns (wgmma SS).
  dkv_swap (hd192, 96-key tiles: 48 keys a warpgroup are no whole wgmma M block): dK^T = Q^T dS
  and dV^T = dO^T P instead, the head dim in M and each warpgroup's 48 keys in N (FA3's
  dKV_swapAB); the accumulators hold dK^T / dV^T, stored transposed.
80 query rows (swapped, hd128; tile_m not whole 64-row wgmma M blocks): dQ^T = K^T dS^T puts the
head dim in M (FA3's dQ_swapAB); dS is then stored keys-contiguous (stmatrix.trans) so its 80-wide
tile keeps the 128-byte swizzle, and the postprocess maps dQ^T's register order back.
GEMM issue order (swapped layout, BwdConfig A/B switches): dv_early issues dV before the dS step
(the tensor pipe runs it while the warpgroup computes dS), dk_early issues dK before the P / dS
barrier (GEMM work across the warpgroups' wait; Q released before dQ's store).
The dQ tile goes to smem in register order (16-byte stores, no bank conflicts), and so to
dQaccum: the postprocess kernel (bwd_postprocess.py) maps it back with the same tiled MMA.
dq_red (BwdConfig): the consumers add their dQ registers to dQaccum themselves with
red.global.add.v4.f32, at the addresses the smem chunk would go to (same element order, same
postprocess); no smem staging and no dQ warp, which frees tile_m * d * 4 bytes of smem for a
second Q / dO stage at hd256 (FA3's C++ backward adds dQ from registers at hd256 too).
Deterministic keeps the dQ warp: consumers that wait for their turn on the semaphores before
their own adds (tried, H100: 0.82-0.86x of the smem path at hd256, 0.73x at hd192) stall the GEMMs.
deterministic: the dQ warp adds tile m only after the CTAs of lower KV blocks have (a semaphore
per (batch, head, m) counts them), so the fp32 sums run in one order on every run. With `spt`
(causal only) KV blocks launch and add from the last one down: a CTA then waits on one that started
before it and is ahead in m, instead of on block 0, which reaches m last.
(The dQ warp lives in bwd_dq.py, the persistent grid's roles in bwd_persistent.py, inline PTX
in mem_ops.py.)
dK (times softmax_scale) and dV are stored once per CTA: by TMA from Q's / dO's smem buffers
(BwdConfig.dkv_tma, MHA dense), else from registers; with GQA they are per query head fp32
partials that the caller sums over the group (or, BwdConfig.dkv_red, adds to its KV head's
fp32 accumulator), unless (BwdConfig.group_loop) the CTA is per KV head and walks each query
head of its group in turn (producer, consumers and dQ warp alike): dK / dV then sum in
registers and are stored once, as for MHA.
Varlen / seqused (compile-time switches; the plain kernels' code is unchanged): a CTA finds its
sequence's rows from cu_seqlens (domain offsets on the packed tensors) and valid lengths from
seqused, and exits when its KV block starts past the sequence's keys. Rows past a sequence's end
in a loaded Q tile have LSE2 = +inf (P = 0, so dS = 0 and the dQ tile's extra rows add 0), and
LSE2 / D / dQaccum rows are padded per sequence to whole tiles.
"""
import math
from typing import Optional

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.utils.hopper_helpers import make_trivial_tiled_mma

from fa3.hopper import mask as mask_mod
from fa3.hopper import softmax as sm
from fa3.hopper import tile_scheduler
from fa3.hopper.bwd_dq import BAR_DQ_EMPTY, BAR_DQ_FULL, DqRoles, dq_copy
from fa3.hopper.bwd_persistent import PersistentRoles
from fa3.hopper.fwd_common import regs_fit, tma_tiles
from fa3.hopper.mem_ops import bulk_g2s, red_add_f32
from fa3.hopper.wgmma_utils import (DescFrag, acc_to_mn, gemm, gemm_desc, pack_f16x2, smem_layout,
                                    stmatrix_copy, transpose_view)

# Named barriers (0 is __syncthreads)
BAR_PDS = 1  # both consumer warpgroups: P / dS tiles complete in smem
# setmaxnreg: producer warpgroup, consumer warpgroups. 384 threads launch with 168 registers each,
# so 24 + 2 x 240 is the whole pool (fwd_common.regs_fit): a 32-register producer warpgroup
# left the consumers' setmaxnreg.inc waiting forever (H100, s13: hung)
REGS = (24, 240)
assert regs_fit(REGS, 2)

MK = cute.nvgpu.OperandMajorMode.K
MN = cute.nvgpu.OperandMajorMode.MN


def dq_transposed(cfg) -> bool:
    """dQ^T = K^T dS^T (FA3's dQ_swapAB): a query tile that is not whole 64-row wgmma M blocks
    (80) goes in N, the head dim (128: 64 a warpgroup) in M."""
    return cfg.swap and cfg.tile_m % 64 != 0


def dkv_swapped(cfg) -> bool:
    """BwdConfig.dkv_swap (a PostConfig, which only uses dQ's tiled MMA, has none)."""
    return getattr(cfg, "dkv_swap", False)


def n_split(cfg, gemm: str) -> int:
    """Head-dim columns per warpgroup of the dK/dV ("dkv"), dV ("dv": differs where dv != d) or
    dQ ("dq") GEMM."""
    if gemm in ("dkv", "dv"):
        cols = cfg.dv if gemm == "dv" else cfg.d
        if dkv_swapped(cfg):  # Q^T / dO^T are A operands, read in 64-row M blocks of the head dim
            return 64
        return cols if cfg.swap else cols // 2
    if dq_transposed(cfg):
        return cfg.d // 2  # rows of dQ^T
    return cfg.d // (2 // (cfg.tile_m // 64))


def tiled_mmas(dtype, cfg):
    """(SdP, dK/dV, dQ) tiled MMAs, shared with the postprocess kernel (dQ's register order)."""
    tm, tn, d, dv = cfg.tile_m, cfg.tile_n, cfg.d, cfg.dv
    assert d == dv or not cfg.swap  # d != dv (192 / 128): unswapped, dV its own GEMM (dv_mma)
    if cfg.swap:  # S^T (tile_n x tile_m), 64 keys per warpgroup; dK/dV likewise, A in registers
        sdp = make_trivial_tiled_mma(dtype, dtype, MK, MK, Float32, (2, 1, 1), (64, tm))
        dkv = make_trivial_tiled_mma(dtype, dtype, MK, MN, Float32, (2, 1, 1), (64, d),
                                     warpgroup.OperandSource.RMEM)
    else:  # S (tile_m x tile_n) split by key columns; dK/dV split by head-dim columns
        sdp = make_trivial_tiled_mma(dtype, dtype, MK, MK, Float32, (1, 2, 1), (64, tn // 2))
        # (dkv_swap: dK^T / dV^T (head dim x tile_n), split by key columns as S is)
        dkv_n = tn // 2 if dkv_swapped(cfg) else n_split(cfg, "dkv")
        dkv = make_trivial_tiled_mma(dtype, dtype, MN, MN, Float32, (1, 2, 1), (64, dkv_n))
    if dq_transposed(cfg):  # dQ^T (d x tile_m): A = K^T (MN-major), B = dS^T (K-major) in smem
        return sdp, dkv, make_trivial_tiled_mma(dtype, dtype, MN, MK, Float32, (2, 1, 1), (64, tm))
    wg_m = tm // 64  # dQ (tile_m x d): split by rows when there are two 64-row halves
    dq = make_trivial_tiled_mma(dtype, dtype, MN if cfg.swap else MK, MN, Float32,
                                (wg_m, 2 // wg_m, 1), (64, n_split(cfg, "dq")))
    return sdp, dkv, dq


def dv_mma(dtype, cfg, dkv):
    """The dV GEMM's tiled MMA: dK's (dkv) unless dv != d (then split over dv's columns;
    dkv_swap: dK's too, dv only changes its M extent)."""
    if cfg.dv == cfg.d or cfg.dkv_swap:
        return dkv
    return make_trivial_tiled_mma(dtype, dtype, MN, MN, Float32, (1, 2, 1), (64, n_split(cfg, "dv")))


def dq_tile_shape(cfg) -> tuple[int, int]:
    """The dQ GEMM's (M, N): (tile_m, d), or (d, tile_m) when transposed."""
    return (cfg.d, cfg.tile_m) if dq_transposed(cfg) else (cfg.tile_m, cfg.d)


class FlashBwdSm90(DqRoles, PersistentRoles):
    regs = REGS  # (the persistent roles' setmaxnreg split)

    def __init__(self, cfg):
        self.cfg = cfg
        self.tile_m, self.tile_n, self.stages = cfg.tile_m, cfg.tile_n, cfg.stages
        self.d, self.dv = cfg.d, cfg.dv
        self.causal, self.swap = cfg.causal, cfg.swap
        assert self.d == self.dv or not self.swap
        self.pds_stages = cfg.stages if cfg.swap else 1
        # persistent causal: tiles differ in cost, so each CTA takes the next one from a global
        # counter when it is done with one (the static split of equal tiles otherwise)
        self.dyn_tiles = cfg.persistent and cfg.causal
        assert not (cfg.stagger and cfg.deterministic)  # the semaphores order adds per m by n
        assert not (cfg.dq_red and (cfg.deterministic or cfg.swap))  # unordered adds; hd192/256
        if cfg.swap:
            assert self.tile_n == 128 and self.tile_m in (64, 80, 128)
            assert not dq_transposed(cfg) or cfg.d == 128  # dQ^T's M: 64 head dims a warpgroup
        else:
            assert self.tile_m == 64 and self.tile_n % 32 == 0
            # 48 keys a warpgroup (96-key tiles): dK / dV need the head dim in M (dkv_swap)
            assert cfg.dkv_swap or self.tile_n % 64 == 0
        assert not cfg.dkv_swap or (not cfg.swap and not cfg.persistent)

    def sw_do(self) -> int:
        """dO's swizzle columns: its atoms divide dV's N split (as Q's divide dK's)."""
        return math.gcd(self.dv, n_split(self.cfg, "dv"))

    def sdv_layout(self, dtype, sdk_layout):
        """dV's smem staging (dkv_tma, in dO's buffer): dK's layout unless dv != d."""
        if self.dv == self.d:
            return sdk_layout
        return smem_layout(dtype, self.tile_n, self.dv, swizzle_cols=self.sw_do())

    def dkv_shape(self, cols: int) -> tuple[int, int]:
        """dK's / dV's accumulator tile: (tile_n, cols), or (cols, tile_n) transposed (dkv_swap)."""
        return (cols, self.tile_n) if self.cfg.dkv_swap else (self.tile_n, cols)

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mdO: cute.Tensor,
                 mLSE2: cute.Tensor, mD: cute.Tensor, mdQacc: cute.Tensor, mdK: cute.Tensor,
                 mdV: cute.Tensor, mSem: cute.Tensor, softmax_scale: Float32, window_left: Int32,
                 window_right: Int32, softcap: Float32, mCuSeqlensQ: Optional[cute.Tensor],
                 mCuSeqlensK: Optional[cute.Tensor], mSeqUsedQ: Optional[cute.Tensor],
                 mSeqUsedK: Optional[cute.Tensor], max_seqlen_k: Optional[Int32],
                 grid_ctas: Optional[Int32], stream):
        """Varlen: q/k/v/dO/dK/dV come as (1, total, h, d), LSE2/D/dQaccum/semaphores in the
        per-sequence padded row layout (see kernel); unused optional inputs are None. grid_ctas:
        the persistent grid (one CTA per SM, at most one per KV tile), else None."""
        dtype = mQ.element_type
        self.dtype = dtype
        # (b, s, h, d) -> (s, d, h, b): TMA/tile modes first
        mQ, mK, mV, mdO, mdK, mdV = [
            cute.make_tensor(t.iterator, cute.select(t.layout, mode=[1, 3, 2, 0]))
            for t in (mQ, mK, mV, mdO, mdK, mdV)]
        sdp, dkv, dq = tiled_mmas(dtype, self.cfg)
        tm, tn, d, st = self.tile_m, self.tile_n, self.d, self.stages
        # Q, dO (dK/dV B operands) and K (dQ's) are also read as MN-major operands in head-dim
        # slices of the GEMMs' N split: their swizzle atoms must divide it (hd96: dQ's N is 48,
        # hd192: every N is 96); at hd 64/128/256 this is the widest swizzle, as before
        sw_qdo, sw_k = math.gcd(d, n_split(self.cfg, "dkv")), math.gcd(d, n_split(self.cfg, "dq"))
        dv = self.dv  # dO and V (and dV) have dv columns
        sQ_layout = smem_layout(dtype, tm, d, st, sw_qdo)
        sdO_layout = smem_layout(dtype, tm, dv, st, self.sw_do())
        sK_layout = smem_layout(dtype, tn, d, swizzle_cols=sw_k)
        sV_layout = smem_layout(dtype, tn, dv)
        # P / dS tiles in the SdP accumulator's orientation (S^T: keys x queries when swapped)
        # (dQ transposed: dS keys-contiguous (tile_m x tile_n), so 80 query rows keep the 128-byte
        # swizzle; dQ^T's B operand is then K-major and stmatrix stores S^T transposed)
        pds_shape = (tn, tm) if const_expr(self.swap and not dq_transposed(self.cfg)) else (tm, tn)
        # (dkv_swap: dS^T / P^T are B operands read in each warpgroup's tile_n / 2 key columns,
        # MN-major: the swizzle atom must divide them, 16 columns at 96 keys)
        pds_sw = math.gcd(tn, tn // 2) if const_expr(self.cfg.dkv_swap) else None
        sPdS_layout = smem_layout(dtype, *pds_shape, self.pds_stages, pds_sw)
        # dkv_tma: dK / dV staged in Q's / dO's buffers (free after the last m block)
        sdKV_layout = smem_layout(dtype, tn, d, swizzle_cols=sw_qdo)  # its atoms divide dK's N split
        sdV_layout = self.sdv_layout(dtype, sdKV_layout)
        g2s = cpasync.CopyBulkTensorTileG2SOp()
        tma_Q, tQ = cpasync.make_tiled_tma_atom(g2s, mQ, cute.select(sQ_layout, mode=[0, 1]), (tm, d))
        tma_dO, tdO = cpasync.make_tiled_tma_atom(g2s, mdO, cute.select(sdO_layout, mode=[0, 1]),
                                                  (tm, dv))
        tma_K, tK = cpasync.make_tiled_tma_atom(g2s, mK, sK_layout, (tn, d))
        tma_V, tV = cpasync.make_tiled_tma_atom(g2s, mV, sV_layout, (tn, dv))
        tma_dK, tma_dV = tma_K, tma_V  # placeholders, unused without dkv_tma
        sQ_elems, sdO_elems = cute.cosize(sQ_layout), cute.cosize(sdO_layout)
        if const_expr(self.cfg.dkv_tma):
            s2g = cpasync.CopyBulkTensorTileS2GOp()
            tma_dK, mdK = cpasync.make_tiled_tma_atom(s2g, mdK, sdKV_layout, (tn, d))
            tma_dV, mdV = cpasync.make_tiled_tma_atom(s2g, mdV, sdV_layout, (tn, dv))
            sQ_elems = max(sQ_elems, cute.cosize(sdKV_layout))
            sdO_elems = max(sdO_elems, cute.cosize(sdV_layout))
        self.bytes_q = cute.size_in_bytes(dtype, cute.select(sQ_layout, mode=[0, 1])) + tm * 4
        self.bytes_do = cute.size_in_bytes(dtype, cute.select(sdO_layout, mode=[0, 1])) + tm * 4
        self.bytes_kv = cute.size_in_bytes(dtype, sK_layout) + cute.size_in_bytes(dtype, sV_layout)
        pds_elems = cute.cosize(sPdS_layout)
        p_elems = 0 if const_expr(self.swap) else pds_elems  # P goes through smem only unswapped

        @cute.struct
        class SharedStorage:
            mbar_q: cute.struct.MemRange[cutlass.Int64, 2 * st]
            mbar_do: cute.struct.MemRange[cutlass.Int64, 2 * st]
            mbar_kv: cute.struct.MemRange[cutlass.Int64, 2]
            sLSE: cute.struct.Align[cute.struct.MemRange[Float32, tm * st], 128]
            sD: cute.struct.Align[cute.struct.MemRange[Float32, tm * st], 128]
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, sQ_elems], 1024]
            sdO: cute.struct.Align[cute.struct.MemRange[dtype, sdO_elems], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sV_layout)], 1024]
            sdS: cute.struct.Align[cute.struct.MemRange[dtype, pds_elems], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[dtype, p_elems], 1024]
            sdQ: cute.struct.Align[cute.struct.MemRange[Float32, 0 if self.cfg.dq_red else tm * d],
                                   1024]
            # dynamic persistent tiles: the producer warp's tile indices for the other roles
            mbar_tile: cute.struct.MemRange[cutlass.Int64, 4 if self.dyn_tiles else 0]
            sTile: cute.struct.MemRange[Int32, 2 if self.dyn_tiles else 0]

        self.shared_storage = SharedStorage
        num_n_blocks = (mK.shape[0] + (tn - 1)) // tn
        num_batch = mQ.shape[3]
        if const_expr(self.cfg.varlen):  # (KV blocks of the longest sequence, head, sequence)
            num_n_blocks = (max_seqlen_k + (tn - 1)) // tn
            num_batch = mCuSeqlensQ.shape[0] - 1
        # group_loop: a CTA per KV head, walking its group's query heads
        grid = [num_n_blocks, mK.shape[2] if const_expr(self.cfg.group_loop) else mQ.shape[2],
                num_batch]
        if const_expr(self.cfg.persistent):
            grid = [grid_ctas, 1, 1]
        self.kernel(tQ, tK, tV, tdO, mLSE2, mD, mdQacc, mdK, mdV, mSem, tma_Q, tma_K, tma_V, tma_dO,
                    tma_dK, tma_dV, sdp, dkv, dq, sQ_layout, sdO_layout, sK_layout, sV_layout,
                    sPdS_layout, sdKV_layout,
                    softmax_scale, window_left, window_right, softcap, mCuSeqlensQ, mCuSeqlensK,
                    mSeqUsedQ, mSeqUsedK).launch(
            grid=grid, block=[384, 1, 1], stream=stream,
            min_blocks_per_mp=1, use_pdl=self.cfg.pdl)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mdO: cute.Tensor,
               mLSE2: cute.Tensor, mD: cute.Tensor, mdQacc: cute.Tensor, mdK: cute.Tensor,
               mdV: cute.Tensor, mSem: cute.Tensor, tma_Q: cute.CopyAtom, tma_K: cute.CopyAtom,
               tma_V: cute.CopyAtom, tma_dO: cute.CopyAtom, tma_dK: cute.CopyAtom,
               tma_dV: cute.CopyAtom, sdp: cute.TiledMma, dkv: cute.TiledMma,
               dq: cute.TiledMma, sQ_layout: cute.ComposedLayout, sdO_layout: cute.ComposedLayout,
               sK_layout: cute.ComposedLayout, sV_layout: cute.ComposedLayout,
               sPdS_layout: cute.ComposedLayout, sdKV_layout: cute.ComposedLayout,
               softmax_scale: Float32, window_left: Int32,
               window_right: Int32, softcap: Float32, mCuSeqlensQ: Optional[cute.Tensor],
               mCuSeqlensK: Optional[cute.Tensor], mSeqUsedQ: Optional[cute.Tensor],
               mSeqUsedK: Optional[cute.Tensor]):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        if const_expr(self.cfg.pdl):  # the postprocess may launch once every CTA got here
            cute.arch.griddepcontrol_launch_dependents()  # (it waits for this grid's end)
        if warp_idx == 0:
            for atom in (tma_Q, tma_K, tma_V, tma_dO):
                cpasync.prefetch_descriptor(atom)
        storage = cutlass.memory.SmemAllocator().allocate(self.shared_storage)
        producer = pipeline.CooperativeGroup(pipeline.Agent.Thread, 1)
        consumers = pipeline.CooperativeGroup(pipeline.Agent.Thread, 8)  # warps
        pipe_q = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_q.data_ptr(), num_stages=self.stages, producer_group=producer,
            consumer_group=consumers, tx_count=self.bytes_q, defer_sync=True)
        pipe_do = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_do.data_ptr(), num_stages=self.stages, producer_group=producer,
            consumer_group=consumers, tx_count=self.bytes_do, defer_sync=True)
        pipe_kv = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_kv.data_ptr(), num_stages=1, producer_group=producer,
            consumer_group=consumers, tx_count=self.bytes_kv, defer_sync=True)
        tile_pipe = None
        if const_expr(self.dyn_tiles):  # read by the 8 consumer warps and the dQ warp
            tile_pipe = (pipeline.PipelineAsync.create(
                barrier_storage=storage.mbar_tile.data_ptr(), num_stages=2, producer_group=producer,
                consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, 9), defer_sync=True),
                storage.sTile.get_tensor(cute.make_layout(2)))
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sdO = storage.sdO.get_tensor(sdO_layout.outer, swizzle=sdO_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        sdS = storage.sdS.get_tensor(sPdS_layout.outer, swizzle=sPdS_layout.inner)
        sP = sdS
        if const_expr(not self.swap):
            sP = storage.sP.get_tensor(sPdS_layout.outer, swizzle=sPdS_layout.inner)
        sLSE = storage.sLSE.get_tensor(cute.make_layout((self.tile_m, self.stages)))
        sD = storage.sD.get_tensor(cute.make_layout((self.tile_m, self.stages)))
        sdQ = None  # dq_red: no dQ staging
        if const_expr(not self.cfg.dq_red):
            sdQ = storage.sdQ.get_tensor(cute.make_layout((self.tile_m * self.d // 2, 2)))
        sdK, sdV = sQ, sdO  # unused without dkv_tma
        if const_expr(self.cfg.dkv_tma and self.cfg.persistent):
            # the next tile's Q / dO load into their buffers during this tile's epilogue: dK / dV
            # are staged in the dS and dQ buffers instead (free between tiles; the dQ warp hands
            # its buffer over, see dq_writer's `handover`)
            sdV_layout = self.sdv_layout(self.dtype, sdKV_layout)
            assert cute.cosize(sdKV_layout) <= cute.cosize(sPdS_layout)
            assert cute.cosize(sdV_layout) * 2 <= self.tile_m * self.d * 4
            sdK = storage.sdS.get_tensor(sdKV_layout.outer, swizzle=sdKV_layout.inner)
            sdV = storage.sdQ.get_tensor(sdV_layout.outer, swizzle=sdV_layout.inner, dtype=self.dtype)
        elif const_expr(self.cfg.dkv_tma):
            sdK = storage.sQ.get_tensor(sdKV_layout.outer, swizzle=sdKV_layout.inner)
            sdV_layout = self.sdv_layout(self.dtype, sdKV_layout)
            sdV = storage.sdO.get_tensor(sdV_layout.outer, swizzle=sdV_layout.inner)

        if const_expr(self.cfg.persistent):
            self.persistent_roles(mQ, mK, mV, mdO, mLSE2, mD, mdQacc, mdK, mdV, mSem, sQ, sK, sV,
                                  sdO, sP, sdS, sLSE, sD, sdQ, tma_Q, tma_K, tma_V, tma_dO, sdp, dkv,
                                  dq, pipe_q, pipe_do, pipe_kv, softmax_scale, window_left,
                                  window_right, softcap, warp_idx, tidx, tma_dK, tma_dV, sdK, sdV,
                                  tile_pipe)
        else:
            self.one_tile(mQ, mK, mV, mdO, mLSE2, mD, mdQacc, mdK, mdV, mSem, sQ, sK, sV, sdO, sP,
                          sdS, sLSE, sD, sdQ, tma_Q, tma_K, tma_V, tma_dO, sdp, dkv, dq, pipe_q,
                          pipe_do, pipe_kv, softmax_scale, window_left, window_right, softcap,
                          warp_idx, tidx, tma_dK, tma_dV, sdK, sdV, mCuSeqlensQ, mCuSeqlensK,
                          mSeqUsedQ, mSeqUsedK)

    @cute.jit
    def one_tile(self, mQ, mK, mV, mdO, mLSE2, mD, mdQacc, mdK, mdV, mSem, sQ, sK, sV, sdO, sP,
                 sdS, sLSE, sD, sdQ, tma_Q, tma_K, tma_V, tma_dO, sdp, dkv, dq, pipe_q, pipe_do,
                 pipe_kv, softmax_scale, window_left, window_right, softcap, warp_idx, tidx, tma_dK,
                 tma_dV, sdK, sdV, mCuSeqlensQ, mCuSeqlensK, mSeqUsedQ, mSeqUsedK):
        """One CTA per (KV block, head, batch): the grid's block index is the tile."""
        n_block, head, batch = cute.arch.block_idx()
        if const_expr(self.cfg.spt):
            n_block = cute.arch.grid_dim()[0] - 1 - n_block
        if const_expr(self.cfg.lpt):  # heaviest KV blocks first, in L2-sized groups of heads
            num_n, num_h, num_b = cute.arch.grid_dim()
            # bytes per query row: Q and dO (2 bytes) and dQaccum (fp32)
            group = tile_scheduler.lpt_group(mQ.shape[0], 6 * self.d + 2 * self.dv, 1, num_h * num_b, num_n,
                                             self.cfg.lpt_mb << 20, static_split=False)
            n_block, head, batch = tile_scheduler.decode_kv_block(
                n_block + num_n * (head + num_h * batch), num_n, num_h, num_h * num_b, group)
        seqlen_q, seqlen_k = mQ.shape[0], mK.shape[0]
        bidx = batch  # batch index into the tensors (varlen: 0, the sequence is a row offset)
        if const_expr(self.cfg.varlen):
            # this sequence's rows of the packed tensors: q/dO/K/V/dK/dV from cu_seqlens; LSE2, D,
            # dQaccum and the semaphores from its padded offset, (cu_q[b] + b * tile_m) rounded
            # down to whole tiles: each sequence owns ceil(len / tile_m) tiles there, so its
            # tile-sized loads and dQ reduce-adds never touch another sequence's rows
            offset_q, offset_k = mCuSeqlensQ[batch], mCuSeqlensK[batch]
            seqlen_q = mCuSeqlensQ[batch + 1] - offset_q
            seqlen_k = mCuSeqlensK[batch + 1] - offset_k
            pad = (offset_q + batch * self.tile_m) // self.tile_m
            mQ, mdO = [cute.domain_offset((offset_q, 0, 0, 0), t) for t in (mQ, mdO)]
            mK, mV, mdK, mdV = [cute.domain_offset((offset_k, 0, 0, 0), t) for t in (mK, mV, mdK, mdV)]
            mLSE2, mD = [cute.domain_offset((0, 0, pad * self.tile_m), t) for t in (mLSE2, mD)]
            mdQacc = cute.domain_offset((0, 0, pad * self.tile_m * self.d), mdQacc)
            mSem = cute.domain_offset((0, 0, pad), mSem)
            bidx = 0
        if const_expr(self.cfg.seqused_q):  # rows past it: LSE2 = +inf (P = 0), dQ = 0
            seqlen_q = cutlass.min(mSeqUsedQ[batch], seqlen_q)
        if const_expr(self.cfg.seqused_k):
            seqlen_k = cutlass.min(mSeqUsedK[batch], seqlen_k)
        if const_expr(self.cfg.local):
            m_min, m_max = mask_mod.m_block_range_local_bwd(seqlen_q, seqlen_k, n_block, self.tile_m,
                                                            self.tile_n, window_left, window_right)
        else:
            m_min = mask_mod.m_block_min_bwd(seqlen_q, seqlen_k, n_block, self.tile_m, self.tile_n,
                                             self.causal)
            m_max = (seqlen_q + (self.tile_m - 1)) // self.tile_m
        roles = (mQ, mK, mV, mdO, mLSE2, mD, mdQacc, mdK, mdV, mSem, sQ, sK, sV, sdO, sP, sdS, sLSE,
                 sD, sdQ, tma_Q, tma_K, tma_V, tma_dO, sdp, dkv, dq, pipe_q, pipe_do, pipe_kv,
                 softmax_scale, window_left, window_right, softcap, warp_idx, tidx, n_block, head,
                 bidx, m_min, m_max, seqlen_q, seqlen_k, tma_dK, tma_dV, sdK, sdV)
        if const_expr(self.cfg.varlen or self.cfg.seqused_k):
            if n_block * self.tile_n < seqlen_k:  # blocks past this sequence's keys: no work
                self.roles(*roles)
        else:
            self.roles(*roles)

    @cute.jit
    def roles(self, mQ, mK, mV, mdO, mLSE2, mD, mdQacc, mdK, mdV, mSem, sQ, sK, sV, sdO, sP, sdS,
              sLSE, sD, sdQ, tma_Q, tma_K, tma_V, tma_dO, sdp, dkv, dq, pipe_q, pipe_do, pipe_kv,
              softmax_scale, window_left, window_right, softcap, warp_idx, tidx, n_block, head,
              batch, m_min, m_max, seqlen_q, seqlen_k, tma_dK, tma_dV, sdK, sdV):
        if warp_idx < 4:
            cute.arch.setmaxregister_decrease(REGS[0])
            if warp_idx == 0:
                head_kv = head  # group_loop: the tile's head is the KV head
                if const_expr(not self.cfg.group_loop):
                    head_kv = head // (mQ.shape[2] // mK.shape[2])
                self.producer(mQ, mK, mV, mdO, mLSE2, mD, sQ, sK, sV, sdO, sLSE, sD, tma_Q, tma_K,
                              tma_V, tma_dO, pipe_q, pipe_do, pipe_kv, n_block, head, head_kv, batch,
                              m_min, m_max, seqlen_q, seqlen_k)
            if const_expr(not self.cfg.dq_red):  # (dq_red: the consumers add dQ)
                if warp_idx == 1:
                    self.dq_writer(mdQacc, mSem, sdQ, n_block, head, batch, m_min, m_max,
                                   tidx % 32, seqlen_q, seqlen_k, window_left,
                                   qpk=mQ.shape[2] // mK.shape[2])
        else:
            cute.arch.setmaxregister_increase(REGS[1])
            self.consumer(mdQacc, mdK, mdV, sQ, sK, sV, sdO, sP, sdS, sLSE, sD, sdQ, sdp, dkv, dq,
                          pipe_q, pipe_do, pipe_kv, softmax_scale, tidx - 128, n_block, head, batch,
                          m_min, m_max, seqlen_q, seqlen_k, window_left, window_right, softcap,
                          (tma_dK, tma_dV, sdK, sdV))

    # ------------------------------------------------------------------------------------------
    def m_nomask(self, seqlen_q, seqlen_k, n_block, m_min, m_max):
        """Where the walk's unmasked run starts (the one computation every role uses)."""
        return mask_mod.m_block_nomask_bwd(seqlen_q, seqlen_k, n_block, m_min, m_max, self.tile_m,
                                           self.tile_n, self.causal, self.cfg.local)

    def walk_start(self, seqlen_q, seqlen_k, n_block, m_min, m_max):
        """m_at's m_nomask for the roles that only follow the walk (m_max, unused, without
        stagger)."""
        if const_expr(self.cfg.stagger):
            return self.m_nomask(seqlen_q, seqlen_k, n_block, m_min, m_max)
        return m_max

    def m_at(self, p, m_nomask, m_max, n_block):
        """The query block at walk position p (m_min <= p < m_max): p itself without stagger."""
        if const_expr(self.cfg.stagger):
            return mask_mod.walk_block(p, m_nomask, m_max, n_block % cutlass.max(m_max - m_nomask, 1))
        return p

    @cute.jit
    def producer(self, mQ, mK, mV, mdO, mLSE2, mD, sQ, sK, sV, sdO, sLSE, sD, tma_Q, tma_K, tma_V,
                 tma_dO, pipe_q, pipe_do, pipe_kv, n_block, head, head_kv, batch, m_min, m_max,
                 seqlen_q, seqlen_k, states=None):
        """states: (K/V, Q/dO ring) producer states carried over from the previous tile
        (persistent), returned advanced past this one; None: fresh ones. group_loop: head is
        the KV head, and the Q / dO walk runs once per query head of its group."""
        gK = cute.local_tile(mK[None, None, head_kv, batch], (self.tile_n, self.d), (n_block, 0))
        gV = cute.local_tile(mV[None, None, head_kv, batch], (self.tile_n, self.dv), (n_block, 0))
        tKs, tKg = tma_tiles(tma_K, sK, gK)
        tVs, tVg = tma_tiles(tma_V, sV, gV)
        if const_expr(states is None):
            kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
        else:
            kv_state = states[0]
        pipe_kv.producer_acquire(kv_state)
        cute.copy(tma_K, tKg, tKs, tma_bar_ptr=pipe_kv.producer_get_barrier(kv_state))
        cute.copy(tma_V, tVg, tVs, tma_bar_ptr=pipe_kv.producer_get_barrier(kv_state))
        if const_expr(self.cfg.pdl):  # LSE2 and D come from the preprocess (K, V: the caller's)
            cute.arch.griddepcontrol_wait()
        if const_expr(states is None):
            state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        else:
            state = states[1]
        q_walk = (mQ, mdO, mLSE2, mD, sQ, sdO, sLSE, sD, tma_Q, tma_dO, pipe_q, pipe_do, n_block,
                  batch, m_min, m_max, seqlen_q, seqlen_k)
        if const_expr(self.cfg.group_loop):
            qpk = mQ.shape[2] // mK.shape[2]
            for hg in cutlass.range(qpk, unroll=1):
                state = self.produce_q(state, head * qpk + hg, *q_walk)
        else:
            state = self.produce_q(state, head, *q_walk)
        kv_state.advance()
        return kv_state, state

    @cute.jit
    def produce_q(self, state, head, mQ, mdO, mLSE2, mD, sQ, sdO, sLSE, sD, tma_Q, tma_dO, pipe_q,
                  pipe_do, n_block, batch, m_min, m_max, seqlen_q, seqlen_k):
        """One query head's walk: Q_m + LSE_m and dO_m + D_m into the ring."""
        gQ = cute.local_tile(mQ[None, None, head, batch], (self.tile_m, self.d), (None, 0))
        gdO = cute.local_tile(mdO[None, None, head, batch], (self.tile_m, self.dv), (None, 0))
        tQs, tQg = tma_tiles(tma_Q, sQ, gQ)
        tdOs, tdOg = tma_tiles(tma_dO, sdO, gdO)
        lse_row = mLSE2[batch, head, None]  # padded to whole tiles by the caller
        d_row = mD[batch, head, None]
        m_nomask = self.walk_start(seqlen_q, seqlen_k, n_block, m_min, m_max)
        for p in cutlass.range(m_min, m_max, unroll=1):
            m = self.m_at(p, m_nomask, m_max, n_block)
            pipe_q.producer_acquire(state)
            bar = pipe_q.producer_get_barrier(state)
            cute.copy(tma_Q, tQg[None, m], tQs[None, state.index], tma_bar_ptr=bar)
            with cute.arch.elect_one():  # one issue (each would complete tile_m*4 tx bytes)
                bulk_g2s(sLSE[None, state.index].iterator, lse_row.iterator + m * self.tile_m,
                         self.tile_m * 4, bar)
            pipe_do.producer_acquire(state)
            bar = pipe_do.producer_get_barrier(state)
            cute.copy(tma_dO, tdOg[None, m], tdOs[None, state.index], tma_bar_ptr=bar)
            with cute.arch.elect_one():
                bulk_g2s(sD[None, state.index].iterator, d_row.iterator + m * self.tile_m,
                         self.tile_m * 4, bar)
            state.advance()
        return state

    # ------------------------------------------------------------------------------------------
    @cute.jit
    def consumer(self, mdQacc, mdK, mdV, sQ, sK, sV, sdO, sP, sdS, sLSE, sD, sdQ, sdp, dkv, dq,
                 pipe_q, pipe_do, pipe_kv, softmax_scale, tidx, n_block, head, batch, m_min, m_max,
                 seqlen_q, seqlen_k, window_left, window_right, softcap, dkv_out, tiles=None):
        """tiles: None, or (persistent) (first tile, tiles, grid, KV blocks, heads, tile ring):
        then n_block, head, batch and m_min are per tile, not these."""
        wg = cute.arch.make_warp_uniform(tidx // 128)
        tm, tn, d = self.tile_m, self.tile_n, self.d
        if const_expr(self.cfg.pdl):  # before any global access: dq_red adds to dQaccum, and
            cute.arch.griddepcontrol_wait()  # dK / dV may be zeroed by the kernel just before
        wg_sdp, wg_dkv, wg_dq = sdp.get_slice(wg * 128), dkv.get_slice(wg * 128), dq.get_slice(wg * 128)
        dvm = dv_mma(self.dtype, self.cfg, dkv)  # dkv itself unless dv != d
        wg_dvm = dvm.get_slice(wg * 128)
        thr_sdp = sdp.get_slice(tidx)
        if const_expr(self.swap):
            # S^T = K Q^T, dP^T = V dO^T; dV += P^T dO and dK += dS^T Q with A in registers
            tSrA, tSrB = wg_sdp.make_fragment_A(wg_sdp.partition_A(sK)), wg_sdp.make_fragment_B(
                wg_sdp.partition_B(sQ))
            tPrA, tPrB = wg_sdp.make_fragment_A(wg_sdp.partition_A(sV)), wg_sdp.make_fragment_B(
                wg_sdp.partition_B(sdO))
            tdVrP = wg_dkv.make_fragment_A(wg_dkv.partition_shape_A((tn, tm)))
            tdKrdS = wg_dkv.make_fragment_A(wg_dkv.partition_shape_A((tn, tm)))
            if const_expr(dq_transposed(self.cfg)):  # dQ^T = K^T dS^T: the operands trade places
                tdQrdS = wg_dq.make_fragment_B(wg_dq.partition_B(sdS))
                tdQrK = wg_dq.make_fragment_A(wg_dq.partition_A(transpose_view(sK)))
            else:
                tdQrdS = wg_dq.make_fragment_A(wg_dq.partition_A(transpose_view(sdS)))
                tdQrK = wg_dq.make_fragment_B(wg_dq.partition_B(transpose_view(sK)))
        else:
            tSrA, tSrB = wg_sdp.make_fragment_A(wg_sdp.partition_A(sQ)), wg_sdp.make_fragment_B(
                wg_sdp.partition_B(sK))
            tPrA, tPrB = wg_sdp.make_fragment_A(wg_sdp.partition_A(sdO)), wg_sdp.make_fragment_B(
                wg_sdp.partition_B(sV))
            tdQrdS = wg_dq.make_fragment_A(wg_dq.partition_A(sdS))
            tdQrK = wg_dq.make_fragment_B(wg_dq.partition_B(transpose_view(sK)))
            if const_expr(self.cfg.dkv_swap):  # dV^T = dO^T P, dK^T = Q^T dS: A, B trade places
                tdVrP = wg_dvm.make_fragment_B(wg_dvm.partition_B(transpose_view(sP)))
                tdKrdS = wg_dkv.make_fragment_B(wg_dkv.partition_B(transpose_view(sdS)))
            else:
                tdVrP = wg_dvm.make_fragment_A(wg_dvm.partition_A(transpose_view(sP)))
                tdKrdS = wg_dkv.make_fragment_A(wg_dkv.partition_A(transpose_view(sdS)))
        if const_expr(self.cfg.dkv_swap):
            tdVrdO = wg_dvm.make_fragment_A(wg_dvm.partition_A(transpose_view(sdO)))
            tdKrQ = wg_dkv.make_fragment_A(wg_dkv.partition_A(transpose_view(sQ)))
        else:
            tdVrdO = wg_dvm.make_fragment_B(wg_dvm.partition_B(transpose_view(sdO)))
            tdKrQ = wg_dkv.make_fragment_B(wg_dkv.partition_B(transpose_view(sQ)))
        pds_shape = (tn, tm) if const_expr(self.swap) else (tm, tn)
        shape_S = wg_sdp.partition_shape_C(pds_shape)
        acc_dV = cute.make_rmem_tensor(wg_dvm.partition_shape_C(self.dkv_shape(self.dv)), Float32)
        acc_dK = cute.make_rmem_tensor(wg_dkv.partition_shape_C(self.dkv_shape(d)), Float32)
        acc_dV.fill(0.0)
        acc_dK.fill(0.0)
        tScS_mn = acc_to_mn(thr_sdp.partition_C(cute.make_identity_tensor(pds_shape)))
        # P / dS registers -> smem (stmatrix), in the accumulator's own orientation (dQ transposed:
        # stmatrix.trans into the keys-contiguous dS)
        st_atom, thr_st = stmatrix_copy(self.dtype, sdp, tidx, transpose=dq_transposed(self.cfg))
        sdS_st = transpose_view(sdS) if const_expr(dq_transposed(self.cfg)) else sdS
        thr_dq_copy = dq_copy(self.cfg).get_slice(tidx)
        if const_expr(self.cfg.dq_red):
            # this thread's 4-float vectors of query block 0's dQaccum tile, where the dQ warp
            # would bulk-add them (chunk wg at wg * chunk); block m's tile is m * tm * d further
            tdQsdQ = thr_dq_copy.partition_D(cute.make_tensor(
                mdQacc[batch, head, None].iterator, cute.make_layout((tm * d // 2, 2))))
        else:
            tdQsdQ = thr_dq_copy.partition_D(sdQ)
        scale_log2 = softmax_scale * Float32(math.log2(math.e))
        softcap_pre = Float32(0.0)
        if const_expr(self.cfg.softcap):
            # S_cap = cap * tanh(S * scale / cap): P = exp2(tanh(..) * cap * log2e - LSE_log2)
            softcap_pre = softmax_scale / softcap
            scale_log2 = softcap * Float32(math.log2(math.e))
        bf16 = self.dtype is cutlass.BFloat16

        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
        if const_expr(tiles is None):
            pipe_kv.consumer_wait(kv_state)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        ctx = dict(tSrA=tSrA, tSrB=tSrB, tPrA=tPrA, tPrB=tPrB, tdVrP=tdVrP, tdKrdS=tdKrdS,
                   tdQrdS=tdQrdS, tdVrdO=tdVrdO, tdKrQ=tdKrQ, tdQrK=tdQrK, shape_S=shape_S,
                   acc_dV=acc_dV, acc_dK=acc_dK, tScS_mn=tScS_mn, thr_st=thr_st, st_atom=st_atom, tdQsdQ=tdQsdQ,
                   sP=sP, sdS=sdS_st, sLSE=sLSE, sD=sD, scale_log2=scale_log2, bf16=bf16, wg=wg,
                   sdp=sdp, dkv=dkv, dvm=dvm, dq=dq, pipe_q=pipe_q, pipe_do=pipe_do, seqlen_q=seqlen_q,
                   seqlen_k=seqlen_k, n_block=n_block, window_left=window_left,
                   window_right=window_right, softcap_pre=softcap_pre)
        if const_expr(self.cfg.group_loop):  # query heads per KV head (dQaccum: every query head)
            ctx["qpk"] = mdQacc.shape[1] // mdK.shape[2]
        if const_expr(self.cfg.desc_hoist):
            # wgmma smem descriptors taken once here, not rebuilt from the smem pointers in every
            # m block (wgmma_utils.DescFrag); registers stay DSL fragments. K's (S's A) k-block
            # descriptors are pinned too (hd128: 6 uniform ops fewer per m block); V's and K^T's
            # as well spill (24 B with V's, 180 B with all three), so those add to one base
            for key in ("tSrA", "tSrB", "tPrA", "tPrB", "tdVrdO", "tdKrQ", "tdQrdS", "tdQrK"):
                ctx["h_" + key] = DescFrag(ctx[key], fixed_k=8 if key == "tSrA" else 0)
        if const_expr(tiles is None):
            state = self.m_blocks_group(ctx, state, n_block, m_min, m_max, seqlen_q, seqlen_k,
                                        window_left, window_right)
            head_out = head  # dkv_red: dK / dV add into their KV head's fp32 accumulator
            if const_expr(self.cfg.dkv_red):
                head_out = head // (mdQacc.shape[1] // mdK.shape[2])
            self.store_dkv(acc_dK, acc_dV, softmax_scale, mdK, mdV, dkv, dvm, dkv_out, tidx, wg,
                           n_block, head_out, batch, seqlen_k)
        else:
            tile = (ctx, acc_dK, acc_dV, pipe_kv, m_max, seqlen_q, seqlen_k, window_left,
                    window_right, softmax_scale, mdK, mdV, dkv, dvm, dkv_out, tidx, wg)
            self.consumer_tiles(tiles, state, kv_state, tile)

    @cute.jit
    def m_blocks_group(self, ctx, state, n_block, m_min, m_max, seqlen_q, seqlen_k, window_left,
                       window_right):
        """m_blocks, once per query head of the group (group_loop; dK / dV keep summing)."""
        walk = (n_block, m_min, m_max, seqlen_q, seqlen_k, window_left, window_right)
        if const_expr(self.cfg.group_loop):
            for _ in cutlass.range(ctx["qpk"], unroll=1):
                state = self.m_blocks(ctx, state, *walk)
        else:
            state = self.m_blocks(ctx, state, *walk)
        return state

    @cute.jit
    def m_blocks(self, ctx, state, n_block, m_min, m_max, seqlen_q, seqlen_k, window_left,
                 window_right):
        """The consumers' walk over one KV tile's query blocks; returns the ring state."""
        # unmasked blocks run no mask code: a masked loop and an unmasked one (a window with
        # window_split: three); the walk's masked part is in order (m_at(p) = p there), its
        # unmasked part goes through m_at like the producer's and dQ's
        if const_expr(self.cfg.window_split):
            # a window's walk is in order (m_nomask = m_max): blocks on its right edge, then blocks
            # that see the whole KV tile (no mask), then blocks on its left edge
            a, b = mask_mod.window_nomask_range_bwd(seqlen_q, seqlen_k, n_block, m_min, m_max,
                                                    self.tile_m, self.tile_n, window_left,
                                                    window_right)
            for m in cutlass.range(m_min, a, unroll=1):
                state = self.one_m_block(ctx, state, m, True)
            for m in cutlass.range(a, b, unroll=1):
                state = self.one_m_block(ctx, state, m, False)
            for m in cutlass.range(b, m_max, unroll=1):
                state = self.one_m_block(ctx, state, m, True)
        else:
            m_nomask = self.m_nomask(seqlen_q, seqlen_k, n_block, m_min, m_max)
            for m in cutlass.range(m_min, m_nomask, unroll=1):
                state = self.one_m_block(ctx, state, m, True)
            for p in cutlass.range(m_nomask, m_max, unroll=1):
                state = self.one_m_block(ctx, state, self.m_at(p, m_nomask, m_max, n_block), False)
        return state

    @cute.jit
    def store_dkv(self, acc_dK, acc_dV, softmax_scale, mdK, mdV, dkv, dvm, dkv_out, tidx, wg,
                  n_block, head, batch, seqlen_k):
        """The tile's dK (times the softmax scale) and dV to global memory."""
        acc_dK.store(acc_dK.load() * softmax_scale)
        if const_expr(self.cfg.dkv_tma):
            tma_dK, tma_dV, sdK, sdV = dkv_out
            if const_expr(self.cfg.persistent):
                # dV is staged in the dQ buffer: wait until the dQ warp's last adds have read it
                cute.arch.barrier(barrier_id=BAR_DQ_EMPTY + wg, number_of_threads=160)
            self.store_tma(acc_dK, acc_dV, sdK, sdV, mdK, mdV, tma_dK, tma_dV, dkv, dvm, tidx, n_block,
                           head, batch)
            if const_expr(self.cfg.persistent):
                # warp 0 waited for the stores to read smem: the dS / dQ buffers are free again
                cute.arch.barrier(barrier_id=BAR_PDS, number_of_threads=256)
                cute.arch.barrier_arrive(barrier_id=BAR_DQ_FULL + wg, number_of_threads=160)
        else:
            self.store_rows(acc_dK, mdK, dkv, tidx, n_block, head, batch, seqlen_k, self.d)
            self.store_rows(acc_dV, mdV, dvm, tidx, n_block, head, batch, seqlen_k, self.dv)

    @cute.jit
    def one_m_block(self, c, state, m, masked: cutlass.Constexpr[bool]):
        tm = self.tile_m
        pds_idx = state.index if const_expr(self.pds_stages > 1) else 0
        c["pipe_q"].consumer_wait(state)
        acc_S = cute.make_rmem_tensor(c["shape_S"], Float32)
        if const_expr(self.swap):
            self.mm(c, "sdp", acc_S, "tSrA", "tSrB", state.index, True, -1)
        else:
            gemm(c["sdp"], acc_S, c["tSrA"][None, None, None, state.index], c["tSrB"], True, -1)
        # stats_early: this thread's LSE values into registers now, so their smem loads complete
        # under the GEMMs instead of stalling the exp2 loop (D likewise, under the rest of dP's
        # GEMM); else each is loaded where it is used (fewer live registers)
        lse_r = None
        if const_expr(self.cfg.stats_early):
            lse_r = self.load_stats(c["tScS_mn"], c["sLSE"][None, state.index])
        c["pipe_do"].consumer_wait(state)
        acc_dP = cute.make_rmem_tensor(c["shape_S"], Float32)
        if const_expr(self.swap):
            self.mm(c, "sdp", acc_dP, "tPrA", "tPrB", state.index, True, 1)
        else:
            gemm(c["sdp"], acc_dP, c["tPrA"][None, None, None, state.index], c["tPrB"], True, 1)
        S_mn = acc_to_mn(acc_S)
        coord = c["tScS_mn"]
        if const_expr(self.cfg.softcap):
            # S <- tanh(S * scale / cap) before the mask (a masked -inf must stay -inf); keep
            # 1 - tanh^2 for dS (the scale is applied to dQ and dK later, as without softcap)
            dtanh = cute.make_rmem_tensor(c["shape_S"], Float32)
            dt_mn = acc_to_mn(dtanh)
            for r in cutlass.range_constexpr(cute.size(S_mn, mode=[0])):
                for j in cutlass.range_constexpr(cute.size(S_mn, mode=[1])):
                    t = sm.tanh_approx(S_mn[r, j] * c["softcap_pre"])
                    S_mn[r, j] = t
                    dt_mn[r, j] = Float32(1.0) - t * t
        if const_expr(masked):
            mask_mod.apply_mask_bwd(S_mn, coord, c["seqlen_q"], c["seqlen_k"], m, c["n_block"], tm,
                                    self.tile_n, self.causal, self.swap, self.cfg.local,
                                    c["window_left"], c["window_right"])
        # P = exp2(S * scale*log2e - LSE_log2); LSE rows past seqlen_q are +inf (P = 0)
        if const_expr(not self.cfg.stats_early):
            lse_r = self.load_stats(coord, c["sLSE"][None, state.index])
        self.pointwise(S_mn, None, lse_r, c["scale_log2"])
        if const_expr(self.swap):
            self.pack(c["tdVrP"], acc_S, c["bf16"])
            if const_expr(self.cfg.dv_early):
                # dV += P^T dO now: the tensor pipe runs it while this warpgroup computes dS
                # (else it idles there, both warpgroups being in their dS step at once)
                self.mm(c, "dvm", c["acc_dV"], "tdVrP", "tdVrdO", state.index, False, -1)
        else:
            rP = cute.make_rmem_tensor(acc_S.layout.shape, self.dtype)
            self.pack(rP, acc_S, c["bf16"])
            cute.arch.barrier(barrier_id=BAR_PDS, number_of_threads=256)  # last sP / sdS reads
            thr_st = c["thr_st"]
            cute.copy(c["st_atom"], thr_st.retile(rP), thr_st.partition_D(c["sP"][None, None, 0]))
        d_r = None
        if const_expr(self.cfg.stats_early):
            d_r = self.load_stats(coord, c["sD"][None, state.index])
        # dP done (dv_early: dV may still run)
        warpgroup.wait_group(1 if const_expr(self.swap and self.cfg.dv_early) else 0)
        # dS = P * (dP - D)  (softcap: times d tanh)
        dP_mn = acc_to_mn(acc_dP)
        if const_expr(not self.cfg.stats_early):
            d_r = self.load_stats(coord, c["sD"][None, state.index])
        self.pointwise(dP_mn, S_mn, d_r, None)
        if const_expr(self.cfg.softcap):
            for r in cutlass.range_constexpr(cute.size(dP_mn, mode=[0])):
                for j in cutlass.range_constexpr(cute.size(dP_mn, mode=[1])):
                    dP_mn[r, j] = dP_mn[r, j] * dt_mn[r, j]
        if const_expr(self.swap):
            self.pack(c["tdKrdS"], acc_dP, c["bf16"])
            rdS = cute.make_tensor(c["tdKrdS"].iterator, cute.make_layout(acc_dP.layout.shape))
        else:
            rdS = cute.make_rmem_tensor(acc_dP.layout.shape, self.dtype)
            self.pack(rdS, acc_dP, c["bf16"])
        thr_st = c["thr_st"]
        cute.copy(c["st_atom"], thr_st.retile(rdS), thr_st.partition_D(c["sdS"][None, None, pds_idx]))
        if const_expr(self.swap and not self.cfg.dv_early):
            # dV += P^T dO (P^T in registers) while the other warpgroup finishes its dS
            self.mm(c, "dvm", c["acc_dV"], "tdVrP", "tdVrdO", state.index, False, -1)
        dk_early = const_expr(self.swap and self.cfg.dk_early)
        if const_expr(dk_early):
            # dK += dS^T Q needs only this warpgroup's dS (registers): issued before the barrier,
            # it keeps the tensor pipe busy while the warpgroups wait for each other there
            self.mm(c, "dkv", c["acc_dK"], "tdKrdS", "tdKrQ", state.index, False, -1)
        cute.arch.fence_view_async_shared()  # generic-proxy smem writes -> wgmma (async proxy)
        cute.arch.barrier(barrier_id=BAR_PDS, number_of_threads=256)
        if const_expr(self.cfg.dkv_swap):  # dV^T += dO^T P
            gemm(c["dvm"], c["acc_dV"], c["tdVrdO"][None, None, None, state.index],
                 c["tdVrP"][None, None, None, 0], False, -1)
        elif const_expr(not self.swap):
            gemm(c["dvm"], c["acc_dV"], c["tdVrP"][None, None, None, 0],
                 c["tdVrdO"][None, None, None, state.index], False, -1)
        # dQ = dS K (or dQ^T = K^T dS^T)
        acc_dQ = cute.make_rmem_tensor(
            c["dq"].get_slice(c["wg"] * 128).partition_shape_C(dq_tile_shape(self.cfg)), Float32)
        if const_expr(dq_transposed(self.cfg)):
            self.mm(c, "dq", acc_dQ, "tdQrK", "tdQrdS", pds_idx, True, 1)
        else:
            self.mm(c, "dq", acc_dQ, "tdQrdS", "tdQrK", pds_idx, True, 1)
        c["pipe_do"].consumer_release(state)  # dV is done with dO
        # dK += dS^T Q
        if const_expr(dk_early):  # dK is done too (Q free); dQ, the last GEMM, before its store
            c["pipe_q"].consumer_release(state)
            warpgroup.wait_group(0)
        elif const_expr(self.swap):
            self.mm(c, "dkv", c["acc_dK"], "tdKrdS", "tdKrQ", state.index, False, 1)
        elif const_expr(self.cfg.dkv_swap):  # dK^T += Q^T dS
            gemm(c["dkv"], c["acc_dK"], c["tdKrQ"][None, None, None, state.index],
                 c["tdKrdS"][None, None, None, 0], False, 1)
        else:
            gemm(c["dkv"], c["acc_dK"], c["tdKrdS"][None, None, None, 0],
                 c["tdKrQ"][None, None, None, state.index], False, 1)
        flat = cute.make_tensor(acc_dQ.iterator, cute.make_layout(c["tdQsdQ"].shape))
        if const_expr(self.cfg.dq_red):
            # dQ -> dQaccum from registers, one 16-byte reduction per vector (under dK's GEMM)
            g = cute.make_tensor(c["tdQsdQ"].iterator + m * (tm * self.d), c["tdQsdQ"].layout)
            for j in cutlass.range_constexpr(cute.size(g, mode=[1])):
                red_add_f32(g[None, j, 0].iterator, *(flat[v, j, 0] for v in range(4)))
        else:
            # dQ -> smem chunk of this warpgroup, once the dQ warp has read the previous one
            cute.arch.barrier(barrier_id=BAR_DQ_EMPTY + c["wg"], number_of_threads=160)
            cute.autovec_copy(flat, c["tdQsdQ"])
            cute.arch.fence_view_async_shared()
            cute.arch.barrier_arrive(barrier_id=BAR_DQ_FULL + c["wg"], number_of_threads=160)
        if const_expr(not dk_early):
            warpgroup.wait_group(0)
            c["pipe_q"].consumer_release(state)
        state.advance()
        return state

    def mm(self, c, mma, acc, a, b, stage, zero_init, wait):
        """One GEMM of ctx operands a, b (keys); the one in a smem ring takes slot `stage`.
        desc_hoist: the smem operands' DescFrags, built before the m loop (ctx "h_" keys)."""
        if const_expr(self.cfg.desc_hoist):
            gemm_desc(c[mma], acc, c.get("h_" + a, c[a]), c["h_" + b], stage, zero_init, wait)
        else:
            fa, fb = c[a], c[b]
            if const_expr(cute.rank(fa) == 4):
                fa = fa[None, None, None, stage]
            if const_expr(cute.rank(fb) == 4):
                fb = fb[None, None, None, stage]
            gemm(c[mma], acc, fa, fb, zero_init, wait)

    @cute.jit
    def load_stats(self, coord, s_vec):
        """The per-query values (LSE2 or D) of this thread's S elements, one per query it holds:
        its columns when swapped, else its rows."""
        mode = 1 if const_expr(self.swap) else 0
        vec = cute.make_rmem_tensor((cute.size(coord, mode=[mode]),), Float32)
        for i in cutlass.range_constexpr(cute.size(vec)):
            vec[i] = s_vec[coord[0, i][1]] if const_expr(self.swap) else s_vec[coord[i, 0][0]]
        return vec

    @cute.jit
    def pointwise(self, acc_mn, p_mn, vec, scale_log2):
        """p_mn is None: acc <- exp2(acc * scale_log2 - vec); else acc <- p * (acc - vec). vec
        (load_stats) holds the value of each element's query (the column when swapped, else the row)."""
        for r in cutlass.range_constexpr(cute.size(acc_mn, mode=[0])):
            for c in cutlass.range_constexpr(cute.size(acc_mn, mode=[1])):
                v = vec[c] if const_expr(self.swap) else vec[r]
                if const_expr(p_mn is None):
                    acc_mn[r, c] = cute.arch.exp2(acc_mn[r, c] * scale_log2 - v)
                else:
                    acc_mn[r, c] = p_mn[r, c] * (acc_mn[r, c] - v)

    @cute.jit
    def pack(self, dst, src, bf16: cutlass.Constexpr[bool]):
        """fp32 accumulator -> 16-bit registers in the same order (two per 32-bit register), before
        the next wgmma fence (a late convert makes ptxas serialize RS wgmmas)."""
        d32 = cute.recast_tensor(dst, Int32)
        for i in cutlass.range_constexpr(cute.size(d32)):
            d32[i] = pack_f16x2(src[2 * i], src[2 * i + 1], bf16)

    @cute.jit
    def store_tma(self, acc_dK, acc_dV, sdK, sdV, mdK, mdV, tma_dK, tma_dV, mma_dk, mma_dv, tidx,
                  n_block, head, batch):
        """dK / dV tiles through smem (Q's and dO's buffers, free once both warpgroups are past
        their last m block) and one TMA store each, rows past seqlen_k clipped by the TMA unit:
        the register path's 4-byte stores queued in the LSU at every CTA's end (ncu hd128 1k:
        lg-throttle stalls 0.9 per instruction; FA4 stores these tiles by TMA too)."""
        cute.arch.barrier(barrier_id=BAR_PDS, number_of_threads=256)  # last wgmma reads of Q / dO
        for acc, s, mma in ((acc_dK, sdK, mma_dk), (acc_dV, sdV, mma_dv)):
            # (dkv_swap: dK^T / dV^T, stored transposed into the row-major tiles)
            st_atom, thr = stmatrix_copy(self.dtype, mma, tidx, transpose=self.cfg.dkv_swap)
            r = cute.make_rmem_tensor_like(acc, self.dtype)
            r.store(acc.load().to(self.dtype))
            dst = transpose_view(s) if const_expr(self.cfg.dkv_swap) else s
            cute.copy(st_atom, thr.retile(r), thr.partition_D(dst))
        cute.arch.fence_view_async_shared()  # generic-proxy smem writes -> TMA (async proxy)
        cute.arch.barrier(barrier_id=BAR_PDS, number_of_threads=256)
        if tidx < 32:
            for atom, s, m, cols in ((tma_dK, sdK, mdK, self.d), (tma_dV, sdV, mdV, self.dv)):
                g = cute.local_tile(m[None, None, head, batch], (self.tile_n, cols), (n_block, 0))
                ts, tg = tma_tiles(atom, s, g)
                cute.copy(atom, ts, tg)
            cute.arch.cp_async_bulk_commit_group()
            cute.arch.cp_async_bulk_wait_group(0, read=True)  # smem must outlive the stores' reads

    @cute.jit
    def store_rows(self, acc, mOut, tiled_mma, tidx, n_block, head, batch, seqlen_k,
                   cols: cutlass.Constexpr[int]):
        """dK / dV tile (cols: d or dv) from registers to global memory (rows past seqlen_k
        skipped); dkv_red: added to it instead, two columns (8 bytes) a reduction."""
        r = cute.make_rmem_tensor_like(acc, mOut.element_type)
        r.store(acc.load().to(mOut.element_type))
        gO = cute.local_tile(mOut[None, None, head, batch], (self.tile_n, cols), (n_block, 0))
        thr = tiled_mma.get_slice(tidx)
        if const_expr(self.cfg.dkv_swap):  # dK^T / dV^T: keys are the accumulator's columns
            self.store_cols(r, thr.partition_C(transpose_view(gO)),
                            thr.partition_C(cute.make_identity_tensor((cols, self.tile_n))),
                            n_block, seqlen_k)
            return
        tg_mn = acc_to_mn(thr.partition_C(gO))
        tc_mn = acc_to_mn(thr.partition_C(cute.make_identity_tensor((self.tile_n, cols))))
        r_mn = acc_to_mn(r)
        for i in cutlass.range_constexpr(cute.size(r_mn, mode=[0])):
            if n_block * self.tile_n + tc_mn[i, 0][0] < seqlen_k:
                if const_expr(self.cfg.dkv_red):  # (j, j + 1): one thread's adjacent columns
                    for j in cutlass.range_constexpr(0, cute.size(r_mn, mode=[1]), 2):
                        red_add_f32(tg_mn.iterator + cute.crd2idx((i, j), tg_mn.layout),
                                    r_mn[i, j], r_mn[i, j + 1])
                else:
                    for j in cutlass.range_constexpr(cute.size(r_mn, mode=[1])):
                        tg_mn[i, j] = r_mn[i, j]

    @cute.jit
    def store_cols(self, r, tg, tc, n_block, seqlen_k):
        """store_rows for a transposed tile (dkv_swap): one element a store (or, dkv_red, a 4-byte
        reduction), keys past seqlen_k skipped."""
        for i in cutlass.range_constexpr(cute.size(r)):
            if n_block * self.tile_n + tc[i][1] < seqlen_k:
                if const_expr(self.cfg.dkv_red):
                    red_add_f32(tg.iterator + cute.crd2idx(i, tg.layout), r[i])
                else:
                    tg[i] = r[i]
