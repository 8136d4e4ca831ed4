"""V -> Vt for the FP8 attention kernel, in one pass: e4m3 V copied, or bf16/fp16 V block-quantized,
into Vt (b, h_kv, dv, s_pad) e4m3 with keys permuted per 32-key group (flash_fwd_fp8.key_perm).

fp8 wgmma wants P V's B operand seqlen-contiguous. Producing that layout here instead of transposing
V in shared memory inside the attention kernel keeps the kernel a pure TMA + wgmma pipeline; this
kernel reads V once and writes Vt once (memory-bound), and with bf16/fp16 input it is also V's
quantizer: one scale per ``block_rows`` keys of one (batch, kv head), exactly
``fp8_emulation.block_quantize(v, block_rows, pow2=True)`` (amax of the block's valid rows, floored at
AMAX_FLOOR; scale = amax / 448 rounded up to a power of two; q = e4m3_rn_satfinite(x * (1 / scale))),
so Vt == vt_layout(block_quantize(v, pow2=True)) bit for bit. Power-of-two V scales make the
attention kernel's lazy rescale exact in P (fwd_fp8_kernel module doc).

One CTA (128 threads) per (block of ``block_rows`` keys, kv head, batch): the block is loaded with
16-byte loads into shared memory (rows past seqlen read as zero); then each thread builds the 32
permuted keys of one (column, 32-key group) and writes them as two 16-byte stores.
"""
import dataclasses

from fa3 import _compile

IN_DTYPES = ("bfloat16", "float16", "float8_e4m3fn")
THREADS = 128
E4M3_MAX = 448.0
AMAX_FLOOR = 2.0**-64  # fp8_emulation.AMAX_FLOOR


