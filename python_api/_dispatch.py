"""Choose the kernel family for a call (compute capability 9.x -> sm90, 8.x -> sm80) and refuse,
by name, any feature a family does not implement yet. Nothing silently falls back to a slower
path: an unsupported request raises NotImplementedError before launch."""
from __future__ import annotations

import dataclasses
import importlib
import os

import torch

BACKENDS = ("auto", "sm90", "sm80")


@dataclasses.dataclass(frozen=True)
class FwdRequest:
    """What a forward call asks for, in the terms the feature tables below use."""
    dtype: torch.dtype
    d: int
    dv: int
    causal: bool
    window: tuple[int, int]
    softcap: float
    varlen: bool
    has_sink: bool
    has_seqused: bool
    fp8: bool


_CAPABILITY: dict = {}


def _capability(device: torch.device) -> tuple[int, int]:
    """Compute capability, cached per device: torch's lookup costs microseconds on every call."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(idx)
    if cap is None:
        cap = _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return cap


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    backend = backend or os.environ.get("FA3_BACKEND") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"fa3: backend must be one of {BACKENDS}, got {backend!r}")
    if device.type == "meta":  # shape-only tracing: any family has the same output shapes
        return "sm90" if backend == "auto" else backend
    major, minor = _capability(device)
    if backend == "auto":
        if major == 9:
            return "sm90"
        if major == 8:
            return "sm80"
        raise NotImplementedError(
            f"fa3: no kernels for compute capability {major}.{minor}; fa3 runs on Hopper (9.x) and "
            "Ampere/Ada (8.x)")
    if backend == "sm90" and major != 9:
        raise ValueError(f"fa3: backend 'sm90' needs a Hopper GPU, this is {major}.{minor}")
    if backend == "sm80" and major < 8:
        raise ValueError(f"fa3: backend 'sm80' needs compute capability >= 8.0, this is {major}.{minor}")
    return backend


# Per family: head dims its forward kernel is built for, and the module that holds it.
_FWD_FAMILIES = {
    "sm90": ((64, 128, 256), "fa3.hopper.flash_fwd", "the sm90 forward kernel"),
    "sm80": ((64, 96, 128, 192, 256), "fa3.ampere.flash_fwd_sm80", "the sm80 (Ampere) forward kernel"),
}


# Per family: what its bf16/fp16 forward adds to the head dims above (which the fp8 forward
# shares), the (d, dv) pairs with d != dv it takes, and the optional features it implements.
_FWD_ADDS = {
    "sm90": ((96, 192), ((192, 128),), frozenset({"varlen", "seqused", "window", "softcap", "sink"})),
    "sm80": ((), (), frozenset({"varlen", "seqused", "window", "softcap"})),
}


def _fwd_missing(backend: str, r: FwdRequest) -> str | None:
    head_dims, module, kernel_name = _FWD_FAMILIES[backend]
    more_dims, pairs, features = _FWD_ADDS[backend]
    if r.fp8:  # the FP8 forward (fa3.fp8 / hopper.flash_fwd_fp8): sm90, equal head dims 64/128/256
        if backend != "sm90" or r.d != r.dv or r.d not in head_dims:
            return f"fp8 attention on {backend} with head dims {r.d}/{r.dv}"
        if r.varlen or r.has_seqused or r.softcap or r.has_sink or (
                r.window != (-1, -1) and not (r.causal and r.window[0] == -1)):
            return "fp8 attention with varlen / seqused / window / softcap / sink"
        return None
    if r.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {r.dtype}"
    if r.d != r.dv and (r.d, r.dv) not in pairs:
        return f"head dim q/k {r.d} != v {r.dv}"
    head_dims = tuple(sorted(head_dims + more_dims))
    if r.d not in head_dims:
        return f"head dim {r.d} ({backend} supports {', '.join(map(str, head_dims))} today)"
    if r.varlen and "varlen" not in features:
        return "varlen / seqused"
    if r.has_seqused and "seqused" not in features:
        return "varlen / seqused"
    if (r.window != (-1, -1) and not (r.causal and r.window[0] == -1)
            and "window" not in features):
        return "sliding-window (local) attention"
    if r.softcap and "softcap" not in features:
        return "softcap"
    if r.has_sink and "sink" not in features:
        return "learnable sink"
    try:
        importlib.import_module(module)
    except ImportError:
        return kernel_name
    return None


_MISSING: dict = {}


def fwd_missing(backend: str, r: FwdRequest) -> str | None:
    """Name of the first requested feature that ``backend`` lacks, or None (memoized: requests
    repeat from call to call and the answer depends only on the request)."""
    key = (backend, r)
    try:
        return _MISSING[key]
    except KeyError:
        if len(_MISSING) > 4096:  # e.g. a sweep over softcap values
            _MISSING.clear()
        missing = _MISSING[key] = _fwd_missing(backend, r)
        return missing


def require_fwd(backend: str, r: FwdRequest):
    missing = fwd_missing(backend, r)
    if missing is not None:
        raise NotImplementedError(f"fa3: {missing} is not implemented yet on backend {backend}")


def run_fwd(backend: str, q, k, v, out, lse, softmax_scale: float, causal: bool, **features):
    """Launch the forward of ``backend`` writing out and lse in place (inputs already validated,
    features already checked by require_fwd). ``features`` are the optional inputs by their API
    names (window, softcap, cu_seqlens_q/k, seqused_q/k, max_seqlen_q/k, sink); a family receives
    only those that are set, so one that lacks a feature cannot ignore it silently."""
    if backend == "sm90" and q.dtype == torch.float8_e4m3fn:
        from fa3.fp8 import fwd_prequantized

        fwd_prequantized(q, k, v, out, lse, softmax_scale, causal, **features)
        return
    if backend == "sm90":
        from fa3.hopper.flash_fwd import flash_fwd

        flash_fwd(q, k, v, out, lse, softmax_scale, causal, **features)
        return
    if backend == "sm80":
        from fa3.ampere.flash_fwd_sm80 import flash_fwd_sm80

        flash_fwd_sm80(q, k, v, out, lse, softmax_scale, causal, **features)
        return
    raise NotImplementedError(f"fa3: forward is not implemented yet on backend {backend}")


# Per family: the module that holds its backward and the function name in it.
_BWD_FAMILIES = {
    "sm90": ("fa3.hopper.flash_bwd", "flash_bwd", "the sm90 backward kernel"),
    "sm80": ("fa3.ampere.flash_bwd_sm80", "flash_bwd_sm80", "the sm80 (Ampere) backward kernel"),
}


def bwd_missing(backend: str, r: FwdRequest) -> str | None:
    """Name of the first feature of a forward request whose gradient ``backend`` lacks, or None.
    The backward module may define ``bwd_missing(request)`` to refuse features it lacks."""
    module, _, kernel_name = _BWD_FAMILIES[backend]
    if r.fp8:
        return "fp8 attention backward"
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return kernel_name
    check = getattr(mod, "bwd_missing", None)
    return check(r) if check is not None else None


def run_bwd(backend: str, dout, q, k, v, out, lse, softmax_scale: float, causal: bool,
            deterministic: bool, **features):
    """Gradients (dq, dk, dv) of ``backend`` (same features convention as run_fwd)."""
    run = _BWD_RUN.get(backend)
    if run is None:  # importlib.import_module costs microseconds per call: look it up once
        module, fn, kernel_name = _BWD_FAMILIES[backend]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise NotImplementedError(f"fa3: {kernel_name} is not implemented yet") from None
        run = _BWD_RUN[backend] = getattr(mod, fn)
    return run(dout, q, k, v, out, lse, softmax_scale, causal, deterministic, **features)


_BWD_RUN: dict = {}  # backend -> its backward function
