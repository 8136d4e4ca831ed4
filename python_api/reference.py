"""Exact attention in plain torch: the oracle for every fa3 test.

Conventions follow FlashAttention 2/3:
* q (b, sq, h, d), k (b, sk, h_kv, d), v (b, sk, h_kv, dv); h % h_kv == 0 (GQA/MQA: query head i
  reads kv head i // (h // h_kv)).
* causal and local masks are aligned bottom-right: query row i sits at key position
  i + sk - sq. Window (left, right): keys j with i + sk - sq - left <= j <= i + sk - sq + right
  are visible; -1 means unbounded on that side. causal == window (left, 0).
* softcap > 0 applies S <- softcap * tanh(S / softcap) to the scaled scores.
* sink (h,) is a learnable per-head logit that joins the softmax denominator only.
* LSE is the natural-log logsumexp of the scaled (capped) scores, float32, shape (b, h, sq);
  a fully masked row has LSE = -inf and output 0.

``upcast=True`` computes in float32 (the oracle); ``upcast=False`` computes in the inputs' own
precision, which is what FA's test rule compares against ("a same-precision PyTorch attention").
Everything is differentiable, so it is the backward oracle too.
"""
from __future__ import annotations

import math

import torch


def visible_mask(sq: int, sk: int, causal: bool = False, window_size=(-1, -1), device=None,
                 seqlen_q=None, seqlen_k=None) -> torch.Tensor:
    """Bool (sq, sk): True where query i may attend key j. seqlen_q/k (<= sq/sk) mark the valid
    part of padded tensors; the diagonal alignment uses the valid lengths."""
    lq = sq if seqlen_q is None else seqlen_q
    lk = sk if seqlen_k is None else seqlen_k
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(sq, device=device).view(-1, 1)
    j = torch.arange(sk, device=device).view(1, -1)
    diag = i + (lk - lq)
    ok = (j < lk) & (i < lq)
    if left >= 0:
        ok &= j >= diag - left
    if right >= 0:
        ok &= j <= diag + right
    return ok


def _attend(q, k, v, mask, scale, softcap, sink, upcast, reorder_ops):
    """One sequence: q (sq, h, d), k (sk, hk, d), v (sk, hk, dv), mask (sq, sk) -> (out, lse)."""
    dtype = q.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # never downcast fp64
    if upcast:
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
    h, hk = q.shape[1], k.shape[1]
    if h != hk:
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)
    if reorder_ops:  # scale q first, as a kernel in low precision would
        s = torch.einsum("qhd,khd->hqk", q * scale, k)
    else:
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask.unsqueeze(0), float("-inf"))
    s32 = s.to(acc)
    if sink is not None:
        sink_col = sink.to(acc).view(-1, 1, 1).expand(s32.shape[0], s32.shape[1], 1)
        lse = torch.logsumexp(torch.cat([s32, sink_col], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(s32, dim=-1)
    # exp(s - lse) is 0 on masked keys; a fully masked row has lse = -inf -> use 0, not NaN.
    p = torch.exp(s32 - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    p = p.masked_fill(~mask.unsqueeze(0), 0.0).to(v.dtype)
    out = torch.einsum("hqk,khd->qhd", p, v)
    return out.to(dtype), lse.float()


def attention_ref(q, k, v, causal: bool = False, softmax_scale: float | None = None,
                  window_size=(-1, -1), softcap: float = 0.0, sink=None,
                  upcast: bool = True, reorder_ops: bool = False, seqused_q=None, seqused_k=None):
    """Batched attention with FA's layout; returns (out in q.dtype, lse float32 (b, h, sq)).

    seqused_q/k (b,) int: only the first seqused rows of each batch element are valid (the rest of
    the output is 0 and LSE -inf there)."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    outs, lses = [], []
    for bi in range(b):
        lq = int(seqused_q[bi]) if seqused_q is not None else sq
        lk = int(seqused_k[bi]) if seqused_k is not None else sk
        mask = visible_mask(sq, sk, causal, window_size, q.device, lq, lk)
        o, lse = _attend(q[bi], k[bi], v[bi], mask, scale, softcap, sink, upcast, reorder_ops)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool = False,
                         softmax_scale: float | None = None, window_size=(-1, -1),
                         softcap: float = 0.0, sink=None, upcast: bool = True,
                         reorder_ops: bool = False, seqused_q=None, seqused_k=None):
    """Packed varlen attention: q (total_q, h, d), k/v (total_k, h_kv, d); cu_seqlens (b+1,) int32.
    Returns (out (total_q, h, dv), lse (h, total_q)) as FA's varlen API does. Rows of q past
    seqused_q (when given) get output 0 and LSE -inf."""
    d = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    total_q, h = q.shape[0], q.shape[1]
    out = torch.zeros(total_q, h, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((h, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for bi in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[bi], cq[bi + 1], ck[bi], ck[bi + 1]
        sq, sk = q1 - q0, k1 - k0
        lq = min(sq, int(seqused_q[bi])) if seqused_q is not None else sq
        lk = min(sk, int(seqused_k[bi])) if seqused_k is not None else sk
        if sq == 0:
            continue
        mask = visible_mask(sq, sk, causal, window_size, q.device, lq, lk)
        o, l_ = _attend(q[q0:q1], k[k0:k1], v[k0:k1], mask, scale, softcap, sink, upcast,
                        reorder_ops)
        out[q0:q1] = o
        lse[:, q0:q1] = l_
    return out, lse


def combine_ref(out_partial, lse_partial):
    """Merge split-KV partial results: out_partial (s, ..., d) float32, lse_partial (s, ...) ->
    (out, lse) with out = sum_i exp(lse_i - lse) * out_i, lse = logsumexp_i lse_i."""
    lse = torch.logsumexp(lse_partial, dim=0)
    w = torch.exp(lse_partial - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(0))
    w = torch.nan_to_num(w, nan=0.0)
    out = (w.unsqueeze(-1) * out_partial).sum(0)
    return out, lse
