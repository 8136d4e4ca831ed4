#!/usr/bin/env python
"""Time the sm80 backward (preprocess + main kernel + dQ conversion) under config overrides
(BwdSm80Config fields), e.g. the hd64 tile, or the cost of the dQ atomics (dQ then left 0):
    python benchmarks/bwd_sm80_tiles.py --d 64 --configs "default;tile_m=64,tile_n=128,warps_m_sdp=2,warps_m_dq=2" --seqlen 4096
    python benchmarks/bwd_sm80_tiles.py --d 128 --configs "default;dq_atomics=0" --causal 0
    python benchmarks/bwd_sm80_tiles.py --d 64 --configs "default;stagger=0" --causal 0

Prints one line per (tile, causal) with ms and TFLOP/s (backward FLOPs = 2.5x forward's, causal
halves); writes JSON rows with --out."""
import argparse
import dataclasses
import json
import math

import torch
from triton.testing import do_bench

from fa3.ampere.flash_bwd_sm80 import BwdSm80Config, flash_bwd_sm80
from fa3.ampere.flash_fwd_sm80 import flash_fwd_sm80


# switches given as 0/1 (dq_atomics, stagger, ...); the module's annotations are strings
BOOL_FIELDS = {f.name for f in dataclasses.fields(BwdSm80Config) if f.type in (bool, "bool")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--configs", default="default;tile_m=64,tile_n=128,warps_m_sdp=2,warps_m_dq=2")
    p.add_argument("--causal", default="0,1")
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--total-tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--out")
    a = p.parse_args()
    s, d = a.seqlen, a.d
    b, h = max(1, a.total_tokens // s), a.hidden // d
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    rows = []
    for causal in (bool(int(c)) for c in a.causal.split(",")):
        out = torch.empty_like(q)
        lse = torch.empty(b, h, s, device="cuda")
        flash_fwd_sm80(q, k, v, out, lse, 1 / math.sqrt(d), causal)
        for tile in a.configs.split(";"):
            ov = {} if tile == "default" else {
                k: (bool(int(v)) if k in BOOL_FIELDS else int(v))
                for k, v in (kv.split("=") for kv in tile.split(","))}
            fn = lambda: flash_bwd_sm80(do, q, k, v, out, lse, 1 / math.sqrt(d), causal, cfg_overrides=ov)  # noqa: E731
            fn()
            ms = do_bench(fn, warmup=25, rep=100)
            flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
            row = dict(d=d, tile=tile, causal=causal, b=b, h=h, seqlen=s, ms=ms,
                       tflops=flops / ms / 1e9, device=torch.cuda.get_device_name())
            rows.append(row)
            print(f"d{d} {tile:24} causal={int(causal)} s{s} {ms:8.3f} ms {row['tflops']:6.1f} TFLOP/s",
                  flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
