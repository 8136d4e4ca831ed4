"""`bench_attn.py --dtype e4m3`: fa3's FP8 forward, with its roofline and costs, in one process.

Rows (dtype "e4m3", mode "fwd"; TFLOP/s counts attention FLOPs only):
  fa3            the FP8 kernel on pre-quantized inputs (e4m3 Q, K, Vt + block scales): FA3's number
  fa3-e2e        flash_attn_fp8_func from bf16: rotate+quantize Q, K (fused kernel), quantize V,
                 build Vt, attention (block quantization and incoherent processing on)
  fa3-quant      the rotate+quantize steps of fa3-e2e alone (hadamard_quant Q, K; fp8_vt V -> Vt; its
                 TFLOP/s column is what the attention FLOPs would be worth in that time: compare ms)
  fa3-vt         building Vt from e4m3 V alone (fp8_vt copy mode: FA3-style callers pay this)
  fa3-vt-torch   the same with torch ops (flash_fwd_fp8.vt_layout, the reference)
  fa3-prequant   fa3.flash_attn_func on e4m3 q/k/v cast from randn, no descales: FA3's fp8 benchmark
                 recipe (includes the V -> Vt copy)
  fa3[k=v,...]   the FP8 kernel with config overrides (flash_fwd_fp8.ABLATIONS); fa3 rows also carry
                 rel_err_vs_bf16, ||out - out_bf16|| / ||out_bf16|| against the bf16 kernel (a sanity check)
and dtype "bf16": fa3 (the bf16 kernel) on the same shapes. Roofline: torch._scaled_mm e4m3 8192^3
(and the bf16 cuBLAS GEMM) measured in the same run.
"""
from __future__ import annotations

import math

import torch

import bench_utils as U
from timing import bench_ms, cycling


def scaled_mm_tflops(n: int = 8192, n_sets: int = 3) -> float:
    """Median TFLOP/s of torch._scaled_mm on e4m3 n^3 (row-major A, column-major B, bf16 out)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    one = torch.ones((), device="cuda")
    sets = [(torch.randn(n, n, device="cuda", generator=g).to(torch.float8_e4m3fn),
             torch.randn(n, n, device="cuda", generator=g).to(torch.float8_e4m3fn).t()) for _ in range(n_sets)]
    fns = [lambda a=a, b=b: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16) for a, b in sets]
    ms = bench_ms(cycling(fns), warmup_ms=100, rep_ms=300)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


def run(shapes, args, log):
    """Time every row above for each shape; returns (rows, extras dict)."""
    import fa3
    from fa3.fp8 import prepare_fp8, quantize_fp8
    from fa3.hopper.fp8_vt import make_vt
    from fa3.hopper.flash_fwd import flash_fwd
    from fa3.hopper.flash_fwd_fp8 import ABLATIONS, default_config, flash_fwd_fp8, vt_layout

    rows = []
    extras = {"scaled_mm_e4m3_tflops": scaled_mm_tflops()}
    log(f"torch._scaled_mm e4m3 8192^3: {extras['scaled_mm_e4m3_tflops']:.1f} TFLOP/s")
    for i, sh in enumerate(shapes):
        log(f"[{i + 1}/{len(shapes)}] {sh.label()}")
        scale = sh.d ** -0.5
        per_set = sh.b * (sh.sq * sh.h + 2 * sh.sk * sh.h_kv) * sh.d * 2
        n = int(min(8, max(2, math.ceil(3 * 50e6 / per_set))))
        sets = [(torch.randn(sh.b, sh.sq, sh.h, sh.d, device="cuda", dtype=torch.bfloat16),
                 torch.randn(sh.b, sh.sk, sh.h_kv, sh.d, device="cuda", dtype=torch.bfloat16),
                 torch.randn(sh.b, sh.sk, sh.h_kv, sh.d, device="cuda", dtype=torch.bfloat16))
                for _ in range(n)]
        cfg = default_config(sh.d, sh.d, sh.causal, sh.sq, sh.sk)
        quant = [quantize_fp8(q, k, v, cfg, True, True, 0) for q, k, v in sets]  # V natural layout
        pre = [prepare_fp8(q, k, v, cfg, True, True, 0) for q, k, v in sets]
        out = torch.empty(sh.b, sh.sq, sh.h, sh.d, device="cuda", dtype=torch.bfloat16)
        lse = torch.empty(sh.b, sh.h, sh.sq, device="cuda", dtype=torch.float32)
        fa3_style = [tuple(t.to(torch.float8_e4m3fn) for t in s) for s in sets]
        cells = {
            ("fa3", "e4m3"): [lambda p=p: flash_fwd_fp8(*p, out, lse, scale, sh.causal, cfg) for p in pre],
            ("fa3-e2e", "e4m3"): [lambda s=s: fa3.flash_attn_fp8_func(*s, causal=sh.causal) for s in sets],
            ("fa3-quant", "e4m3"): [lambda s=s: prepare_fp8(*s, cfg, True, True, 0) for s in sets],
            ("fa3-vt", "e4m3"): [lambda qq=qq: make_vt(qq[2], cfg.tile_n) for qq in quant],
            ("fa3-vt-torch", "e4m3"): [lambda qq=qq: vt_layout(qq[2]) for qq in quant],
            # FA3's own fp8 benchmark recipe: randn cast to e4m3, no descales (scale 1 on our block
            # quantized values would make P one-hot, and an idle PV GEMM flatters the clock)
            ("fa3-prequant", "e4m3"): [lambda x=x: fa3.flash_attn_func(*x, causal=sh.causal)
                                       for x in fa3_style],
            ("fa3", "bf16"): [lambda s=s: flash_fwd(*s, out, lse, scale, sh.causal) for s in sets],
        }
        # tile/schedule ablations of the FP8 kernel (flash_fwd_fp8.ABLATIONS): inputs re-quantized
        # for each config's tiles (the block scales follow the tiles); rel_err vs the bf16 kernel
        ref = None
        for d_, causal_, over in ABLATIONS:
            if (d_, causal_) != (sh.d, sh.causal):
                continue
            acfg = default_config(sh.d, sh.d, sh.causal, sh.sq, sh.sk, **over)
            apre = [prepare_fp8(q, k, v, acfg, True, True, 0) for q, k, v in sets]
            name = "fa3[" + ",".join(f"{a}={b}" for a, b in over.items()) + "]"
            cells[(name, "e4m3")] = [lambda p=p, c=acfg: flash_fwd_fp8(*p, out, lse, scale, sh.causal, c)
                                     for p in apre]
        for (impl, dtype), fns in cells.items():
            try:
                with torch.no_grad():
                    fns[0]()
                    torch.cuda.synchronize()
                    ms = bench_ms(cycling(fns), args.warmup_ms, args.rep_ms)
            except Exception as e:  # noqa: BLE001 - one cell failing must not end the run
                log(f"  {impl} {dtype}: FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            extra = {}
            if dtype == "e4m3" and (impl.startswith("fa3[") or impl == "fa3"):
                fns[0]()
                if ref is None:
                    ref = torch.empty_like(out)
                    flash_fwd(*sets[0], ref, lse, scale, sh.causal)
                    fns[0]()
                extra["rel_err_vs_bf16"] = float((out.float() - ref.float()).norm() / ref.float().norm())
            row = U.make_row(impl, "fwd", dtype, sh, ms, **extra)
            rows.append(row)
            err = f"  rel_err {extra['rel_err_vs_bf16']:.1e}" if extra else ""
            log(f"  {impl:34} {dtype:5} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s{err}")
        del sets, quant, pre, fa3_style
        torch.cuda.empty_cache()
    return rows, extras
