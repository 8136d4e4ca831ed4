"""Compile (in parallel, into the fa3 cache) every kernel the FP8 GPU tests and `bench_attn.py --dtype
e4m3` use: the FP8 variants, their rotate+quantize configs, and the bf16 forward on the benchmark's
shapes. Usage: python benchmarks/warm_fp8.py [processes]."""
import os, sys, concurrent.futures
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
def jobs():
    from fa3.hopper import flash_fwd_fp8 as F, flash_fwd as B
    from fa3.hopper.hadamard_quant import HadamardQuantConfig
    out = []
    from fa3.hopper import fp8_vt
    for c in fp8_vt.variants():
        out.append(("fa3.hopper.fp8_vt", c))
    for cfg in F.variants():
        d = cfg.d
        out.append(("fa3.hopper.flash_fwd_fp8", cfg))
        for rows in {cfg.tile_m, cfg.tile_n}:
            for rot in (True, False):
                out.append(("fa3.hopper.hadamard_quant", HadamardQuantConfig("bfloat16", d, rows, rot)))
    for d in (64, 128, 256):
        for causal in (False, True):
            for s in (2048, 16384):
                out.append(("fa3.hopper.flash_fwd", B.default_config(d, d, "bfloat16", causal, seqlen_q=s, seqlen_k=s)))
    seen = []
    for j in out:
        if j not in seen: seen.append(j)
    return seen
def one(job):
    import importlib
    from fa3 import _compile
    try:
        mod = importlib.import_module(job[0])
        _compile.get_kernel(job[1], mod.build)
        return "ok " + str(job[1])[:70]
    except Exception as e:  # noqa: BLE001 - report and go on; the caller compiles it on first use
        return f"FAILED {str(job[1])[:70]}: {type(e).__name__}: {str(e)[:200]}"

if __name__ == "__main__":
    js = jobs(); print(len(js), "jobs", flush=True)
    with concurrent.futures.ProcessPoolExecutor(int(sys.argv[1]) if len(sys.argv) > 1 else 4) as ex:
        for r in ex.map(one, js): print(r, flush=True)
