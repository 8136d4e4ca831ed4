"""Exact torch emulation of the fused Hadamard-rotation + FP8 (e4m3) block quantization kernel.

Incoherent processing (FA3 paper §3.3): X' = X · diag(s) · H / sqrt(d) with s random ±1 signs and H the
Sylvester Hadamard matrix, then one e4m3 scale per block of ``block_rows`` sequence rows of one
(batch, head). ``fa3.hopper.hadamard_quant`` must reproduce this module bit for bit, so the fp32 op order
here *is* the specification:

1. ``v = float32(x) * s``                         (exact: s is ±1; the kernel flips sign bits)
2. fast Walsh–Hadamard transform in the standard stage order, butterfly stride h = 1, 2, 4, ..., d/2:
   ``(a, b) -> (a + b, a - b)`` for the pair (i, i + h).  Every output element sees the same fp32
   additions in the same order in the kernel (the stages are split into in-thread and cross-lane
   ones, but never reordered), so the rotation is bit-exact, not merely within rounding.
3. ``x' = v * float32(1 / sqrt(d))``              (exact for d = 64, 256; one rounding for d = 128)
4. ``amax = max |x'|`` over the block's valid rows (exact; a ragged last block covers fewer rows)
5. ``amax = max(amax, AMAX_FLOOR)``               (an all-zero block gets a tiny scale, never inf/NaN)
6. ``scale = amax / 448``, ``inv = 448 / amax``   (two IEEE fp32 divisions, once per block; note that
   torch's ``448.0 / tensor`` is ``tensor.reciprocal() * 448``, two roundings, so the code divides
   tensor by tensor)
7. ``q = e4m3_rn_satfinite(x' * inv)``             (one fp32 multiply per element; round to nearest even,
   clamp to ±448)

``dequantize`` returns ``q * scale``. Note step 7 multiplies by ``inv`` instead of dividing by
``scale``; the two differ by at most one fp32 rounding before the e4m3 rounding, and the kernel does
exactly what is written here.
"""
from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0
# Smallest amax used for a scale: 448 / 2**-64 is still finite, so an all-zero block never makes inf/NaN.
AMAX_FLOOR = 2.0**-64
SUPPORTED_HEAD_DIMS = (64, 128, 256)


