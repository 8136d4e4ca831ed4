"""Pure helpers for the attention benchmark: shapes, FLOP counts, JSON rows, ratios.

Nothing here touches a GPU (or imports torch), so tests/test_bench_utils.py checks it on the CPU.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

# The JSON row schema other tools read: keep exactly these names (extra keys are allowed).
ROW_KEYS = ("impl", "mode", "dtype", "b", "sq", "sk", "h", "h_kv", "d", "causal", "ms", "tflops")
MODES = ("fwd", "bwd")
DTYPES = ("bf16", "fp16", "e4m3")

# FA3 paper matrix (Fig. 5): 16k tokens in total, hidden 2048.
PAPER_TOTAL_TOKENS = 16384
PAPER_HIDDEN = 2048
PAPER_HDIMS = (64, 128, 256)
PAPER_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_HDIMS = (128,)
QUICK_SEQLENS = (1024, 4096, 16384)


@dataclass(frozen=True)
class Shape:
    b: int
    sq: int
    sk: int
    h: int
    h_kv: int
    d: int
    causal: bool

    def label(self) -> str:
        heads = f"{self.h}" if self.h == self.h_kv else f"{self.h}/{self.h_kv}"
        seq = f"{self.sq}" if self.sq == self.sk else f"{self.sq}x{self.sk}"
        return f"b={self.b} s={seq} h={heads} d={self.d} {'causal' if self.causal else 'full'}"


def _parse_bool(tok: str) -> bool:
    t = tok.strip().lower()
    if t in ("1", "true", "causal", "c", "yes"):
        return True
    if t in ("0", "false", "full", "nc", "no"):
        return False
    raise ValueError(f"causal must be 0 or 1, got {tok!r}")


def parse_causal_opt(text: str) -> tuple[bool, ...]:
    """--causal {0,1,both} -> the causal settings to run."""
    t = text.strip().lower()
    if t == "both":
        return (False, True)
    return (_parse_bool(t),)


def parse_shape(text: str, default_causal: tuple[bool, ...] = (False, True)) -> list[Shape]:
    """'b,sq,sk,h,h_kv,d[,causal]' -> shapes. Without a causal field, one shape per default_causal.

    Raises ValueError on anything malformed: wrong field count, non-integers, non-positive sizes,
    h not a multiple of h_kv."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (6, 7):
        raise ValueError(f"shape must be b,sq,sk,h,h_kv,d[,causal], got {text!r}")
    try:
        b, sq, sk, h, h_kv, d = (int(p) for p in parts[:6])
    except ValueError:
        raise ValueError(f"shape fields must be integers, got {text!r}") from None
    if min(b, sq, sk, h, h_kv, d) <= 0:
        raise ValueError(f"shape sizes must be positive, got {text!r}")
    if h % h_kv:
        raise ValueError(f"h ({h}) must be a multiple of h_kv ({h_kv}) in {text!r}")
    causals = (_parse_bool(parts[6]),) if len(parts) == 7 else tuple(default_causal)
    return [Shape(b, sq, sk, h, h_kv, d, c) for c in causals]


def parse_int_list(text: str) -> list[int]:
    """'64,128' -> [64, 128]; accepts 1k/16k suffixes for sequence lengths."""
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        m = re.fullmatch(r"(\d+)(k?)", tok)
        if not m:
            raise ValueError(f"expected integers like 512,1k,16k, got {text!r}")
        v = int(m.group(1)) * (1024 if m.group(2) else 1)
        if v <= 0:
            raise ValueError(f"values must be positive, got {text!r}")
        out.append(v)
    return out


