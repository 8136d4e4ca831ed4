"""Torch-facing Hopper FP8 (e4m3) attention forward: config, Vt layout, compile on fake tensors, launch.

Importing this module does not import the CuTe DSL (kernel: fwd_fp8_kernel.py). One compile serves
every batch, seqlen and head count.

V layout. fp8 wgmma takes both operands K-major, so for O += P V the kernel reads V seqlen-contiguous:
Vt (b, h_kv, dv, s_pad) with s_pad = s rounded up to 32 (TMA needs 16-byte strides; padding keys are
zeros and their P is 0), and keys permuted inside each 32-key group by key_perm to match the register
layout P is packed in (fwd_fp8_kernel's module doc). fa3.hopper.fp8_vt builds it in one pass over V
(quantizing bf16/fp16 V on the way, or copying e4m3 V); vt_layout here is the torch reference.
FA3 instead transposes V in shared memory inside the attention kernel. Here the V pass costs a few
percent of the attention at long sequences (benchmarks/results: fa3-vt rows) and is free in the fused
entry point, which has to quantize V anyway; the attention kernel stays a pure TMA + wgmma pipeline.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

from fa3 import _compile
from fa3.hopper.tile_scheduler import grid_size, num_sms, num_tiles

HEAD_DIMS = (64, 128, 256)
OUT_DTYPES = ("bfloat16",)
SMEM_LIMIT = 227 * 1024
VT_ALIGN = 32  # keys per permutation group (one fp8 wgmma k-block)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8FwdConfig:
    d: int
    dv: int
    causal: bool
    tile_m: int
    tile_n: int
    stages: int = 2
    pingpong: bool = True  # consumer warpgroups take turns issuing GEMMs
    persistent: bool = True  # grid = #SMs walking tiles; else one CTA per tile
    rescale_early: bool = False  # rescale O while the next S = Q K^T runs (else after PV)
    # O kept in units of the largest V block scale seen, r = s_v(n)/ref folded into P, max moved only
    # past LAZY_TAU: most blocks skip O's rescale (fwd_fp8_kernel module doc). H200 hd256 16k, 5
    # rounds vs off: 1141 vs 1126 (+1.4%), causal 1112 vs 1077 (+3.3%). With V's power-of-two block
    # scales (fp8_vt) it costs +0.1-1.5% RMSE (emulated, randn/outlier inputs, hd64-256)
    lazy_rescale: bool = True
    # wgmma_utils.schedule_fence before the PV wait (FwdConfig.p_after_wait): every exp2 of a block
    # then runs under the PV in flight; off, ptxas waits for it after 6-8 exp2s and packs P in the
    # MUFU gaps. default_config: off at hd256 (H100 16k, 5 rounds: 1195 vs 1169 TFLOP/s), on at
    # hd128 (883 vs 850)
    p_after_wait: bool = True
    out_dtype: str = "bfloat16"
    l2_group: bool = True  # causal: heaviest-first within groups of heads sharing L2 (tile_scheduler)
    # wgmma smem descriptors built once per kernel (wgmma_utils.DescFrag), as FwdConfig.desc_hoist:
    # hd256 loop 635 -> 602 SASS instructions (uniform 100 -> 67). H100, 5 rounds vs off, 16k:
    # hd256 +2.4% (causal +0.4%), hd128 +0.0%, hd64 +1.7%; hd256 4k +1.0%; a second run at hd256
    # 16k: +0.5%, causal -1.3% (rounds spread ~3%)
    desc_hoist: bool = True
    # exp2 emulation, as FwdConfig.exp2_emu (fp8's GEMMs take half bf16's cycles, so a block's EX2s
    # weigh twice as much against them). An ablation, off: H100 16k, 3 rounds, k = 4 / 2: hd64
    # 0.92 / 0.81x, hd128 0.94 / 0.86x, hd256 0.92 / 0.87x (h100-2026-12-08-s21-exp2-emu.json).
    exp2_emu: int = 0


def smem_bytes(tile_m: int, tile_n: int, d: int, dv: int, stages: int) -> int:
    return tile_m * d + stages * tile_n * (d + dv) + 1024


def tile_size(d: int, dv: int, causal: bool) -> tuple[int, int, int]:
    """(tile_m, tile_n, stages). The K/V block-quantization granularity equals tile_n (and Q's
    equals tile_m). Registers bound tile_n: per consumer thread S is tile_n/2 fp32, P tile_n/8,
    O dv/2. FA3 (fp8, V pre-transposed): hd64 192x160, hd128 128x192, hd256 128x128; here tile_n
    is kept a multiple of 64 so Vt's smem rows get at least the 64-byte swizzle."""
    hd = max(d, dv)
    if hd <= 64:
        return 192, 128, 2
    if hd <= 128:
        return 128, 192 if not causal else 128, 2
    return 128, 128, 3  # hd256: a third K/V stage fits (230 KB) and paid off (H200 16k: +9%)


