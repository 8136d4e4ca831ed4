#!/usr/bin/env python
"""Interleaved repeat timing of fa3's backward (the whole call: preprocess, main kernel, dQ
conversion) under config overrides, in one process; each round times every config once, and the
table reports each config's median round. --peers adds other implementations to every round
(their backward as bench_attn.py times it: autograd.grad through their forward's graph).

    python benchmarks/bwd_repeat.py --backend sm90 --shape 1,16384,32,64,0 --override stagger=False
    python benchmarks/bwd_repeat.py --shape 1,16384,8,256,1 --override dq_red=True --peers fa4,cudnn
    python benchmarks/bwd_repeat.py --shape 4,4096,8,256,0 --override deterministic=True  (its cost)
    python benchmarks/bwd_repeat.py --backend sm80 --shape 4,4096,32,64,0 --override stagger=False
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("sm90", "sm80"), default="sm90")
    p.add_argument("--shape", action="append", required=True,
                   help="b,s,h,d,causal[,h_kv[,dv]] (repeatable; h_kv < h: GQA; dv: V's head dim, "
                        "192,...,128: DeepSeek's)")
    p.add_argument("--override", action="append", default=[], help="k=v[,k=v] config overrides (repeatable)")
    p.add_argument("--peers", default="", help="comma list of peers timed in each round (e.g. fa4,cudnn)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import torch

    import bench_utils as U
    import peers
    from fwd_repeat import parse_override, time_rounds
    from timing import cycling

    if a.backend == "sm90":
        from fa3.hopper.flash_bwd import flash_bwd as bwd
        from fa3.hopper.flash_fwd import flash_fwd as fwd
    else:
        from fa3.ampere.flash_bwd_sm80 import flash_bwd_sm80 as bwd
        from fa3.ampere.flash_fwd_sm80 import flash_fwd_sm80 as fwd
    impls = peers.load_available(a.peers)
    results = []
    for text in a.shape:
        b, s, h, d, causal, *rest = (int(x) for x in text.split(","))
        hk = rest[0] if rest else h
        dv = rest[1] if len(rest) > 1 else d
        sh = U.Shape(b, s, s, h, hk, d, bool(causal))
        scale = 1 / math.sqrt(d)
        sets = []
        for _ in range(2):
            q, k, v, do = (torch.randn(b, s, hh, dd, device="cuda", dtype=torch.bfloat16)
                           for hh, dd in ((h, d), (hk, d), (hk, dv), (h, dv)))
            out, lse = torch.empty_like(do), torch.empty(b, h, s, device="cuda")
            fwd(q, k, v, out, lse, scale, sh.causal)
            sets.append((do, q, k, v, out, lse))
        cells = {}
        for ov_text in ["default"] + a.override:
            ov = parse_override(ov_text)
            det = bool(ov.pop("deterministic", False))  # an argument of its own, not a config field
            cells[ov_text] = cycling([lambda x=x, ov=ov, det=det: bwd(*x, scale, sh.causal, det,
                                                                      cfg_overrides=ov or None)
                                      for x in sets])
        for impl in impls:  # the peer's own forward graph per input set, its backward timed
            graphs = []
            for do, q, k, v, _, _ in sets:
                qkv = tuple(t.detach().requires_grad_() for t in (q, k, v))
                try:
                    impl.check(sh, "bwd")
                    with impl.context(), torch.enable_grad():
                        graphs.append((impl.fwd(*qkv, sh.causal), qkv, do))
                except Exception as e:  # noqa: BLE001 - a peer failing must not end the run
                    print(f"  [{impl.name}] skipped: {type(e).__name__}: {str(e)[:200]}")
                    break
            else:
                def grad(g, impl=impl):
                    with impl.context():
                        return torch.autograd.grad(g[0], g[1], g[2], retain_graph=True)
                cells[impl.name] = cycling([lambda g=g, f=grad: f(g) for g in graphs])
        # (dv != d: QK^T-side GEMMs count d, PV-side ones dv: the mean head dim)
        flops = U.attn_flops(b, s, s, h, d, sh.causal, "bwd") * (d + dv) / (2 * d)
        label = sh.label() + ("" if dv == d else f" dv={dv}")
        times, tf, line = time_rounds(cells, a.rounds, label, flops)
        print(f"{a.backend} {label:40} {line}", flush=True)
        results.append({"shape": label, "b": b, "s": s, "h": h, "h_kv": hk, "d": d, "dv": dv,
                        "causal": bool(causal),
                        "tflops_median": tf, "rounds_ms": times})
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "backend": a.backend,
                                           "rounds": a.rounds, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
