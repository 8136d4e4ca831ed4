"""fa3's attention as torch custom ops (``torch.ops.fa3.fwd`` / ``torch.ops.fa3.bwd``) with fake
(meta) implementations and autograd, so ``torch.compile(fullgraph=True)`` traces them without graph
breaks and shape inference needs no GPU.

Dense layout: q (b, sq, h, d) -> out (b, sq, h, dv), lse (b, h, sq).
Varlen layout (cu_seqlens given): q (total_q, h, d) -> out (total_q, h, dv), lse (h, total_q).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from fa3 import _dispatch


def _out_dtype(q: Tensor) -> torch.dtype:
    return torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype


def _alloc(q: Tensor, v: Tensor, varlen: bool):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=_out_dtype(q))
    if varlen:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


def fwd_request(q, v, causal, window_left, window_right, softcap, varlen, sink, seqused):
    return _dispatch.FwdRequest(
        dtype=q.dtype, d=q.shape[-1], dv=v.shape[-1], causal=causal,
        window=(window_left, window_right), softcap=softcap, varlen=varlen,
        has_sink=sink is not None, has_seqused=seqused, fp8=q.dtype == torch.float8_e4m3fn)


_CHECKED: dict = {}


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor,
        cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
        seqused_q: Optional[Tensor], seqused_k: Optional[Tensor],
        max_seqlen_q: int, max_seqlen_k: int,
        softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
        sink: Optional[Tensor], q_descale: Optional[Tensor], k_descale: Optional[Tensor],
        v_descale: Optional[Tensor], deterministic: bool, backend: str,
        pack_gqa: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    # deterministic only affects the backward; it rides on the forward so autograd can see it.
    # pack_gqa is FA3's performance hint: None lets the kernel choose; False keeps one query head
    # per tile on the sm90 bf16/fp16 kernel (True is its default where it packs: GQA ratios 2/4/8).
    varlen = cu_seqlens_q is not None
    seqused = seqused_q is not None or seqused_k is not None
    # backend choice and feature check, remembered per request (they are the same every call of
    # a loop; the environment variable is part of the key, so changing it takes effect)
    key = (backend, os.environ.get("FA3_BACKEND"), q.device, q.dtype, q.shape[-1], v.shape[-1], causal,
           window_left, window_right, softcap, varlen, sink is None, seqused)
    be = _CHECKED.get(key)
    if be is None:
        be = _dispatch.resolve_backend(q.device, backend)
        _dispatch.require_fwd(be, fwd_request(q, v, causal, window_left, window_right, softcap,
                                              varlen, sink, seqused))
        if len(_CHECKED) > 4096:
            _CHECKED.clear()
        _CHECKED[key] = be
    out, lse = _alloc(q, v, varlen)
    _dispatch.run_fwd(be, q, k, v, out, lse, softmax_scale, causal,
                      **_features(causal, window_left, window_right, softcap, cu_seqlens_q, cu_seqlens_k,
                                  seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, sink),
                      **{n: t for n, t in (("q_descale", q_descale), ("k_descale", k_descale),
                                           ("v_descale", v_descale)) if t is not None},
                      **({"config_overrides": {"pack_gqa": 1}}
                         if pack_gqa is False and be == "sm90" and q.dtype != torch.float8_e4m3fn
                         else {}))
    return out, lse


def _features(causal, window_left, window_right, softcap, cu_seqlens_q, cu_seqlens_k, seqused_q,
              seqused_k, max_seqlen_q, max_seqlen_k, sink) -> dict:
    """The optional inputs that are set, by API name (see _dispatch.run_fwd)."""
    f = {}
    if (window_left, window_right) not in ((-1, -1), (-1, 0) if causal else (-1, -1)):
        f["window"] = (window_left, window_right)
    if softcap:
        f["softcap"] = softcap
    if cu_seqlens_q is not None:
        f.update(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                 max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    if seqused_q is not None:
        f["seqused_q"] = seqused_q
    if seqused_k is not None:
        f["seqused_k"] = seqused_k
    if sink is not None:
        f["sink"] = sink
    return f


fwd = torch.library.custom_op("fa3::fwd", _fwd_impl, mutates_args=(), device_types="cuda")


def call_fwd(q, k, v, *args):
    """The wrappers' entry. Tracing (torch.compile) and autograd go through the custom op; plain
    eager inference on CUDA calls the implementation directly, skipping the op layer's Python
    dispatch (~50 us per call measured on H200, more than a short attention takes)."""
    sink = args[11]  # the only other input that can carry a gradient (see _fwd_impl's signature)
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
        or (isinstance(sink, Tensor) and sink.requires_grad))
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return fwd(q, k, v, *args)
    if needs_grad:
        # eager training: a plain autograd.Function around the same implementations; through the
        # op's autograd layer a forward with grad took 436 us of host time, this way 89 (H100
        # host, tiny shape; without grad 50), and the backward skips the op's ~60 us dispatch
        return _EagerAttention.apply(q, k, v, *args)
    return _fwd_impl(q, k, v, *args)


@fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
              max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap, sink,
              q_descale, k_descale, v_descale, deterministic, backend, pack_gqa=None):
    return _alloc(q, v, cu_seqlens_q is not None)


@torch.library.custom_op("fa3::bwd", mutates_args=(), device_types="cuda")
def bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
        cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
        seqused_q: Optional[Tensor], seqused_k: Optional[Tensor],
        max_seqlen_q: int, max_seqlen_k: int,
        softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
        sink: Optional[Tensor], deterministic: bool, backend: str
        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dsink): dsink is the sink's fp32 (h,) gradient, or an empty tensor."""
    return _bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                     max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
                     softcap, sink, deterministic, backend)


