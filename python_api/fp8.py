"""FP8 (e4m3) attention forward on Hopper: one call from bf16/fp16 inputs, and FA3's pre-quantized path.

``flash_attn_fp8_func(q, k, v, causal=..., incoherent=True, block_quant=True, seed=0)``:
  1. (incoherent) Q and K rotated by M = diag(random +-1 from ``seed``) H / sqrt(d) (QM (KM)^T = QK^T);
  2. quantized to e4m3: with ``block_quant`` one scale per (B_r query rows, head) and per (B_c key
     rows, kv head), B_r x B_c being the kernel's tile; else one scale per tensor;
     steps 1-2 are one fused kernel per tensor (``fa3.hopper.hadamard_quant``); V (never rotated)
     is quantized straight into the kernel's seqlen-contiguous Vt layout (``fa3.hopper.fp8_vt``);
  3. the FP8 attention kernel (``fa3.hopper.fwd_fp8_kernel``), output bf16.
``fa3.flash_attn_func`` with float8_e4m3fn q/k/v and optional FA3 descales (float32 (b, h_kv))
runs the same kernel (``fwd_prequantized``). Forward only: no gradient.
Every step has a CPU emulation in ``fa3.fp8_emulation`` (``block_quantize``, ``attention_fp8``).
"""
from __future__ import annotations

import functools

import torch

from fa3 import _validate as V
from fa3 import fp8_emulation as fq

E4M3 = torch.float8_e4m3fn


def _no_grad_guard(*tensors):
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise NotImplementedError(
            "fa3: FP8 attention is forward-only (no backward); call it under torch.no_grad() or "
            "torch.inference_mode(), or pass tensors that do not require grad")


