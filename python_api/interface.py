"""FA3's ``flash_attn_interface`` functions, same signatures and return conventions.

Each function validates its inputs (clear exceptions before any launch) and calls the custom op
``torch.ops.fa3.fwd``. FA3's performance hints are accepted: num_splits (ignored: no split-KV
kernel yet) and pack_gqa (None: the kernel's heuristic; False: one query head per tile on sm90).
Options that change results or resources and are not built yet raise NotImplementedError by name.
Extra keyword-only arguments: ``learnable_sink`` (per-head logit in the softmax denominator) and
``backend`` ("auto" | "sm90" | "sm80"; also the FA3_BACKEND environment variable).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from fa3 import _dispatch
from fa3 import _validate as V
from fa3 import ops
from fa3.reference import combine_ref

_IN_DTYPES = V.HALF_DTYPES + V.FP8_DTYPES


def _not_built(name: str):
    raise NotImplementedError(f"fa3: {name} is not implemented yet")


def _common_options(qv, attention_chunk, sm_margin):
    if qv is not None:
        _not_built("qv (MLA-style extra query/value input)")
    if attention_chunk:
        _not_built("attention_chunk")
    if sm_margin:
        _not_built("sm_margin")


# Signatures (shape, strides, dtype, device of q, k, v) that passed _check_qkv: its checks read
# only these, and a training or decode loop repeats a handful of them, so a hit skips ~20 us.
_GOOD_QKV: set = set()


def _check_qkv(q, k, v, ndim):
    try:
        key = (ndim, q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
               v.shape, v.stride(), v.dtype, v.device)
    except AttributeError:  # not tensors: the checks below say so
        key = None
    if key is not None and key in _GOOD_QKV:
        return
    _check_qkv_full(q, k, v, ndim)
    if key is not None:
        if len(_GOOD_QKV) > 4096:
            _GOOD_QKV.clear()
        _GOOD_QKV.add(key)


def _check_qkv_full(q, k, v, ndim):
    V.check_tensor("q", q, ndim, _IN_DTYPES)
    V.check_tensor("k", k, ndim, _IN_DTYPES)
    V.check_tensor("v", v, ndim, _IN_DTYPES)
    V.check_same(("q", "k", "v"), (q, k, v), "dtype")
    V.check_same(("q", "k", "v"), (q, k, v), "device")
    if q.shape[-1] != k.shape[-1]:
        V._fail(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[:-1] != v.shape[:-1]:
        V._fail(f"k and v must agree on all but the head dim: {tuple(k.shape)} vs {tuple(v.shape)}")
    V.check_head_dims(q.shape[-1], v.shape[-1], fp8=q.dtype in V.FP8_DTYPES)
    V.check_heads(q.shape[-2], k.shape[-2])
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.check_aligned(name, t)


def _check_fp8(q, descales, batch, h_kv):
    for name, t in zip(("q_descale", "k_descale", "v_descale"), descales):
        if t is not None and q.dtype not in V.FP8_DTYPES:
            V._fail(f"{name} is only meaningful with float8_e4m3fn inputs, q is {q.dtype}")
        V.check_descale(name, t, batch, h_kv, q.device)


def _backend(backend) -> str:
    """'' lets the op resolve FA3_BACKEND / the GPU at run time; a named backend is checked now."""
    if backend in (None, "", "auto"):
        return ""
    if backend not in _dispatch.BACKENDS:
        V._fail(f"backend must be one of {_dispatch.BACKENDS}, got {backend!r}")
    return backend


def _pack_gqa(pack_gqa):
    """FA3's hint: None (heuristic), True or False; anything else is refused."""
    if pack_gqa is not None and not isinstance(pack_gqa, bool):
        V._fail(f"pack_gqa must be None, True or False, got {pack_gqa!r}")
    return pack_gqa


