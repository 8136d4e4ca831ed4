#!/usr/bin/env bash
# One call on the lent GPU: every GPU test, then a short benchmark matrix, then one compact table.
# Full logs go to $OUT (or ./gpu-out). Run from the repo root after the CuTe DSL setup (README).
#   usage: bash tools/gpu_harness.sh [quick|full]
set -uo pipefail
mode=${1:-quick}
out=${OUT:-gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 FA3_CACHE_DIR=${FA3_CACHE_DIR:-/tmp/fa3-cache}
python3 -c "import fa3" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > "$out/gpu.csv" 2>&1
fa3 info | tee "$out/info.txt"
python3 -m pytest -q -ra -m gpu tests --junitxml="$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}
bench_args=(--quick)
[ "$mode" = full ] && bench_args=()
if [ -f benchmarks/bench_attn.py ]; then
  python3 benchmarks/bench_attn.py "${bench_args[@]}" --out "$out/bench.json" 2> "$out/bench.log" | tee "$out/bench_table.txt"
fi
for extra in benchmarks/hadamard_quant_bench.py; do
  [ -f "$extra" ] && python3 "$extra" 2>&1 | tee "$out/$(basename "$extra" .py).txt"
done
python3 - "$out/gpu_tests.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    s = ET.parse(sys.argv[1]).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    t, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
    print(f"GPU tests: {t - f - e - k} passed, {f + e} failed, {k} skipped")
except Exception as ex:
    print("GPU tests: no report", ex)
PY
exit $tests_rc
