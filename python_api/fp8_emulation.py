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


def block_quantize(
    x: torch.Tensor, block_rows: int, rotate_signs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b, s, h, d) bf16/fp16 -> (x_fp8 (b, s, h, d) float8_e4m3fn, scales (b, h, ceil(s/block_rows)) fp32).

    With ``rotate_signs`` (a (d,) ±1 tensor) the rows are rotated first; without, x is quantized as is.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, heads, head_dim), got shape {tuple(x.shape)}")
    if block_rows < 1:
        raise ValueError("block_rows must be positive")
    xr = rotate(x, rotate_signs) if rotate_signs is not None else x.to(torch.float32)
    b, s, h, d = xr.shape
    amax = block_amax(xr, block_rows)
    full = torch.full_like(amax, E4M3_MAX)  # tensor / tensor: one IEEE rounding (div.rn.f32)
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


def attention_fp8(q8, k8, v8, q_scale, k_scale, v_scale, softmax_scale: float, causal: bool,
                  tile_m: int, tile_n: int):
    """fp32 emulation of fa3's FP8 attention kernel on already quantized inputs.

    q8 (b, sq, h, d), k8 (b, sk, h_kv, d), v8 (b, sk, h_kv, dv) float8_e4m3fn (V in its natural
    layout); q_scale (b, h, ceil(sq / tile_m)), k_scale / v_scale (b, h_kv, ceil(sk / tile_n)) fp32.
    Returns (out (b, sq, h, dv) fp32, lse (b, h, sq) fp32, natural log).

    Mirrors the kernel: KV blocks of tile_n keys walked from the last down; per block
    c = (scale log2(e) s_q) s_k, S = q8 k8^T in fp32; m' = max(m, c max(S)) (log2 units);
    P = exp2(c S + 8 - m') (2^8 times the softmax numerator); l = l exp2(m - m') + sum(P) in fp32
    before P's cast; P -> e4m3 (round to nearest even); O is kept in units of the current block's
    V scale: O = O exp2(m - m') s_v(prev) / s_v(n) + e4m3(P) v8_n; out = O (s_v(last) / l);
    lse = ln2 (m + log2 l - 8). Rows that see no key give out = 0, lse = -inf. What is left
    between this and the kernel: fp32 summation order, the FFMA (one rounding instead of two),
    ex2.approx/rcp.approx, and bf16 rounding of the kernel's output.
    """
    b, sq, h, d = q8.shape
    sk, hk, dv = k8.shape[1], k8.shape[2], v8.shape[-1]
    g = h // hk
    f32 = torch.float32
    qf = q8.to(f32).transpose(1, 2)  # (b, h, sq, d)
    kf = k8.to(f32).transpose(1, 2).repeat_interleave(g, dim=1)
    vf = v8.to(f32).transpose(1, 2).repeat_interleave(g, dim=1)
    ks = k_scale.to(f32).repeat_interleave(g, dim=1)
    vs = v_scale.to(f32).repeat_interleave(g, dim=1)
    scale_log2 = torch.tensor(softmax_scale, dtype=f32) * torch.tensor(LOG2E, dtype=f32)
    c_q = (scale_log2.to(q8.device) * q_scale.to(f32)).repeat_interleave(tile_m, dim=2)[:, :, :sq]
    rows = torch.arange(sq, device=q8.device)[:, None]
    m = torch.full((b, h, sq), -math.inf, dtype=f32, device=q8.device)
    l = torch.zeros_like(m)
    o = torch.zeros(b, h, sq, dv, dtype=f32, device=q8.device)
    sv_cur = None
    nblk = -(-sk // tile_n)
    if nblk == 0:
        return o.transpose(1, 2), torch.full_like(m, -math.inf)
    for n in reversed(range(nblk)):
        cols = torch.arange(n * tile_n, min((n + 1) * tile_n, sk), device=q8.device)[None, :]
        s = qf @ kf[:, :, cols[0]].transpose(-1, -2)
        hidden = cols > rows + (sk - sq) if causal else torch.zeros_like(cols > rows)
        s = s.masked_fill(hidden, -math.inf)
        c = c_q * ks[:, :, n, None]
        m_new = torch.maximum(m, s.amax(-1) * c)
        m_ref = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        row_scale = torch.exp2(m - m_ref)
        p = torch.exp2(s * c[..., None] + (P_EXP_OFFSET - m_ref)[..., None])
        l = l * row_scale + p.sum(-1)
        p8 = p.to(torch.float8_e4m3fn).to(f32)  # P <= 256: no saturation
        sv_n = vs[:, :, n, None]
        if sv_cur is not None:
            o = o * (row_scale * (sv_cur / sv_n))[..., None]
        o = o + p8 @ vf[:, :, cols[0]]
        sv_cur, m = sv_n, m_new
    empty = l == 0
    factor = torch.where(empty, torch.zeros_like(l), sv_cur * (1.0 / l))
    out = (o * factor[..., None]).transpose(1, 2)
    lse = torch.where(empty, torch.full_like(l, -math.inf),
                      (m + torch.log2(l) - P_EXP_OFFSET) * math.log(2.0))
    return out, lse