def hadamard_matrix(d: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Sylvester Hadamard matrix of order d (a power of two): H_{2n} = [[H, H], [H, -H]], entries ±1."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"d must be a power of two, got {d}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_signs(d: int, seed: int, device=None) -> torch.Tensor:
    """Deterministic ±1 float32 signs of length d from ``seed`` (drawn on the CPU, then moved)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    bits = torch.randint(0, 2, (d,), generator=g, dtype=torch.int64)
    return (1.0 - 2.0 * bits.to(torch.float32)).to(device)


def rotation_factor(d: int) -> float:
    """1/sqrt(d) as the fp32 constant both the kernel and this module multiply by."""
    return float(torch.tensor(1.0 / math.sqrt(d), dtype=torch.float32))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh–Hadamard transform over the last dim (fp32), stages h = 1, 2, ..., d/2."""
    d = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < d:
        v = x.reshape(*lead, d // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).reshape(*lead, d)
        h *= 2
    return x


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x (..., d) -> x · diag(signs) · H / sqrt(d) in fp32 (bit-exact with the kernel's rotation)."""
    d = x.shape[-1]
    if signs.shape != (d,):
        raise ValueError(f"signs must have shape ({d},), got {tuple(signs.shape)}")
    v = x.to(torch.float32) * signs.to(device=x.device, dtype=torch.float32)
    return fwht(v) * rotation_factor(d)


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> float8_e4m3fn, round to nearest even, saturating to ±448 (PTX cvt.rn.satfinite)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def block_amax(xr: torch.Tensor, block_rows: int) -> torch.Tensor:
    """amax of fp32 x' (b, s, h, d) per block -> (b, h, ceil(s / block_rows)), floored (steps 4-5)."""
    b, s, h, d = xr.shape
    nblk = -(-s // block_rows)
    pad = nblk * block_rows - s
    a = xr.abs().amax(dim=-1)  # (b, s, h)
    if pad:  # zeros never raise a max of absolute values: padding keeps the max over the valid rows
        a = torch.cat([a, a.new_zeros(b, pad, h)], dim=1)
    amax = a.reshape(b, nblk, block_rows, h).amax(dim=2).transpose(1, 2)
    return amax.clamp_min(AMAX_FLOOR).contiguous()


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Positive normal fp32 x -> the smallest power of two >= x (exact: clears the mantissa, bumps the
    exponent if it was nonzero), as fa3.hopper.fp8_vt does with the same bits."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    mant = bits & 0x7FFFFF
    up = (bits & 0x7F800000) + 0x800000
    return torch.where(mant != 0, up, bits).view(torch.float32)


def block_quantize(
    x: torch.Tensor, block_rows: int, rotate_signs: torch.Tensor | None = None, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, s, h, d) bf16/fp16 -> (x_fp8 (b, s, h, d) float8_e4m3fn, scales (b, h, ceil(s/block_rows)) fp32).

    With ``rotate_signs`` (a (d,) ±1 tensor) the rows are rotated first; without, x is quantized as is.
    pow2: each scale is rounded up to a power of two (step 6 becomes scale = pow2_ceil(amax / 448),
    inv = 1 / scale, both exact); what the FP8 path uses for V (fa3.hopper.fp8_vt): V's block-to-block
    ratios are then exact powers of two, which the lazy rescale folds into P without rounding it
    differently. Every value still lands in e4m3's normal range; the largest is 224..448.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, heads, head_dim), got shape {tuple(x.shape)}")
    if block_rows < 1:
        raise ValueError("block_rows must be positive")
    xr = rotate(x, rotate_signs) if rotate_signs is not None else x.to(torch.float32)
    b, s, h, d = xr.shape
    amax = block_amax(xr, block_rows)
    full = torch.full_like(amax, E4M3_MAX)  # tensor / tensor: one IEEE rounding (div.rn.f32)
    if pow2:
        scales = pow2_ceil(amax / full)
        inv = torch.ones_like(scales) / scales
    else:
        scales = amax / full
        inv = full / amax
    inv_rows = inv.repeat_interleave(block_rows, dim=2)[:, :, :s].transpose(1, 2)  # (b, s, h)
    return round_to_e4m3(xr * inv_rows.unsqueeze(-1)), scales


def dequantize(x_fp8: torch.Tensor, scales: torch.Tensor, block_rows: int) -> torch.Tensor:
    """Inverse of ``block_quantize`` up to e4m3 rounding: (b, s, h, d) fp32 = q * scale of the row's block."""
    s = x_fp8.shape[1]
    sc = scales.to(torch.float32).repeat_interleave(block_rows, dim=2)[:, :, :s].transpose(1, 2)
    return x_fp8.to(torch.float32) * sc.unsqueeze(-1)


def unrotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rotate`` (H/sqrt(d) is symmetric orthogonal): x (..., d) -> x · H / sqrt(d) · diag(s)."""
    d = x.shape[-1]
    return fwht(x.to(torch.float32)) * rotation_factor(d) * signs.to(device=x.device, dtype=torch.float32)


# ---- the FP8 attention kernel (fa3.hopper.fwd_fp8_kernel), step by step ---------------------------
P_EXP_OFFSET = 8.0  # P is computed as 2^8 * exp2(c S - m): e4m3 holds up to 448, P <= 1 would waste 8 binades
LOG2E = math.log2(math.e)


LAZY_TAU = 0.75  # fwd_fp8_kernel.LAZY_TAU: a row's max moves only past this (log2 units)


def _e4m3_near_tie(p: torch.Tensor) -> torch.Tensor:
    """p (>= 0, fp32) within 2^-20 (relative) of a boundary between two e4m3 values: the kernel,
    whose S and exp2 differ from fp32 torch by far more, may round such a P either way."""
    lo, hi = p * (1 - 2.0**-20), p * (1 + 2.0**-20)
    return round_to_e4m3(lo).to(torch.float32) != round_to_e4m3(hi).to(torch.float32)


def attention_fp8(q8, k8, v8, q_scale, k_scale, v_scale, softmax_scale: float, causal: bool,
                  tile_m: int, tile_n: int, lazy: bool = True, return_ties: bool = False):
    """fp32 emulation of fa3's FP8 attention kernel on already quantized inputs.

    q8 (b, sq, h, d), k8 (b, sk, h_kv, d), v8 (b, sk, h_kv, dv) float8_e4m3fn (V in its natural
    layout); q_scale (b, h, ceil(sq / tile_m)), k_scale / v_scale (b, h_kv, ceil(sk / tile_n)) fp32.
    Returns (out (b, sq, h, dv) fp32, lse (b, h, sq) fp32, natural log); with return_ties also a
    (b, sq, h) bool: rows where some P sat on (within 2^-20 of) an e4m3 rounding tie.

    Mirrors the kernel: KV blocks of tile_n keys walked from the last down (each row's tile
    visits blocks below its causal limit); per block c = (scale log2(e) s_q) s_k, S = q8 k8^T in
    fp32; m' = max(m, c max(S)) (log2 units); P = exp2(c S + 8 - m') (2^8 times the softmax
    numerator); l = l exp2(m - m') + sum(P) in fp32 before P's cast; P -> e4m3 (round to nearest
    even). lazy=False (FP8 config lazy_rescale=False): O is kept in units of the current block's V
    scale, O = O exp2(m - m') s_v(prev) / s_v(n) + e4m3(P) v8_n, out = O (s_v(last) / l).
    lazy=True (the default): ref = the largest V scale the tile has seen; m' = m unless c max(S)
    exceeds m by more than LAZY_TAU; r = s_v(n) / ref; P = exp2(c S + 8 - m' + log2 r); l = l
    exp2(m - m') + sum(P) / r; O = O exp2(m - m') ref_old / ref + e4m3(P) v8_n; out = O ref / l.
    lse = ln2 (m + log2 l - 8). Rows that see no key give out = 0, lse = -inf. What is left between
    this and the kernel: fp32 summation order, the FFMA (one rounding instead of two),
    ex2/lg2/rcp.approx, and bf16 rounding of the kernel's output.
    """
    b, sq, h, d = q8.shape
    sk, hk, dv = k8.shape[1], k8.shape[2], v8.shape[-1]
    g = h // hk
    f32 = torch.float32
    dev = q8.device
    qf = q8.to(f32).transpose(1, 2)  # (b, h, sq, d)
    kf = k8.to(f32).transpose(1, 2).repeat_interleave(g, dim=1)
    vf = v8.to(f32).transpose(1, 2).repeat_interleave(g, dim=1)
    ks = k_scale.to(f32).repeat_interleave(g, dim=1)
    vs = v_scale.to(f32).repeat_interleave(g, dim=1)
    scale_log2 = torch.tensor(softmax_scale, dtype=f32) * torch.tensor(LOG2E, dtype=f32)
    c_q = (scale_log2.to(dev) * q_scale.to(f32)).repeat_interleave(tile_m, dim=2)[:, :, :sq]
    rows = torch.arange(sq, device=dev)[:, None]
    nblk = -(-sk // tile_n)
    # blocks a row's tile walks: n < n_max(tile) (mask.n_block_max)
    tile_end = (torch.arange(sq, device=dev) // tile_m + 1) * tile_m
    n_max = torch.full((sq,), nblk, device=dev)
    if causal:
        n_max = ((tile_end + sk - sq).clamp(0, sk) + tile_n - 1) // tile_n
    m = torch.full((b, h, sq), -math.inf, dtype=f32, device=dev)
    l = torch.zeros_like(m)
    ref = torch.zeros_like(m)  # lazy: V scale O is expressed in; 0 until a row's first block
    ties = torch.zeros(b, h, sq, dtype=torch.bool, device=dev)
    o = torch.zeros(b, h, sq, dv, dtype=f32, device=dev)
    sv_cur = None
    if nblk == 0:
        lse = torch.full_like(m, -math.inf)
        return (o.transpose(1, 2), lse) + ((ties.transpose(1, 2),) if return_ties else ())
    for n in reversed(range(nblk)):
        cols = torch.arange(n * tile_n, min((n + 1) * tile_n, sk), device=dev)[None, :]
        s = qf @ kf[:, :, cols[0]].transpose(-1, -2)
        hidden = cols > rows + (sk - sq) if causal else torch.zeros_like(cols > rows)
        s = s.masked_fill(hidden, -math.inf)
        c = c_q * ks[:, :, n, None]
        sv_n = vs[:, :, n, None]
        m_new = torch.maximum(m, s.amax(-1) * c)
        if lazy:
            grow = sv_n > ref
            ref_ratio = torch.where(grow, ref * (1.0 / sv_n), torch.ones_like(ref))
            inv_r = torch.where(grow, torch.ones_like(ref), ref * (1.0 / sv_n))
            ref_new = torch.where(grow, sv_n.expand_as(ref), ref)
            log2r = torch.where(grow, torch.zeros_like(ref), torch.log2(sv_n * (1.0 / ref_new)))
            m_new = torch.where(m_new - m <= LAZY_TAU, m, m_new)  # NaN (both -inf) compares False
        else:
            log2r, inv_r = torch.zeros_like(m), torch.ones_like(m)
        m_ref = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        row_scale = torch.exp2(m - m_ref)  # exactly 1 where the max stayed
        p = torch.exp2(s * c[..., None] + (P_EXP_OFFSET - m_ref + log2r)[..., None])
        l_new = l * row_scale + p.sum(-1) * inv_r
        p8 = round_to_e4m3(p).to(f32)  # P < 2^(8 + tau) < 448: no saturation
        if lazy:
            o_new = o * (row_scale * ref_ratio)[..., None] + p8 @ vf[:, :, cols[0]]
        else:
            o_new = o if sv_cur is None else o * (row_scale * (sv_cur / sv_n))[..., None]
            o_new = o_new + p8 @ vf[:, :, cols[0]]
            sv_cur = sv_n
        visited = n < n_max  # (sq,): rows whose tile walks block n
        o = torch.where(visited[:, None], o_new, o)
        l, m = torch.where(visited, l_new, l), torch.where(visited, m_new, m)
        if lazy:
            ref = torch.where(visited, ref_new, ref)
        if return_ties:
            ties |= _e4m3_near_tie(p).any(-1) & visited
    empty = l == 0
    last = ref if lazy else sv_cur
    factor = torch.where(empty, torch.zeros_like(l), last * (1.0 / l))
    out = (o * factor[..., None]).transpose(1, 2)
    lse = torch.where(empty, torch.full_like(l, -math.inf),
                      (m + torch.log2(l) - P_EXP_OFFSET) * math.log(2.0))
    if return_ties:
        return out, lse, ties.transpose(1, 2)
    return out, lse
