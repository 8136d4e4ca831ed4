#!/usr/bin/env python
"""Forward TFLOP/s of fa3's feature paths against FA4 (flash_attn.cute) and SDPA-cuDNN, same process.

    python benchmarks/bench_features.py [--cases varlen,gqa,window] [--out results/x.json]

Rows: varlen (packed batch of long-tailed document lengths, 16k-64k tokens, causal per document,
Llama-3-8B heads 32 q / 8 kv, hd128); GQA shapes of Llama-3-8B (32/8) and 70B (64/8), hd128,
2 x 8k tokens; sliding window 4096 on 32k sequences (causal, 16 heads, hd128). cuDNN runs where
SDPA can express the case (dense GQA); varlen and windows are FA-only. FLOPs count only the
visible (q, k) pairs of each case: 4 * pairs * d per head.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def doc_lengths(total: int, seed: int, lo: int = 64, hi: int = 16384) -> list[int]:
    """Long-tailed (Pareto, alpha 1.1) document lengths summing to `total`."""
    rng = random.Random(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(min(hi, lo * rng.paretovariate(1.1))))
    lens[-1] -= sum(lens) - total
    return [n for n in lens if n > 0]


def visible_pairs(sq: int, sk: int, causal: bool, left: int = -1) -> int:
    """(q, k) pairs a bottom-right causal (or local (left, 0)) mask lets through, one head."""
    if not causal:
        return sq * sk
    off = sk - sq
    n = 0
    for i in range(sq):  # python loop is fine at these sizes (<= 64k rows)
        hi = min(sk - 1, i + off)
        lo = 0 if left < 0 else max(0, i + off - left)
        n += max(0, hi - lo + 1)
    return n


def cases(names):
    import torch

    out = []
    if "varlen" in names:
        for total in (16384, 32768, 65536):
            lens = doc_lengths(total, seed=total)
            out.append(dict(name=f"varlen {total // 1024}k tokens, {len(lens)} docs (max {max(lens)}), "
                                 "causal, 32/8 heads, hd128",
                            kind="varlen", lens=lens, h=32, hk=8, d=128, causal=True, window=(-1, -1)))
    if "gqa" in names:
        for model, h in (("Llama-3-8B", 32), ("Llama-3-70B", 64)):
            for causal in (False, True):
                out.append(dict(name=f"GQA {model} {h}/8 heads hd128, 2 x 8k{' causal' if causal else ''}",
                                kind="dense", b=2, s=8192, h=h, hk=8, d=128, causal=causal,
                                window=(-1, -1)))
    if "window" in names:
        out.append(dict(name="sliding window (4096, 0) on 32k, 16 heads hd128", kind="dense", b=1,
                        s=32768, h=16, hk=16, d=128, causal=True, window=(4096, 0)))
    del torch
    return out


def flops(c) -> float:
    if c["kind"] == "varlen":
        pairs = sum(visible_pairs(n, n, c["causal"]) for n in c["lens"])
        return 4.0 * pairs * c["d"] * c["h"]
    pairs = visible_pairs(c["s"], c["s"], c["causal"], c["window"][0])
    return 4.0 * pairs * c["d"] * c["h"] * c["b"]


def make_calls(c, impls, overrides=()):
    """{impl: zero-arg callable} for this case; an impl that cannot run it maps to a reason.
    overrides: FwdConfig override texts (fwd_repeat's syntax), each timed as "fa3[text]" through
    the Hopper forward directly."""
    import torch

    from fwd_repeat import parse_override

    dt = torch.bfloat16
    calls = {}
    if c["kind"] == "varlen":
        total = sum(c["lens"])
        q = torch.randn(total, c["h"], c["d"], device="cuda", dtype=dt)
        k = torch.randn(total, c["hk"], c["d"], device="cuda", dtype=dt)
        v = torch.randn_like(k)
        cu = torch.tensor([0] + list(torch.tensor(c["lens"]).cumsum(0)), dtype=torch.int32,
                          device="cuda")
        mx = max(c["lens"])
        if "fa3" in impls:
            import fa3

            # validate_seqlens=False: no host read of cu_seqlens per call (FA4 does none either)
            calls["fa3"] = lambda: fa3.flash_attn_varlen_func(q, k, v, cu, cu, mx, mx,
                                                              causal=c["causal"],
                                                              validate_seqlens=False)
        if "fa4" in impls:
            try:
                from flash_attn.cute import flash_attn_varlen_func as f4

                calls["fa4"] = lambda: f4(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx,
                                          max_seqlen_k=mx, causal=c["causal"])
            except Exception as e:  # noqa: BLE001
                calls["fa4"] = f"unavailable: {e!r}"[:200]
        if overrides:
            from fa3.hopper.flash_fwd import flash_fwd

            out = torch.empty_like(q)
            lse = torch.empty(c["h"], total, device="cuda", dtype=torch.float32)
            for text in overrides:
                calls[f"fa3[{text}]"] = lambda ov=parse_override(text): flash_fwd(
                    q, k, v, out, lse, c["d"] ** -0.5, c["causal"], cu_seqlens_q=cu, cu_seqlens_k=cu,
                    max_seqlen_q=mx, max_seqlen_k=mx, config_overrides=ov)
        if "cudnn" in impls:
            calls["cudnn"] = "SDPA cannot express packed varlen"
        return calls
    q = torch.randn(c["b"], c["s"], c["h"], c["d"], device="cuda", dtype=dt)
    k = torch.randn(c["b"], c["s"], c["hk"], c["d"], device="cuda", dtype=dt)
    v = torch.randn_like(k)
    win = c["window"]
    if "fa3" in impls:
        import fa3

        calls["fa3"] = lambda: fa3.flash_attn_func(q, k, v, causal=c["causal"], window_size=win)
    if overrides:
        from fa3.hopper.flash_fwd import flash_fwd

        out = torch.empty_like(q)
        lse = torch.empty(c["b"], c["h"], c["s"], device="cuda", dtype=torch.float32)
        for text in overrides:
            calls[f"fa3[{text}]"] = lambda ov=parse_override(text): flash_fwd(
                q, k, v, out, lse, c["d"] ** -0.5, c["causal"],
                window=None if win == (-1, -1) else win, config_overrides=ov)
    if "fa4" in impls:
        try:
            from flash_attn.cute import flash_attn_func as f4

            w4 = (None, None) if win == (-1, -1) else win
            calls["fa4"] = lambda: f4(q, k, v, causal=c["causal"], window_size=w4)
        except Exception as e:  # noqa: BLE001
            calls["fa4"] = f"unavailable: {e!r}"[:200]
    if "cudnn" in impls:
        if win != (-1, -1):
            calls["cudnn"] = "SDPA has no sliding-window mask"
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            from peers import sdpa_fwd

            def cud():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return sdpa_fwd(q, k, v, c["causal"])
            calls["cudnn"] = cud
    return calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="varlen,gqa,window")
    p.add_argument("--impls", default="fa3,fa4,cudnn")
    p.add_argument("--rep-ms", type=float, default=200)
    p.add_argument("--rounds", type=int, default=1,
                   help="time every impl of a case round robin this many times (the first impl "
                        "rotating), report the median: clocks drift by several %% over a run")
    p.add_argument("--override", action="append", default=[],
                   help="k=v[,k=v] FwdConfig overrides, each timed as its own fa3 row (repeatable)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    from timing import bench_ms

    names = set(args.cases.split(","))
    impls = args.impls.split(",")
    device = torch.cuda.get_device_name(0)
    rows, skipped = [], []
    torch.manual_seed(0)
    for c in cases(names):
        fl = flops(c)
        print(f"{c['name']}", flush=True)
        calls = {}
        for impl, call in make_calls(c, impls, args.override).items():
            if not isinstance(call, str):
                try:  # first call compiles (fa3, FA4): never inside a timed round
                    with torch.no_grad():
                        call()
                    torch.cuda.synchronize()
                    calls[impl] = call
                    continue
                except Exception as e:  # noqa: BLE001
                    call = f"FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            skipped.append(dict(case=c["name"], impl=impl, reason=call))
            print(f"  {impl:6} -- {call}", flush=True)
        times = {impl: [] for impl in calls}
        order = list(calls)
        for rnd in range(max(1, args.rounds)):
            for impl in order[rnd % len(order):] + order[:rnd % len(order)] if order else []:
                with torch.no_grad():
                    times[impl].append(bench_ms(calls[impl], 25, args.rep_ms))
        for impl in order:
            ms = statistics.median(times[impl])
            tf = fl / ms / 1e9
            rows.append(dict(case=c["name"], impl=impl, ms=ms, tflops=tf, rounds_ms=times[impl]))
            print(f"  {impl:6} {ms:8.3f} ms {tf:7.1f} TFLOP/s", flush=True)
        torch.cuda.empty_cache()
    doc = dict(device=device, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, flops_rule="4 * visible (q,k) pairs * d * heads", rows=rows,
               unavailable=skipped)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
