#!/usr/bin/env python
"""Interleaved repeat timing of fa3's bf16 Hopper forward under config overrides, next to FA4 and
cuDNN (SDPA), in one process. Each round times every cell once (round robin), so clock and thermal
drift hit all cells alike; the table reports each cell's median over rounds. For tile/schedule
experiments on a few shapes; `bench_attn.py --rounds` is the full matrix.

    python benchmarks/fwd_repeat.py --shape 32,512,8,256,0 --shape 16,1024,8,256,1 \
        --override tile_n=64 --override tile_n=64,o_in_q=True --rounds 3 --out sweep.json
"""
import argparse
import ast
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_override(text: str) -> dict:
    """'tile_n=64,o_in_q=True' -> {'tile_n': 64, 'o_in_q': True}; 'default' -> {}."""
    if text == "default":
        return {}
    return {k.strip(): ast.literal_eval(v.strip()) for k, v in (kv.split("=") for kv in text.split(","))}


def time_rounds(cells: dict, rounds: int, label: str, flops: float) -> tuple[dict, dict, str]:
    """Call every cell once (a cell that fails to build or run is reported and dropped), then time
    them round robin `rounds` times, each round starting one cell later (on long shapes the
    clocks drift within a round: s17, H100, the first cell of every round drifted 17.8 -> 20.3 ms
    while the same config in another cell held 17.7-17.8). -> (ms per cell per round, median
    TFLOP/s per cell, a table line with each cell's ratio to "default")."""
    import torch

    from timing import bench_ms

    for k, fn in list(cells.items()):
        try:
            fn()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            print(f"  {label} [{k}] failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            del cells[k]
    times = {k: [] for k in cells}
    order = list(cells.items())
    for r in range(rounds if order else 0):
        for k, fn in order[r % len(order):] + order[:r % len(order)]:
            times[k].append(bench_ms(fn))
    tf = {k: flops / statistics.median(v) / 1e9 for k, v in times.items()}
    base = tf.get("default")
    line = "  ".join(f"{k} {v:.0f}" + (f" ({v / base:.3f})" if base and k != "default" else "")
                     for k, v in tf.items())
    return times, tf, line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", required=True, help="b,s,h,d,causal[,h_kv] (repeatable; h_kv < h: GQA)")
    p.add_argument("--override", action="append", default=[], help="k=v[,k=v] FwdConfig overrides (repeatable)")
    p.add_argument("--peers", default="fa4,cudnn", help="comma list of peers timed in each round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", default=None, help="L,R: a sliding window for every shape (FA4 the only peer)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import torch

    import bench_utils as U
    import peers
    from timing import cycling

    from fa3.hopper.flash_fwd import flash_fwd

    impls = peers.load_available(a.peers)
    window = tuple(int(x) for x in a.window.split(",")) if a.window else None
    assert window is None or window[1] == 0, "--window L,0 (causal sliding window) only"
    results = []
    for text in a.shape:
        b, s, h, d, causal, *rest = (int(x) for x in text.split(","))
        hk = rest[0] if rest else h
        sh = U.Shape(b, s, s, h, hk, d, bool(causal))
        sets = [tuple(torch.randn(b, s, hh, d, device="cuda", dtype=torch.bfloat16) for hh in (h, hk, hk))
                for _ in range(3)]
        out = torch.empty(b, s, h, d, device="cuda", dtype=torch.bfloat16)
        lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
        cells = {}
        for ov_text in ["default"] + a.override:
            ov = parse_override(ov_text)
            cells[ov_text] = cycling([lambda x=x, ov=ov: flash_fwd(*x, out, lse, d ** -0.5, sh.causal,
                                                                   window=window, config_overrides=ov or None)
                                      for x in sets])
        assert not window or causal, "--window L,0 is a causal window: give causal=1 shapes"
        if window:  # the SDPA peers have no window mask; FA4 takes it directly
            from flash_attn.cute import flash_attn_func as f4

            cells["fa4"] = cycling([lambda x=x: f4(*x, causal=sh.causal, window_size=window) for x in sets])
        for impl in ([] if window else impls):
            def call(x, impl=impl):
                with impl.context():
                    return impl.fwd(*x, sh.causal)
            cells[impl.name] = cycling([lambda x=x, c=call: c(x) for x in sets])
        fl = U.attn_flops(b, s, s, h, d, sh.causal, "fwd")
        if window:  # only the visible (q, k) pairs count
            from bench_features import visible_pairs

            fl = 4.0 * visible_pairs(s, s, True, window[0]) * d * h * b
        times, tf, line = time_rounds(cells, a.rounds, sh.label() + (f" window {window}" if window else ""), fl)
        print(f"{sh.label():40} {line}", flush=True)
        results.append({"shape": sh.label(), "b": b, "s": s, "h": h, "h_kv": hk, "d": d, "causal": bool(causal),
                        "tflops_median": tf, "rounds_ms": times})
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rounds": a.rounds,
                                           "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
