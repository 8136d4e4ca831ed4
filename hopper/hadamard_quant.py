"""Fused random-sign Hadamard rotation + FP8 (e4m3) block quantization for Hopper, in one pass.

x (b, s, h, d) bf16/fp16 -> x_fp8 (b, s, h, d) float8_e4m3fn, scales (b, h, ceil(s / block_rows)) fp32,
bit-exact with ``fa3.fp8_emulation.block_quantize`` (its docstring is the op-order specification).

The kernel is memory-bound (3 bytes moved per element), so the design is about keeping HBM busy:

* Persistent CTAs (``ctas_per_sm`` per SM, 512 threads per SM in all) walk the tiles (block of
  ``block_rows`` rows, head, batch), heads fastest so concurrent CTAs read neighbouring rows; the tile
  coordinates advance by the grid size in mixed radix (no integer division per tile). A tile's amax
  never leaves its CTA.
* The rotation is what limits the speed: with no rotation the same pipeline moves 83-87% of the H200's
  copy rate, with it 69-74% (benchmarks/results/h200-2026-11-22-hadamard-quant.json). The loop is kept
  lean (full tiles read back with no row checks, only a ragged last tile takes the checked path; bf16
  widened with one shift / one AND per element pair; the thread's amax as eight independent chains),
  but trimming ~10% of its instructions changed nothing measurable: the limit looks like latency at
  16 warps per SM (64 fp32 values per thread under a 128-register cap), not instruction issue.
* Each thread prefetches its own part of the *next* tile into shared memory with 16-byte ``cp.async``
  while it rotates, reduces and stores the current one (two buffers). A thread reads back only what it
  copied, so the pipeline needs no barrier, only ``cp.async.wait_group``; the smem layout is
  thread-private (chunk-major, thread fastest), so copies and reads are bank-conflict free.
* Thread mapping (L = 4 lanes per row by default, K = d / (8 L) chunks per lane, NP rows per thread,
  P = T / L rows per pass): thread ``tid`` owns row ``p * P + tid // L`` for p < NP and, in it, the K
  chunks of 8 elements starting at ``8 * (tid % L) + 8 * L * j``: the 4 lanes of a row read 64
  contiguous bytes per j. (Measured on the H200: 2 lanes per row is much slower, 8 no faster.)
* The Walsh–Hadamard butterfly keeps the standard stage order (stride 1, 2, ..., d/2), so results are
  bit-exact: strides 1, 2, 4 inside a chunk; 8, 16 across lanes (``shfl.sync.bfly`` with lane xor 1, 2);
  32, 64, 128 across the thread's chunks. Four lanes per row (not eight) saves a shuffle stage.
* The rotated tile stays in registers (64 fp32 per thread) until the CTA amax is known (warp shuffle
  max, then one smem slot per warp, double-buffered so one barrier per tile suffices).
* For d = 64 and 256, 1/sqrt(d) is a power of two, so it is folded into the quantization multiplier
  (``v * (inv / sqrt(d))`` rounds exactly like ``(v / sqrt(d)) * inv``: both products are exact scalings
  of the same real number); d = 128 keeps the separate multiply.
* Stores are 8 bytes per lane (the 4 lanes of a row write one full 32-byte sector).

Signs are passed as the float32 (d,) ±1 tensor of ``fp8_emulation.random_signs``; only their sign bits
are used (the kernel flips the input's sign bits, which equals multiplying by ±1 exactly). They are
turned into packed 16-bit sign masks once per CTA, in shared memory.

Limits: block_rows a multiple of 8 whose tile fits in registers at 64 values per thread and at most 512
threads: up to 512 rows at d = 64, 256 at d = 128, 128 at d = 256. NaN inputs are not propagated into
the scale (the amax uses max.xorsign.abs, which skips NaN).
"""
import dataclasses
import math

from fa3 import _compile

