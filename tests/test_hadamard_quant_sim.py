"""CPU simulation of hadamard_quant's per-thread data flow (no DSL, no GPU).

Replays the kernel's thread mapping — which lane loads which 16-byte chunk, the in-thread and
``shfl.sync.bfly`` butterfly stages, the CTA amax, and the paired 16-byte stores — with fp32 torch
ops, and checks the result is bit-identical to fa3.fp8_emulation. This catches indexing and
stage-order mistakes in the kernel's design; the GPU test checks the compiled kernel itself.
"""
import subprocess
import sys

import pytest
import torch

from fa3 import fp8_emulation as emu
from fa3.hopper.hadamard_quant import HadamardQuantConfig


def simulate_block(xb: torch.Tensor, signs, cfg: HadamardQuantConfig):
    """xb (rows <= block_rows, d) bf16/fp16 of one (batch, head) block -> (fp8 (rows, d), scale, fp32 x')."""
    d, br, K, NP, T, L = cfg.head_dim, cfg.block_rows, cfg.chunks, cfg.passes, cfg.threads, cfg.lanes_per_row
    P = T // L
    rows = xb.shape[0]
    tid = torch.arange(T)
    lt, prow = tid % L, tid // L
    # v[tid, p, j, e] = x[p*P + prow, 8*lt + 8*L*j + e], zero for rows past the end
    r = torch.arange(NP)[None, :, None, None] * P + prow[:, None, None, None]
    c = 8 * lt[:, None, None, None] + 8 * L * torch.arange(K)[None, None, :, None] + torch.arange(8)
    r, c = torch.broadcast_tensors(r, c)
    valid = r < rows
    xf = xb.to(torch.float32)
    v = torch.where(valid, xf[r.clamp(max=rows - 1), c], torch.zeros(()))
    fold = cfg.rotate and d in (64, 256)  # 1/sqrt(d) a power of two: folded into the multiplier
    factor = emu.rotation_factor(d)
    if cfg.rotate:
        v = torch.where(signs[c] < 0, -v, v)
        for hs in (1, 2, 4):  # in-thread, strides 1, 2, 4
            v = v.reshape(T, NP, K, 8 // (2 * hs), 2, hs)
            a, b = v[..., 0, :], v[..., 1, :]
            v = torch.stack([a + b, a - b], dim=-2).reshape(T, NP, K, 8)
        hs = 1
        while hs < L:  # cross-lane, strides 8, 16: other = shfl.bfly(v, hs); v = fma(v, ±1, other)
            other = v[tid ^ hs]
            upper = ((lt & hs) != 0)[:, None, None, None]
            v = torch.where(upper, other - v, other + v)
            hs *= 2
        hj = 1
        while hj < K:  # across the thread's chunks, strides 32, 64, 128
            v = v.reshape(T, NP, K // (2 * hj), 2, hj, 8)
            a, b = v[:, :, :, 0], v[:, :, :, 1]
            v = torch.stack([a + b, a - b], dim=3).reshape(T, NP, K, 8)
            hj *= 2
        if not fold:
            v = v * factor
    xr = v * factor if fold else v  # x' (exact scaling when folded)
    rotated = torch.zeros(rows, d)
    rotated[r[valid], c[valid]] = xr[valid]
    amax = torch.tensor(v.abs().max().item(), dtype=torch.float32)
    if fold:
        amax = amax * factor
    amax = torch.clamp(amax, min=emu.AMAX_FLOOR)
    e4m3_max = torch.tensor(emu.E4M3_MAX)  # tensor / tensor: one rounding, like div.rn.f32
    scale, inv = amax / e4m3_max, e4m3_max / amax
    mul = inv * factor if fold else inv
    q = emu.round_to_e4m3(v * mul).view(torch.uint8).reshape(T, NP, K, 8)
    # 8-byte stores: thread tid writes q[tid, p, j] at row p*P + prow, columns 8*lt + 8*L*j .. +8
    out = torch.full((br, d), 0x7F, dtype=torch.uint8)  # NaN bytes: every valid byte must be written
    for t in range(T):
        for p in range(NP):
            row = p * P + int(prow[t])
            if row < rows:
                for j in range(K):
                    col = 8 * int(lt[t]) + 8 * L * j
                    out[row, col:col + 8] = q[t, p, j]
    return out[:rows].view(torch.float8_e4m3fn), scale, rotated


CASES = [
    HadamardQuantConfig("bfloat16", 64, 64, True),
    HadamardQuantConfig("bfloat16", 128, 128, True),
    HadamardQuantConfig("float16", 256, 64, True),
    HadamardQuantConfig("bfloat16", 256, 128, True),
    HadamardQuantConfig("bfloat16", 128, 176, True),
    HadamardQuantConfig("float16", 128, 64, False),
    HadamardQuantConfig("float16", 64, 8, True),  # one warp, one row per thread
    HadamardQuantConfig("bfloat16", 64, 128, True, lanes=2),
    HadamardQuantConfig("float16", 128, 64, True, lanes=2),
    HadamardQuantConfig("bfloat16", 256, 128, True, lanes=2),  # 128 values per thread
    HadamardQuantConfig("bfloat16", 256, 64, True, lanes=8),
    HadamardQuantConfig("float16", 64, 128, True, lanes=8),
    HadamardQuantConfig("bfloat16", 128, 128, True, values=32),  # 1024 threads per SM
    HadamardQuantConfig("float16", 64, 128, True, values=32),
]


@pytest.mark.parametrize("cfg", CASES, ids=str)
@pytest.mark.parametrize("rows", ["full", "ragged"])
@pytest.mark.parametrize("data", ["outliers", "wide"])
def test_simulated_kernel_matches_emulation(cfg, rows, data):
    g = torch.Generator().manual_seed(cfg.head_dim + cfg.block_rows)
    n = cfg.block_rows if rows == "full" else cfg.block_rows // 2 + 3
    dt = getattr(torch, cfg.dtype)
    x = torch.randn(n, cfg.head_dim, generator=g)
    if data == "outliers":
        x += torch.randn(n, cfg.head_dim, generator=g) * 10 * (torch.rand(n, cfg.head_dim, generator=g) < 0.01)
    else:  # exponents spread wider than fp32's 24 bits: the butterfly's sums round, so stage order matters
        x *= torch.exp2(torch.randint(-12, 12, (n, cfg.head_dim), generator=g).float())
    x = x.to(dt)
    signs = emu.random_signs(cfg.head_dim, seed=7)
    q, scale, rotated = simulate_block(x, signs, cfg)
    ref_rot = emu.rotate(x, signs) if cfg.rotate else x.float()
    assert torch.equal(rotated, ref_rot)  # the fp32 rotation itself is bit-exact, not just the fp8
    ref_q, ref_s = emu.block_quantize(x[None, :, None, :], cfg.block_rows, signs if cfg.rotate else None)
    assert ref_s.shape == (1, 1, 1)
    assert torch.equal(scale, ref_s[0, 0, 0])
    assert torch.equal(q.view(torch.uint8), ref_q[0, :, 0, :].view(torch.uint8))


def test_launch_shapes():
    for cfg in CASES:
        T, NP = cfg.threads, cfg.passes
        assert T % 32 == 0 and 32 <= T <= 512
        assert (T // cfg.lanes_per_row) * NP == cfg.block_rows
        values = NP * cfg.chunks * 8  # fp32 registers holding the block
        assert values <= cfg.values_per_thread or (values <= 128 and T <= 256 and cfg.ctas_per_sm == 1)
        # >= 128 registers per thread at 64 values, >= 64 at 32
        assert cfg.ctas_per_sm * T * cfg.values_per_thread <= 512 * 64 or cfg.ctas_per_sm == 1
    with pytest.raises(AssertionError):
        HadamardQuantConfig("bfloat16", 128, 12, True)  # not a multiple of 8
    with pytest.raises(AssertionError):
        HadamardQuantConfig("bfloat16", 96, 64, True)


def test_import_does_not_load_dsl():
    code = "import sys, fa3, fa3.hopper.hadamard_quant, fa3.fp8_emulation; assert 'cutlass' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