def default_config(d: int, dv: int, causal: bool, seqlen_q: int | None = None,
                   seqlen_k: int | None = None, **overrides) -> Fp8FwdConfig:
    tile_m, tile_n, stages = tile_size(d, dv, causal)
    pingpong = max(d, dv) <= 128  # hd256: measured no faster with it (H200, 16k: 1052 vs 1025)
    persistent = True  # hd256 non-persistent: 1024 tiles = 7.8 waves of 132 SMs (H200 16k: 1025 -> 1122)
    # hd256 without pingpong: rescale O under the next S GEMM (H200 16k, persistent, 3 stages:
    # non-causal 1012 -> 1132, causal 1072 -> 1102; runs differ by up to ~8%)
    rescale_early = max(d, dv) > 128
    cfg = Fp8FwdConfig(d=d, dv=dv, causal=bool(causal), tile_m=tile_m, tile_n=tile_n, stages=stages,
                       pingpong=pingpong, persistent=persistent, rescale_early=rescale_early,
                       p_after_wait=max(d, dv) <= 128)
    cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    assert cfg.d in HEAD_DIMS and cfg.dv in HEAD_DIMS and cfg.tile_n % 32 == 0, cfg
    assert smem_bytes(cfg.tile_m, cfg.tile_n, d, dv, cfg.stages) <= SMEM_LIMIT, f"smem: {cfg}"
    return cfg


def variants() -> Iterator[Fp8FwdConfig]:
    """Every config worth compile-testing: shipped defaults plus a few tile/schedule switches."""
    for d in HEAD_DIMS:
        for causal in (False, True):
            yield default_config(d, d, causal)
    for d, causal, over in ABLATIONS:
        yield default_config(d, d, causal, **over)


# Switch sets timed by `bench_attn.py --dtype e4m3` (and GPU-tested) beside the defaults.
ABLATIONS = [
    (64, False, dict(persistent=False)), (64, False, dict(tile_m=128, tile_n=192)),
    (64, False, dict(stages=3)), (128, False, dict(stages=3)),
    (128, False, dict(tile_n=128)), (128, False, dict(pingpong=False)),
    (128, False, dict(persistent=False)), (128, True, dict(tile_n=192)),
    (256, False, dict(persistent=False)), (256, False, dict(stages=2)),
    (256, False, dict(rescale_early=False)), (256, False, dict(pingpong=True)),
    (256, True, dict(rescale_early=False)), (256, True, dict(persistent=False)),
    (256, True, dict(stages=2)), (128, True, dict(l2_group=False)), (256, True, dict(l2_group=False)),
    (64, True, dict(desc_hoist=False)), (128, False, dict(desc_hoist=False)),
    (256, False, dict(desc_hoist=False)), (256, True, dict(desc_hoist=False)),
    (64, True, dict(lazy_rescale=False)), (128, False, dict(lazy_rescale=False)),
    (256, False, dict(lazy_rescale=False)), (256, True, dict(lazy_rescale=False)),
    (128, False, dict(p_after_wait=False)), (256, False, dict(p_after_wait=True)),
    (64, False, dict(exp2_emu=4)), (128, False, dict(exp2_emu=4)), (128, True, dict(exp2_emu=2)),
    (256, False, dict(exp2_emu=4)),
]


def _fake(dtype, shape, contiguous_last=True):
    import cutlass
    from cutlass.cute.runtime import make_fake_tensor

    cute = _compile.dsl()
    dt = {"float8_e4m3fn": cutlass.Float8E4M3FN, "float32": cutlass.Float32}[dtype]
    div = 16 // (dt.width // 8)
    stride = tuple(cute.sym_int64(divisibility=div) for _ in shape[:-1]) + (1,)
    return make_fake_tensor(dt, shape, stride=stride, assumed_align=16)


