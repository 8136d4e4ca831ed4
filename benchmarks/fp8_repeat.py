#!/usr/bin/env python
"""Interleaved repeat timing of fa3's FP8 forward configs on one shape, next to torch._scaled_mm, in
one process: each round times every config once (round robin), so clock and thermal drift hit all
configs alike; the table reports each config's median over rounds.

    python benchmarks/fp8_repeat.py --shape 1,16384,8,256,0 --rounds 5 --override stages=2 --override persistent=False
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1,16384,8,256,0", help="b,s,h,d,causal")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--override", action="append", default=[], help="k=v[,k=v] config overrides (repeatable)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import torch

    import bench_utils as U
    from fp8_bench import scaled_mm_tflops
    from timing import bench_ms, cycling

    from fa3.fp8 import prepare_fp8
    from fa3.hopper.flash_fwd_fp8 import default_config, flash_fwd_fp8

    b, s, h, d, causal = (int(x) for x in a.shape.split(","))
    sh = U.Shape(b, s, s, h, h, d, bool(causal))
    sets = [tuple(torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for _ in range(2)]
    out = torch.empty(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
    cells = {}
    for text in ["default"] + a.override:
        over = {} if text == "default" else {k: eval(v) for k, v in (kv.split("=") for kv in text.split(","))}
        cfg = default_config(d, d, sh.causal, s, s, **over)
        pre = [prepare_fp8(*x, cfg, True, True, 0) for x in sets]
        cells[text] = cycling([lambda p=p, c=cfg: flash_fwd_fp8(*p, out, lse, d ** -0.5, sh.causal, c) for p in pre])
        cells[text]()
    times = {k: [] for k in cells}
    mm = []
    for _ in range(a.rounds):
        mm.append(scaled_mm_tflops(n_sets=2))
        for k, fn in cells.items():
            times[k].append(bench_ms(fn, 50, 200))
    flops = U.attn_flops(b, s, s, h, d, sh.causal, "fwd")
    res = {"device": torch.cuda.get_device_name(0), "shape": sh.label(), "rounds": a.rounds,
           "scaled_mm_e4m3_tflops": mm,
           "configs": {k: {"ms": v, "tflops_median": flops / statistics.median(v) / 1e9} for k, v in times.items()}}
    print(f"{res['device']} {sh.label()}: torch._scaled_mm e4m3 median {statistics.median(mm):.1f} TFLOP/s")
    for k, v in res["configs"].items():
        tf = v["tflops_median"]
        print(f"  {k:32} {tf:7.1f} TFLOP/s  ({tf / statistics.median(mm):.1%} of scaled_mm)  "
              f"rounds {[round(flops / t / 1e9) for t in v['ms']]}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
