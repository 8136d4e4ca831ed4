"""Host cost of one fa3.flash_attn_func call (validation + custom op + TVM-FFI launch) on a tiny
problem with the kernel cached, next to SDPA's flash backend on the same problem."""
import cProfile
import pstats
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fa3


def per_call_us(fn, n=500):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    q = torch.randn(1, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
    qt = q.transpose(1, 2)
    ours = per_call_us(lambda: fa3.flash_attn_func(q, q, q))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa = per_call_us(lambda: torch.nn.functional.scaled_dot_product_attention(qt, qt, qt))
    print(f"call overhead (b1 s128 h2 d64): fa3 {ours:.1f} us/call, SDPA-FA2 {sdpa:.1f} us/call")
    if "--profile" in sys.argv:  # where the host time goes, by function (own time)
        prof = cProfile.Profile()
        prof.enable()
        per_call_us(lambda: fa3.flash_attn_func(q, q, q), n=2000)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
