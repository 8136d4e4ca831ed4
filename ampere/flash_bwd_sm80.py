"""Torch-facing sm80 (Ampere / Ada, and Hopper as a fallback) attention backward: config, compile on
fake tensors, launch. The main kernel is bwd_sm80_kernel.py; D = rowsum(dO * O) and the log2 LSE
come from the shared preprocess kernel (fa3.hopper.bwd_preprocess, plain SIMT code, built here for
the sm80 family's arch).

Pipeline of one call (FA2's algorithm):
  1. preprocess: D, LSE * log2(e) (+inf for fully masked rows), both (b, h, seqlen_q) fp32;
  2. main kernel, one CTA of 8 warps per (n_block, q head, batch): K/V tile in smem, loop over the
     Q tiles that see it (masked ones first, then the unmasked run, non-causal rotated by n_block
     so that the CTAs running together add into different dQ tiles: `stagger`); dK, dV in
     registers; dQ partials (already scaled) added with fp32 atomics into a zeroed
     (b, h, m_blocks * tile_m * d) buffer, thread-interleaved per Q tile;
  3. dQ -> dtype: a second kernel of the same compiled function. GQA/MQA: dK/dV are written per q
     head into an expanded buffer and summed over each group in fp32 (what FA2 does), so no
     atomics touch dK/dV.

Tiles (8 warps, FA2's choices on A100), stages = depth of the Q/dO smem ring:
* d = 64: 128 x 128 on sm_90 (64 x 128 on sm_80); d = 96/128: 64 x 128; d = 192/256: 64 x 64;
* 2 stages where they fit the arch's smem (the next Q/dO tile loads under the whole current
  iteration), else 1. The tile for d <= 128 on sm_86/sm_89 (99 KB) shrinks to 64 x 64/128.
Importing this module does not import the CuTe DSL.
"""
from __future__ import annotations

import dataclasses

from fa3 import _compile
from fa3.ampere.flash_fwd_sm80 import (_SMEM, ARCHS, DTYPES, HEAD_DIMS, _dtype_name, check_common,  # noqa: F401 (ARCHS re-exported)
                                       device_arch)

NUM_THREADS = 256


