"""Torch-facing sm80 (Ampere / Ada, and Hopper as a fallback) attention forward: config, compile on
fake tensors, launch. The kernel itself is fwd_sm80_kernel.py.

Importing this module does not import the CuTe DSL. One compile serves every batch, seqlen and head
count (sizes and strides are symbolic); head dim, dtype, causal, tiling and the target arch are baked
in. The arch is part of the config because cubins are arch-specific (an sm_80 cubin does not load on
sm_90); it is read from the device at call time, never while compiling.

Tiles (4 warps, each warp owns tile_m / 4 query rows; tile_n = 64 keys per step):
* d <= 128: 128 x 64. Per thread O is d fp32 registers, S 64, P 32: fits in 255 with no spills, and
  a 128-row Q tile halves K/V smem traffic per query compared with 64 rows.
* d > 128: 64 x 64, the only 4-warp tile whose O accumulator (d/2 registers) leaves room for S and P.
  (ptxas, 4.8.1: d 64/192/256 need no spills; d 96/128 sit at 255 registers with a few values
  spilled, 2-10 local loads/stores per ~1000-instruction KV iteration, more in causal variants.)
Stages of the K/V smem rings: 2 (cp.async of block j+1 overlaps block j's MMAs), unless the second
stage would cost the second resident CTA per SM: mma.sync needs more than one warp per SM
sub-partition to hide ldmatrix/MMA/MUFU latency, which 2 CTAs of 4 warps give and 1 does not
(FA2 makes the same trade-off). Then 1 stage, where the FA2 order still overlaps the V load with
S = Q K^T and the next K load with softmax + P V.
"""
from __future__ import annotations

import dataclasses
import math

from fa3 import _compile

DTYPES = ("bfloat16", "float16")
HEAD_DIMS = (64, 96, 128, 192, 256)
ARCHS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
# (max dynamic smem per block, smem per SM) in bytes; the driver reserves 1 KB per resident CTA
_SMEM = {"sm_80": (163 << 10, 164 << 10), "sm_87": (163 << 10, 164 << 10),
         "sm_86": (99 << 10, 100 << 10), "sm_89": (99 << 10, 100 << 10),
         "sm_90": (227 << 10, 228 << 10)}
_RESERVED_PER_CTA = 1 << 10


