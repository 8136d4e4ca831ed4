"""Quick Hopper forward benchmark: fa3 vs FA4 (CuTe DSL) vs cuDNN SDPA vs SDPA-FA2, one process.

16k tokens total, hidden 2048: (b = 16384 / s, h = 2048 / d, s) for s in 1k, 4k, 16k; bf16; random
inputs; median of triton.testing.do_bench (falls back to CUDA events). FLOPs = 4 b h sq sk d
(halved for causal). Also an ablation of fa3's switches at hd128. Prints a table; with --out DIR
writes the rows as JSON lines too.

    python benchmarks/fwd_quick.py [--hd 64,128,256] [--seqlens 1024,4096,16384] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch


def bench_ms(fn, reps=30):
    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    except ImportError:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return sorted(ts)[len(ts) // 2]


def impls(q, k, v, causal, scale):
    from fa3.hopper.flash_fwd import flash_fwd

    b, s, h, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, device=q.device, dtype=torch.float32)
    res = {"fa3": lambda: flash_fwd(q, k, v, out, lse, scale, causal)}
    try:
        from flash_attn.cute import flash_attn_func

        res["FA4"] = lambda: flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    except Exception as e:  # noqa: BLE001
        print("FA4 unavailable:", e, file=sys.stderr)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    for name, be in (("cuDNN", SDPBackend.CUDNN_ATTENTION), ("SDPA-FA2", SDPBackend.FLASH_ATTENTION)):
        def f(be=be):
            with sdpa_kernel(be):
                return sdpa(qt, kt, vt, is_causal=causal, scale=scale)
        res[name] = f
    return res


BOOL_FIELDS = ("overlap", "pingpong", "persistent", "rescale_early", "o_in_q")


def parse_variants(text):
    """'pp0:pingpong=0;tn128@128:tile_n=128' -> {'fa3 pp0': (None, {'pingpong': False}),
    'fa3 tn128': (128, {'tile_n': 128})}: a name ending in @D is timed at head dim D only."""
    out = {}
    for item in filter(None, text.split(";")):
        name, _, kvs = item.partition(":")
        name, _, hd = name.partition("@")
        cfg = {}
        for kv in filter(None, kvs.split(",")):
            k, v = kv.split("=")
            cfg[k] = bool(int(v)) if k in BOOL_FIELDS else int(v)
        out["fa3 " + name] = (int(hd) if hd else None, cfg)
    return out


def run_shape(d, s, causal, rows, ablate=False, variants=None, skip=()):
    b, h = max(1, 16384 // s), 2048 // d
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = d ** -0.5
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    fns = {n: f for n, f in impls(q, k, v, causal, scale).items() if n not in skip}
    if ablate:
        from fa3.hopper.flash_fwd import flash_fwd

        out = torch.empty_like(q)
        lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        fns = {"fa3": fns["fa3"]}
        for name, cfg in (("no-overlap", dict(overlap=False)), ("no-pingpong", dict(pingpong=False)),
                          ("neither", dict(overlap=False, pingpong=False)),
                          ("non-persistent", dict(persistent=False))):
            fns["fa3 " + name] = (lambda cfg=cfg: flash_fwd(q, k, v, out, lse, scale, causal, config_overrides=cfg))
    if variants:
        from fa3.hopper.flash_fwd import flash_fwd

        out_v = torch.empty_like(q)
        lse_v = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        for name, (hd, cfg) in variants.items():
            if hd is not None and hd != d:
                continue
            fns[name] = (lambda cfg=cfg: flash_fwd(q, k, v, out_v, lse_v, scale, causal, config_overrides=cfg))
    row = dict(d=d, s=s, b=b, h=h, causal=causal)
    for name, fn in fns.items():
        try:
            fn()  # compiles on first use
            torch.cuda.synchronize()
            ms = bench_ms(fn)
            row[name] = round(flops / ms / 1e9, 1)
        except Exception as e:  # noqa: BLE001
            row[name] = None
            print(f"{name} d{d} s{s} causal{causal}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
    rows.append(row)
    cols = [c for c in row if c not in ("d", "s", "b", "h", "causal")]
    print(f"hd{d:<3} s{s:<6} b{b:<3} h{h:<3} {'causal' if causal else 'full  '} | " +
          "  ".join(f"{c} {row[c] if row[c] is not None else '-':>6}" for c in cols), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hd", default="64,128,256")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--ablate", default="8192")
    ap.add_argument("--variants", default="", help="extra fa3 configs timed on every shape, "
                    "e.g. 'pp0:pingpong=0;tn128:tile_n=128'")
    ap.add_argument("--skip", default="", help="implementations not to time, e.g. 'SDPA-FA2'")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), "TFLOP/s (bf16 fwd, median)")
    rows = []
    for d in map(int, a.hd.split(",")):
        for causal in (c == "1" for c in a.causal.split(",")):
            for s in map(int, a.seqlens.split(",")):
                run_shape(d, s, causal, rows, variants=parse_variants(a.variants),
                          skip=a.skip.split(","))
    for s in (int(x) for x in a.ablate.split(",") if x):
        for causal in (False, True):
            run_shape(128, s, causal, rows, ablate=True)
    if a.out:
        with open(os.path.join(a.out, "fwd_quick.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
