"""Torch-facing Hopper attention forward: config, compile on fake tensors, launch.

Importing this module does not import the CuTe DSL; the kernel (fwd_kernel.py) is traced and compiled
on first use of a config, through fa3._compile's cache. One compile serves every batch, seqlen and head
count: sizes and strides are symbolic (only the head dims, dtype and switches are baked in).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

from fa3 import _compile
from fa3.hopper.tile_scheduler import grid_size, num_sms, num_tiles
from fa3.hopper.tile_size import SMEM_LIMIT, separate_o_fits, smem_bytes, tile_size

DTYPES = ("bfloat16", "float16")
HEAD_DIMS = (64, 96, 128, 192, 256)
# (d, dv) pairs with d != dv (DeepSeek-style MLA prefill shapes)
HEAD_DIM_PAIRS = ((192, 128),)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FwdConfig:
    d: int
    dv: int
    dtype: str  # "bfloat16" | "float16"
    causal: bool
    tile_m: int
    tile_n: int
    stages: int
    overlap: bool = True  # intra-warpgroup overlap of S_{j+1} with softmax_j (FA3 Alg. 2)
    pingpong: bool = True  # the two consumer warpgroups alternate their GEMMs (named barriers)
    persistent: bool = True  # grid = #SMs, static tile scheduler
    rescale_early: bool = False  # (overlap) rescale O while S = Q K^T of the next block runs
    # (overlap) free Q's buffer right after the tile's last S = Q K^T, so the producer's load of
    # the next tile's Q (and the K behind it) runs under the last softmax, PV and epilogue
    # instead of after them: short tiles (causal, short sequences) wait less for Q.
    q_early: bool = True
    # Q's ring depth. 2 (persistent): the next tile's Q loads while this tile runs, instead of
    # after its last S = Q K^T, so a short tile does not start by waiting for Q's TMA (nor for
    # its first K, which the producer issues after that Q). Measured no help, so off: H100,
    # 3 rounds, hd64/hd128 at 512-4k tokens 0.975-1.002x (h100-2026-12-06-s6-fwd.json).
    q_stages: int = 1
    # Each consumer warpgroup stores its own 64 rows of O (its own smem slice, named barrier and
    # TMA store) instead of all of them meeting at one barrier per tile: the warpgroups then
    # stay staggered across tiles, as pingpong staggers them within one, and the first softmax
    # of a tile hides under another warpgroup's GEMMs. Needs O's own smem buffer; default_config
    # turns it on wherever that fits.
    wg_epilogue: bool = False
    # causal: heaviest-first order within groups of heads whose K/V fit in L2 (tile_scheduler)
    # rather than over all heads at once
    l2_group: bool = True
    l2_group_mb: int = 32  # the K/V megabytes one such group may hold (tile_scheduler.lpt_group)
    # Where O gets no smem buffer of its own (hd256): stage it in Q's buffer and TMA-store it
    # (persistent: Q is then released after the store has read smem), instead of storing it
    # from registers straight to global memory.
    o_in_q: bool = False
    # wgmma smem descriptors built once per kernel and stepped by 32-bit static offsets
    # (wgmma_utils.DescFrag) instead of rebuilt by the DSL in every KV block. H100, two runs of
    # 3-5 rounds vs off: hd64 +0.7..3.2%, hd128 -1.1..+1.8%, hd256 +0..6.2% (4k causal -1%)
    desc_hoist: bool = True
    # Lazy rescale (softmax.py): a row keeps its running max until a block's max exceeds it by
    # more than this many log2 units (P <= 2^8 then, well inside bf16/fp16), and warps whose rows
    # all keep it skip O's rescale. None: rescale every block.
    rescale_threshold: float | None = 8.0
    # (overlap) wgmma_utils.schedule_fence before the wait for the previous PV: without it ptxas
    # interleaves P's packs (which overwrite the registers that PV reads) with the exp2s and so
    # waits for that PV first: before 0 of 64 (hd64), 13 of 66 (hd128) or 16 of 42 (hd256) exp2s
    # per thread, i.e. little of the softmax overlapped the PV.
    # H100, 5 rounds, both switches vs neither: hd256 4k +1.5%, hd128 4k causal +1.0%, hd64 -0.6%,
    # hd128 4k full -1.5%, 16k 0 (rounds swung 5-10% that day: h100-2026-12-06-s2-probes.json).
    # default_config turns it off at hd128: there waiting for the PV after ~13 exp2s and packing P
    # in the MUFU gaps (what FA4's SASS does too) is faster; see default_config.
    p_after_wait: bool = True
    # exp2 emulation (softmax.exp2_mixed): 1 column in k of each S block gets 2^x by FMA-pipe
    # arithmetic instead of MUFU.EX2 (0: off). An ablation, off: on an H100 the softmax is not
    # EX2-bound (ncu, hd64: XU pipe 62% busy, tensor 60%); emulation adds issue slots and loses.
    # 3 rounds, 512-16k tokens, k = 8 / 4 / 2: hd64 0.94-0.97 / 0.89-0.96 / 0.82-0.94x, hd128
    # 0.97 / 0.93-0.95 / 0.90-0.92x (h100-2026-12-08-s21-exp2-emu.json).
    exp2_emu: int = 0
    # (overlap, causal, persistent) The tile's first KV block (on the diagonal): a warpgroup whose
    # rows see none of its upper half of keys computes S = Q K^T with N = tile_n / 2 (1; the mask
    # then clears the other half, whose registers the wgmma left unwritten), and with 2 also
    # O += P V over the first half of the keys (P is 0 past it): the next block is peeled off the
    # loops to issue that PV. At tile_m = tile_n = 128, warpgroup 0 of every tile: 1/4 (1) or 1/2
    # (2) of its GEMM work on that block, and its first softmax starts sooner. Not measured yet,
    # so 0 (off).
    diag_half: int = 0
    # Features, each a compile-time switch (off: the plain kernel, unchanged).
    local: bool = False  # sliding window (left, right) given at run time; causal is then False
    softcap: bool = False  # S <- cap * tanh(S * scale / cap), cap given at run time
    sink: bool = False  # learnable per-head sink logit (fp32 (h,)) in the softmax denominator
    varlen: bool = False  # cu_seqlens_q/k: packed sequences
    seqused_q: bool = False  # valid rows per sequence (rows past it: O = 0, LSE = -inf/sink)
    seqused_k: bool = False  # valid keys per sequence
    # pack_gqa: query heads per kv head folded into one Q tile's rows (1 = off); compile-time, so
    # the row -> (position, head) split is a division by a constant
    pack_gqa: int = 1


FEATURES = ("local", "softcap", "sink", "varlen", "seqused_q", "seqused_k")


def default_config(d: int, dv: int, dtype, causal: bool, seqlen_q: int | None = None,
                   seqlen_k: int | None = None, features: dict | None = None,
                   qhead_per_kvhead: int = 1, window: tuple[int, int] | None = None,
                   **overrides) -> FwdConfig:
    """features: {name: True} for FEATURES; qhead_per_kvhead: the GQA ratio (pack_gqa heuristic);
    window: the kernel's (left, right) when local (sides may be mask.UNBOUNDED): it bounds the
    keys one Q tile reads; overrides: any FwdConfig field (tiles, switches, pack_gqa=1 to turn
    packing off)."""
    features = {k: bool(v) for k, v in (features or {}).items()}
    assert set(features) <= set(FEATURES), features
    dtype = _dtype_name(dtype)
    qpk = qhead_per_kvhead if qhead_per_kvhead > 1 else 1
    rows_q = seqlen_q * qpk if seqlen_q is not None else None
    tile_m, tile_n, stages = tile_size(d, dv, causal, rows_q, local=features.get("local", False),
                                       seqlen_k=seqlen_k)
    # Pack the heads of a GQA group into the tile's rows (FA4 does by default): K/V are read once
    # per group instead of once per query head, short sequences fill the tile, and a causal tile
    # spans fewer positions, so fewer blocks cross the diagonal.
    # Ratios 2/4/8 (GPU-tested on the H200); others keep one head per tile.
    pack = qpk if qpk in (2, 4, 8) and tile_m % qpk == 0 else 1
    # Pingpong needs the second S tile's registers to fit beside O: FA3 turns it off above hd128.
    pingpong = max(d, dv) <= 128
    # Without pingpong nothing hides a large O's rescale: move it under the next S GEMM.
    rescale_early = dv > 128
    # hd256 (no smem for O beside Q): one tile per CTA, O staged in Q's buffer + TMA store.
    # With one tile per CTA nothing waits for Q's buffer, and the hardware hands out CTAs
    # dynamically (heaviest causal tiles first). H200, TFLOP/s vs the persistent register-store
    # epilogue: s1k/4k/16k 557/629/689 -> 637/670/714; causal 323/552/684 -> 336/584/687.
    big = not separate_o_fits(tile_m, tile_n, d, dv, stages)
    o_in_q = big
    persistent = not big
    # hd128 with long KV (>= 64 blocks a tile): CTAs launched in order keep walking the same
    # heads' K/V together; a static persistent split drifts apart over ~16 long rounds
    # (H200 s16k: 571 -> 639, causal 561 -> 591; shorter sequences keep persistent: 1k/4k lose).
    # hd64 causal too (H100, 5 rounds, 16 MB groups: 2x8k 448 -> 465, 16k 480 -> 492, 32k 499 -> 513;
    # ncu at 16k: L2 hit rate 40% for our persistent walk, 82% for FA4's one CTA per tile);
    # hd64 non-causal loses 0.8% (8k/16k), hd64 causal 4k loses 0.7%.
    # A window bounds the keys one Q tile reads (FA4 sizes its splits the same way): window 4096
    # on 32k reads 33 blocks a tile, short-KV work, so it stays persistent. H100, two runs of 5 and
    # 7 rounds, one CTA per tile -> persistent: 595 -> 607 and 604 -> 605 TFLOP/s (FA4 595, 608).
    kv_span = seqlen_k
    if kv_span is not None and window is not None and features.get("local"):
        kv_span = min(kv_span, window[0] + window[1] + 1 + tile_m)
    long_kv = kv_span is not None and kv_span >= 8192
    if long_kv and (64 < max(d, dv) <= 128 or (causal and max(d, dv) <= 64)):
        persistent = False
    # Causal LPT groups (tile_scheduler.lpt_group): with the static persistent split, small groups
    # (~16-64 tiles: all query blocks of a few heads run together and share their K/V in L2) beat
    # 32 MB ones (H100 hd128 causal s512/1k/2k/4k: 254/364/453/499 -> 293/433/518/573 TFLOP/s;
    # hd64 s512/1k 214/291 -> 232/314, 2k/4k within 2%; H100 s15, 3 rounds, vs 2 MB: 1 / 4 / 8 MB
    # and all heads: hd128 s512 1.03 / 0.92 / 0.78 / 0.70x, hd64 s512 1.01 / 0.98 / 0.79 / 0.87x,
    # hd64 s1k 1.00 / 0.99 / 0.75 / 0.85x). 1 MB (4 heads at s512) for hd128 causal with at most
    # 4 query blocks: H100, 5 rounds, s512 +3.2% and +3.0% (s17; +3.3% in s15's 3), every round
    # faster; hd64 s512 +0.5%, so 2 MB there; longer hd128 not measured.
    # One CTA per tile (hardware order) keeps 32 MB: its heaviest-first order is global there
    # (hd256 causal 2k/4k: 553/633 -> 520/584 at 2 MB), except with few query blocks, where K/V
    # reuse wins (hd256 causal s512: 263 -> 297 at 8 MB, twice; s1k 414 -> 425; s2k, 16 blocks,
    # 553 -> 533).
    # Past 32 query blocks only one-CTA-per-tile kernels group (lpt_group's static_split); there
    # 16 MB groups measured best (H100, causal: hd128 16k 593 -> 625, hd256 16k 675 -> 728, 8k
    # hd128 541 -> 594, hd256 640 -> 659 vs all heads at once; 32 MB: 600 / 659 / 593 / 665).
    m_blocks = None if seqlen_q is None else -(-rows_q // tile_m)
    few_blocks = m_blocks is not None and m_blocks <= 8
    many_blocks = m_blocks is not None and m_blocks > 32
    l2_group_mb = 2 if persistent else (8 if few_blocks else (16 if many_blocks else 32))
    if persistent and causal and 64 < max(d, dv) <= 128 and m_blocks is not None and m_blocks <= 4:
        l2_group_mb = 1
    l2_group = True
    if features.get("varlen"):
        # tiles are only known on the device: a persistent walk, or (persistent=False) a grid
        # sized for the most tiles the packed rows can make, whose spare CTAs exit at once;
        # O from registers (a TMA store cannot stop at a sequence end). L2 groups within a
        # sequence (tile_scheduler.varlen_decode) stay off: H100, 5 rounds, causal 32/8 hd128
        # mixes of 16k/32k/64k tokens, 16 MB groups: 445/617/587 -> 435/616/595 TFLOP/s (one CTA
        # per tile with them: 395/620/590).
        persistent, o_in_q, l2_group = True, False, False
    # The schedule fence before the PV wait (p_after_wait) pays at hd64 and is neutral at hd256;
    # at hd128 ptxas's own order (wait after ~13 of 66 exp2s, P's packs in the exp2s' MUFU gaps)
    # is faster. H100, 5 rounds, off vs on, two sessions: hd128 4k +0.8/+2.1%, 16k +2.6/+1.6%,
    # 4k causal +1.9/+1.6%, 1k +2.0%; hd64 4k -1.4/+0.1%, 16k causal -3.5/-2.5%; hd256 -0.3..+1.3%.
    p_after_wait = not (64 < max(d, dv) <= 128)
    # Per-warpgroup O stores wherever O has its own smem buffer (the kernel ignores it for varlen).
    # H100, 5 rounds: hd64 s512 338 -> 355 TFLOP/s (causal 227 -> 230), hd128 s512 489 -> 505,
    # s1k 576 -> 587 (causal 438 -> 444); hd64 1k/2k +-0.2% (h100-2026-12-06-s6-fwd.json).
    wg_epilogue = not big and not features.get("varlen")
    # keywords only: fields were added in the middle of FwdConfig before, and a positional o_in_q
    # once landed in q_early (hd256 lost its staged O store, every other head dim its early Q)
    cfg = FwdConfig(d=d, dv=dv, dtype=dtype, causal=bool(causal), tile_m=tile_m, tile_n=tile_n,
                    stages=stages, pingpong=pingpong, persistent=persistent, p_after_wait=p_after_wait,
                    rescale_early=rescale_early, o_in_q=o_in_q, l2_group=l2_group,
                    l2_group_mb=l2_group_mb, wg_epilogue=wg_epilogue, **features,
                    pack_gqa=pack)
    cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    assert not (cfg.causal and cfg.local), cfg
    assert cfg.tile_m % cfg.pack_gqa == 0 and cfg.pack_gqa in (1, qpk), cfg
    assert cfg.tile_m in (128, 192) and cfg.tile_n % 16 == 0, cfg
    assert cfg.overlap or not cfg.rescale_early, cfg
    assert not cfg.o_in_q or d >= dv, cfg
    assert cfg.q_stages in (1, 2) and not (cfg.q_stages > 1 and cfg.o_in_q), cfg
    # (the half GEMM's N and the PV's 16-key steps; Q single-buffered: the half GEMM reads slot 0.
    # Dense causal, two warpgroups, persistent (short KV: where a tile's first block weighs): else
    # ptxas spills or serializes every wgmma (C7511): three warpgroups (160 registers) 256 B;
    # window 28-60 B; varlen 8 B; softcap, sink, non-causal pack_gqa, one CTA per tile: C7511)
    assert cfg.diag_half in (0, 1, 2), cfg
    assert not cfg.diag_half or (cfg.overlap and cfg.causal and cfg.persistent and cfg.tile_m == 128
                                 and cfg.tile_n % 32 == 0 and cfg.q_stages == 1 and not any(
                                     getattr(cfg, f) for f in ("softcap", "sink", "varlen"))), cfg
    assert smem_bytes(cfg.tile_m, cfg.tile_n, d, dv, cfg.stages, q_stages=cfg.q_stages) <= SMEM_LIMIT, \
        f"smem: {cfg}"
    # wg_epilogue needs O's own smem buffer: off where an override (tiles, stages) leaves none
    if cfg.wg_epilogue and (cfg.varlen or not separate_o_fits(cfg.tile_m, cfg.tile_n, d, dv, cfg.stages,
                                                              q_stages=cfg.q_stages)):
        cfg = dataclasses.replace(cfg, wg_epilogue=False)
    return cfg


def variants() -> Iterator[FwdConfig]:
    """Every config worth compile-testing: the shipped defaults plus the ablation switches and
    the feature switches."""
    for d, dv in [(d, d) for d in HEAD_DIMS] + list(HEAD_DIM_PAIRS):
        for dtype in DTYPES:
            for causal in (False, True):
                yield default_config(d, dv, dtype, causal)
    for d, dv in ((64, 64), (128, 128), (192, 128), (256, 256)):  # features, bf16
        yield default_config(d, dv, "bfloat16", False, features=dict(local=True))
        yield default_config(d, dv, "bfloat16", True, features=dict(softcap=True, sink=True))
        yield default_config(d, dv, "bfloat16", True, features=dict(varlen=True))
        yield default_config(d, dv, "bfloat16", False, features=dict(
            local=True, softcap=True, sink=True, varlen=True, seqused_q=True, seqused_k=True))
    yield default_config(128, 128, "float16", False, features=dict(softcap=True))
    yield default_config(128, 128, "bfloat16", False, features=dict(seqused_k=True))
    yield default_config(128, 128, "bfloat16", True, features=dict(seqused_q=True, local=False))
    yield default_config(96, 96, "bfloat16", False, features=dict(varlen=True, local=True))
    yield dataclasses.replace(default_config(128, 128, "bfloat16", False, features=dict(local=True)),
                              overlap=False)
    for qpk in (2, 4, 8):  # pack_gqa
        yield default_config(128, 128, "bfloat16", True, qhead_per_kvhead=qpk)
        yield default_config(128, 128, "bfloat16", False, qhead_per_kvhead=qpk)
    yield default_config(128, 128, "bfloat16", True, features=dict(varlen=True), qhead_per_kvhead=4)
    for persistent in (True, False):  # varlen with L2 groups inside each sequence (ablation)
        yield dataclasses.replace(default_config(128, 128, "bfloat16", True, features=dict(varlen=True),
                                                 qhead_per_kvhead=4), l2_group=True, l2_group_mb=16,
                                  persistent=persistent)
    yield default_config(64, 64, "float16", False, features=dict(
        local=True, softcap=True, sink=True, varlen=True, seqused_q=True, seqused_k=True),
        qhead_per_kvhead=2)
    yield default_config(256, 256, "bfloat16", False, features=dict(sink=True, local=True),
                         qhead_per_kvhead=4)
    yield default_config(192, 128, "bfloat16", False, features=dict(seqused_q=True),
                         qhead_per_kvhead=8)
    for causal in (False, True):  # ablations at hd128 bf16
        base = default_config(128, 128, "bfloat16", causal)
        yield dataclasses.replace(base, overlap=False)
        yield dataclasses.replace(base, pingpong=False)
        yield dataclasses.replace(base, overlap=False, pingpong=False)
        yield dataclasses.replace(base, persistent=False)
        yield dataclasses.replace(base, rescale_early=True)
        yield dataclasses.replace(base, p_after_wait=False, rescale_threshold=None)
        yield dataclasses.replace(base, p_after_wait=True)
        yield dataclasses.replace(base, rescale_threshold=0.0)
        yield dataclasses.replace(base, q_stages=2)
        yield dataclasses.replace(base, wg_epilogue=False)
        yield dataclasses.replace(default_config(64, 64, "bfloat16", causal), q_stages=2,
                                  wg_epilogue=True)
        yield dataclasses.replace(default_config(256, 256, "bfloat16", causal), p_after_wait=False,
                                  rescale_threshold=None)
        yield dataclasses.replace(default_config(256, 256, "bfloat16", causal), rescale_early=False)
        yield dataclasses.replace(default_config(256, 256, "bfloat16", causal), persistent=True)
        yield dataclasses.replace(default_config(256, 256, "bfloat16", causal), persistent=True,
                                  o_in_q=False)
        yield default_config(64, 64, "bfloat16", causal, seqlen_q=1024)
        # exp2 emulation at rates the GPU tests run (hd64's 3 warpgroups; hd128 fp16)
        yield dataclasses.replace(default_config(64, 64, "bfloat16", causal), exp2_emu=4)
        yield dataclasses.replace(default_config(128, 128, "float16", causal), exp2_emu=2)
    # the half-width GEMMs on a tile's first block (causal): hd128 / hd64, fp16, pack_gqa, seqused
    for dh in (1, 2):
        yield dataclasses.replace(default_config(128, 128, "bfloat16", True), diag_half=dh)
    yield dataclasses.replace(default_config(64, 64, "bfloat16", True), tile_m=128, diag_half=2)
    yield dataclasses.replace(default_config(128, 128, "float16", True, qhead_per_kvhead=4,
                                             features=dict(seqused_q=True, seqused_k=True)),
                              diag_half=2)


def _dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    assert name in DTYPES, f"fa3 hopper fwd: unsupported dtype {dtype}"
    return name


def build(cfg: FwdConfig, extra_options: str = ""):
    """Compile cfg for sm_90a on fake tensors (no GPU needed)."""
    cute = _compile.dsl()
    import cutlass
    from cutlass.cute.runtime import make_fake_stream

    from fa3.hopper.fwd_kernel import FlashFwdSm90

    from cutlass.cute.runtime import make_fake_tensor

    b, h, hk, sq, sk = (cute.sym_int32() for _ in range(5))
    q = _compile.fake_attn_tensor(cfg.dtype, (b, sq, h, cfg.d))
    k = _compile.fake_attn_tensor(cfg.dtype, (b, sk, hk, cfg.d))
    v = _compile.fake_attn_tensor(cfg.dtype, (b, sk, hk, cfg.dv))
    o = _compile.fake_attn_tensor(cfg.dtype, (b, sq, h, cfg.dv))
    lse = _compile.fake_lse_tensor((b, h, sq))

    def vec(dtype, n=None):  # a contiguous 1-D int32/fp32 tensor of symbolic length
        return make_fake_tensor(dtype, (n if n is not None else cute.sym_int32(),), stride=(1,),
                                assumed_align=4)

    nb = cute.sym_int32()  # number of sequences (varlen) or batch
    opt = dict(
        cu_q=vec(cutlass.Int32) if cfg.varlen else None,
        cu_k=vec(cutlass.Int32) if cfg.varlen else None,
        used_q=vec(cutlass.Int32, nb) if cfg.seqused_q else None,
        used_k=vec(cutlass.Int32, nb) if cfg.seqused_k else None,
        sink=vec(cutlass.Float32) if cfg.sink else None,
        softcap=cutlass.Float32(1.0) if cfg.softcap else None,
        wl=cutlass.Int32(0) if cfg.local else None,
        wr=cutlass.Int32(0) if cfg.local else None)
    kernel = FlashFwdSm90(cfg)
    return cute.compile(kernel, q, k, v, o, lse, cutlass.Float32(1.0), cutlass.Int32(1), *opt.values(),
                        make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=_compile.compile_options(extra=extra_options))


def _window(causal: bool, window) -> tuple[bool, bool, int, int]:
    """FA's (left, right), -1 unbounded -> (causal, local, left, right) for the kernel: causal is
    (-1, 0); any other bounded window is local, with -1 sides as mask.UNBOUNDED."""
    from fa3.hopper.mask import UNBOUNDED

    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    if left < 0 and right < 0:
        return False, False, 0, 0
    if left < 0 and right == 0:
        return True, False, 0, 0
    return False, True, left if left >= 0 else UNBOUNDED, right if right >= 0 else UNBOUNDED


_PLANS: dict = {}
_PLANS_MAX = 1024


def _plan(q, k, v, out, lse, causal, window, softcap, sink, varlen, seqused_q, seqused_k,
          max_seqlen_q, max_seqlen_k, config_overrides):
    """(compiled kernel, grid, local, left, right) for one call signature, after its checks."""
    b, sq, h, d = q.shape
    _, sk, hk, dv = v.shape
    assert k.shape == (b, sk, hk, d) and out.shape == (b, sq, h, dv) and lse.shape == (b, h, sq)
    assert h % hk == 0 and q.dtype == k.dtype == v.dtype == out.dtype
    for t in (q, k, v, out):  # TMA: 16-byte strides
        assert t.stride(-1) == 1
        assert all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
    assert lse.stride(-1) == 1 and str(lse.dtype) == "torch.float32"
    causal, local, left, right = _window(causal, window)
    features = dict(local=local, softcap=softcap > 0, sink=sink is not None, varlen=varlen,
                    seqused_q=seqused_q is not None, seqused_k=seqused_k is not None)
    cfg = default_config(d, dv, q.dtype, causal,
                         seqlen_q=max_seqlen_q if varlen else sq,
                         seqlen_k=max_seqlen_k if varlen else sk,
                         features=features, qhead_per_kvhead=h // hk,
                         window=(left, right) if local else None, **(config_overrides or {}))
    fn = _compile.get_kernel(cfg, build)
    if varlen and cfg.persistent:
        grid = num_sms(q.device)  # the tile count is known only on the device
    elif varlen:  # sum over sequences of ceil(rows / tile_m) <= total rows / tile_m + sequences;
        # the number of sequences is not part of the plan's key: the grid is a function of it
        rows_tiles, heads = q.shape[1] * cfg.pack_gqa // cfg.tile_m, h // cfg.pack_gqa
        grid = lambda nseq: max(1, (rows_tiles + nseq) * heads)  # noqa: E731
    else:
        tiles = num_tiles(sq * cfg.pack_gqa, cfg.tile_m, h // cfg.pack_gqa, b)
        grid = grid_size(tiles, num_sms(q.device), cfg.persistent)
    return fn, grid, local, left, right


def flash_fwd(q, k, v, out, lse, softmax_scale: float, causal: bool, *, window=None,
              softcap: float = 0.0, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None,
              seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, sink=None,
              config_overrides: dict | None = None) -> None:
    """out and lse (fp32) are written in place. Dense: q (b, sq, h, d), k (b, sk, h_kv, d),
    v (b, sk, h_kv, dv), out (b, sq, h, dv), lse (b, h, sq). Varlen (cu_seqlens_q/k int32 (b+1,)):
    q (total_q, h, d), k/v (total_k, h_kv, d/dv), out (total_q, h, dv), lse (h, total_q).
    Last dims contiguous. window (left, right), softcap, seqused_q/k (int32 (b,)) and sink
    ((h,) logits) as in fa3.reference; config_overrides: FwdConfig fields (tiles, switches)."""
    varlen = cu_seqlens_q is not None
    assert varlen == (cu_seqlens_k is not None), "cu_seqlens_q and cu_seqlens_k go together"
    if varlen:
        assert q.dim() == 3 and lse.shape == (q.shape[1], q.shape[0])
        q, k, v, out, lse = (t.unsqueeze(0) for t in (q, k, v, out, lse))
    for t in (q, k, v, out):  # TMA: 16-byte aligned bases (the strides are part of the plan's key)
        assert t.data_ptr() % 16 == 0, "q, k, v and out must be 16-byte aligned"
    # Everything below the launch depends only on this signature: checks, the tile heuristic,
    # the compiled kernel and the grid are looked up once per signature (a decode loop repeats
    # a few; the dict is cleared past _PLANS_MAX), which keeps eager calls' host cost low.
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), out.stride(), lse.shape,
           lse.stride(), q.dtype, out.dtype, lse.dtype, causal, window and tuple(window),
           softcap > 0, sink is None, varlen, seqused_q is None, seqused_k is None,
           max_seqlen_q if varlen else None, max_seqlen_k if varlen else None, q.device,
           tuple(sorted(config_overrides.items())) if config_overrides else None)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(q, k, v, out, lse, causal, window, softcap, sink, varlen, seqused_q, seqused_k,
                     max_seqlen_q, max_seqlen_k, config_overrides)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    fn, grid, local, left, right = plan
    if callable(grid):
        grid = grid(cu_seqlens_q.shape[0] - 1)
    if sink is not None:
        sink = sink.float().contiguous()
    b, sq, h, _ = q.shape
    if b == 0 or sq == 0 or h == 0:
        return
    if k.shape[1] == 0:  # no keys: every row is empty
        out.zero_()
        if sink is not None:
            lse.copy_(sink.view(1, h, 1).expand(b, h, sq))
        else:
            lse.fill_(-math.inf)
        return
    scale, softcap_pre = float(softmax_scale), None
    if softcap > 0:  # tanh(S * scale / cap), then the softmax runs with scale cap
        scale, softcap_pre = float(softcap), float(softmax_scale) / float(softcap)
    fn(q, k, v, out, lse, scale, grid, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, sink,
       softcap_pre, left if local else None, right if local else None)
