"""GPU timing per /work/.library/device/METHOD.md: warm-up, many repeats, median, device events."""
from __future__ import annotations

import statistics
import time

import torch

try:
    import triton.testing as _tt
except Exception:  # triton missing or broken: fall back to plain CUDA events
    _tt = None

TIMER = "triton.testing.do_bench(median)" if _tt is not None else "cuda-events(median)"


def bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 100, device: str = "cuda") -> float:
    """Median milliseconds of one fn() call."""
    if device != "cuda":  # harness smoke test on the CPU: a host clock is right there
        return _host_ms(fn, warmup_ms, rep_ms)
    if _tt is not None:
        # do_bench also flushes L2 between calls and keeps the flush out of the timed region.
        return float(_tt.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return _events_ms(fn, warmup_ms, rep_ms)


def _events_ms(fn, warmup_ms: float, rep_ms: float) -> float:
    fn()
    torch.cuda.synchronize()
    # Estimate one call's time to turn the millisecond budgets into counts, as do_bench does.
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(5, int(rep_ms / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends))


def _host_ms(fn, warmup_ms: float, rep_ms: float) -> float:
    fn()
    times, t_end = [], time.perf_counter() + (warmup_ms + rep_ms) / 1e3
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cycling(fns):
    """A closure that calls the next of fns each time: rotating input sets between iterations keeps
    a short shape's inputs from sitting in L2 and flattering it."""
    state = {"i": 0}

    def call():
        f = fns[state["i"]]
        state["i"] = (state["i"] + 1) % len(fns)
        return f()

    return call


def gemm_tflops(n: int = 8192, dtype=torch.bfloat16, n_sets: int = 3) -> float:
    """cuBLAS roofline for this run: median TFLOP/s of an n^3 torch.mm on random inputs."""
    g = torch.Generator(device="cuda").manual_seed(0)
    sets = [(torch.randn(n, n, device="cuda", dtype=dtype, generator=g),
             torch.randn(n, n, device="cuda", dtype=dtype, generator=g)) for _ in range(n_sets)]
    out = torch.empty(n, n, device="cuda", dtype=dtype)
    ms = bench_ms(cycling([lambda a=a, b=b: torch.mm(a, b, out=out) for a, b in sets]),
                  warmup_ms=100, rep_ms=300)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12
