"""Fused random-sign Hadamard rotation + FP8 (e4m3) block quantization for Hopper, in one pass.

x (b, s, h, d) bf16/fp16 -> x_fp8 (b, s, h, d) float8_e4m3fn, scales (b, h, ceil(s / block_rows)) fp32,
bit-exact with ``fa3.fp8_emulation.block_quantize`` (its docstring is the op-order specification).

One CTA per (block of ``block_rows`` rows, head, batch), so a block's amax never leaves the CTA.
Thread mapping (R = 8 lanes per row, K = d / 64 chunks per lane, P = T / 8 rows per pass):

* thread ``tid`` works on row ``p * P + tid // 8`` for each pass p < NP (NP = block_rows / P), and in each
  row on the K chunks of 8 elements starting at ``8 * (tid % 8) + 64 * j``: each chunk is one 16-byte
  load, and the 8 lanes of a row read 128 contiguous bytes per j.
* The Walsh–Hadamard butterfly keeps the standard stage order (stride 1, 2, ..., d/2), so results are
  bit-exact: strides 1, 2, 4 inside a chunk; 8, 16, 32 across lanes (``shfl.sync.bfly`` with lane xor
  1, 2, 4); 64 and 128 across the thread's chunks.
* All rotated values of the block stay in registers (NP * K * 8 = NP * d / 8 fp32 per thread) until the
  CTA amax is known (warp shuffle max, then one smem slot per warp).
* Stores are 16 bytes: lanes 2i and 2i+1 swap half chunks of two passes with one shuffle, so the even
  lane writes 16 contiguous fp8 of pass 2q and the odd lane those of pass 2q+1.

Signs are passed as the float32 (d,) ±1 tensor of ``fp8_emulation.random_signs``; only their sign bits
are used (the kernel flips the input's sign bits, which equals multiplying by ±1 exactly).

Limits: block_rows a multiple of 8 whose block fits in registers (see ``HadamardQuantConfig.passes``):
up to 512 rows at d = 64, 256 at d = 128, 128 at d = 256. Occupancy at block_rows = 128: d = 64 uses
128 threads (96 registers), d = 128 256 threads (124), d = 256 512 threads (127, one CTA per SM).
NaN inputs are not propagated into the scale (the amax uses max.xorsign.abs, which skips NaN).
"""
import dataclasses
import math

from fa3 import _compile

DTYPES = ("bfloat16", "float16")
HEAD_DIMS = (64, 128, 256)
E4M3_MAX = 448.0
AMAX_FLOOR = 2.0**-64  # same as fp8_emulation.AMAX_FLOOR
LANES_PER_ROW = 8  # each lane loads 8 elements (16 B) per chunk; a row's chunk j spans 64 elements
MAX_VALUES_PER_THREAD = 128  # fp32 registers holding the block; more would spill


