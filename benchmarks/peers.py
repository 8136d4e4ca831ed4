"""The implementations the benchmark compares, all called as fwd(q, k, v, causal) -> out.

q is (b, sq, h, d), k and v (b, sk, h_kv, d), as in FA3's flash_attn_interface. Every impl loads
lazily: a missing package makes that impl unavailable (with its reason), never the whole run.
"""
from __future__ import annotations

import contextlib
import inspect

import torch

ALL_IMPLS = ("fa3", "fa3-sm80", "fa2", "cudnn", "fa4")

# How fa3's sm80 (Ampere) fallback is selected through the public API.
FA3_SM80_KWARGS = {"backend": "sm80"}


class Unavailable(Exception):
    """This impl cannot run this request (not importable, not implemented, not supported)."""


def _first(out):
    # FA3/FA4 entry points return out, or (out, lse, ...) depending on version and flags.
    return out[0] if isinstance(out, (tuple, list)) else out


class Impl:
    name = "?"

    def load(self):
        """Import what is needed; raise Unavailable(reason) when it can't be."""

    def check(self, shape, mode: str):
        """Raise Unavailable(reason) when this impl cannot run shape/mode at all."""

    def context(self):
        """Held around warm-up and timing (SDPA backend selection); no-op by default."""
        return contextlib.nullcontext()

    def fwd(self, q, k, v, causal):
        raise NotImplementedError


class Fa3(Impl):
    def __init__(self, name="fa3", extra=None):
        self.name, self.extra = name, dict(extra or {})

    def load(self):
        try:
            import fa3
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"import fa3 failed: {e!r}") from None
        self.func = fa3.flash_attn_func
        params = inspect.signature(self.func).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        missing = [k for k in self.extra if k not in params and not takes_kwargs]
        if missing:
            raise Unavailable(f"fa3.flash_attn_func has no {missing} argument")

    def fwd(self, q, k, v, causal):
        return _first(self.func(q, k, v, causal=causal, **self.extra))


class Fa4(Impl):
    name = "fa4"

    def load(self):
        try:
            from flash_attn.cute import flash_attn_func
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"flash_attn.cute not importable: {e!r}") from None
        self.func = flash_attn_func

    def fwd(self, q, k, v, causal):
        return _first(self.func(q, k, v, causal=causal))


class Sdpa(Impl):
    """torch SDPA pinned to one backend. SDPA takes (b, h, s, d): we pass transposed views of the
    same (b, s, h, d) data, which is how a model calling SDPA on FA-layout tensors would."""

    def __init__(self, name, backend):
        self.name, self.backend_name = name, backend

    def load(self):
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"torch.nn.attention not importable: {e!r}") from None
        if not hasattr(SDPBackend, self.backend_name):
            raise Unavailable(f"this torch has no SDPBackend.{self.backend_name}")
        self.backend = getattr(SDPBackend, self.backend_name)
        self.sdpa_kernel = sdpa_kernel

    def check(self, shape, mode):
        # SDPA's is_causal is top-left aligned; FA's causal is bottom-right. They only agree when
        # sq == sk. For sq != sk the flash backend gets FA's mask through causal_lower_right; the
        # cuDNN backend has no such path (it would fall back to a dense mask), so we skip it.
        if shape.causal and shape.sq != shape.sk and self.backend_name != "FLASH_ATTENTION":
            raise Unavailable("SDPA has no bottom-right causal mask for this backend (sq != sk)")

    def context(self):
        return self.sdpa_kernel(self.backend)

    def fwd(self, q, k, v, causal):
        return sdpa_fwd(q, k, v, causal)


def sdpa_fwd(q, k, v, causal):
    """SDPA on (b, s, h, d) tensors with FA semantics (bottom-right causal, GQA), whatever backend
    the caller's sdpa_kernel context allows."""
    import torch.nn.functional as F

    sq, sk = q.shape[1], k.shape[1]
    kw = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if causal and sq != sk:
        from torch.nn.attention.bias import causal_lower_right

        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(sq, sk), **kw)
    else:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=bool(causal), **kw)
    return o.transpose(1, 2)


def reference_fwd(q, k, v, causal):
    """A trusted output for the sanity check: torch's fused SDPA kernels (never the O(s^2)-memory
    math path, which would not fit the long shapes)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [b for b in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
                if hasattr(SDPBackend, b)]
    with sdpa_kernel([getattr(SDPBackend, b) for b in backends]):
        return sdpa_fwd(q, k, v, causal)


def make_impl(name: str) -> Impl:
    if name == "fa3":
        return Fa3()
    if name == "fa3-sm80":
        return Fa3("fa3-sm80", FA3_SM80_KWARGS)
    if name == "fa2":
        return Sdpa("fa2", "FLASH_ATTENTION")
    if name == "cudnn":
        return Sdpa("cudnn", "CUDNN_ATTENTION")
    if name == "fa4":
        return Fa4()
    raise ValueError(f"unknown impl {name!r}; choose from {ALL_IMPLS}")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32 (NaN anywhere gives NaN)."""
    o, r = out.float(), ref.float()
    return float(torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r))


def load_available(names: str) -> list:
    """The peers of a comma list that load here; the others are reported and skipped."""
    impls = []
    for name in filter(None, names.split(",")):
        impl = make_impl(name)
        try:
            impl.load()
            impls.append(impl)
        except Unavailable as e:
            print(f"[{name}] unavailable: {e}")
    return impls
