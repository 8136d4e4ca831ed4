#!/usr/bin/env bash
# One call on the lent GPU: every GPU test, then a benchmark matrix, then one compact table.
# Logs go to $OUT (or ./gpu-out), at most 8 files. Run from the repo root after the DSL setup.
#   usage: [BENCH_ARGS=...] bash tools/gpu_harness.sh [quick|full|tests|bench] [extra pytest args...]
set -uo pipefail
mode=${1:-quick}; shift || true
out=${OUT:-gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 FA3_CACHE_DIR=${FA3_CACHE_DIR:-/tmp/fa3-cache}
python3 -c "import fa3" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv; python3 -m fa3 info; } > "$out/info.txt" 2>&1
head -12 "$out/info.txt"
tests_rc=0
if [ "$mode" != bench ]; then
  python3 -m pytest -q -ra -m gpu tests --junitxml="$out/gpu_tests.xml" "$@" > "$out/gpu_tests.log" 2>&1
  tests_rc=$?
  grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -20
  tail -1 "$out/gpu_tests.log"
fi
if [ "$mode" != tests ]; then
  bench_args=(--quick)
  [ "$mode" = full ] && bench_args=()
  [ -n "${BENCH_ARGS:-}" ] && read -r -a bench_args <<< "$BENCH_ARGS"  # e.g. "--mode fwd"
  python3 benchmarks/bench_attn.py "${bench_args[@]}" --out "$out/bench.json" --plot "$out/bench.png" 2> "$out/bench.log"
  for extra in benchmarks/call_overhead.py benchmarks/hadamard_quant_bench.py; do
    python3 "$extra" 2>&1
  done | tee "$out/extras.txt"
fi
python3 - "$out/gpu_tests.xml" <<'PY'
import os, sys, xml.etree.ElementTree as ET
if os.path.exists(sys.argv[1]):
    s = ET.parse(sys.argv[1]).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    t, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
    print(f"GPU tests: {t - f - e - k} passed, {f + e} failed, {k} skipped")
PY
exit $tests_rc
