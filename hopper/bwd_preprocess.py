"""Backward preprocess: D = rowsum(dO * O) in fp32, and the LSE in the log2 domain the backward
main loop wants (P = exp2(S * scale * log2 e - lse_log2)).

A fully masked row has LSE = -inf (fa3's forward convention, never NaN); it becomes +inf here so
the backward's exp2 gives P = 0 for it instead of inf.

Memory-bound: each row of O/dO is read once with 16-byte vector loads by a group of dv/8 lanes,
reduced with warp shuffles, and two floats per row are written. Plain SIMT code, so the same
kernel serves sm80 and sm90.

Varlen (packed (1, total, h, dv) O/dO, LSE (1, h, total)): one CTA column per sequence, and D /
LSE2 written at the sm90 backward's per-sequence padded offsets (pad_tile = its tile_m; see
bwd_kernel.py). seqused: rows past it are not written (the caller fills LSE2 = +inf, D = 0).

fill (dense, the sm90 backward): the kernel also writes what the caller used to pre-fill, so the
caller allocates with torch.empty (each torch.zeros / full is a memset launch plus ~14 us of host
time): LSE2 = +inf and D = 0 for rows past the sequence (or seqused) up to the pad_tile boundary,
dQaccum's rows zeroed (FA3's C++ preprocess clears dq_accum too; the same bytes a memset writes),
and with `sem` the deterministic semaphores, one per pad_tile rows, zeroed.
"""

import dataclasses
import math
from typing import Optional

import torch

from fa3 import _compile