def paper_matrix(hdims=PAPER_HDIMS, seqlens=PAPER_SEQLENS, causals=(False, True),
                 total_tokens=PAPER_TOTAL_TOKENS, hidden=PAPER_HIDDEN) -> list[Shape]:
    """FA3 paper shapes: batch = total_tokens / seqlen, heads = hidden / hdim (at least 1 each)."""
    shapes = []
    for causal in causals:
        for d in hdims:
            h = max(1, hidden // d)
            for s in seqlens:
                shapes.append(Shape(max(1, total_tokens // s), s, s, h, h, d, causal))
    return shapes


def causal_pairs(sq: int, sk: int) -> float:
    """(query, key) pairs a causal mask keeps, per batch and head.

    sq == sk: the half rule sq*sk/2 that FA2/FA3 papers and their benchmark scripts use, so our
    numbers compare with theirs. sq != sk: the exact count for FA's bottom-right aligned mask
    (query i sees keys j <= i + sk - sq); the half rule is far off there (e.g. sq=1 decodes)."""
    if sq == sk:
        return sq * sk / 2
    off = sk - sq
    # sum over i of clamp(i + off + 1, 0, sk)
    total = 0
    for i in range(sq):  # sq is at most a few 100k: cheap, and obviously right
        total += min(max(i + off + 1, 0), sk)
    return float(total)


def attn_flops(b: int, sq: int, sk: int, h: int, d: int, causal: bool, mode: str = "fwd") -> float:
    """Forward: 2 matmuls (QK^T, PV) of 2*sq*sk*d each -> 4*b*h*sq*sk*d. Backward: 2.5x forward
    (5 matmuls instead of 2), the convention of FA2/FA3. The dv head dim is taken equal to d."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pairs = causal_pairs(sq, sk) if causal else float(sq) * sk
    fwd = 4.0 * b * h * d * pairs
    return fwd if mode == "fwd" else 2.5 * fwd


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def make_row(impl: str, mode: str, dtype: str, shape: Shape, ms: float, **extra) -> dict:
    """One JSON row with exactly ROW_KEYS (plus any extra keys given)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    flops = attn_flops(shape.b, shape.sq, shape.sk, shape.h, shape.d, shape.causal, mode)
    row = {
        "impl": impl, "mode": mode, "dtype": dtype,
        "b": shape.b, "sq": shape.sq, "sk": shape.sk, "h": shape.h, "h_kv": shape.h_kv,
        "d": shape.d, "causal": bool(shape.causal),
        "ms": float(ms), "tflops": tflops(flops, ms),
    }
    for k, v in extra.items():
        if k in row:
            raise ValueError(f"extra key {k!r} would overwrite a schema key")
        row[k] = v
    return row


def merge_rounds(rows: list) -> list:
    """Rows of one (shape, mode) timed over several interleaved rounds -> one row per impl (first
    appearance order) with the median round's ms and TFLOP/s and every round's ms in `rounds_ms`."""
    by_impl: dict = {}
    for r in rows:
        by_impl.setdefault(r["impl"], []).append(r)
    merged = []
    for impl, rs in by_impl.items():
        ms = sorted(r["ms"] for r in rs)
        mid = ms[(len(ms) - 1) // 2] if len(ms) % 2 else (ms[len(ms) // 2 - 1] + ms[len(ms) // 2]) / 2
        row = dict(rs[0])
        row["tflops"] = rs[0]["tflops"] * rs[0]["ms"] / mid
        row["ms"] = mid
        row["rounds_ms"] = [r["ms"] for r in rs]
        errs = [r["rel_err"] for r in rs if "rel_err" in r]
        if errs:  # the worst round's check stands (NaN included)
            row["rel_err"] = max(errs, key=lambda e: (e != e, e))
        merged.append(row)
    return merged


def row_shape(row: dict) -> Shape:
    return Shape(row["b"], row["sq"], row["sk"], row["h"], row["h_kv"], row["d"], row["causal"])


def geomean(xs) -> float:
    xs = [float(x) for x in xs]
    if not xs:
        return float("nan")
    if any(x <= 0 or math.isnan(x) for x in xs):
        raise ValueError("geomean needs positive numbers")
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def index_rows(rows) -> dict:
    """(mode, dtype, Shape) -> {impl: tflops} for the rows of plain implementations."""
    table: dict = {}
    for r in rows:
        if r.get("ablation"):
            continue
        table.setdefault((r["mode"], r["dtype"], row_shape(r)), {})[r["impl"]] = r["tflops"]
    return table


def ratios(rows, base: str = "fa3") -> dict:
    """{(mode, peer): [base/peer TFLOP/s ratio per shape where both ran]}."""
    out: dict = {}
    for (mode, _dtype, _shape), by_impl in index_rows(rows).items():
        if base not in by_impl:
            continue
        for impl, tf in by_impl.items():
            if impl != base and tf > 0:
                out.setdefault((mode, impl), []).append(by_impl[base] / tf)
    return out


def geomean_ratios(rows, base: str = "fa3") -> dict:
    """{(mode, peer): geometric mean of base/peer over the shapes both ran}."""
    return {k: geomean(v) for k, v in ratios(rows, base).items()}


TARGET_PEERS = ("fa4", "cudnn")  # the issues' targets: fa3 >= the best of these at every row


def _rounds_ms(row: dict) -> list:
    return row.get("rounds_ms") or [row["ms"]]


def target_rows(rows, base: str = "fa3", peers=TARGET_PEERS) -> dict:
    """{mode: [(Shape, base/best-peer ratio, best peer, noise)]} over the shapes where base and at
    least one of peers ran. noise: whether the two overlap across rounds (base's slowest round no
    slower than the peer's fastest, or the reverse), i.e. the order is not settled by this run."""
    by_key = {}
    for r in rows:
        if not r.get("ablation"):
            by_key.setdefault((r["mode"], r["dtype"], row_shape(r)), {})[r["impl"]] = r
    out: dict = {}
    for (mode, _dtype, shape), by_impl in by_key.items():
        ran = [p for p in peers if p in by_impl and by_impl[p]["tflops"] > 0]
        if base not in by_impl or not ran:
            continue
        best = max(ran, key=lambda p: by_impl[p]["tflops"])
        b_ms, p_ms = _rounds_ms(by_impl[base]), _rounds_ms(by_impl[best])
        noise = len(b_ms) > 1 and len(p_ms) > 1 and min(b_ms) <= max(p_ms) and min(p_ms) <= max(b_ms)
        out.setdefault(mode, []).append((shape, by_impl[base]["tflops"] / by_impl[best]["tflops"],
                                         best, noise))
    return out


def format_targets(rows, base: str = "fa3", peers=TARGET_PEERS, gemm_tflops=None) -> str:
    """The issues' forward / backward targets read off one run: per mode, base over the best peer
    of each row (geomean, rows short of it, the worst, how many of those the rounds leave open),
    and base at hd 128 / 256 on the longest non-causal rows over the same run's GEMM rate."""
    lines = []
    for mode in MODES:
        tr = target_rows(rows, base, peers).get(mode)
        if not tr:
            continue
        short = sorted((t for t in tr if t[1] < 1.0), key=lambda t: t[1])
        line = (f"targets {mode}: {base} / best of {','.join(peers)} per row: geomean "
                f"{geomean([t[1] for t in tr]):.3f}x over {len(tr)} rows; {len(short)} rows below")
        if short:
            worst = short[0]
            line += (f" (worst {worst[1]:.3f}x vs {worst[2]}, {worst[0].label()}; "
                     f"{sum(t[3] for t in short)} within the round-to-round spread)")
        lines.append(line)
        for shape, ratio, best, noise in short:
            lines.append(f"  below: {shape.label():42} {ratio:.3f}x vs {best}"
                         + (" (spread)" if noise else ""))
    if gemm_tflops:
        fwd = [r for r in rows if r["impl"] == base and r["mode"] == "fwd" and not r.get("ablation")
               and not r["causal"] and r["d"] in (128, 256)]
        for d in (128, 256):
            rs = [r for r in fwd if r["d"] == d]
            if rs:
                r = max(rs, key=lambda r: (r["sk"], r["sq"]))
                lines.append(f"targets fwd vs GEMM: d={d} s={r['sq']} {r['tflops']:.1f} / "
                             f"{gemm_tflops:.1f} = {r['tflops'] / gemm_tflops:.3f}")
    return "\n".join(lines)


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file names)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def seqlen_label(s: int) -> str:
    return f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s)


def format_table(rows, impls, base: str = "fa3") -> str:
    """One line per (mode, shape): TFLOP/s per impl, then base/peer ratios; geomeans last."""
    table = index_rows(rows)
    peers = [i for i in impls if i != base]
    show_ratios = base in impls
    head = f"{'mode':4} {'dtype':5} {'shape':42}" + "".join(f"{i:>10}" for i in impls)
    if show_ratios:
        head += "".join(f"{base + '/' + p:>14}" for p in peers)
    lines = ["TFLOP/s per implementation (- = did not run)", head, "-" * len(head)]
    for (mode, dtype, shape), by_impl in sorted(
            table.items(), key=lambda kv: (MODES.index(kv[0][0]), kv[0][1], kv[0][2].causal, kv[0][2].d,
                                           kv[0][2].sq, kv[0][2].sk, kv[0][2].b, kv[0][2].h)):
        line = f"{mode:4} {dtype:5} {shape.label():42}"
        line += "".join(f"{by_impl[i]:10.1f}" if i in by_impl else f"{'-':>10}" for i in impls)
        if show_ratios:
            for p in peers:
                ok = base in by_impl and p in by_impl and by_impl[p] > 0
                line += f"{by_impl[base] / by_impl[p]:14.2f}" if ok else f"{'-':>14}"
        lines.append(line)
    if show_ratios:
        gm = geomean_ratios(rows, base)
        for mode in MODES:
            parts = [f"{base}/{p} {gm[(mode, p)]:.2f}x ({len(ratios(rows, base)[(mode, p)])} shapes)"
                     for p in peers if (mode, p) in gm]
            if parts:
                lines.append(f"geomean {mode}: " + ", ".join(parts))
    return "\n".join(lines)