@dataclasses.dataclass(frozen=True)
class BwdSm80Config:
    d: int
    dtype: str  # "bfloat16" | "float16"
    causal: bool
    tile_m: int  # query rows per inner-loop step
    tile_n: int  # keys per CTA
    stages: int  # Q/dO smem ring depth (1 or 2)
    warps_m_sdp: int  # warps along M of the S / dP GEMMs (the rest along N)
    warps_n_dkv: int  # warps along tile_n of the dK / dV GEMMs (the rest along d)
    warps_m_dq: int  # warps along M of the dQ GEMM (the rest along d)
    arch: str
    local: bool = False  # sliding window (left, right) given at run time; causal is then False
    softcap: bool = False  # S <- cap * tanh(S * scale / cap), cap given at run time
    dq_vec: int = 1  # floats per dQ atomic: 4 (red.global.add.v4.f32) needs sm_90
    dq_first: bool = True  # dQ GEMM + atomics before the dK GEMM (FA2's order)
    dq_atomics: bool = True  # False only for timing experiments: dQ is left 0
    varlen: bool = False  # cu_seqlens_q/k: packed sequences, grids over max_seqlen_q/k
    seqused_q: bool = False  # valid rows per sequence (rows past it: dQ = 0)
    seqused_k: bool = False  # valid keys per sequence (keys past it: dK = dV = 0)
    # walk the unmasked Q tiles from an n_block-dependent offset (wrapping) instead of all CTAs of a
    # head in lockstep from the same tile, so concurrent CTAs add into different dQ tiles
    # (default_config turns it off for causal and local builds)
    stagger: bool = True

    def __post_init__(self):
        check_common(self)
        if self.dq_vec not in (1, 4) or (self.dq_vec == 4 and self.arch != "sm_90"):
            raise ValueError(f"dq_vec must be 1, or 4 on sm_90; got {self.dq_vec} on {self.arch}")
        if self.stages not in (1, 2):
            raise ValueError(f"stages must be 1 or 2, got {self.stages}")
        w = NUM_THREADS // 32
        for name, rows, cols, wm in (("S/dP", self.tile_m, self.tile_n, self.warps_m_sdp),
                                     ("dK/dV", self.tile_n, self.d, self.warps_n_dkv),
                                     ("dQ", self.tile_m, self.d, self.warps_m_dq)):
            if w % wm or rows % (16 * wm) or cols % (16 * (w // wm)):
                raise ValueError(f"{name} tile {rows}x{cols} does not split over {wm}x{w // wm} warps")
        if smem_bytes(self.tile_m, self.tile_n, self.d, self.stages) > _SMEM[self.arch][0]:
            raise ValueError(f"{self} needs more shared memory than {self.arch} has")


def smem_bytes(tile_m: int, tile_n: int, d: int, stages: int) -> int:
    # Q and dO rings, K and V, P and dS (16-bit)
    return 2 * (2 * stages * tile_m * d + 2 * tile_n * d + 2 * tile_m * tile_n)


def _tiles(d: int, arch: str):
    small = _SMEM[arch][0] < (160 << 10)  # sm_86 / sm_89: 99 KB
    if d <= 64:
        # FA2's 128 x 128 with S / dP split 4 x 2 over the warps: the sm_90 build keeps it in
        # registers (one 4-byte spill per step), and per MMA it runs a fifth fewer other
        # instructions than 64 x 128. The sm_80 build spills (causal: 76 bytes) and cannot be
        # measured here, so it keeps 64 x 128 (the 2 x 4 split spills at 128 x 128 everywhere)
        return (128, 128) if arch == "sm_90" else (64, 128)
    if d <= 128:
        return (64, 64) if small else (64, 128)
    return 64, 64


def default_config(d: int, dtype, causal: bool, arch: str, **overrides) -> BwdSm80Config:
    tile_m, tile_n = overrides.pop("tile_m", None), overrides.pop("tile_n", None)
    if tile_m is None or tile_n is None:
        tile_m, tile_n = _tiles(d, arch)
    stages = 2 if smem_bytes(tile_m, tile_n, d, 2) <= _SMEM[arch][0] else 1
    # FA2's warp grids: 2 x 4 for S/dP and dQ, 4 x 2 for dK/dV; d = 96 is not a multiple of the
    # 64 columns that 4 warps of 16 cover, so its dQ uses 4 x 2; a 128-row tile splits S/dP and
    # dQ 4 x 2 (fewer registers, see _tiles)
    tall = tile_m == 128
    warps_m_dq = 2 if d % 64 == 0 and not tall else 4
    cfg = dict(d=d, dtype=_dtype_name(dtype), causal=bool(causal), tile_m=tile_m, tile_n=tile_n,
               stages=stages, warps_m_sdp=4 if tall else 2, warps_n_dkv=4,
               warps_m_dq=warps_m_dq, arch=arch, dq_vec=4 if arch == "sm_90" else 1)
    cfg.update(overrides)
    # causal CTAs already start at their own diagonal, so they do not collide on dQ tiles, and the
    # rotation's two live values make the hd128 causal build spill (sm_80: 0 -> 20 bytes); a window
    # masks every tile, so there is no unmasked run to rotate
    cfg.setdefault("stagger", not (cfg["causal"] or cfg.get("local", False)))
    return BwdSm80Config(**cfg)


def fits(d: int, arch: str) -> bool:
    """Whether the arch's smem holds the smallest backward tile of head dim d (hd >= 192 needs more
    than sm_86/sm_89's 99 KB)."""
    tile_m, tile_n = _tiles(d, arch)
    return smem_bytes(tile_m, tile_n, d, 1) <= _SMEM[arch][0]


@dataclasses.dataclass(frozen=True)
class PreprocessSm80Config:
    """The shared preprocess kernel (fa3.hopper.bwd_preprocess) built for an sm80-family arch."""
    dtype: str  # "bfloat16" | "float16"
    d: int
    arch: str


def variants(arch: str = "sm_80"):
    """The shipped configs for one arch: every head dim x dtype x causal that fits it, and the
    preprocess kernel for each head dim x dtype."""
    for d in HEAD_DIMS:
        if not fits(d, arch):
            continue
        for dtype in DTYPES:
            yield PreprocessSm80Config(dtype, d, arch)
            for causal in (False, True):
                yield default_config(d, dtype, causal, arch)


def varlen_variants(arch: str = "sm_80"):
    """A few varlen / seqused builds covering each switch and its combinations with the others."""
    yield default_config(64, "bfloat16", True, arch, varlen=True)
    yield default_config(128, "float16", False, arch, varlen=True, seqused_q=True, seqused_k=True)
    yield default_config(128, "bfloat16", False, arch, varlen=True, local=True, softcap=True)
    yield default_config(96, "bfloat16", True, arch, seqused_q=True, seqused_k=True)  # dense
    if fits(256, arch):
        yield default_config(256, "float16", True, arch, varlen=True, seqused_k=True)


def build(cfg, extra_options: str = ""):
    """Compile cfg (a BwdSm80Config or PreprocessSm80Config) for cfg.arch on fake tensors."""
    if isinstance(cfg, PreprocessSm80Config):
        from fa3.hopper import bwd_preprocess as pre

        # pre.build targets sm_90a; a later --gpu-arch overrides it (checked by the compile test)
        pcfg = pre.PreprocessConfig({"bfloat16": "bf16", "float16": "fp16"}[cfg.dtype], cfg.d)
        return pre.build(pcfg, f"--gpu-arch {cfg.arch} {extra_options}")
    return _build_main(cfg, extra_options)


def _build_main(cfg: BwdSm80Config, extra_options: str = ""):
    cute = _compile.dsl()
    import cutlass
    from cutlass.cute.runtime import make_fake_stream

    from fa3.ampere.bwd_sm80_kernel import FlashBwdSm80
    from fa3.ampere.flash_fwd_sm80 import fake_seq_args

    b, h, hk, sq, sk, acc_len = (cute.sym_int32() for _ in range(6))

    def bshd(s, heads):
        return _compile.fake_attn_tensor(cfg.dtype, (b, s, heads, cfg.d))

    q, do, dq = bshd(sq, h), bshd(sq, h), bshd(sq, h)
    k, v = bshd(sk, hk), bshd(sk, hk)
    dk, dv = bshd(sk, h), bshd(sk, h)  # per q head (expanded for GQA)
    lse2, dpsum = _compile.fake_lse_tensor((b, h, sq)), _compile.fake_lse_tensor((b, h, sq))
    dq_acc = _compile.fake_lse_tensor((b, h, acc_len))  # (b, h, m_blocks * tile_m * d)
    f32, i32 = cutlass.Float32(1.0), cutlass.Int32(0)
    seq = fake_seq_args(cfg)  # cu_seqlens_q/k, seqused_q/k, max_seqlen_q; and max_seqlen_k:
    return cute.compile(FlashBwdSm80(cfg), q, k, v, do, lse2, dpsum, dq_acc, dq, dk, dv,
                        f32, f32, f32, i32, i32, *seq, seq[-1],
                        make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=_compile.compile_options(arch=cfg.arch, extra=extra_options))


def compile_kernel(cfg):
    return _compile.get_kernel(cfg, build, arch=cfg.arch)


def bwd_missing(request) -> str | None:
    """The forward features whose gradient this backward lacks (window, softcap, varlen and
    seqused it has)."""
    if request.has_sink:
        return "learnable sink backward"
    if request.d != request.dv or request.d not in HEAD_DIMS:
        return f"head dim {request.d}/{request.dv} backward"
    return None


def flash_bwd_sm80(dout, q, k, v, out, lse, softmax_scale: float, causal: bool,
                   deterministic: bool = False, cfg_overrides: dict | None = None, window=None,
                   softcap: float = 0.0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                   max_seqlen_k=None, seqused_q=None, seqused_k=None, **features):
    """(dq, dk, dv) of attention, q/out/dout (b, sq, h, d), k/v (b, sk, h_kv, d), lse (b, h, sq).
    Varlen (cu_seqlens_q/k int32 (n+1,), max_seqlen_q/k): q/out/dout (total_q, h, d), k/v
    (total_k, h_kv, d), lse (h, total_q). seqused_q/k: int32 (n,), with or without cu_seqlens.
    window (left, right) and softcap as in FA3's API (the forward's values);
    cfg_overrides: BwdSm80Config fields to change (tiling experiments)."""
    import torch

    from fa3.ampere.flash_fwd_sm80 import kernel_scales

    varlen = cu_seqlens_q is not None
    if varlen != (cu_seqlens_k is not None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k go together")
    if varlen and (max_seqlen_q is None or max_seqlen_k is None):
        raise ValueError("varlen needs max_seqlen_q and max_seqlen_k")
    if varlen:  # one packed batch; the kernels move to each sequence's rows
        assert q.dim() == 3 and lse.shape == (q.shape[1], q.shape[0]), "varlen shapes"
        q, k, v, out, dout, lse = (t.unsqueeze(0) for t in (q, k, v, out, dout, lse))
    for t in (cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k):
        assert t is None or (t.dtype == torch.int32 and t.is_contiguous() and t.device == q.device), \
            "cu_seqlens / seqused: int32, contiguous, on q's device"
    if features:
        raise NotImplementedError(f"fa3: sm80 backward does not implement {sorted(features)} yet")
    if deterministic:
        raise NotImplementedError("fa3: deterministic sm80 backward is not implemented yet "
                                  "(dQ is accumulated with fp32 atomics)")
    b, sq, h, d = q.shape
    _, sk, hk, _ = k.shape
    assert k.shape == v.shape == (b, sk, hk, d) and out.shape == dout.shape == q.shape, "shapes"
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32, "lse must be (b, h, sq) fp32"
    assert hk > 0 and h % hk == 0, "h must be a multiple of h_kv"
    assert q.dtype == k.dtype == v.dtype == out.dtype == dout.dtype, "one dtype for all inputs"
    arch = device_arch(q.device)
    if not fits(d, arch):
        raise NotImplementedError(f"fa3: sm80 backward of head dim {d} needs more shared memory "
                                  f"than {arch} has")
    causal, local, left, right, exp_scale, pre = kernel_scales(causal, window, softcap, softmax_scale)
    cfg = default_config(d, q.dtype, causal, arch, local=local, softcap=bool(softcap and softcap > 0),
                         varlen=varlen, seqused_q=seqused_q is not None,
                         seqused_k=seqused_k is not None, **(cfg_overrides or {}))

    def contig(t):  # 16-byte cp.async / vector stores need a unit last stride and 8-aligned rows
        ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1])
        return t if ok else t.contiguous()

    q, k, v, out, dout = (contig(t) for t in (q, k, v, out, dout))
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    n_seq = cu_seqlens_q.shape[0] - 1 if varlen else b
    if b == 0 or h == 0 or sk == 0 or sq == 0 or n_seq == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return _unpack(varlen, dq, dk, dv)
    dpsum = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
    lse2 = torch.empty_like(dpsum)
    # D and lse2 are per row: the packed rows are one batch to the preprocess kernel
    compile_kernel(PreprocessSm80Config(cfg.dtype, d, arch))(out, dout, lse.contiguous(), dpsum, lse2)
    # dense: each (batch, head)'s whole Q tiles; varlen: every sequence starts tile_m rows after
    # the previous one ends (bwd_sm80_kernel.acc_row0), so n_seq * tile_m rows more
    acc_rows = sq + n_seq * cfg.tile_m if varlen else -(-sq // cfg.tile_m) * cfg.tile_m
    dq_acc = torch.zeros(b, h, acc_rows * d, device=q.device, dtype=torch.float32)
    g = h // hk
    dk_h = dk if g == 1 else torch.empty(b, sk, h, d, device=q.device, dtype=q.dtype)
    dv_h = dv if g == 1 else torch.empty(b, sk, h, d, device=q.device, dtype=q.dtype)
    compile_kernel(cfg)(q, k, v, dout, lse2, dpsum, dq_acc, dq, dk_h, dv_h, float(softmax_scale),
                        exp_scale, pre, left, right, cu_seqlens_q, cu_seqlens_k, seqused_q,
                        seqused_k, int(max_seqlen_q) if varlen else None,
                        int(max_seqlen_k) if varlen else None)
    if g > 1:
        dk.copy_(dk_h.view(b, sk, hk, g, d).sum(3, dtype=torch.float32))
        dv.copy_(dv_h.view(b, sk, hk, g, d).sum(3, dtype=torch.float32))
    return _unpack(varlen, dq, dk, dv)


def _unpack(varlen: bool, *grads):
    """Varlen grads back to the packed (total, h, d) layout."""
    return tuple(t.squeeze(0) for t in grads) if varlen else grads