def _bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
              max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap,
              sink, deterministic, backend):
    be = _dispatch.resolve_backend(q.device, backend)
    grads = _dispatch.run_bwd(be, dout, q, k, v, out, lse, softmax_scale, causal, deterministic,
                              **_features(causal, window_left, window_right, softcap, cu_seqlens_q,
                                          cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
                                          max_seqlen_k, sink))
    if len(grads) == 3:  # no sink: a family returns its gradient only when given one
        grads = (*grads, q.new_empty(0, dtype=torch.float32))  # 0 elements: no fill needed
    return tuple(grads)


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
              max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
              softcap, sink, deterministic, backend):
    dsink = q.new_empty(sink.shape if sink is not None else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsink


_FWD_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k",
             "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal", "window_left",
             "window_right", "softcap", "sink", "q_descale", "k_descale", "v_descale", "deterministic", "backend",
             "pack_gqa")


def _setup_context(ctx, inputs, output):
    a = dict(zip(_FWD_ARGS, inputs))
    out, lse = output
    if a["q"].dtype == torch.float8_e4m3fn:
        ctx.fp8 = True
        return
    ctx.fp8 = False
    ctx.save_for_backward(a["q"], a["k"], a["v"], out, lse, a["cu_seqlens_q"], a["cu_seqlens_k"],
                          a["seqused_q"], a["seqused_k"], a["sink"])
    ctx.args = {n: a[n] for n in ("max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal",
                                  "window_left", "window_right", "softcap", "deterministic",
                                  "backend")}


def _backward(ctx, dout, dlse):
    if ctx.fp8:
        raise NotImplementedError("fa3: fp8 attention has no backward yet; call it under torch.no_grad()")
    q, k, v, out, lse, cu_q, cu_k, su_q, su_k, sink = ctx.saved_tensors
    a = ctx.args
    # traced backward (torch.compile): the op; eager: its implementation (_EagerAttention)
    op = bwd if torch.compiler.is_compiling() or not getattr(ctx, "eager", False) else _bwd_impl
    dq, dk, dv, dsink = op(dout, q, k, v, out, lse, cu_q, cu_k, su_q, su_k, a["max_seqlen_q"],
                            a["max_seqlen_k"], a["softmax_scale"], a["causal"], a["window_left"],
                            a["window_right"], a["softcap"], sink, a["deterministic"], a["backend"])
    grads = [dq, dk, dv] + [None] * (len(_FWD_ARGS) - 3)
    if sink is not None:
        grads[_FWD_ARGS.index("sink")] = dsink.to(sink.dtype)
    return tuple(grads)


torch.library.register_autograd("fa3::fwd", _backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """Eager-mode autograd of the attention forward: the same forward implementation, context and
    backward as the fa3::fwd op's registered autograd, without the op layer (call_fwd)."""

    @staticmethod
    def forward(ctx, q, k, v, *args):
        out, lse = _fwd_impl(q, k, v, *args)
        _setup_context(ctx, (q, k, v, *args), (out, lse))
        ctx.eager = True
        ctx.set_materialize_grads(False)  # no zero-filled dLSE (it is not used)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None:  # only the LSE was used: O's gradient is zero
            dout = torch.zeros_like(ctx.saved_tensors[3])
        return _backward(ctx, dout, dlse)