THREADS = 128
VEC = 8  # 16 bytes of fp16/bf16 per lane


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    dtype: str  # "bf16" | "fp16"
    head_dim_v: int
    varlen: bool = False
    seqused: bool = False
    pad_tile: int = 0  # varlen / fill: the main kernel's tile_m (padded output rows)
    fill: bool = False  # dense: write padded rows, zero dQaccum (head_dim_v floats a row)
    sem: bool = False  # fill: zero the deterministic semaphores (one int32 per pad_tile rows)
    pdl: bool = False  # fill (sm90): let the PDL-launched main kernel start during the last wave

    def __post_init__(self):
        if self.dtype not in ("bf16", "fp16"):
            raise ValueError(f"dtype must be bf16 or fp16, got {self.dtype}")
        if self.head_dim_v % VEC or not 0 < self.head_dim_v <= 256:
            raise ValueError(f"head_dim_v must be a multiple of {VEC} in 8..256, got {self.head_dim_v}")
        if (self.varlen or self.fill) != (self.pad_tile > 0):
            raise ValueError("varlen and fill need pad_tile (the main kernel's tile_m), and only they")
        if self.fill and (self.varlen or self.pad_tile % self.rows_per_cta):
            raise ValueError("fill is dense only, with pad_tile a multiple of rows_per_cta")
        if self.sem and not self.fill:
            raise ValueError("sem needs fill")
        if self.pdl and not self.fill:
            raise ValueError("pdl needs fill (griddepcontrol is sm90+)")

    @property
    def lanes(self) -> int:
        """Lanes per row: a power of two >= dv/8 so a row's group never straddles a warp."""
        return 1 << math.ceil(math.log2(self.head_dim_v // VEC))

    @property
    def rows_per_cta(self) -> int:
        return THREADS // self.lanes


def variants():
    plain = [PreprocessConfig(dt, dv) for dt in ("bf16", "fp16") for dv in (64, 96, 128, 192, 256)]
    # the sm90 backward's dense fills at its tile_m (hopper/flash_bwd.py: 128 at hd64, else 64),
    # deterministic (sem) or not, seqused_q or not (a few corners for the last two)
    fills = [PreprocessConfig(dt, dv, pad_tile=128 if dv <= 64 else 64, fill=True)
             for dt in ("bf16", "fp16") for dv in (64, 96, 128, 192, 256)]
    fills += [PreprocessConfig("bf16", 128, pad_tile=64, fill=True, sem=True),
              PreprocessConfig("fp16", 64, pad_tile=128, fill=True, sem=True, seqused=True),
              PreprocessConfig("bf16", 256, pad_tile=64, fill=True, seqused=True),
              PreprocessConfig("bf16", 64, pad_tile=64, fill=True),  # hd64 softcap: tile_m 64
              PreprocessConfig("bf16", 128, pad_tile=80, fill=True)]  # hd128 80-row tiles (A/B)
    return plain + fills


def build(cfg: PreprocessConfig, extra_options: str = ""):
    cute = _compile.dsl()
    import cutlass
    from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

    dt = cutlass.BFloat16 if cfg.dtype == "bf16" else cutlass.Float16
    dv, lanes, rows = cfg.head_dim_v, cfg.lanes, cfg.rows_per_cta
    log2e = math.log2(math.e)

    varlen, seqused, pad_tile, fill, sem = cfg.varlen, cfg.seqused, cfg.pad_tile, cfg.fill, cfg.sem
    pdl = cfg.pdl

    @cute.kernel
    def kernel(mO: cute.Tensor, mdO: cute.Tensor, mLSE: cute.Tensor, mD: cute.Tensor,
               mLSE2: cute.Tensor, mCu: Optional[cute.Tensor], mUsed: Optional[cute.Tensor],
               mdQacc: Optional[cute.Tensor], mSem: Optional[cute.Tensor]):
        tidx, _, _ = cute.arch.thread_idx()
        m_blk, hi, bi = cute.arch.block_idx()
        if cutlass.const_expr(pdl):  # the main kernel's CTAs may launch once the last wave runs
            cute.arch.griddepcontrol_launch_dependents()
        lane = tidx % lanes
        row = m_blk * rows + tidx // lanes
        seqlen = mO.shape[1]
        bidx = bi  # batch index into the tensors (varlen: 0, the sequence is a row offset)
        if cutlass.const_expr(varlen):
            off = mCu[bi]
            seqlen = mCu[bi + 1] - off
            pad = (off + bi * pad_tile) // pad_tile * pad_tile
            mO, mdO = [cute.domain_offset((0, off, 0, 0), t) for t in (mO, mdO)]
            mLSE = cute.domain_offset((0, 0, off), mLSE)
            mD, mLSE2 = [cute.domain_offset((0, 0, pad), t) for t in (mD, mLSE2)]
            bidx = 0
        end = seqlen  # rows this CTA column writes
        if cutlass.const_expr(fill):  # padded rows too, up to the main kernel's tile boundary
            end = (seqlen + (pad_tile - 1)) // pad_tile * pad_tile
        if cutlass.const_expr(seqused):
            seqlen = cutlass.min(mUsed[bi], seqlen)
        acc = cutlass.Float32(0.0)
        if row < seqlen:
            if lane * VEC < dv:
                gO = cute.local_tile(mO[bidx, row, hi, None], (VEC,), (lane,))
                gdO = cute.local_tile(mdO[bidx, row, hi, None], (VEC,), (lane,))
                rO = cute.make_fragment_like(gO)
                rdO = cute.make_fragment_like(gdO)
                cute.autovec_copy(gO, rO)
                cute.autovec_copy(gdO, rdO)
                prod = rO.load().to(cutlass.Float32) * rdO.load().to(cutlass.Float32)
                acc = prod.reduce(cute.ReductionOp.ADD, cutlass.Float32(0.0), 0)
        acc = cute.arch.warp_reduction(acc, lambda a, b: a + b, threads_in_group=lanes)
        if row < seqlen:
            if lane == 0:
                mD[bidx, hi, row] = acc
                lse = mLSE[bidx, hi, row]
                mLSE2[bidx, hi, row] = lse * log2e if lse != -cutlass.Float32.inf else cutlass.Float32.inf
        if cutlass.const_expr(fill):
            if row < end:
                if row >= seqlen:  # padding / past seqused: P = exp2(-inf) = 0, no dS
                    if lane == 0:
                        mD[bidx, hi, row] = cutlass.Float32(0.0)
                        mLSE2[bidx, hi, row] = cutlass.Float32.inf
                if lane * VEC < dv:  # this row's dQaccum floats, 8 a lane (two 16-byte stores)
                    gAcc = cute.local_tile(mdQacc[bidx, hi, None], (VEC,), (row * (dv // VEC) + lane,))
                    zero = cute.make_fragment_like(gAcc)
                    zero.fill(0.0)
                    cute.autovec_copy(zero, gAcc)
                if cutlass.const_expr(sem):
                    if lane == 0 and row % pad_tile == 0:
                        mSem[bidx, hi, row // pad_tile] = cutlass.Int32(0)

    @cute.jit
    def launch_seqs(mO: cute.Tensor, mdO: cute.Tensor, mLSE: cute.Tensor, mD: cute.Tensor,
                    mLSE2: cute.Tensor, mCu: Optional[cute.Tensor], mUsed: Optional[cute.Tensor],
                    max_seqlen: Optional[cutlass.Int32], stream):
        b, s, h = mO.shape[0], mO.shape[1], mO.shape[2]
        if cutlass.const_expr(varlen):
            b, s = mCu.shape[0] - 1, max_seqlen
        kernel(mO, mdO, mLSE, mD, mLSE2, mCu, mUsed, None, None).launch(
            grid=[(s + rows - 1) // rows, h, b], block=[THREADS, 1, 1], stream=stream)

    @cute.jit
    def launch_fill(mO: cute.Tensor, mdO: cute.Tensor, mLSE: cute.Tensor, mD: cute.Tensor,
                    mLSE2: cute.Tensor, mdQacc: cute.Tensor, mSem: Optional[cute.Tensor],
                    mUsed: Optional[cute.Tensor], stream):
        b, s, h = mO.shape[0], mO.shape[1], mO.shape[2]
        tiles = (s + pad_tile - 1) // pad_tile
        kernel(mO, mdO, mLSE, mD, mLSE2, None, mUsed, mdQacc, mSem).launch(
            grid=[tiles * (pad_tile // rows), h, b], block=[THREADS, 1, 1], stream=stream)

    @cute.jit
    def launch(mO: cute.Tensor, mdO: cute.Tensor, mLSE: cute.Tensor, mD: cute.Tensor,
               mLSE2: cute.Tensor, stream):  # the plain signature (sm80 backward, tests)
        launch_seqs(mO, mdO, mLSE, mD, mLSE2, None, None, None, stream)

    def bshd():  # (b, s, h, dv), last dim contiguous, other strides free but 16-byte aligned
        st = (cute.sym_int64(divisibility=VEC), cute.sym_int64(divisibility=VEC),
              cute.sym_int64(divisibility=VEC), 1)
        return make_fake_tensor(dt, (cute.sym_int(), cute.sym_int(), cute.sym_int(), dv), stride=st,
                                assumed_align=16)

    def bhs():
        return make_fake_tensor(cutlass.Float32, (cute.sym_int(), cute.sym_int(), cute.sym_int()),
                                stride=(cute.sym_int64(), cute.sym_int64(), 1), assumed_align=4)

    def vec():
        return make_fake_tensor(cutlass.Int32, (cute.sym_int(),), stride=(1,), assumed_align=4)

    stream = make_fake_stream(use_tvm_ffi_env_stream=True)
    if fill:  # dQaccum as the main kernel sees it: (b, h, rows * dv), 16-byte aligned rows
        acc = make_fake_tensor(cutlass.Float32, (cute.sym_int(), cute.sym_int(), cute.sym_int()),
                               stride=(cute.sym_int64(divisibility=4), cute.sym_int64(divisibility=4), 1),
                               assumed_align=16)
        sems = make_fake_tensor(cutlass.Int32, (cute.sym_int(), cute.sym_int(), cute.sym_int()),
                                stride=(cute.sym_int64(), cute.sym_int64(), 1), assumed_align=4)
        return cute.compile(launch_fill, bshd(), bshd(), bhs(), bhs(), bhs(), acc,
                            sems if sem else None, vec() if seqused else None, stream,
                            options=_compile.compile_options(extra=extra_options))
    if not (varlen or seqused):
        return cute.compile(launch, bshd(), bshd(), bhs(), bhs(), bhs(), stream,
                            options=_compile.compile_options(extra=extra_options))
    return cute.compile(launch_seqs, bshd(), bshd(), bhs(), bhs(), bhs(), vec() if varlen else None,
                        vec() if seqused else None, cutlass.Int32(1) if varlen else None, stream,
                        options=_compile.compile_options(extra=extra_options))


def compile_preprocess(cfg: PreprocessConfig):
    return _compile.get_kernel(cfg, build)


_DT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def bwd_preprocess(out: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor):
    """out, dout (b, s, h, dv) fp16/bf16; lse (b, h, s) fp32 -> (D, lse_log2), both (b, h, s) fp32."""
    assert out.shape == dout.shape and out.dtype == dout.dtype and out.dtype in _DT
    assert out.stride(-1) == 1 and dout.stride(-1) == 1
    b, s, h, dv = out.shape
    assert lse.shape == (b, h, s) and lse.dtype == torch.float32 and lse.stride(-1) == 1
    d = torch.empty(b, h, s, device=out.device, dtype=torch.float32)
    lse2 = torch.empty_like(d)
    if out.numel():
        compile_preprocess(PreprocessConfig(_DT[out.dtype], dv))(out, dout, lse, d, lse2)
    return d, lse2