def check_common(cfg) -> None:
    """Checks every sm80 config (forward and backward) shares: dtype, head dim, arch, masks."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {cfg.dtype}")
    if cfg.d not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {cfg.d}")
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {cfg.arch}")
    if cfg.causal and cfg.local:
        raise ValueError("causal with a window is local with right = 0 (causal=False)")


@dataclasses.dataclass(frozen=True)
class FwdSm80Config:
    d: int  # head dim of q, k and v (d == dv)
    dtype: str  # "bfloat16" | "float16"
    causal: bool
    tile_m: int
    tile_n: int
    stages: int
    arch: str  # "sm_80", "sm_86", "sm_87", "sm_89" or "sm_90": the cubin's target
    local: bool = False  # sliding window (left, right) given at run time; causal is then False
    softcap: bool = False  # S <- cap * tanh(S * scale / cap), cap given at run time
    varlen: bool = False  # cu_seqlens_q/k: packed sequences, grid over max_seqlen_q
    seqused_q: bool = False  # valid rows per sequence (rows past it: O = 0, LSE = -inf)
    seqused_k: bool = False  # valid keys per sequence

    def __post_init__(self):
        check_common(self)
        if self.tile_m % 64 or self.tile_n % 16 or self.stages < 1:
            raise ValueError(f"bad tiling {self.tile_m}x{self.tile_n}, {self.stages} stages")
        if smem_bytes(self.tile_m, self.tile_n, self.d, self.stages) > _SMEM[self.arch][0]:
            raise ValueError(f"{self} needs more shared memory than {self.arch} has")


def smem_bytes(tile_m: int, tile_n: int, d: int, stages: int) -> int:
    return 2 * (tile_m * d + 2 * stages * tile_n * d)  # Q (reused for O) + K and V rings


def ctas_per_sm(nbytes: int, arch: str) -> int:
    return _SMEM[arch][1] // (nbytes + _RESERVED_PER_CTA)


def default_config(d: int, dtype, causal: bool, arch: str, **overrides) -> FwdSm80Config:
    tile_m, tile_n = (128, 64) if d <= 128 else (64, 64)
    limit = _SMEM[arch][0] if arch in _SMEM else 0
    fits = [s for s in (2, 1) if smem_bytes(tile_m, tile_n, d, s) <= limit] or [1]
    want = min(2, ctas_per_sm(smem_bytes(tile_m, tile_n, d, 1), arch)) if arch in _SMEM else 1
    stages = next((s for s in fits if ctas_per_sm(smem_bytes(tile_m, tile_n, d, s), arch) >= want),
                  fits[-1])
    cfg = FwdSm80Config(d, _dtype_name(dtype), bool(causal), tile_m, tile_n, stages, arch)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def variants(arch: str = "sm_80"):
    """The shipped configs for one arch: every head dim x dtype x causal."""
    for d in HEAD_DIMS:
        for dtype in DTYPES:
            for causal in (False, True):
                yield default_config(d, dtype, causal, arch)


def varlen_variants(arch: str = "sm_80"):
    """A few varlen / seqused builds covering each switch and its combinations with the others
    (every head dim x dtype x feature set would be hundreds of builds)."""
    yield default_config(64, "bfloat16", True, arch, varlen=True)
    yield default_config(128, "float16", False, arch, varlen=True, seqused_q=True, seqused_k=True)
    yield default_config(256, "bfloat16", False, arch, varlen=True, local=True, softcap=True)
    yield default_config(128, "bfloat16", True, arch, seqused_k=True)  # dense + seqused
    yield default_config(96, "bfloat16", False, arch, seqused_q=True, local=True)


def _dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    assert name in DTYPES, f"fa3 sm80 fwd: unsupported dtype {dtype}"
    return name


def build(cfg: FwdSm80Config, extra_options: str = ""):
    """Compile cfg for cfg.arch on fake tensors (no GPU needed)."""
    cute = _compile.dsl()
    import cutlass
    from cutlass.cute.runtime import make_fake_stream

    from fa3.ampere.fwd_sm80_kernel import FlashFwdSm80

    b, h, hk, sq, sk = (cute.sym_int32() for _ in range(5))

    def bshd(s, heads):
        return _compile.fake_attn_tensor(cfg.dtype, (b, s, heads, cfg.d))

    lse = _compile.fake_lse_tensor((b, h, sq))
    return cute.compile(FlashFwdSm80(cfg), bshd(sq, h), bshd(sk, hk), bshd(sk, hk), bshd(sq, h), lse,
                        cutlass.Float32(1.0), cutlass.Float32(1.0), cutlass.Int32(0),
                        cutlass.Int32(0), *fake_seq_args(cfg),
                        make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=_compile.compile_options(arch=cfg.arch, extra=extra_options))


def fake_seq_args(cfg):
    """cu_seqlens_q/k (n+1,), seqused_q/k (n,) (int32, contiguous) and max_seqlen_q for the
    features cfg has, None for the others (the forward's and backward's trailing arguments)."""
    cute = _compile.dsl()
    import cutlass
    from cutlass.cute.runtime import make_fake_tensor

    n = cute.sym_int32()

    def vec(length):
        return make_fake_tensor(cutlass.Int32, (length,), stride=(1,), assumed_align=4)

    cu = vec(cute.sym_int32()) if cfg.varlen else None
    return (cu, vec(cute.sym_int32()) if cfg.varlen else None,
            vec(n) if cfg.seqused_q else None, vec(n) if cfg.seqused_k else None,
            cutlass.Int32(1) if cfg.varlen else None)


def compile_fwd(cfg: FwdSm80Config):
    return _compile.get_kernel(cfg, build, arch=cfg.arch)


def device_arch(device) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    arch = f"sm_{major}{minor}"
    assert arch in ARCHS, f"fa3 sm80 fwd: no config for {arch} (supported: {ARCHS})"
    return arch


def kernel_scales(causal: bool, window, softcap: float, softmax_scale: float):
    """FA's (window, softcap) -> (causal, local, left, right, scale, softcap_pre) as the sm80
    kernels take them (window: fa3.hopper.flash_fwd's rules; softcap: scale becomes cap and S is
    first multiplied by scale / cap)."""
    from fa3.hopper.flash_fwd import _window

    causal, local, left, right = _window(causal, window)
    scale, pre = float(softmax_scale), 1.0
    if softcap and softcap > 0:
        scale, pre = float(softcap), float(softmax_scale) / float(softcap)
    return causal, local, left, right, scale, pre


def flash_fwd_sm80(q, k, v, out, lse, softmax_scale: float, causal: bool, window=None,
                   softcap: float = 0.0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                   max_seqlen_k=None, seqused_q=None, seqused_k=None, **cfg_overrides) -> None:
    """out (b, sq, h, d) and lse (b, h, sq) fp32 are written in place.
    q (b, sq, h, d), k and v (b, sk, h_kv, d); last dims contiguous, other strides multiples of 8.
    Varlen (cu_seqlens_q/k int32 (n+1,), max_seqlen_q/k): q (total_q, h, d), k/v (total_k, h_kv,
    d), out (total_q, h, d), lse (h, total_q). seqused_q/k: int32 (n,) valid lengths, with or
    without cu_seqlens. window (left, right) and softcap as in FA3's API."""
    varlen = cu_seqlens_q is not None
    assert varlen == (cu_seqlens_k is not None), "cu_seqlens_q and cu_seqlens_k go together"
    seq = dict(varlen=varlen, seqused_q=seqused_q is not None, seqused_k=seqused_k is not None)
    if varlen:  # one packed batch; the kernel moves to each sequence's rows
        assert q.dim() == 3 and lse.shape == (q.shape[1], q.shape[0]), "varlen shapes"
        assert max_seqlen_q is not None, "varlen needs max_seqlen_q"
        q, k, v, out, lse = (t.unsqueeze(0) for t in (q, k, v, out, lse))
    for t in (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k):
        assert t is None or (str(t.dtype) == "torch.int32" and t.is_contiguous()
                             and t.device == q.device), "cu_seqlens / seqused: int32, contiguous"
    b, sq, h, d = q.shape
    _, sk, hk, _ = k.shape
    assert k.shape == v.shape == (b, sk, hk, d) and out.shape == (b, sq, h, d), "shapes"
    assert lse.shape == (b, h, sq) and str(lse.dtype) == "torch.float32" and lse.stride(-1) == 1
    assert hk > 0 and h % hk == 0, "h must be a multiple of h_kv"
    assert q.dtype == k.dtype == v.dtype == out.dtype, "q, k, v, out must share a dtype"
    for t in (q, k, v, out, lse):
        assert t.is_cuda and t.device == q.device, "all tensors on one CUDA device"
    for t in (q, k, v, out):  # 16-byte cp.async / vector stores
        assert t.stride(-1) == 1 and t.data_ptr() % 16 == 0
        assert all(s % 8 == 0 for s in t.stride()[:-1]), "strides must be multiples of 8 elements"
    causal, local, left, right, scale, pre = kernel_scales(causal, window, softcap, softmax_scale)
    cfg = default_config(d, q.dtype, causal, device_arch(q.device), local=local,
                         softcap=bool(softcap and softcap > 0), **seq, **cfg_overrides)
    n_seq = cu_seqlens_q.shape[0] - 1 if varlen else b
    if b == 0 or sq == 0 or h == 0 or n_seq == 0 or (varlen and max_seqlen_q == 0):
        return
    if sk == 0:  # no keys: every row is empty
        out.zero_()
        lse.fill_(-math.inf)
        return
    compile_fwd(cfg)(q, k, v, out, lse, scale, pre, left, right, cu_seqlens_q, cu_seqlens_k,
                     seqused_q, seqused_k, int(max_seqlen_q) if varlen else None)