def _check_inputs(q, k, v, dtypes):
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.check_tensor(name, t, 4, dtypes)
    V.check_same(("q", "k", "v"), (q, k, v), "dtype")
    V.check_same(("q", "k", "v"), (q, k, v), "device")
    if q.shape[0] != k.shape[0]:
        V._fail(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        V._fail(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[:-1] != v.shape[:-1]:
        V._fail(f"k and v must agree on all but the head dim: {tuple(k.shape)} vs {tuple(v.shape)}")
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv or d not in fq.SUPPORTED_HEAD_DIMS:
        V._fail(f"FP8 attention supports head dims {fq.SUPPORTED_HEAD_DIMS} with q/k and v equal, "
                f"got d={d}, dv={dv}")
    V.check_heads(q.shape[2], k.shape[2])
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.check_aligned(name, t)


def _check_hopper(device):
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        raise NotImplementedError(f"fa3: FP8 attention needs a Hopper GPU (sm90), this is {major}.{minor}")


@functools.lru_cache(maxsize=64)
def _signs(d: int, seed: int, device: str):
    return fq.random_signs(d, seed, device=device)


def _alloc_out(q, dv):
    b, sq, h, _ = q.shape
    out = torch.empty(b, sq, h, dv, device=q.device, dtype=torch.bfloat16)
    lse = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
    return out, lse


def _nblk(s, tile):
    return -(-s // tile)


def quantize_fp8(q, k, v, cfg, incoherent: bool, block_quant: bool, seed: int):
    """bf16/fp16 q, k, v -> (q8, k8, v8, q_scale, k_scale, v_scale) as the FP8 kernel takes them
    (V in its natural layout; ``flash_fwd_fp8.vt_layout`` makes the kernel's Vt)."""
    d = q.shape[-1]
    signs = _signs(d, int(seed), str(q.device)) if incoherent else None
    if block_quant:
        from fa3.hopper.hadamard_quant import hadamard_quant

        q8, qs = hadamard_quant(q, signs, cfg.tile_m, rotate=incoherent)
        k8, ks = hadamard_quant(k, signs, cfg.tile_n, rotate=incoherent)
        v8, vs = fq.block_quantize(v, cfg.tile_n, pow2=True)  # what fp8_vt does (torch: a reference)
        return q8, k8, v8, qs, ks, vs
    # one scale per tensor (torch ops: a reference point for accuracy, not a fast path)
    out = []
    for x, rot, tile in ((q, incoherent, cfg.tile_m), (k, incoherent, cfg.tile_n), (v, False, cfg.tile_n)):
        xr = fq.rotate(x, signs) if rot else x.float()
        amax = xr.abs().amax().clamp_min(fq.AMAX_FLOOR)
        x8 = fq.round_to_e4m3(xr * (fq.E4M3_MAX / amax))
        sc = (amax / fq.E4M3_MAX).expand(x.shape[0], x.shape[2], _nblk(x.shape[1], tile)).contiguous()
        out.append((x8, sc))
    (q8, qs), (k8, ks), (v8, vs) = out
    return q8, k8, v8, qs, ks, vs


def prepare_fp8(q, k, v, cfg, incoherent: bool, block_quant: bool, seed: int):
    """bf16/fp16 q, k, v -> the FP8 kernel's inputs (q8, k8, vt8, q_scale, k_scale, v_scale).
    With block quantization V goes bf16 -> e4m3 Vt in one pass (``fa3.hopper.fp8_vt``); the result
    equals ``quantize_fp8`` followed by ``flash_fwd_fp8.vt_layout`` bit for bit."""
    from fa3.hopper.fp8_vt import make_vt

    if block_quant:
        from fa3.hopper.hadamard_quant import hadamard_quant

        signs = _signs(q.shape[-1], int(seed), str(q.device)) if incoherent else None
        q8, qs = hadamard_quant(q, signs, cfg.tile_m, rotate=incoherent)
        k8, ks = hadamard_quant(k, signs, cfg.tile_n, rotate=incoherent)
        vt8, vs = make_vt(v, cfg.tile_n)
        return q8, k8, vt8, qs, ks, vs
    q8, k8, v8, qs, ks, vs = quantize_fp8(q, k, v, cfg, incoherent, False, seed)
    return q8, k8, make_vt(v8, cfg.tile_n)[0], qs, ks, vs


def flash_attn_fp8_func(q, k, v, softmax_scale=None, causal=False, *, incoherent=True,
                        block_quant=True, seed=0, return_attn_probs=False):
    """FP8 attention from bf16/fp16 q (b, sq, h, d), k/v (b, sk, h_kv, d), d in (64, 128, 256).

    Returns out (b, sq, h, d) bf16 (and, with return_attn_probs, LSE (b, h, sq) fp32, natural
    log). Causal aligns bottom-right. ``seed`` picks the rotation's random signs."""
    _check_inputs(q, k, v, V.HALF_DTYPES)
    _no_grad_guard(q, k, v)
    scale = V.check_scale(softmax_scale, q.shape[-1])
    _check_hopper(q.device)
    from fa3.hopper.flash_fwd_fp8 import default_config, flash_fwd_fp8

    cfg = default_config(q.shape[-1], v.shape[-1], bool(causal), q.shape[1], k.shape[1])
    q8, k8, vt8, qs, ks, vs = prepare_fp8(q, k, v, cfg, bool(incoherent), bool(block_quant), seed)
    out, lse = _alloc_out(q, v.shape[-1])
    flash_fwd_fp8(q8, k8, vt8, qs, ks, vs, out, lse, scale, bool(causal), cfg)
    return (out, lse) if return_attn_probs else out


def descales_to_block_scales(q, k, cfg, q_descale=None, k_descale=None, v_descale=None):
    """FA3's per-(batch, kv head) descales -> the kernel's block scales (None -> 1): Q's are
    shared by the q heads of one kv head (GQA)."""
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    ones = torch.ones(b, hk, device=q.device, dtype=torch.float32)

    def expand(t, heads, nblk):
        t = ones if t is None else t.to(torch.float32)
        if heads != hk:
            t = t.repeat_interleave(heads // hk, dim=1)
        return t[:, :, None].expand(b, heads, nblk).contiguous()

    return (expand(q_descale, h, _nblk(sq, cfg.tile_m)), expand(k_descale, hk, _nblk(sk, cfg.tile_n)),
            expand(v_descale, hk, _nblk(sk, cfg.tile_n)))


def fwd_prequantized(q, k, v, out, lse, softmax_scale: float, causal: bool, q_descale=None,
                     k_descale=None, v_descale=None):
    """The sm90 forward for float8_e4m3fn q/k/v (inputs validated by the caller, FA3 semantics:
    dequantized x = x8 * descale[batch, kv head]); writes out (bf16) and lse in place."""
    _no_grad_guard(q, k, v)
    from fa3.hopper.flash_fwd_fp8 import default_config, flash_fwd_fp8
    from fa3.hopper.fp8_vt import make_vt

    cfg = default_config(q.shape[-1], v.shape[-1], bool(causal), q.shape[1], k.shape[1])
    qs, ks, vs = descales_to_block_scales(q, k, cfg, q_descale, k_descale, v_descale)
    flash_fwd_fp8(q, k, make_vt(v, cfg.tile_n)[0], qs, ks, vs, out, lse, softmax_scale,
                  bool(causal), cfg)