def build(cfg: Fp8FwdConfig, extra_options: str = ""):
    """Compile cfg for sm_90a on fake tensors (no GPU needed)."""
    cute = _compile.dsl()
    import cutlass
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    from fa3.hopper.fwd_fp8_kernel import FlashFwdFp8Sm90

    b, h, hk, sq, sk, skp, nq, nk = (cute.sym_int32() for _ in range(8))
    q = _fake("float8_e4m3fn", (b, sq, h, cfg.d))
    k = _fake("float8_e4m3fn", (b, sk, hk, cfg.d))
    vt = _fake("float8_e4m3fn", (b, hk, cfg.dv, skp))
    o = _compile.fake_attn_tensor(cfg.out_dtype, (b, sq, h, cfg.dv))
    lse = _compile.fake_lse_tensor((b, h, sq))
    scales = [make_fake_compact_tensor(cutlass.Float32, shape, stride_order=(2, 1, 0), assumed_align=4)
              for shape in ((b, h, nq), (b, hk, nk), (b, hk, nk))]
    kernel = FlashFwdFp8Sm90(cfg)
    return cute.compile(kernel, q, k, vt, o, lse, *scales, cutlass.Float32(1.0), cutlass.Int32(1),
                        make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=_compile.compile_options(extra=extra_options))


# Slot 16h + 4q + 2a + c of each 32-key group holds key 16h + 8a + 2q + c (see fwd_fp8_kernel).
def key_perm() -> list[int]:
    return [16 * (s // 16) + 8 * ((s % 4) // 2) + 2 * ((s % 16) // 4) + (s % 2) for s in range(32)]


def vt_layout(v8, out=None):
    """v8 (b, s, h_kv, dv) e4m3 -> Vt (b, h_kv, dv, s_pad) e4m3 with keys permuted per 32-group
    (slot order of key_perm), s_pad = s rounded up to 32, padding zero. One strided copy."""
    import torch

    b, s, hk, dv = v8.shape
    s_pad = -(-s // VT_ALIGN) * VT_ALIGN
    src = v8.view(torch.uint8)
    if s_pad != s:
        src = torch.nn.functional.pad(src, (0, 0, 0, 0, 0, s_pad - s))
    g = s_pad // VT_ALIGN
    if out is None:
        out = torch.empty(b, hk, dv, s_pad, device=v8.device, dtype=torch.float8_e4m3fn)
    # keys (g, h, a, q, c) -> slots (g, h, q, a, c): key = 32g + 16h + 8a + 2q + c
    src = src.reshape(b, g, 2, 2, 4, 2, hk, dv).permute(0, 6, 7, 1, 2, 4, 3, 5)
    out.view(torch.uint8).view(b, hk, dv, g, 2, 4, 2, 2).copy_(src)
    return out


def flash_fwd_fp8(q8, k8, vt8, q_scale, k_scale, v_scale, out, lse, softmax_scale: float,
                  causal: bool, cfg: Fp8FwdConfig) -> None:
    """out (b, sq, h, dv) bf16 and lse (b, h, sq) fp32 written in place.
    q8 (b, sq, h, d), k8 (b, sk, h_kv, d) e4m3; vt8 from vt_layout; scales fp32 contiguous:
    q_scale (b, h, ceil(sq/tile_m)), k_scale and v_scale (b, h_kv, ceil(sk/tile_n)); dequantized
    x = x8 * scale of its block. ``cfg`` fixes the tiles the scales were computed for."""
    b, sq, h, d = q8.shape
    _, sk, hk, _ = k8.shape
    dv = vt8.shape[2]
    assert (d, dv) == (cfg.d, cfg.dv) and cfg.causal == bool(causal)
    assert vt8.shape == (b, hk, dv, -(-sk // VT_ALIGN) * VT_ALIGN), vt8.shape
    assert q_scale.shape == (b, h, -(-sq // cfg.tile_m)), q_scale.shape
    assert k_scale.shape == v_scale.shape == (b, hk, -(-sk // cfg.tile_n)), k_scale.shape
    assert out.shape == (b, sq, h, dv) and lse.shape == (b, h, sq)
    fn = _compile.get_kernel(cfg, build)
    if b == 0 or sq == 0 or h == 0:
        return
    if sk == 0:
        out.zero_()
        lse.fill_(-math.inf)
        return
    tiles = num_tiles(sq, cfg.tile_m, h, b)
    grid = grid_size(tiles, num_sms(q8.device), cfg.persistent)
    fn(q8, k8, vt8, out, lse, q_scale, k_scale, v_scale, float(softmax_scale), grid)
