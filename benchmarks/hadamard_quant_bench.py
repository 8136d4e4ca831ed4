"""GB/s of fa3.hopper.hadamard_quant vs a same-run torch device copy (16k tokens, hidden 2048).

    python benchmarks/hadamard_quant_bench.py [--seqlen 16384] [--hidden 2048] [--block-rows 128]
        [--before OLD_hadamard_quant.py] [--json out.json]

Bytes moved: the kernel reads x (2 B/elem) and writes fp8 (1 B/elem) + the scales; the copy reads and
writes x (4 B/elem). Times are the median of CUDA-event-timed runs with the L2 flushed before each;
a GPU sleep after the flush (~0.5 ms: longer than a call's host cost, which reached ~80 us on an
H100 host, where a 50 us sleep let host time leak into the timing) makes sure the host has queued
the call before the start event fires, so Python/launch overhead never counts. ``--before`` loads another version of the kernel
module from a file (e.g. ``git show REV:hopper/hadamard_quant.py``) and times it in the same run.
"""
import argparse
import importlib.util
import json
import statistics

import torch

from fa3 import fp8_emulation as emu


def do_bench(fn, reps=50, warmup=10):
    """Median milliseconds of fn() (each run preceded by an L2 flush that is not timed)."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        torch.cuda._sleep(1_000_000)  # ~0.5 ms: the host queues fn() before the start event fires
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def load_module(path):
    """A kernel module from a file, under its own name (so its compile-cache entries stay apart)."""
    spec = importlib.util.spec_from_file_location("hadamard_quant_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_gbps(d, seqlen=16384, hidden=2048, batch=1, block_rows=128, rotate=True, dtype=torch.bfloat16,
               module=None, lanes=0, values=0):
    """Returns dict(d, ms, gbps, copy_gbps, frac) for one head dim."""
    if module is None:
        from fa3.hopper import hadamard_quant as module
    hadamard_quant = getattr(module, "hadamard_quant", None)

    h = hidden // d
    x = torch.randn(batch, seqlen, h, d, device="cuda", dtype=dtype)
    signs = emu.random_signs(d, seed=0, device="cuda")
    kw = dict(lanes=lanes) if lanes else {}
    if values:
        kw["values"] = values
    if module == "cast":  # torch's bf16 -> e4m3 cast: the same bytes moved, next to no arithmetic
        q, sc = torch.empty(x.shape, device="cuda", dtype=torch.float8_e4m3fn), x.new_empty(0)
        ms = do_bench(lambda: q.copy_(x))
    else:
        q, sc = hadamard_quant(x, signs, block_rows, rotate, **kw)  # compile / load outside the timing
        ms = do_bench(lambda: hadamard_quant(x, signs, block_rows, rotate, out=q, out_scales=sc, **kw))
    nbytes = x.numel() * x.element_size() + q.numel() + sc.numel() * 4
    y = torch.empty_like(x)
    copy_ms = do_bench(lambda: y.copy_(x))
    copy_bytes = 2 * x.numel() * x.element_size()
    gbps, copy_gbps = nbytes / ms / 1e6, copy_bytes / copy_ms / 1e6
    return dict(d=d, ms=ms, gbps=gbps, copy_gbps=copy_gbps, frac=gbps / copy_gbps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block-rows", type=int, default=128)
    p.add_argument("--no-rotate", action="store_true")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--before", default=None, help="another hadamard_quant.py to time in the same run")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--lanes", default="0", help="comma list of lanes per row to time (0: default)")
    p.add_argument("--values", default="0", help="comma list of fp32 values per thread to time "
                   "(0: default 64; 32 doubles the threads per SM)")
    p.add_argument("--extras", action="store_true", help="also time the no-rotate path and torch's "
                   "bf16 -> e4m3 cast (same bytes moved)")
    a = p.parse_args()
    device = torch.cuda.get_device_name()
    print(f"{device}  tokens={a.batch * a.seqlen} hidden={a.hidden} "
          f"block_rows={a.block_rows} rotate={not a.no_rotate} {a.dtype}")
    print(f"{'kernel':>7} {'hd':>4} {'ms':>8} {'GB/s':>8} {'copy GB/s':>10} {'of copy':>8}")
    impls = [(f"after{'-L' + ln if ln != '0' else ''}{'-V' + vs if vs != '0' else ''}", None, int(ln),
              not a.no_rotate, int(vs))
             for ln in a.lanes.split(",") for vs in a.values.split(",")]
    impls += [("before", load_module(a.before), 0, not a.no_rotate, 0)] if a.before else []
    impls += [("norot", None, 0, False, 0), ("cast", "cast", 0, False, 0)] if a.extras else []
    rows = []
    for d in (64, 128, 256):
        for name, mod, lanes, rotate, values in impls:
            r = bench_gbps(d, a.seqlen, a.hidden, a.batch, a.block_rows, rotate,
                           getattr(torch, a.dtype), module=mod, lanes=lanes, values=values)
            rows.append(dict(kernel=name, **r))
            print(f"{name:>7} {d:>4} {r['ms']:>8.4f} {r['gbps']:>8.0f} {r['copy_gbps']:>10.0f} "
                  f"{r['frac']:>8.0%}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, args=vars(a), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
