#!/usr/bin/env python
"""Plot a bench_attn.py JSON in the style of FA3 paper Fig. 5: one panel per (head dim, causal),
grouped bars per sequence length, one bar per implementation, TFLOP/s written on each bar.

    python benchmarks/plot.py benchmarks/results/<file>.json [-o out.png] [--mode fwd|bwd|both]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_utils as U  # noqa: E402

ORDER = ("fa2", "cudnn", "fa4", "fa3-sm80", "fa3")  # fa3 last, as the paper puts its own bar last


def _x_label(key, dup_seq):
    b, sq, sk, h, h_kv = key
    s = U.seqlen_label(sq) if sq == sk else f"{U.seqlen_label(sq)}x{U.seqlen_label(sk)}"
    return f"{s}\nb{b} h{h}" + (f"/{h_kv}" if h != h_kv else "") if dup_seq else s


def plot_rows(doc: dict, path: str, modes=("fwd", "bwd")):
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on the GPU box
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if not r.get("ablation")]
    modes = [m for m in modes if any(r["mode"] == m for r in rows)]
    panels = sorted({(r["mode"], r["d"], r["causal"]) for r in rows}, key=lambda p: (modes.index(p[0]), p[2], p[1]))
    if not panels:
        raise ValueError("no rows to plot")
    impls = [i for i in ORDER if any(r["impl"] == i for r in rows)]
    impls += sorted({r["impl"] for r in rows} - set(impls))
    colors = dict(zip(ORDER, ("#4c72b0", "#55a868", "#8172b2", "#ccb974", "#c44e52")))

    ncol = len({p[1] for p in panels})
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.6 * nrow), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (mode, d, causal) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["mode"], r["d"], r["causal"]) == (mode, d, causal)]
        keys = sorted({(r["b"], r["sq"], r["sk"], r["h"], r["h_kv"]) for r in sel}, key=lambda k: (k[1], k[2], k[0]))
        dup_seq = len({(k[1], k[2]) for k in keys}) < len(keys)
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for xi, key in enumerate(keys):
                r = next((r for r in sel if r["impl"] == impl and (r["b"], r["sq"], r["sk"], r["h"], r["h_kv"]) == key), None)
                if r:
                    xs.append(xi - 0.4 + width * (j + 0.5))
                    ys.append(r["tflops"])
            bars = ax.bar(xs, ys, width, label=impl, color=colors.get(impl))
            ax.bar_label(bars, labels=[f"{y:.0f}" for y in ys], fontsize=6, padding=1)
        ax.set_xticks(range(len(keys)), [_x_label(k, dup_seq) for k in keys], fontsize=8)
        ax.set_title(f"{'Forward' if mode == 'fwd' else 'Backward'}, {'with' if causal else 'without'} "
                     f"causal mask, head dim {d}", fontsize=9)
        ax.set_xlabel("Sequence length", fontsize=8)
        ax.set_ylabel("Speed (TFLOP/s)", fontsize=8)
        ax.margins(y=0.12)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(impls), fontsize=8)  # off the bars
    dt = sel[0]["dtype"] if sel else ""
    gemm = doc.get("gemm_tflops")
    fig.suptitle(f"Attention {dt}, {doc.get('device', '?')}" + (f" (cuBLAS GEMM {gemm:.0f} TFLOP/s)" if gemm else ""),
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json")
    p.add_argument("-o", "--out", help="PNG path (default: the JSON path with .png)")
    p.add_argument("--mode", choices=("fwd", "bwd", "both"), default="both")
    a = p.parse_args(argv)
    doc = json.loads(Path(a.json).read_text())
    out = a.out or str(Path(a.json).with_suffix(".png"))
    try:
        plot_rows(doc, out, ("fwd", "bwd") if a.mode == "both" else (a.mode,))
    except ImportError as e:
        print(f"plot.py: matplotlib is not importable ({e}); pip install matplotlib", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
