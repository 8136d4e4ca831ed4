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
from fa3.hopper.tile_scheduler import grid_size, num_tiles
from fa3.hopper.tile_size import SMEM_LIMIT, separate_o_fits, smem_bytes, tile_size

DTYPES = ("bfloat16", "float16")
HEAD_DIMS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
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
    # Where O gets no smem buffer of its own (hd256): stage it in Q's buffer and TMA-store it
    # (persistent: Q is then released after the store has read smem), instead of storing it
    # from registers straight to global memory.
    o_in_q: bool = False


def default_config(d: int, dv: int, dtype, causal: bool, seqlen_q: int | None = None,
                   seqlen_k: int | None = None, **overrides) -> FwdConfig:
    dtype = _dtype_name(dtype)
    tile_m, tile_n, stages = tile_size(d, dv, causal, seqlen_q)
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
    if 64 < max(d, dv) <= 128 and seqlen_k is not None and seqlen_k >= 8192:
        persistent = False
    cfg = FwdConfig(d, dv, dtype, bool(causal), tile_m, tile_n, stages, True, pingpong, persistent,
                    rescale_early, o_in_q)
    cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    assert cfg.tile_m in (128, 192) and cfg.tile_n % 16 == 0, cfg
    assert cfg.overlap or not cfg.rescale_early, cfg
    assert not cfg.o_in_q or d >= dv, cfg
    assert smem_bytes(cfg.tile_m, cfg.tile_n, d, dv, cfg.stages) <= SMEM_LIMIT, f"smem: {cfg}"
    return cfg


def variants() -> Iterator[FwdConfig]:
    """Every config worth compile-testing: the shipped defaults plus the ablation switches."""
    for d in HEAD_DIMS:
        for dtype in DTYPES:
            for causal in (False, True):
                yield default_config(d, d, dtype, causal)
    for causal in (False, True):  # ablations at hd128 bf16
        base = default_config(128, 128, "bfloat16", causal)
        yield dataclasses.replace(base, overlap=False)
        yield dataclasses.replace(base, pingpong=False)
        yield dataclasses.replace(base, overlap=False, pingpong=False)
        yield dataclasses.replace(base, persistent=False)
        yield dataclasses.replace(base, rescale_early=True)
        yield dataclasses.replace(default_config(256, 256, "bfloat16", causal), rescale_early=False)
        yield dataclasses.replace(default_config(256, 256, "bfloat16", causal), persistent=True)
        yield dataclasses.replace(default_config(256, 256, "bfloat16", causal), persistent=True,
                                  o_in_q=False)
        yield default_config(64, 64, "bfloat16", causal, seqlen_q=1024)


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

    b, h, hk, sq, sk = (cute.sym_int32() for _ in range(5))
    q = _compile.fake_attn_tensor(cfg.dtype, (b, sq, h, cfg.d))
    k = _compile.fake_attn_tensor(cfg.dtype, (b, sk, hk, cfg.d))
    v = _compile.fake_attn_tensor(cfg.dtype, (b, sk, hk, cfg.dv))
    o = _compile.fake_attn_tensor(cfg.dtype, (b, sq, h, cfg.dv))
    lse = _compile.fake_lse_tensor((b, h, sq))
    kernel = FlashFwdSm90(cfg)
    return cute.compile(kernel, q, k, v, o, lse, cutlass.Float32(1.0), cutlass.Int32(1),
                        make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=_compile.compile_options(extra=extra_options))


def _num_sms(device) -> int:
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


def flash_fwd(q, k, v, out, lse, softmax_scale: float, causal: bool, **cfg_overrides) -> None:
    """out (b, sq, h, dv) and lse (b, h, sq) fp32 are written in place.
    q (b, sq, h, d), k (b, sk, h_kv, d), v (b, sk, h_kv, dv); last dims contiguous."""
    b, sq, h, d = q.shape
    _, sk, hk, dv = v.shape
    assert k.shape == (b, sk, hk, d) and out.shape == (b, sq, h, dv) and lse.shape == (b, h, sq)
    assert h % hk == 0 and q.dtype == k.dtype == v.dtype == out.dtype
    for t in (q, k, v, out):  # TMA: 16-byte aligned base and strides
        assert t.stride(-1) == 1 and t.data_ptr() % 16 == 0
        assert all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
    assert lse.stride(-1) == 1 and str(lse.dtype) == "torch.float32"
    cfg = default_config(d, dv, q.dtype, causal, seqlen_q=sq, seqlen_k=sk, **cfg_overrides)
    fn = _compile.get_kernel(cfg, build)
    if b == 0 or sq == 0 or h == 0:
        return
    if sk == 0:  # no keys: every row is empty
        out.zero_()
        lse.fill_(-math.inf)
        return
    tiles = num_tiles(sq, cfg.tile_m, h, b)
    grid = grid_size(tiles, _num_sms(q.device), cfg.persistent)
    fn(q, k, v, out, lse, float(softmax_scale), grid)
