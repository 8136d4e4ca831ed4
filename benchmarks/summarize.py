#!/usr/bin/env python
"""Re-read saved benchmark runs (bench_attn.py's JSON): the TFLOP/s table with fa3's ratios, and
the issues' targets read off each run (fa3 over the best of FA4 / cuDNN per row, the rows below it
and whether the run's rounds settle them, the forward over the same run's GEMM rate).

    python benchmarks/summarize.py benchmarks/results/h100-2026-12-07-s14-fwd-matrix.json
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_utils as U  # noqa: E402


def summarize(doc: dict, table: bool = True) -> str:
    rows = [r for r in doc.get("rows", []) if isinstance(r, dict) and all(k in r for k in U.ROW_KEYS)]
    impls = sorted({r["impl"] for r in rows if not r.get("ablation")}, key=lambda n: (n != "fa3", n))
    head = f"{doc.get('device', '?')}  {doc.get('date', '?')}"
    if doc.get("gemm_tflops"):
        head += f"  GEMM {doc['gemm_tflops']:.1f} TFLOP/s"
    parts = [head]
    if table:
        parts.append(U.format_table(rows, impls))
    targets = U.format_targets(rows, gemm_tflops=doc.get("gemm_tflops"))
    parts.append(targets or "(no fa3 row with a target peer)")
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="bench_attn.py result files")
    p.add_argument("--targets-only", action="store_true", help="skip the table")
    a = p.parse_args(argv)
    for i, path in enumerate(a.json):
        if i:
            print()
        print(summarize(json.loads(Path(path).read_text()), table=not a.targets_only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