@dataclasses.dataclass(frozen=True)
class HadamardQuantConfig:
    dtype: str  # "bfloat16" | "float16"
    head_dim: int  # 64 | 128 | 256
    block_rows: int  # rows of one (batch, head) sharing a scale; a multiple of 8
    rotate: bool = True

    def __post_init__(self):
        assert self.dtype in DTYPES, f"hadamard_quant: unsupported dtype {self.dtype}"
        assert self.head_dim in HEAD_DIMS, f"hadamard_quant: head_dim must be one of {HEAD_DIMS}"
        assert self.block_rows % 8 == 0 and self.block_rows >= 8, "block_rows must be a multiple of 8"
        _ = self.passes  # validates that a launch shape exists

    @property
    def chunks(self) -> int:  # 16-byte chunks per lane per row
        return self.head_dim // (8 * LANES_PER_ROW)

    @property
    def passes(self) -> int:
        """Rows per thread (even, for the paired 16-byte stores); aims at 64 fp32 values per thread.

        The block lives in registers, so CTAs above 256 threads (at most 128 registers each, from the
        .reqntid bound) hold at most 64 values per thread, and smaller ones at most 128.
        """
        target = max(2, 64 // (8 * self.chunks))

        def fits(n):
            t, values = 8 * self.block_rows // n, n * 8 * self.chunks
            return (self.block_rows % n == 0 and (self.block_rows // n) % 4 == 0 and t <= 512
                    and values <= (64 if t > 256 else MAX_VALUES_PER_THREAD))

        ok = [n for n in range(2, self.block_rows + 1, 2) if fits(n)]
        assert ok, (f"hadamard_quant: block_rows={self.block_rows} x head_dim={self.head_dim} does not fit "
                    "in registers; use a smaller block_rows")
        return min(ok, key=lambda n: (abs(math.log2(n / target)), n))

    @property
    def threads(self) -> int:
        return LANES_PER_ROW * self.block_rows // self.passes


def variants():
    """Every config the compile test covers."""
    for d in HEAD_DIMS:
        for dtype in DTYPES:
            for rotate in (True, False):
                for br in (64, 128):
                    yield HadamardQuantConfig(dtype, d, br, rotate)
    yield HadamardQuantConfig("bfloat16", 128, 176, True)  # a K/V-tile-sized, non-power-of-two block
    yield HadamardQuantConfig("float16", 128, 256, True)  # 512 threads
    yield HadamardQuantConfig("float16", 64, 8, True)  # one warp


def _kernel_class():
    """The DSL kernel class, defined on first use so importing this module never imports the DSL."""
    cute = _compile.dsl()
    import cutlass
    import cutlass.memory
    from cutlass import Float32, Uint32

    class HadamardQuant:
        def __init__(self, cfg: HadamardQuantConfig):
            self.cfg = cfg
            self.d = cfg.head_dim
            self.br = cfg.block_rows
            self.K = cfg.chunks
            self.NP = cfg.passes
            self.T = cfg.threads
            self.P = self.T // LANES_PER_ROW  # rows per pass
            self.nwarps = self.T // 32
            self.in_dtype = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16

        @cute.jit
        def __call__(self, mX: cute.Tensor, mSigns: cute.Tensor, mQ: cute.Tensor,
                     mScales: cute.Tensor, stream):
            nblk = mScales.shape[2]
            nheads = mX.shape[2]
            batch = mX.shape[0]
            self.kernel(mX, mSigns, mQ, mScales).launch(
                grid=[nblk, nheads, batch], block=[self.T, 1, 1], stream=stream)

        @cute.kernel
        def kernel(self, mX: cute.Tensor, mSigns: cute.Tensor, mQ: cute.Tensor, mScales: cute.Tensor):
            d, K, NP, P = self.d, self.K, self.NP, self.P
            tid, _, _ = cute.arch.thread_idx()
            blk, head, bat = cute.arch.block_idx()
            lt = tid % LANES_PER_ROW  # lane within the row's 8 lanes
            prow = tid // LANES_PER_ROW  # row within a pass
            row_limit = mX.shape[1] - blk * self.br  # rows of this block that exist (ragged tail)

            # (block_rows, d) tiles of this (batch, head); out-of-range rows are never touched.
            gX = cute.local_tile(mX[bat, None, head, None], (self.br, d), (blk, 0))
            gQ = cute.local_tile(mQ[bat, None, head, None], (self.br, d), (blk, 0))
            load_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.in_dtype,
                                            num_bits_per_copy=128)
            store_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), cutlass.Float8E4M3FN,
                                             num_bits_per_copy=128)

            # Sign-flip masks for packed 16-bit pairs: bit 15 / bit 31 set where the sign is negative.
            smask = cute.make_rmem_tensor((4, K), Uint32)
            if cutlass.const_expr(self.cfg.rotate):
                sg = cute.make_rmem_tensor((8, K), Float32)
                for j in cutlass.range_constexpr(K):
                    gS = cute.local_tile(mSigns, (8,), (lt + LANES_PER_ROW * j,))
                    cute.autovec_copy(gS, sg[None, j])
                sgu = cute.recast_tensor(sg, Uint32)
                for j in cutlass.range_constexpr(K):
                    for w in cutlass.range_constexpr(4):
                        lo = sgu[2 * w, j]
                        hi = sgu[2 * w + 1, j]
                        smask[w, j] = ((lo >> 16) & Uint32(0x8000)) | (hi & Uint32(0x80000000))

            # Load, sign-flip, widen to fp32. Rows past the end read as zeros (they do not move amax).
            v = cute.make_rmem_tensor((8, K, NP), Float32)
            raw = cute.make_rmem_tensor((8,), self.in_dtype)
            rawu = cute.recast_tensor(raw, Uint32)
            for p in cutlass.range_constexpr(NP):
                row = p * P + prow
                for j in cutlass.range_constexpr(K):
                    raw.fill(0.0)
                    if row < row_limit:
                        src = cute.local_tile(gX, (1, 8), (row, lt + LANES_PER_ROW * j))
                        cute.copy(load_atom, src[0, None], raw)
                    if cutlass.const_expr(self.cfg.rotate):
                        for w in cutlass.range_constexpr(4):
                            rawu[w] = rawu[w] ^ smask[w, j]
                    v[None, j, p].store(raw.load().to(Float32))

            if cutlass.const_expr(self.cfg.rotate):
                self.fwht(v, lt)

            # amax of this thread, warp, then CTA. fmax(abs=True) keeps max(|a|, |b|) as magnitude.
            m = Float32(0.0)
            for r in cutlass.range_constexpr(NP * K):  # nested loops: 8 at a time keeps tracing fast
                for e in cutlass.range_constexpr(8):
                    m = cute.arch.fmax(m, v[8 * r + e], abs=True)
            m = cute.math.absf(m)
            for k in cutlass.range_constexpr(5):
                m = cute.arch.fmax(m, cute.arch.shuffle_sync_bfly(m, offset=1 << k))
            smem = cutlass.memory.SmemAllocator()
            red = smem.allocate_tensor(Float32, cute.make_layout(self.nwarps), byte_alignment=16)
            warp = tid // 32
            if tid % 32 == 0:
                red[warp] = m
            cute.arch.sync_threads()
            amax = Float32(AMAX_FLOOR)
            for w in cutlass.range_constexpr(self.nwarps):
                amax = cute.arch.fmax(amax, red[w])
            scale = amax / Float32(E4M3_MAX)
            inv = Float32(E4M3_MAX) / amax
            if tid == 0:
                mScales[bat, head, blk] = scale

            # Quantize (x' * inv, e4m3 RN satfinite), then pair passes 2q / 2q+1 between lanes 2i / 2i+1
            # so that each lane stores 16 contiguous bytes.
            q8 = cute.make_rmem_tensor((8, K, NP), cutlass.Float8E4M3FN)
            for p in cutlass.range_constexpr(NP):
                for j in cutlass.range_constexpr(K):
                    q8[None, j, p].store((v[None, j, p].load() * inv).to(cutlass.Float8E4M3FN))
            qu = cute.recast_tensor(q8, Uint32)  # (2, K, NP)
            odd = (lt & 1) == 1
            out = cute.make_rmem_tensor((4,), Uint32)
            out8 = cute.recast_tensor(out, cutlass.Float8E4M3FN)
            for qq in cutlass.range_constexpr(NP // 2):
                row = (2 * qq + (lt & 1)) * P + prow
                for j in cutlass.range_constexpr(K):
                    for w in cutlass.range_constexpr(2):
                        mine_lo = qu[w, j, 2 * qq]
                        mine_hi = qu[w, j, 2 * qq + 1]
                        got = cute.arch.shuffle_sync_bfly(
                            Uint32(cutlass.select_(odd, mine_lo, mine_hi)), offset=1)
                        out[w] = Uint32(cutlass.select_(odd, got, mine_lo))
                        out[2 + w] = Uint32(cutlass.select_(odd, mine_hi, got))
                    if row < row_limit:
                        dst = cute.local_tile(gQ, (1, 16), (row, (lt >> 1) + (LANES_PER_ROW // 2) * j))
                        cute.copy(store_atom, out8, dst[0, None])

        @cute.jit
        def fwht(self, v: cute.Tensor, lt):
            """Unnormalized Walsh–Hadamard over d in the standard stage order, then x' = v / sqrt(d)."""
            K, NP = self.K, self.NP
            for h in cutlass.range_constexpr(3):  # strides 1, 2, 4 inside each 8-element chunk
                hs = 1 << h
                for p in cutlass.range_constexpr(NP):
                    for j in cutlass.range_constexpr(K):
                        for e in cutlass.range_constexpr(8):
                            if cutlass.const_expr((e & hs) == 0):
                                a = v[e, j, p]
                                b = v[e + hs, j, p]
                                v[e, j, p] = a + b
                                v[e + hs, j, p] = a - b
            for h in cutlass.range_constexpr(3):  # strides 8, 16, 32: partner lane = lane ^ 2^h
                hs = 1 << h
                # upper lane holds x[i + stride] and computes partner - own; fma(own, -1, partner) rounds
                # exactly like that subtraction, the lower lane's fma(own, 1, partner) like own + partner.
                sgn = Float32(cutlass.select_((lt & hs) != 0, Float32(-1.0), Float32(1.0)))
                for r in cutlass.range_constexpr(NP * K):
                    for e in cutlass.range_constexpr(8):
                        other = cute.arch.shuffle_sync_bfly(v[8 * r + e], offset=hs)
                        v[8 * r + e] = cute.math.fma(v[8 * r + e], sgn, other)
            for k in cutlass.range_constexpr(int(math.log2(K))):  # strides 64, 128: across chunks
                hj = 1 << k
                for p in cutlass.range_constexpr(NP):
                    for j in cutlass.range_constexpr(K):
                        if cutlass.const_expr((j & hj) == 0):
                            for e in cutlass.range_constexpr(8):
                                a = v[e, j, p]
                                b = v[e, j + hj, p]
                                v[e, j, p] = a + b
                                v[e, j + hj, p] = a - b
            c = Float32(1.0 / math.sqrt(self.d))
            for r in cutlass.range_constexpr(NP * K):
                for e in cutlass.range_constexpr(8):
                    v[8 * r + e] = v[8 * r + e] * c

    return HadamardQuant


def build(cfg: HadamardQuantConfig, extra_options: str = ""):
    """Compile cfg for sm_90a on fake tensors: one compile serves every batch, seqlen, heads and stride."""
    cute = _compile.dsl()
    import cutlass
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream, make_fake_tensor

    dt = cutlass.BFloat16 if cfg.dtype == "bfloat16" else cutlass.Float16
    b, s, h, nblk = (cute.sym_int32() for _ in range(4))
    x_stride = tuple(cute.sym_int64(divisibility=8) for _ in range(3)) + (1,)  # 16-byte rows
    x = make_fake_tensor(dt, (b, s, h, cfg.head_dim), stride=x_stride, assumed_align=16)
    signs = make_fake_compact_tensor(cutlass.Float32, (cfg.head_dim,), assumed_align=16)
    q = make_fake_compact_tensor(cutlass.Float8E4M3FN, (b, s, h, cfg.head_dim),
                                 stride_order=(3, 2, 1, 0), assumed_align=16)
    scales = make_fake_compact_tensor(cutlass.Float32, (b, h, nblk), stride_order=(2, 1, 0),
                                      assumed_align=4)
    kernel = _kernel_class()(cfg)
    return cute.compile(kernel, x, signs, q, scales, make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=_compile.compile_options(extra=extra_options))


def hadamard_quant(x, signs, block_rows: int, rotate: bool = True, *, out=None, out_scales=None):
    """x (b, s, h, d) bf16/fp16, last dim contiguous -> (x_fp8 (b, s, h, d) e4m3, scales (b, h, nblk) fp32).

    ``signs``: float32 (d,) ±1 on x's device (``fp8_emulation.random_signs``); only its sign bits are
    read, and it may be None when ``rotate`` is False. ``out`` / ``out_scales`` (optional) are written in
    place: contiguous e4m3 (b, s, h, d) and contiguous fp32 (b, h, ceil(s / block_rows)).
    """
    import torch

    assert x.is_cuda and x.dim() == 4, "x must be a 4-D CUDA tensor (batch, seqlen, heads, head_dim)"
    bsz, seqlen, nheads, d = x.shape
    cfg = HadamardQuantConfig(str(x.dtype).replace("torch.", ""), d, block_rows, bool(rotate))
    assert x.stride(3) == 1, "x's last dim must be contiguous"
    assert all(st % 8 == 0 for st in x.stride()[:3]), "x's strides must be multiples of 8 elements"
    assert x.data_ptr() % 16 == 0, "x must be 16-byte aligned"
    if signs is None:
        assert not rotate, "rotate=True needs signs"
        signs = torch.ones(d, device=x.device, dtype=torch.float32)
    assert signs.shape == (d,) and signs.dtype == torch.float32 and signs.is_contiguous()
    assert signs.device == x.device and signs.data_ptr() % 16 == 0
    nblk = -(-seqlen // block_rows)
    if out is None:
        out = torch.empty(bsz, seqlen, nheads, d, device=x.device, dtype=torch.float8_e4m3fn)
    if out_scales is None:
        out_scales = torch.empty(bsz, nheads, nblk, device=x.device, dtype=torch.float32)
    assert out.shape == x.shape and out.dtype == torch.float8_e4m3fn and out.is_contiguous()
    assert out.device == x.device and out.data_ptr() % 16 == 0
    assert out_scales.shape == (bsz, nheads, nblk) and out_scales.dtype == torch.float32
    assert out_scales.is_contiguous() and out_scales.device == x.device
    if out.numel() == 0:
        return out, out_scales
    _compile.get_kernel(cfg, build)(x, signs, out, out_scales)
    return out, out_scales
