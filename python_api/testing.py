"""Helpers shared by fa3's tests (and useful to anyone validating a kernel the way FA does)."""
from __future__ import annotations

import torch


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (or 0xFF bytes for non-float types) before a launch, so an
    element the kernel never writes cannot pass a check."""
    if t.dtype.is_floating_point and t.element_size() >= 2:
        t.fill_(float("nan"))
    else:  # fp8 and integer buffers: all-ones bytes (NaN in e4m3fn, -1 in ints)
        t.view(torch.uint8).fill_(0xFF)
    return t


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float32; NaN anywhere (or a NaN/inf mismatch) gives inf."""
    a32, b32 = a.float(), b.float()
    both_inf = torch.isinf(a32) & torch.isinf(b32) & (torch.sign(a32) == torch.sign(b32))
    d = torch.where(both_inf, torch.zeros_like(a32), (a32 - b32).abs())
    if torch.isnan(d).any():
        return float("inf")
    return float(d.max()) if d.numel() else 0.0


def assert_fa_close(out, out_ref, out_pt, atol: float = 0.0, factor: float = 2.0, name: str = "out"):
    """FA's rule: max|out - ref| <= factor * max|out_pt - ref| + atol, where ref is the fp32
    oracle and out_pt the same-precision PyTorch attention. NaN never passes."""
    assert out.shape == out_ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(out_ref.shape)}"
    err = max_err(out, out_ref)
    pt_err = max_err(out_pt, out_ref)
    bound = factor * pt_err + atol
    assert err <= bound, (
        f"{name}: max error {err:.3e} > {factor} x same-precision error {pt_err:.3e} + atol {atol:.1e}"
    )
    return err, pt_err


def rounding_atol(dtype: torch.dtype) -> float:
    """The rounding term of FA's rule: a few ulps of the output dtype at unit magnitude."""
    return {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}.get(dtype, 1e-5)


def random_qkv(b: int, h: int, hk: int, sq: int, sk: int, d: int, dtype: torch.dtype,
               device: str = "cuda"):
    """Fresh N(0, 1) q (b, sq, h, d), k and v (b, sk, hk, d), seeded from the shape so that a
    failing case reproduces alone; the generator is left where the next draw (e.g. dO) continues."""
    torch.manual_seed(sq * 7 + sk + d + h)
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=device, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=device, dtype=dtype)
    return q, k, v


def hopper_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def ampere_or_newer() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