DTYPES = ("bfloat16", "float16")
HEAD_DIMS = (64, 128, 256)
E4M3_MAX = 448.0
AMAX_FLOOR = 2.0**-64  # same as fp8_emulation.AMAX_FLOOR
LANES_PER_ROW = 4  # default lanes per row; each lane loads 8 elements (16 B) per chunk
LANE_CHOICES = (2, 4, 8)  # 2 lanes: one shuffle stage, 16-byte row segments; 8: three stages
VALUES_PER_THREAD = 64  # fp32 registers holding the tile (at 512 threads a thread has 128 registers)
THREADS_PER_SM = 512  # resident threads per SM the persistent grid aims at (ctas_per_sm * threads)
STAGES = 2  # smem tile buffers per CTA: the tile being read back and the next one in flight


@dataclasses.dataclass(frozen=True)
class HadamardQuantConfig:
    dtype: str  # "bfloat16" | "float16"
    head_dim: int  # 64 | 128 | 256
    block_rows: int  # rows of one (batch, head) sharing a scale; a multiple of 8
    rotate: bool = True
    lanes: int = 0  # lanes per row (0: LANES_PER_ROW)
    # fp32 values a thread holds (0: VALUES_PER_THREAD). 32 doubles the resident threads (1024 per
    # SM at <= 64 registers each): more loads in flight where the 64-value layout looks latency-bound.
    # Where a block cannot be split that fine (d = 256: 64 values per 4-lane row) it keeps 64.
    values: int = 0

    def __post_init__(self):
        assert self.lanes in (0,) + LANE_CHOICES, f"hadamard_quant: lanes must be one of {LANE_CHOICES}"
        assert self.values in (0, 32, 64), "hadamard_quant: values must be 32 or 64"
        assert self.dtype in DTYPES, f"hadamard_quant: unsupported dtype {self.dtype}"
        assert self.head_dim in HEAD_DIMS, f"hadamard_quant: head_dim must be one of {HEAD_DIMS}"
        assert self.block_rows % 8 == 0 and self.block_rows >= 8, "block_rows must be a multiple of 8"
        _ = self.passes  # validates that a launch shape exists

    @property
    def lanes_per_row(self) -> int:
        return self.lanes or LANES_PER_ROW

    @property
    def chunks(self) -> int:  # 16-byte chunks per lane per row
        return self.head_dim // (8 * self.lanes_per_row)

    @property
    def values_per_thread(self) -> int:
        return self.values or VALUES_PER_THREAD

    @property
    def passes(self) -> int:
        """Rows per thread: the most that keeps values_per_thread (64) fp32 values per thread and
        whole warps (<= 512); a row of 2 lanes at d = 256 (128 values) needs 128, in CTAs of at
        most 256 threads."""
        def fits(n, values):
            t = self.lanes_per_row * self.block_rows // n
            return (self.block_rows % n == 0 and t % 32 == 0 and t <= (512 if values <= 64 else 256)
                    and n * 8 * self.chunks <= values)

        vpt = self.values_per_thread
        ok = ([n for n in range(1, self.block_rows + 1) if fits(n, vpt)]
              or [n for n in range(1, self.block_rows + 1) if fits(n, 2 * vpt)])
        assert ok, (f"hadamard_quant: block_rows={self.block_rows} x head_dim={self.head_dim} does not fit "
                    "in registers; use a smaller block_rows")
        return max(ok)

    @property
    def threads(self) -> int:
        return self.lanes_per_row * self.block_rows // self.passes

    @property
    def ctas_per_sm(self) -> int:
        """Resident CTAs per SM of the persistent grid: THREADS_PER_SM threads (>= 128 registers
        each) at 64 values per thread, twice as many (<= 64 registers) at 32; one CTA (255
        registers) where a thread holds more than that."""
        vpt = self.values_per_thread
        if self.passes * 8 * self.chunks > vpt:
            return 1
        return max(1, THREADS_PER_SM * VALUES_PER_THREAD // vpt // self.threads)


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
    for d in HEAD_DIMS:  # the other lane counts (the benchmark compares them)
        for lanes in (2, 8):
            yield HadamardQuantConfig("bfloat16", d, 128, True, lanes)
    for d in (64, 128):  # 32 values per thread, 1024 threads per SM (not the default: unmeasured)
        yield HadamardQuantConfig("bfloat16", d, 128, True, values=32)


def _kernel_class():
    """The DSL kernel class, defined on first use so importing this module never imports the DSL."""
    cute = _compile.dsl()
    import cutlass
    import cutlass.memory
    from cutlass import Float32, Int32, Uint32
    from cutlass.cute.nvgpu import cpasync

    class HadamardQuant:
        def __init__(self, cfg: HadamardQuantConfig):
            self.cfg = cfg
            self.L = L = cfg.lanes_per_row
            self.d = cfg.head_dim
            self.br = cfg.block_rows
            self.K = cfg.chunks
            self.NP = cfg.passes
            self.T = cfg.threads
            self.P = self.T // L  # rows per pass
            self.nwarps = self.T // 32
            self.bf16 = cfg.dtype == "bfloat16"
            self.in_dtype = cutlass.BFloat16 if self.bf16 else cutlass.Float16
            # 1/sqrt(d) is 2^-3 / 2^-4 at d = 64 / 256: folded into the quantization multiplier
            self.fold_scale = cfg.rotate and cfg.head_dim in (64, 256)

        @cute.jit
        def __call__(self, mX: cute.Tensor, mSigns: cute.Tensor, mQ: cute.Tensor,
                     mScales: cute.Tensor, grid: Int32, stream):
            self.kernel(mX, mSigns, mQ, mScales).launch(
                grid=[grid, 1, 1], block=[self.T, 1, 1], min_blocks_per_mp=self.cfg.ctas_per_sm,
                preferred_smem_carveout=100, stream=stream)  # smem holds the tiles; loads skip L1

        @cute.kernel
        def kernel(self, mX: cute.Tensor, mSigns: cute.Tensor, mQ: cute.Tensor, mScales: cute.Tensor):
            d, K, NP, P, T, L = self.d, self.K, self.NP, self.P, self.T, self.L
            tid, _, _ = cute.arch.thread_idx()
            cta, _, _ = cute.arch.block_idx()
            grid, _, _ = cute.arch.grid_dim()
            lt = tid % L  # lane within the row's 4 lanes
            prow = tid // L  # row within a pass
            nheads = mX.shape[2]
            nblk = mScales.shape[2]
            ntiles = nheads * nblk * mX.shape[0]

            smem = cutlass.memory.SmemAllocator()
            # Thread-private tile buffers: chunk (p, j) of thread tid at [:, tid, j, p, stage].
            sbuf = smem.allocate_tensor(self.in_dtype, cute.make_layout((8, T, K, NP, STAGES)),
                                        byte_alignment=128)
            red = smem.allocate_tensor(Float32, cute.make_layout((self.nwarps, 2)), byte_alignment=16)
            g2s = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL),
                                      self.in_dtype, num_bits_per_copy=128)
            store_atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), cutlass.Float8E4M3FN,
                                             num_bits_per_copy=64)

            # Sign-flip masks for packed 16-bit pairs (bit 15 / bit 31 set where the sign is negative),
            # built once per CTA: smask[w, c] for element pair w of the 8-element column chunk c.
            smask = smem.allocate_tensor(Uint32, cute.make_layout((4, d // 8)), byte_alignment=16)
            if cutlass.const_expr(self.cfg.rotate):
                if tid < d // 8:
                    sg = cute.make_rmem_tensor((8,), Float32)
                    cute.autovec_copy(cute.local_tile(mSigns, (8,), (tid,)), sg)
                    sgu = cute.recast_tensor(sg, Uint32)
                    for w in cutlass.range_constexpr(4):
                        smask[w, tid] = (((sgu[2 * w] >> 16) & Uint32(0x8000))
                                         | (sgu[2 * w + 1] & Uint32(0x80000000)))
                cute.arch.sync_threads()

            # Tile t = head + nheads * (blk + nblk * bat), heads fastest. Coordinates advance by the
            # grid size in mixed radix (no integer division per tile): grid = (gh, gb, gbat).
            gh = grid % nheads
            gb = (grid // nheads) % nblk
            gbat = grid // (nheads * nblk)
            cur = (cta % nheads, (cta // nheads) % nblk, cta // (nheads * nblk))

            # Prologue: the first STAGES tiles of this CTA in flight (one commit group per tile, even
            # when empty, so wait_group(STAGES - 1) always means "this iteration's tile has landed").
            pre = cur
            for st in cutlass.range_constexpr(STAGES):
                self.prefetch(mX, sbuf, cta + st * grid, ntiles, pre, Int32(st), tid, g2s)
                cute.arch.cp_async_commit_group()
                pre = self.advance(pre, gh, gb, gbat, nheads, nblk)
            head, blk, bat = cur

            niter = (ntiles - cta + grid - 1) // grid
            for it in cutlass.range(niter, unroll=1):
                tile = cta + it * grid
                stage = it % STAGES
                row_limit = mX.shape[1] - blk * self.br  # rows of this tile that exist (ragged tail)

                # Read back this thread's chunks, sign-flip, widen to fp32; missing rows are zeros.
                cute.arch.cp_async_wait_group(STAGES - 1)
                v = cute.make_rmem_tensor((8, K, NP), Float32)
                if row_limit >= self.br:  # all rows exist: no per-row checks, no zero fill
                    self.read_tile(sbuf, smask, v, stage, tid, row_limit, False)
                else:
                    self.read_tile(sbuf, smask, v, stage, tid, row_limit, True)
                # The buffer is consumed (its values are in registers): refill it with tile + STAGES
                # (its coordinates recomputed here: cheaper than keeping three more live registers).
                pre = (head, blk, bat)
                for _ in cutlass.range_constexpr(STAGES):
                    pre = self.advance(pre, gh, gb, gbat, nheads, nblk)
                self.prefetch(mX, sbuf, tile + STAGES * grid, ntiles, pre, stage, tid, g2s)
                cute.arch.cp_async_commit_group()

                if cutlass.const_expr(self.cfg.rotate):
                    self.fwht(v, lt)

                # amax of this thread, warp, then CTA. fmax(abs=True) keeps max(|a|, |b|) as magnitude.
                # Eight independent running maxima (not one chain of NP*K*8 dependent FMNMX), then a
                # tree: max is exact, so any order gives the same amax.
                mx = cute.make_rmem_tensor((8,), Float32)
                mx.fill(0.0)
                for r in cutlass.range_constexpr(NP * K):
                    for e in cutlass.range_constexpr(8):
                        mx[e] = cute.arch.fmax(mx[e], v[8 * r + e], abs=True)
                for h in cutlass.range_constexpr(3):
                    for e in cutlass.range_constexpr(8 >> (h + 1)):
                        mx[e] = cute.arch.fmax(mx[e], mx[e + (8 >> (h + 1))], abs=True)
                m = cute.math.absf(mx[0])
                for k in cutlass.range_constexpr(5):
                    m = cute.arch.fmax(m, cute.arch.shuffle_sync_bfly(m, offset=1 << k))
                parity = it % 2  # two reduction slots: a fast warp never overwrites one still read
                if tid % 32 == 0:
                    red[tid // 32, parity] = m
                cute.arch.sync_threads()
                amax = Float32(0.0)
                for w in cutlass.range_constexpr(self.nwarps):
                    amax = cute.arch.fmax(amax, red[w, parity])
                if cutlass.const_expr(self.fold_scale):
                    amax = amax * Float32(1.0 / math.sqrt(self.d))  # exact: a power of two
                amax = cute.arch.fmax(amax, Float32(AMAX_FLOOR))
                scale = amax / Float32(E4M3_MAX)
                inv = Float32(E4M3_MAX) / amax
                if tid == 0:
                    mScales[bat, head, blk] = scale
                mul = inv
                if cutlass.const_expr(self.fold_scale):
                    mul = inv * Float32(1.0 / math.sqrt(self.d))  # exact: a power of two

                # Quantize (x' * inv, e4m3 RN satfinite); each lane stores 8 contiguous bytes per chunk.
                gQ = cute.local_tile(mQ[bat, None, head, None], (self.br, d), (blk, 0))
                q8 = cute.make_rmem_tensor((8, K, NP), cutlass.Float8E4M3FN)
                for p in cutlass.range_constexpr(NP):
                    for j in cutlass.range_constexpr(K):
                        q8[None, j, p].store((v[None, j, p].load() * mul).to(cutlass.Float8E4M3FN))
                for p in cutlass.range_constexpr(NP):
                    row = p * P + prow
                    if row < row_limit:
                        for j in cutlass.range_constexpr(K):
                            dst = cute.local_tile(gQ, (1, 8), (row, lt + L * j))
                            cute.copy(store_atom, q8[None, j, p], dst[0, None])
                head, blk, bat = self.advance((head, blk, bat), gh, gb, gbat, nheads, nblk)

        @cute.jit
        def advance(self, hbb, gh, gb, gbat, nheads, nblk):
            """(head, blk, bat) of tile t -> that of tile t + grid (mixed-radix add with carries)."""
            head, blk, bat = hbb
            head = head + gh
            c = Int32(head >= nheads)
            head = head - c * nheads
            blk = blk + gb + c
            c = Int32(blk >= nblk)
            return head, blk - c * nblk, bat + gbat + c

        @cute.jit
        def read_tile(self, sbuf: cute.Tensor, smask: cute.Tensor, v: cute.Tensor, stage, tid, row_limit,
                      check: cutlass.Constexpr):
            """This thread's chunks of buffer ``stage`` -> fp32 ``v`` (signs applied); with ``check``,
            rows at or past ``row_limit`` read as zeros (they do not move the amax)."""
            K, NP, P, L = self.K, self.NP, self.P, self.L
            lt, prow = tid % L, tid // L
            lds = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.in_dtype, num_bits_per_copy=128)
            raw = cute.make_rmem_tensor((8,), self.in_dtype)
            rawu = cute.recast_tensor(raw, Uint32)
            wide = cute.make_rmem_tensor((8,), Uint32)  # bf16 -> fp32 bit patterns
            widef = cute.recast_tensor(wide, Float32)
            mk = cute.make_rmem_tensor((4,), Uint32)
            for j in cutlass.range_constexpr(K):
                if cutlass.const_expr(self.cfg.rotate):
                    cute.autovec_copy(smask[None, lt + L * j], mk)
                for p in cutlass.range_constexpr(NP):
                    if cutlass.const_expr(check):
                        raw.fill(0.0)
                        if p * P + prow < row_limit:
                            cute.copy(lds, sbuf[None, tid, j, p, stage], raw)
                    else:
                        cute.copy(lds, sbuf[None, tid, j, p, stage], raw)
                    if cutlass.const_expr(self.cfg.rotate):
                        for w in cutlass.range_constexpr(4):
                            rawu[w] = rawu[w] ^ mk[w]
                    if cutlass.const_expr(self.bf16):
                        # bf16 is the top half of an fp32: widen a packed pair with one shift and one
                        # AND (the generic conversion spends a PRMT and two shifts).
                        for w in cutlass.range_constexpr(4):
                            wide[2 * w] = rawu[w] << Uint32(16)
                            wide[2 * w + 1] = rawu[w] & Uint32(0xFFFF0000)
                        v[None, j, p].store(widef.load())
                    else:
                        v[None, j, p].store(raw.load().to(Float32))

        @cute.jit
        def prefetch(self, mX: cute.Tensor, sbuf: cute.Tensor, tile, ntiles, hbb, stage, tid, g2s):
            """cp.async this thread's chunks of ``tile`` = (head, blk, bat) (if it exists) into buffer
            ``stage``."""
            if tile < ntiles:
                head, blk, bat = hbb
                row_limit = mX.shape[1] - blk * self.br
                gX = cute.local_tile(mX[bat, None, head, None], (self.br, self.d), (blk, 0))
                L = self.L
                lt, prow = tid % L, tid // L
                for p in cutlass.range_constexpr(self.NP):
                    row = p * self.P + prow
                    if row < row_limit:
                        for j in cutlass.range_constexpr(self.K):
                            src = cute.local_tile(gX, (1, 8), (row, lt + L * j))
                            cute.copy(g2s, src[0, None], sbuf[None, tid, j, p, stage])

        @cute.jit
        def fwht(self, v: cute.Tensor, lt):
            """Unnormalized Walsh–Hadamard over d in the standard stage order; then x' = v / sqrt(d)
            unless that factor is folded into the quantization multiplier."""
            K, NP, L = self.K, self.NP, self.L
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
            for h in cutlass.range_constexpr(int(math.log2(L))):  # strides 8, 16: partner = lane ^ 2^h
                hs = 1 << h
                # upper lane holds x[i + stride] and computes partner - own; fma(own, -1, partner) rounds
                # exactly like that subtraction, the lower lane's fma(own, 1, partner) like own + partner.
                sgn = Float32(cutlass.select_((lt & hs) != 0, Float32(-1.0), Float32(1.0)))
                for r in cutlass.range_constexpr(NP * K):
                    for e in cutlass.range_constexpr(8):
                        other = cute.arch.shuffle_sync_bfly(v[8 * r + e], offset=hs)
                        v[8 * r + e] = cute.math.fma(v[8 * r + e], sgn, other)
            for k in cutlass.range_constexpr(int(math.log2(K))):  # strides 32, 64, 128: across chunks
                hj = 1 << k
                for p in cutlass.range_constexpr(NP):
                    for j in cutlass.range_constexpr(K):
                        if cutlass.const_expr((j & hj) == 0):
                            for e in cutlass.range_constexpr(8):
                                a = v[e, j, p]
                                b = v[e, j + hj, p]
                                v[e, j, p] = a + b
                                v[e, j + hj, p] = a - b
            if cutlass.const_expr(not self.fold_scale):
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
    return cute.compile(kernel, x, signs, q, scales, cutlass.Int32(1),
                        make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=_compile.compile_options(extra=extra_options))


def hadamard_quant(x, signs, block_rows: int, rotate: bool = True, *, out=None, out_scales=None, lanes=0,
                   values=0):
    """x (b, s, h, d) bf16/fp16, last dim contiguous -> (x_fp8 (b, s, h, d) e4m3, scales (b, h, nblk) fp32).

    ``signs``: float32 (d,) ±1 on x's device (``fp8_emulation.random_signs``); only its sign bits are
    read, and it may be None when ``rotate`` is False. ``out`` / ``out_scales`` (optional) are written in
    place: contiguous e4m3 (b, s, h, d) and contiguous fp32 (b, h, ceil(s / block_rows)).
    """
    import torch

    from fa3.hopper.tile_scheduler import num_sms

    assert x.is_cuda and x.dim() == 4, "x must be a 4-D CUDA tensor (batch, seqlen, heads, head_dim)"
    bsz, seqlen, nheads, d = x.shape
    cfg = HadamardQuantConfig(str(x.dtype).replace("torch.", ""), d, block_rows, bool(rotate), int(lanes),
                              int(values))
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
    grid = min(bsz * nheads * nblk, num_sms(x.device) * cfg.ctas_per_sm)  # persistent CTAs
    _compile.get_kernel(cfg, build)(x, signs, out, out_scales, grid)
    return out, out_scales