@dataclasses.dataclass(frozen=True)
class VtConfig:
    in_dtype: str  # "bfloat16" | "float16" (quantize) | "float8_e4m3fn" (copy)
    dv: int
    block_rows: int  # keys per CTA; with quantization the scale block (the attention's tile_n)

    def __post_init__(self):
        assert self.in_dtype in IN_DTYPES and self.dv in (64, 128, 256)
        assert self.block_rows % 32 == 0
        epc = 16 // self.elem_bytes
        assert (self.block_rows * self.dv // epc) % THREADS == 0
        assert (self.dv * self.block_rows // 32) % THREADS == 0

    @property
    def quantize(self) -> bool:
        return self.in_dtype != "float8_e4m3fn"

    @property
    def elem_bytes(self) -> int:
        return 1 if self.in_dtype == "float8_e4m3fn" else 2


def variants():
    from fa3.hopper.flash_fwd_fp8 import variants as fwd_variants

    seen = []
    for cfg in fwd_variants():
        for dt in IN_DTYPES:
            c = VtConfig(dt, cfg.dv, cfg.tile_n)
            if c not in seen:
                seen.append(c)
                yield c


def _kernel_class():
    cute = _compile.dsl()
    import cutlass
    import cutlass.memory
    from cutlass import Float32, Int32, Uint8

    from fa3.hopper.flash_fwd_fp8 import key_perm
    from fa3.hopper.fwd_fp8_kernel import pack_e4m3x4, pow2_ceil

    perm = key_perm()

    class VtKernel:
        def __init__(self, cfg: VtConfig):
            self.cfg = cfg
            self.rows, self.dv = cfg.block_rows, cfg.dv
            self.epc = 16 // cfg.elem_bytes  # elements per 16-byte chunk
            self.dtype = {"bfloat16": cutlass.BFloat16, "float16": cutlass.Float16,
                          "float8_e4m3fn": Uint8}[cfg.in_dtype]

        @cute.jit
        def __call__(self, mV: cute.Tensor, mVt: cute.Tensor, mScales: cute.Tensor, stream):
            self.kernel(mV, mVt, mScales).launch(
                grid=[(mV.shape[1] + self.rows - 1) // self.rows, mV.shape[2], mV.shape[0]],
                block=[THREADS, 1, 1], stream=stream)

        @cute.kernel
        def kernel(self, mV: cute.Tensor, mVt: cute.Tensor, mScales: cute.Tensor):
            rows, dv, epc = self.rows, self.dv, self.epc
            tid, _, _ = cute.arch.thread_idx()
            blk, head, bat = cute.arch.block_idx()
            row_limit = mV.shape[1] - blk * rows
            s_pad = mVt.shape[3]
            smem = cutlass.memory.SmemAllocator()
            sT = smem.allocate_tensor(self.dtype, cute.make_layout((rows, dv), stride=(dv, 1)),
                                      byte_alignment=16)
            red = smem.allocate_tensor(Float32, cute.make_layout(THREADS // 32), byte_alignment=16)
            gV = cute.local_tile(mV[bat, None, head, None], (rows, dv), (blk, 0))
            vec = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype, num_bits_per_copy=128)
            raw = cute.make_rmem_tensor((epc,), self.dtype)
            m = Float32(0.0)
            cpr = dv // epc
            for it in cutlass.range_constexpr(rows * cpr // THREADS):
                i = it * THREADS + tid
                row, c = i // cpr, i % cpr
                raw.fill(0)
                if row < row_limit:
                    cute.copy(vec, cute.local_tile(gV, (1, epc), (row, c))[0, None], raw)
                if cutlass.const_expr(self.cfg.quantize):
                    xf = raw.load().to(Float32)
                    for e in cutlass.range_constexpr(epc):
                        m = cute.arch.fmax(m, cute.math.absf(xf[e]))
                cute.copy(vec, raw, cute.local_tile(sT, (1, epc), (row, c))[0, None])
            inv = Float32(1.0)
            if cutlass.const_expr(self.cfg.quantize):
                for k in cutlass.range_constexpr(5):
                    m = cute.arch.fmax(m, cute.arch.shuffle_sync_bfly(m, offset=1 << k))
                if tid % 32 == 0:
                    red[tid // 32] = m
            cute.arch.sync_threads()
            if cutlass.const_expr(self.cfg.quantize):
                amax = Float32(AMAX_FLOOR)
                for w in cutlass.range_constexpr(THREADS // 32):
                    amax = cute.arch.fmax(amax, red[w])
                # scale = amax / 448 rounded up to a power of two (mantissa cleared, exponent bumped)
                scale = pow2_ceil(amax / Float32(E4M3_MAX))
                inv = Float32(1.0) / scale  # exact: a power of two
                if tid == 0:
                    mScales[bat, head, blk] = scale
            out = cute.make_rmem_tensor((32,), Uint8)
            out32 = cute.recast_tensor(out, Int32)
            st = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Uint8, num_bits_per_copy=128)
            for it in cutlass.range_constexpr(dv * (rows // 32) // THREADS):
                j = it * THREADS + tid
                col, g = j % dv, j // dv
                key0 = blk * rows + 32 * g
                if key0 < s_pad:
                    if cutlass.const_expr(self.cfg.quantize):
                        for w in cutlass.range_constexpr(8):
                            xs = [Float32(sT[32 * g + perm[4 * w + b], col]) * inv for b in range(4)]
                            out32[w] = pack_e4m3x4(xs[0], xs[1], xs[2], xs[3])
                    else:
                        for slot in cutlass.range_constexpr(32):
                            out[slot] = sT[32 * g + perm[slot], col]
                    gdst = cute.local_tile(mVt[bat, head, col, None], (16,), (key0 // 16,))
                    cute.copy(st, cute.local_tile(out, (16,), (0,)), gdst)
                    gdst2 = cute.local_tile(mVt[bat, head, col, None], (16,), (key0 // 16 + 1,))
                    cute.copy(st, cute.local_tile(out, (16,), (1,)), gdst2)

    return VtKernel


def build(cfg: VtConfig, extra_options: str = ""):
    cute = _compile.dsl()
    import cutlass
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream, make_fake_tensor

    b, s, hk, nblk = (cute.sym_int32() for _ in range(4))
    sp = cute.sym_int32(divisibility=32)  # s_pad: 16-byte aligned rows of Vt
    dt = {"bfloat16": cutlass.BFloat16, "float16": cutlass.Float16,
          "float8_e4m3fn": cutlass.Uint8}[cfg.in_dtype]
    div = 16 // cfg.elem_bytes
    v = make_fake_tensor(dt, (b, s, hk, cfg.dv),
                         stride=tuple(cute.sym_int64(divisibility=div) for _ in range(3)) + (1,),
                         assumed_align=16)
    vt = make_fake_compact_tensor(cutlass.Uint8, (b, hk, cfg.dv, sp), stride_order=(3, 2, 1, 0),
                                  assumed_align=16)
    scales = make_fake_compact_tensor(cutlass.Float32, (b, hk, nblk), stride_order=(2, 1, 0),
                                      assumed_align=4)
    return cute.compile(_kernel_class()(cfg), v, vt, scales,
                        make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=_compile.compile_options(extra=extra_options))


def make_vt(v, block_rows: int, out=None, out_scales=None):
    """v (b, s, h_kv, dv) CUDA, last dim contiguous: e4m3 -> (Vt, None); bf16/fp16 -> (Vt, scales
    (b, h_kv, ceil(s / block_rows)) fp32). Vt (b, h_kv, dv, ceil(s / 32) * 32) e4m3, see module doc."""
    import torch

    b, s, hk, dv = v.shape
    cfg = VtConfig(str(v.dtype).replace("torch.", ""), dv, block_rows)
    assert v.stride(-1) == 1 and v.data_ptr() % 16 == 0
    assert all((st * v.element_size()) % 16 == 0 for st in v.stride()[:-1])
    s_pad = -(-s // 32) * 32
    nblk = -(-s // block_rows)
    if out is None:
        out = torch.empty(b, hk, dv, s_pad, device=v.device, dtype=torch.float8_e4m3fn)
    scales = out_scales
    if scales is None:
        scales = torch.empty(b, hk, nblk if cfg.quantize else 1, device=v.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, (scales if cfg.quantize else None)
    src = v.view(torch.uint8) if not cfg.quantize else v
    _compile.get_kernel(cfg, build)(src, out.view(torch.uint8), scales)
    return out, (scales if cfg.quantize else None)
