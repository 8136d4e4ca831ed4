"""Input checks that run before any launch. Every failure is a ValueError/TypeError naming the
argument, so bad input never reaches a kernel (no crash, hang or silent wrong result).

Checks read only shapes, dtypes, devices and strides, except cu_seqlens/seqused contents, which
are read on the host once per call (FA does the same; pass ``validate_seqlens=False`` to skip that
sync in a hot loop once your data is known good)."""
from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
FP8_DTYPES = (torch.float8_e4m3fn,)
MAX_HEAD_DIM = 256


def _fail(msg: str, exc=ValueError):
    raise exc(f"fa3: {msg}")


def check_tensor(name: str, t, ndim: int, dtypes=HALF_DTYPES):
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if t.dim() != ndim:
        _fail(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {names}",
              TypeError)
    if t.device.type not in ("cuda", "meta"):
        _fail(f"{name} is on {t.device}; fa3 kernels need CUDA tensors "
              "(fa3.reference.attention_ref computes attention on any device)")
    if t.numel() > 0 and t.stride(-1) != 1:
        _fail(f"{name} must have a contiguous last dimension (stride(-1) == 1), got strides "
              f"{tuple(t.stride())}")


def check_aligned(name: str, t):
    """TMA descriptors need 16-byte aligned strides (checked after the head dims, whose message
    is clearer when both fail)."""
    es = t.element_size()
    if t.numel() > 0 and any((st * es) % 16 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
        _fail(f"{name} strides {tuple(t.stride())} must be multiples of {16 // es} elements (16 bytes)")


def check_same(names, tensors, attr):
    vals = [getattr(t, attr) for t in tensors]
    if any(v != vals[0] for v in vals):
        desc = ", ".join(f"{n}={v}" for n, v in zip(names, vals))
        _fail(f"{', '.join(names)} must share {attr}: {desc}")


def check_head_dims(d: int, dv: int, fp8: bool = False):
    for nm, x in (("head dim of q/k", d), ("head dim of v", dv)):
        if x <= 0 or x > MAX_HEAD_DIM:
            _fail(f"{nm} is {x}; supported range is 1..{MAX_HEAD_DIM}")
        if x % 8:
            _fail(f"{nm} is {x}; it must be a multiple of 8 (16-byte rows for TMA)")
    if fp8 and (d % 16 or dv % 16):
        _fail(f"fp8 needs head dims that are multiples of 16, got d={d}, dv={dv}")


def check_heads(h: int, h_kv: int):
    if h_kv <= 0 or h % h_kv:
        _fail(f"number of q heads ({h}) must be a positive multiple of kv heads ({h_kv}) for GQA/MQA")


def check_window(window_size, causal: bool):
    try:
        left, right = (int(x) for x in window_size)
    except Exception:
        _fail(f"window_size must be a pair (left, right) of ints, got {window_size!r}", TypeError)
    if left < -1 or right < -1:
        _fail(f"window_size values must be >= -1 (-1 = unbounded), got {(left, right)}")
    if causal:
        right = 0  # causal is the window (left, 0)
    return left, right


def check_softcap(softcap):
    if not isinstance(softcap, (int, float)) or softcap != softcap or softcap < 0:
        _fail(f"softcap must be a float >= 0 (0 disables), got {softcap!r}")
    return float(softcap)


def check_scale(softmax_scale, d: int):
    if softmax_scale is None:
        return d ** -0.5
    s = float(softmax_scale)
    if not (s == s) or s in (float("inf"), float("-inf")) or s <= 0:
        _fail(f"softmax_scale must be a finite positive float, got {softmax_scale!r}")
    return s


def check_cu_seqlens(name: str, cu, batch: int | None, total: int, device, validate: bool = True):
    """cu_seqlens: int32 (b+1,), starts at 0, non-decreasing, ends <= total rows."""
    if not isinstance(cu, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor", TypeError)
    if cu.dtype != torch.int32:
        _fail(f"{name} must be int32, got {cu.dtype}", TypeError)
    if cu.dim() != 1 or cu.numel() < 2:
        _fail(f"{name} must be 1-D with batch+1 >= 2 entries, got shape {tuple(cu.shape)}")
    if batch is not None and cu.numel() != batch + 1:
        _fail(f"{name} has {cu.numel()} entries but the batch has {batch} sequences (expected {batch + 1})")
    if cu.device != device and device.type != "meta" and cu.device.type != "meta":
        _fail(f"{name} is on {cu.device} but q is on {device}")
    if not cu.is_contiguous():
        _fail(f"{name} must be contiguous")
    if validate and cu.device.type != "meta":
        c = cu.tolist()
        if c[0] != 0:
            _fail(f"{name}[0] must be 0, got {c[0]}")
        if any(b < a for a, b in zip(c, c[1:])):
            _fail(f"{name} must be non-decreasing, got {c[:16]}{'...' if len(c) > 16 else ''}")
        if c[-1] > total:
            _fail(f"{name}[-1] = {c[-1]} exceeds the {total} packed rows of the tensor")
    return cu.numel() - 1


def check_seqused(name: str, su, batch: int, limit: int | None, device, validate: bool = True):
    if su is None:
        return
    if not isinstance(su, torch.Tensor) or su.dtype != torch.int32:
        _fail(f"{name} must be an int32 tensor", TypeError)
    if su.shape != (batch,):
        _fail(f"{name} must have shape ({batch},), got {tuple(su.shape)}")
    if su.device != device and device.type != "meta" and su.device.type != "meta":
        _fail(f"{name} is on {su.device} but q is on {device}")
    if validate and su.device.type != "meta" and su.numel():
        lo, hi = int(su.min()), int(su.max())
        if lo < 0 or (limit is not None and hi > limit):
            _fail(f"{name} values must lie in [0, {limit}], got min {lo} max {hi}")


def check_descale(name: str, t, batch: int, h_kv: int, device):
    """FA3's descales: float32 (batch, h_kv)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        _fail(f"{name} must be a float32 tensor of shape ({batch}, {h_kv})", TypeError)
    if tuple(t.shape) != (batch, h_kv):
        _fail(f"{name} must have shape (batch, num_heads_k) = ({batch}, {h_kv}), got {tuple(t.shape)}")
    if t.device != device and device.type != "meta" and t.device.type != "meta":
        _fail(f"{name} is on {t.device} but q is on {device}")


def check_sink(sink, h: int, device):
    if sink is None:
        return
    if not isinstance(sink, torch.Tensor) or sink.dtype not in (torch.float32, *HALF_DTYPES):
        _fail("learnable_sink must be a float tensor of shape (num_heads,)", TypeError)
    if tuple(sink.shape) != (h,):
        _fail(f"learnable_sink must have shape ({h},), got {tuple(sink.shape)}")
