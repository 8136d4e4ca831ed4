#!/usr/bin/env bash
# One lent-GPU pass for the FP8 forward: compile (parallel), GPU tests, benchmark, fp8-eval with the
# kernels. Logs and JSON under $OUT (default ./gpu-out). Run from the repo root after the DSL set-up.
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export FA3_CACHE_DIR=${FA3_CACHE_DIR:-/tmp/fa3c} PYTHONUNBUFFERED=1 FA3_FP8_REPORT=$OUT/agree.jsonl
(time timeout 150 python3 benchmarks/warm_fp8.py 16) > "$OUT/warm.log" 2>&1
grep -c "^ok" "$OUT/warm.log"; grep FAILED "$OUT/warm.log" | head -3; grep real "$OUT/warm.log"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_fwd_gpu.py > "$OUT/test.log" 2>&1
grep -E "passed|failed" "$OUT/test.log" | tail -1; grep FAILED "$OUT/test.log" | head -8
timeout 240 python3 benchmarks/bench_attn.py --dtype e4m3 --hdim 64,128,256 --seqlen 2k,16k \
  --causal both --out "$OUT/fp8.json" > "$OUT/bench.out" 2> "$OUT/bench.log"
grep -E "GEMM|scaled_mm" "$OUT/bench.out"; grep -E "^fwd|geomean" "$OUT/bench.out" | cut -c1-150 | head -30
timeout 120 python3 -m fa3 fp8-eval --seeds 1 --json "$OUT/eval.json" > "$OUT/eval.out" 2> "$OUT/eval.log"
tail -7 "$OUT/eval.out"