def _ret(out, lse, want_lse):
    return (out, lse) if want_lse else out


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None,
                    k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
                    softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                    return_attn_probs=False, *, learnable_sink=None, backend=None):
    """Attention over q (b, sq, h, d), k (b, sk, h_kv, d), v (b, sk, h_kv, dv).

    Returns out (b, sq, h, dv), and with return_attn_probs=True also the softmax LSE (b, h, sq)
    (natural log, float32) as FA3 does. Causal and window masks align bottom-right."""
    _check_qkv(q, k, v, 4)
    if q.shape[0] != k.shape[0]:
        V._fail(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    _common_options(qv, attention_chunk, sm_margin)
    left, right = V.check_window(window_size, causal)
    softcap = V.check_softcap(softcap)
    scale = V.check_scale(softmax_scale, q.shape[-1])
    V.check_sink(learnable_sink, q.shape[2], q.device)
    _check_fp8(q, (q_descale, k_descale, v_descale), q.shape[0], k.shape[2])
    out, lse = ops.call_fwd(q, k, v, None, None, None, None, q.shape[1], k.shape[1], scale, bool(causal),
                       left, right, softcap, learnable_sink, q_descale, k_descale, v_descale,
                       bool(deterministic), _backend(backend), _pack_gqa(pack_gqa))
    return _ret(out, lse, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           seqused_q=None, seqused_k=None, softmax_scale=None, causal=False,
                           qv=None, q_descale=None, k_descale=None, v_descale=None,
                           window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                           pack_gqa=None, deterministic=False, sm_margin=0,
                           return_attn_probs=False, *, learnable_sink=None, backend=None,
                           validate_seqlens=True):
    """Packed sequences: q (total_q, h, d), k/v (total_k, h_kv, d); cu_seqlens int32 (b+1,).
    Returns out (total_q, h, dv) and, with return_attn_probs=True, LSE (h, total_q)."""
    _check_qkv(q, k, v, 3)
    _common_options(qv, attention_chunk, sm_margin)
    b = V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, None, q.shape[0], q.device, validate_seqlens)
    V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, b, k.shape[0], q.device, validate_seqlens)
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, int) or m < 0:
            V._fail(f"{name} must be a non-negative int, got {m!r}", TypeError)
    if validate_seqlens and cu_seqlens_q.device.type != "meta":
        for name, cu, m in (("q", cu_seqlens_q, max_seqlen_q), ("k", cu_seqlens_k, max_seqlen_k)):
            longest = int((cu[1:] - cu[:-1]).max())
            if longest > m:
                V._fail(f"max_seqlen_{name} = {m} is smaller than the longest sequence ({longest})")
    V.check_seqused("seqused_q", seqused_q, b, max_seqlen_q, q.device, validate_seqlens)
    V.check_seqused("seqused_k", seqused_k, b, max_seqlen_k, q.device, validate_seqlens)
    left, right = V.check_window(window_size, causal)
    softcap = V.check_softcap(softcap)
    scale = V.check_scale(softmax_scale, q.shape[-1])
    V.check_sink(learnable_sink, q.shape[1], q.device)
    _check_fp8(q, (q_descale, k_descale, v_descale), b, k.shape[1])
    out, lse = ops.call_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
                       max_seqlen_k, scale, bool(causal), left, right, softcap, learnable_sink,
                       q_descale, k_descale, v_descale, bool(deterministic), _backend(backend),
                       _pack_gqa(pack_gqa))
    return _ret(out, lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, softmax_scale=None, causal=False, q_descale=None,
                              k_descale=None, v_descale=None, window_size=(-1, -1),
                              attention_chunk=0, softcap=0.0, deterministic=False,
                              num_heads_q=None, sm_margin=0, return_attn_probs=False, *,
                              learnable_sink=None, backend=None):
    """qkv (b, s, 3, h, d), or (b, s, h + 2*h_kv, d) with num_heads_q = h for GQA."""
    V.check_tensor("qkv", qkv, 5 if num_heads_q is None else 4, _IN_DTYPES)
    if num_heads_q is None:
        if qkv.shape[2] != 3:
            V._fail(f"qkv must have shape (b, s, 3, h, d), got {tuple(qkv.shape)}")
        q, k, v = qkv.unbind(2)
    else:
        h_kv2 = qkv.shape[2] - num_heads_q
        if num_heads_q <= 0 or h_kv2 <= 0 or h_kv2 % 2:
            V._fail(f"qkv with num_heads_q={num_heads_q} needs h + 2*h_kv heads, got {qkv.shape[2]}")
        q, k, v = qkv.split([num_heads_q, h_kv2 // 2, h_kv2 // 2], dim=2)
    return flash_attn_func(q, k, v, softmax_scale, causal, None, q_descale, k_descale, v_descale,
                           window_size, attention_chunk, softcap, 1, None, deterministic,
                           sm_margin, return_attn_probs, learnable_sink=learnable_sink,
                           backend=backend)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None,
                            rotary_sin=None,
                            cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
                            cache_batch_idx=None, cache_leftpad=None, page_table=None,
                            cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None,
                            rotary_seqlens=None, q_descale=None, k_descale=None, v_descale=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1),
                            attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                            scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
                            return_softmax_lse=False, *, learnable_sink=None, backend=None):
    """Decoding against a KV cache: q (b, sq, h, d), caches (b, s_cache, h_kv, d); attends to the
    first cache_seqlens keys of each batch element. Appending k/v, rotary, paging and cache
    indirection are not built yet and raise NotImplementedError."""
    for name, val in (("k/v (in-place cache append)", k if k is not None else v),
                      ("rotary embedding", rotary_cos), ("cache_batch_idx", cache_batch_idx),
                      ("cache_leftpad", cache_leftpad), ("page_table (paged KV)", page_table),
                      ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k_new", cu_seqlens_k_new)):
        if val is not None:
            _not_built(f"flash_attn_with_kvcache with {name}")
    _check_qkv(q, k_cache, v_cache, 4)
    _common_options(qv, attention_chunk, sm_margin)
    b = q.shape[0]
    if k_cache.shape[0] != b:
        V._fail(f"k_cache batch ({k_cache.shape[0]}) must equal q batch ({b}) without cache_batch_idx")
    if isinstance(cache_seqlens, int):
        if not 0 <= cache_seqlens <= k_cache.shape[1]:
            V._fail(f"cache_seqlens={cache_seqlens} outside [0, {k_cache.shape[1]}]")
        cache_seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    V.check_seqused("cache_seqlens", cache_seqlens, b, k_cache.shape[1], q.device)
    left, right = V.check_window(window_size, causal)
    softcap = V.check_softcap(softcap)
    scale = V.check_scale(softmax_scale, q.shape[-1])
    V.check_sink(learnable_sink, q.shape[2], q.device)
    _check_fp8(q, (q_descale, k_descale, v_descale), b, k_cache.shape[2])
    out, lse = ops.call_fwd(q, k_cache, v_cache, None, None, None, cache_seqlens, q.shape[1],
                       k_cache.shape[1], scale, bool(causal), left, right, softcap, learnable_sink,
                       q_descale, k_descale, v_descale, False, _backend(backend), _pack_gqa(pack_gqa))
    return _ret(out, lse, return_softmax_lse)


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """Merge split-KV partial results: out_partial (splits, b, s, h, d) float32, lse_partial
    (splits, b, s, h) float32 -> (out (b, s, h, d) in out_dtype, lse (b, s, h)).

    Computed with a few fused torch ops (memory-bound, exact in fp32); a CuTe kernel is planned."""
    V.check_tensor("out_partial", out_partial, 5, (torch.float32,))
    if not isinstance(lse_partial, torch.Tensor) or lse_partial.dtype != torch.float32:
        V._fail("lse_partial must be a float32 tensor", TypeError)
    if tuple(lse_partial.shape) != tuple(out_partial.shape[:-1]):
        V._fail(f"lse_partial shape {tuple(lse_partial.shape)} must be out_partial's without the "
                f"head dim {tuple(out_partial.shape[:-1])}")
    o, lse = combine_ref(out_partial, lse_partial)
    dtype = out_dtype or (out.dtype if out is not None else out_partial.dtype)
    if out is not None:
        if out.shape != o.shape:
            V._fail(f"out must have shape {tuple(o.shape)}, got {tuple(out.shape)}")
        out.copy_(o)
        return out, lse
    return o.to(dtype), lse
