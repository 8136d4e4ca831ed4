"""Backward preprocess: D = rowsum(dO * O) in fp32, and the LSE in the log2 domain the backward
main loop wants (P = exp2(S * scale * log2 e - lse_log2)).

A fully masked row has LSE = -inf (fa3's forward convention, never NaN); it becomes +inf here so
the backward's exp2 gives P = 0 for it instead of inf.

Memory-bound: each row of O/dO is read once with 16-byte vector loads by a group of dv/8 lanes,
reduced with warp shuffles, and two floats per row are written. Plain SIMT code, so the same
kernel serves sm80 and sm90.
"""

import dataclasses
import math

import torch

from fa3 import _compile

THREADS = 128
VEC = 8  # 16 bytes of fp16/bf16 per lane


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    dtype: str  # "bf16" | "fp16"
    head_dim_v: int

    def __post_init__(self):
        if self.dtype not in ("bf16", "fp16"):
            raise ValueError(f"dtype must be bf16 or fp16, got {self.dtype}")
        if self.head_dim_v % VEC or not 0 < self.head_dim_v <= 256:
            raise ValueError(f"head_dim_v must be a multiple of {VEC} in 8..256, got {self.head_dim_v}")

    @property
    def lanes(self) -> int:
        """Lanes per row: a power of two >= dv/8 so a row's group never straddles a warp."""
        return 1 << math.ceil(math.log2(self.head_dim_v // VEC))

    @property
    def rows_per_cta(self) -> int:
        return THREADS // self.lanes


def variants():
    return [PreprocessConfig(dt, dv) for dt in ("bf16", "fp16") for dv in (64, 96, 128, 192, 256)]


def build(cfg: PreprocessConfig, extra_options: str = ""):
    cute = _compile.dsl()
    import cutlass
    from cutlass.cute.runtime import make_fake_stream, make_fake_tensor

    dt = cutlass.BFloat16 if cfg.dtype == "bf16" else cutlass.Float16
    dv, lanes, rows = cfg.head_dim_v, cfg.lanes, cfg.rows_per_cta
    log2e = math.log2(math.e)

    @cute.kernel
    def kernel(mO: cute.Tensor, mdO: cute.Tensor, mLSE: cute.Tensor, mD: cute.Tensor,
               mLSE2: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        m_blk, hi, bi = cute.arch.block_idx()
        lane = tidx % lanes
        row = m_blk * rows + tidx // lanes
        seqlen = mO.shape[1]
        acc = cutlass.Float32(0.0)
        if row < seqlen:
            if lane * VEC < dv:
                gO = cute.local_tile(mO[bi, row, hi, None], (VEC,), (lane,))
                gdO = cute.local_tile(mdO[bi, row, hi, None], (VEC,), (lane,))
                rO = cute.make_fragment_like(gO)
                rdO = cute.make_fragment_like(gdO)
                cute.autovec_copy(gO, rO)
                cute.autovec_copy(gdO, rdO)
                prod = rO.load().to(cutlass.Float32) * rdO.load().to(cutlass.Float32)
                acc = prod.reduce(cute.ReductionOp.ADD, cutlass.Float32(0.0), 0)
        acc = cute.arch.warp_reduction(acc, lambda a, b: a + b, threads_in_group=lanes)
        if row < seqlen:
            if lane == 0:
                mD[bi, hi, row] = acc
                lse = mLSE[bi, hi, row]
                mLSE2[bi, hi, row] = lse * log2e if lse != -cutlass.Float32.inf else cutlass.Float32.inf

    @cute.jit
    def launch(mO: cute.Tensor, mdO: cute.Tensor, mLSE: cute.Tensor, mD: cute.Tensor,
               mLSE2: cute.Tensor, stream):
        b, s, h = mO.shape[0], mO.shape[1], mO.shape[2]
        kernel(mO, mdO, mLSE, mD, mLSE2).launch(
            grid=[(s + rows - 1) // rows, h, b], block=[THREADS, 1, 1], stream=stream)

    def bshd():  # (b, s, h, dv), last dim contiguous, other strides free but 16-byte aligned
        st = (cute.sym_int64(divisibility=VEC), cute.sym_int64(divisibility=VEC),
              cute.sym_int64(divisibility=VEC), 1)
        return make_fake_tensor(dt, (cute.sym_int(), cute.sym_int(), cute.sym_int(), dv), stride=st,
                                assumed_align=16)

    def bhs():
        return make_fake_tensor(cutlass.Float32, (cute.sym_int(), cute.sym_int(), cute.sym_int()),
                                stride=(cute.sym_int64(), cute.sym_int64(), 1), assumed_align=4)

    return cute.compile(launch, bshd(), bshd(), bhs(), bhs(), bhs(),
                        make_fake_stream(use_tvm_ffi_env_stream=True),
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
