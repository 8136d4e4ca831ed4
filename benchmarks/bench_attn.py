#!/usr/bin/env python
"""Attention TFLOP/s benchmark: fa3 against its peers, in one process, on one GPU.

    python benchmarks/bench_attn.py                 # FA3 paper matrix, fwd+bwd, all impls
    python benchmarks/bench_attn.py --quick         # a few shapes, for a smoke run
    python benchmarks/bench_attn.py --shape 2,8192,8192,16,4,128,1 --impls fa3,fa2

See benchmarks/README.md for the columns and the JSON schema.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_utils as U  # noqa: E402

# --ablation: fa3 forward config switches, passed as keyword overrides to
# fa3.hopper.flash_fwd.flash_fwd(q, k, v, out, lse, softmax_scale, causal, config_overrides=...).
# Edit this table when the kernel's switch names change. "baseline" must stay first and empty.
# Names are FwdConfig fields in hopper/flash_fwd.py (pingpong is already off by default above hd128,
# so "no-pingpong" equals the baseline there).
ABLATIONS = [
    ("baseline", {}),
    ("no-overlap", {"overlap": False}),  # no intra-warpgroup overlap of GEMMs and softmax
    ("no-pingpong", {"pingpong": False}),  # no inter-warpgroup GEMM/softmax ping-pong
    ("neither", {"overlap": False, "pingpong": False}),
    ("non-persistent", {"persistent": False}),  # one CTA per tile instead of #SMs CTAs
    ("late-q", {"q_early": False}),  # Q's buffer freed after the tile's last PV, not its last S
    ("no-l2-group", {"l2_group": False}),  # causal: heaviest-first over all heads at once
    ("shared-epilogue", {"wg_epilogue": False}),  # all consumer warpgroups store O together
    ("q-double-buffer", {"q_stages": 2}),  # the next tile's Q loads one tile ahead
    ("exp2-emu-4", {"exp2_emu": 4}),  # 1 exp2 in 4 by FMA-pipe polynomial instead of MUFU
]

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def shape_arg(text):
        try:
            U.parse_shape(text)  # validate now; expanded with --causal in select_shapes
            return text
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def int_list(text):
        try:
            return U.parse_int_list(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def causal_arg(text):
        try:
            return U.parse_causal_opt(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p.add_argument("--shape", action="append", type=shape_arg, default=[], metavar="b,sq,sk,h,h_kv,d[,causal]",
                   help="extra shape (repeatable). Given alone, only these shapes run; with --hdim or "
                        "--seqlen the paper matrix for those runs too")
    p.add_argument("--hdim", type=int_list, help="head dims of the matrix, e.g. 64,128 (default 64,128,256)")
    p.add_argument("--seqlen", type=int_list, help="seqlens of the matrix, e.g. 512,4k (default 512..16k)")
    p.add_argument("--total-tokens", type=int, default=U.PAPER_TOTAL_TOKENS, help="batch*seqlen of the matrix")
    p.add_argument("--hidden", type=int, default=U.PAPER_HIDDEN, help="heads*hdim of the matrix")
    p.add_argument("--causal", type=causal_arg, default=(False, True), metavar="{0,1,both}")
    p.add_argument("--dtype", choices=sorted(DTYPES) + ["e4m3"], default="bf16",
                   help="e4m3: fa3's FP8 forward (benchmarks/fp8_bench.py; fwd only, fa3 only)")
    p.add_argument("--mode", choices=("fwd", "bwd", "both"), default="both")
    p.add_argument("--impls", default=",".join(_all_impls()),
                   help="comma list from %(default)s (default: all; unavailable ones are reported and skipped)")
    p.add_argument("--quick", action="store_true", help="a few shapes: hdim 128, seqlen 1k/4k/16k")
    p.add_argument("--ablation", action="store_true", help="also time fa3's forward with config switches toggled")
    p.add_argument("--no-check", action="store_true", help="skip the output check against torch SDPA")
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--rep-ms", type=float, default=100)
    p.add_argument("--rounds", type=int, default=1,
                   help="time every impl of a shape this many times, interleaved (A B C A B C ...), and "
                        "report each impl's median round: clock drift then hits all impls alike")
    p.add_argument("--sets", type=int, default=0, help="input sets rotated per shape (default: enough to exceed L2 3x, >= 3)")
    p.add_argument("--no-gemm", action="store_true", help="skip the cuBLAS roofline GEMM")
    p.add_argument("--tag", default=None, help="file name tag (default quick/full/custom)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>-<date>-<tag>.json)")
    p.add_argument("--plot", default=None, help="also write a PNG plot here (FA3 paper Fig. 5 style)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke-test the harness only
    args = p.parse_args(argv)
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [i for i in args.impls if i not in _all_impls()]
    if bad:
        p.error(f"unknown impls {bad}; choose from {','.join(_all_impls())}")
    return args


def _all_impls():
    # The name list lives in peers.py, which imports torch; duplicate it here so --help is cheap.
    return ("fa3", "fa3-sm80", "fa2", "cudnn", "fa4")


def select_shapes(args) -> list[U.Shape]:
    causals = args.causal
    # A --shape without its own causal field runs once per --causal setting.
    user = [s for text in args.shape for s in U.parse_shape(text, causals)]
    want_matrix = not user or args.hdim or args.seqlen
    shapes = []
    if want_matrix:
        hdims = args.hdim or (U.QUICK_HDIMS if args.quick else U.PAPER_HDIMS)
        seqlens = args.seqlen or (U.QUICK_SEQLENS if args.quick else U.PAPER_SEQLENS)
        shapes += U.paper_matrix(hdims, seqlens, causals, args.total_tokens, args.hidden)
    for s in user:
        if s not in shapes:
            shapes.append(s)
    return shapes


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def versions() -> dict:
    import importlib.metadata as md

    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    # First distribution found wins; FA4 ships as flash-attn-4 (its package is flash_attn.cute).
    for key, dists in (("triton", ("triton",)), ("cutlass-dsl", ("nvidia-cutlass-dsl",)),
                       ("flash_attn", ("flash-attn-4", "flash-attn", "flash-attn-cute"))):
        for dist in dists:
            try:
                v[key] = md.version(dist)
                break
            except Exception:  # noqa: BLE001
                pass
    for key, mod in (("cutlass-dsl", "cutlass"), ("flash_attn", "flash_attn")):
        if key not in v:  # unpacked onto PYTHONPATH without metadata: ask the module
            try:
                v[key] = getattr(__import__(mod), "__version__", "unknown")
            except Exception:  # noqa: BLE001
                pass
    try:
        import fa3

        v["fa3"] = fa3.__version__
    except Exception as e:  # noqa: BLE001
        v["fa3"] = f"not importable: {type(e).__name__}"
    return v


class Runner:
    """Times (impl, mode, shape) cells; a failure is recorded for that cell and the run goes on."""

    def __init__(self, args, dtype_name):
        import torch

        self.torch = torch
        self.args, self.dtype_name = args, dtype_name
        self.dtype = getattr(torch, DTYPES[dtype_name])
        self.rows, self.skipped, self._said = [], [], set()
        self.dev = args.device
        self.l2 = (getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
                   if self.dev == "cuda" else 32 << 20)

    def sync(self):
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def say_once(self, key, msg):
        if key not in self._said:
            self._said.add(key)
            log(msg)

    def skip(self, impl, mode, shape, reason, failed=False):
        """Record a cell that did not run; print each distinct reason once per impl and mode."""
        kind = "FAILED" if failed else "unavailable"
        self.skipped.append({"impl": impl, "mode": mode, "shape": shape.label(), "kind": kind, "reason": reason})
        self.say_once((impl, mode, reason), f"  [{impl} {mode}] {kind}: {reason}")

    # --- inputs -------------------------------------------------------------------------------
    def n_sets(self, shape, mode):
        if self.args.sets:
            return max(1, self.args.sets)
        el = shape.b * (shape.sq * shape.h + 2 * shape.sk * shape.h_kv) * shape.d
        if mode == "bwd":
            el += 2 * shape.b * shape.sq * shape.h * shape.d  # dout and out
        per_set = el * self.torch.finfo(self.dtype).bits // 8
        return int(min(32, max(3, math.ceil(3 * self.l2 / per_set))))

    def inputs(self, shape, n, grad):
        t, dev = self.torch, self.dev
        sets = []
        for _ in range(n):
            q = t.randn(shape.b, shape.sq, shape.h, shape.d, device=dev, dtype=self.dtype)
            k = t.randn(shape.b, shape.sk, shape.h_kv, shape.d, device=dev, dtype=self.dtype)
            v = t.randn(shape.b, shape.sk, shape.h_kv, shape.d, device=dev, dtype=self.dtype)
            if grad:
                for x in (q, k, v):
                    x.requires_grad_(True)
            sets.append((q, k, v))
        return sets

    def warm(self, impls, mode, shape, sets):
        """Before timed rounds: one call of every impl (JIT compiles happen here, not between two
        timed cells), then ~0.2 s of GPU work so the first timed cell does not start from the
        clocks of an idle GPU (in one H100 run the first cell after a compile was 5-18% slower)."""
        t = self.torch
        for impl in impls:
            try:
                impl.check(shape, mode)
                with impl.context():
                    if mode == "fwd":
                        with t.no_grad():
                            impl.fwd(*sets[0], shape.causal)
                    else:
                        with t.enable_grad():
                            out = impl.fwd(*sets[0], shape.causal)
                        t.autograd.grad(out, sets[0], t.randn_like(out))
            except Exception:  # noqa: BLE001 - measure() reports what fails
                pass
        if self.dev == "cuda":
            a = t.randn(4096, 4096, device="cuda", dtype=t.bfloat16)
            end = time.perf_counter() + 0.2
            while time.perf_counter() < end:
                for _ in range(8):
                    a @ a
                self.sync()
        self.sync()

    # --- one measurement -----------------------------------------------------------------------
    def measure(self, impl, mode, shape, sets, ref, label=None, call=None, **extra):
        """Time impl on shape; append a row. call(q, k, v) overrides impl.fwd (ablation)."""
        from timing import bench_ms, cycling

        from peers import Unavailable, rel_err

        t = self.torch
        name = label or impl.name
        fwd = call or (lambda q, k, v: impl.fwd(q, k, v, shape.causal))
        try:
            impl.check(shape, mode)
            with impl.context():
                if mode == "fwd":
                    with t.no_grad():
                        out0 = fwd(*sets[0])  # first call compiles / warms; also checked below
                        self.sync()
                        if ref is not None:
                            extra["rel_err"] = rel_err(out0, ref)
                        del out0
                        fn = cycling([lambda s=s: fwd(*s) for s in sets])
                        ms = bench_ms(fn, self.args.warmup_ms, self.args.rep_ms, self.dev)
                else:
                    graphs = []
                    for q, k, v in sets:
                        with t.enable_grad():
                            out = fwd(q, k, v)
                        if not out.requires_grad:
                            raise Unavailable("its output does not require grad (no backward)")
                        graphs.append((out, (q, k, v), t.randn_like(out)))
                    fns = [lambda g=g: t.autograd.grad(g[0], g[1], g[2], retain_graph=True) for g in graphs]
                    fns[0]()
                    self.sync()
                    ms = bench_ms(cycling(fns), self.args.warmup_ms, self.args.rep_ms, self.dev)
                    del graphs, fns
                self.sync()
        except (Unavailable, NotImplementedError, ImportError) as e:
            self.skip(name, mode, shape, f"{type(e).__name__}: {e}")
            return None
        except Exception as e:  # noqa: BLE001 - one impl failing must not end the run
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            self.skip(name, mode, shape, msg, failed=True)
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            if isinstance(e, t.cuda.OutOfMemoryError):
                t.cuda.empty_cache()
            elif "CUDA error" in str(e) or "illegal" in str(e).lower():
                log("  note: a CUDA error can poison the context; later measurements may fail too")
            return None
        row = U.make_row(name, mode, self.dtype_name, shape, ms, **extra)
        self.rows.append(row)
        err = f"  err {row['rel_err']:.1e}" if "rel_err" in row else ""
        warn = "  <-- CHECK OUTPUT" if "rel_err" in row and not row["rel_err"] < 2e-2 else ""
        log(f"  {name:18} {mode} {shape.label():42} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s{err}{warn}")
        return row


def ablation_call(shape, sets, overrides):
    """A call(q, k, v) for fa3's hopper forward with config overrides, or raise ImportError."""
    import torch

    from fa3.hopper.flash_fwd import flash_fwd  # ImportError -> "unavailable"

    scale = shape.d ** -0.5
    # Preallocated per input set, as the kernel writes out and lse in place.
    bufs = {id(q): (torch.empty_like(q), torch.empty(shape.b, shape.h, shape.sq, device=q.device,
                                                      dtype=torch.float32)) for q, _, _ in sets}

    def call(q, k, v):
        out, lse = bufs[id(q)]
        flash_fwd(q, k, v, out, lse, scale, shape.causal, config_overrides=overrides)
        return out

    return call


def print_ablation(rows):
    base = {(U.row_shape(r)): r["tflops"] for r in rows if r.get("ablation") == "baseline"}
    names = [n for n, _ in ABLATIONS if n != "baseline"]
    lines = ["", "fa3 forward ablation: TFLOP/s (ratio to baseline)",
             f"{'shape':42}{'baseline':>10}" + "".join(f"{n:>22}" for n in names)]
    for shape, tf in base.items():
        line = f"{shape.label():42}{tf:10.1f}"
        for n in names:
            r = next((r for r in rows if r.get("ablation") == n and U.row_shape(r) == shape), None)
            line += f"{r['tflops']:12.1f} ({r['tflops'] / tf:5.2f})" if r else f"{'-':>22}"
        lines.append(line)
    print("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        log(f"bench_attn: torch is not importable ({e}); this benchmark needs torch with CUDA")
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        log("bench_attn: no CUDA device is visible; run this on a GPU machine (see benchmarks/README.md)")
        return 2

    import peers
    from timing import TIMER, gemm_tflops

    timer = TIMER if args.device == "cuda" else "host perf_counter (smoke test)"

    shapes = select_shapes(args)
    modes = ("fwd", "bwd") if args.mode == "both" else (args.mode,)
    cuda = args.device == "cuda"
    device = torch.cuda.get_device_name(0) if cuda else f"{args.device} (harness smoke test)"
    log(f"device: {device}  timer: {timer}  shapes: {len(shapes)}  modes: {','.join(modes)}")
    ver = versions()
    log("versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()))

    if args.dtype == "e4m3":
        return main_fp8(args, shapes, device, ver, timer)

    runner = Runner(args, args.dtype)
    impls = []
    for name in args.impls:
        impl = peers.make_impl(name)
        try:
            impl.load()
            impls.append(impl)
        except peers.Unavailable as e:
            log(f"  [{name}] unavailable: {e}")
            runner.skipped.append({"impl": name, "mode": "all", "shape": "all", "reason": str(e)})

    gemm = None
    if not args.no_gemm and cuda:
        gemm = gemm_tflops()
        torch.cuda.empty_cache()  # hand the GEMM's buffers back before the attention shapes
        log(f"cuBLAS bf16 GEMM 8192^3: {gemm:.1f} TFLOP/s (roofline for this run)")

    torch.manual_seed(0)
    for i, shape in enumerate(shapes):
        log(f"[{i + 1}/{len(shapes)}] {shape.label()}")
        for mode in modes:
            sets = runner.inputs(shape, runner.n_sets(shape, mode), grad=(mode == "bwd"))
            ref = None
            if mode == "fwd" and not args.no_check:
                try:
                    with torch.no_grad():
                        ref = peers.reference_fwd(*sets[0], shape.causal)
                except Exception as e:  # noqa: BLE001
                    runner.say_once(("ref", str(e)[:80]), f"  (no reference output for the check: {str(e)[:120]})")
            first = len(runner.rows)
            if args.rounds > 1:
                runner.warm(impls, mode, shape, sets)
            for rnd in range(max(1, args.rounds)):
                # each round starts at the next impl, so none is always the first after a pause
                for impl in impls[rnd % len(impls):] + impls[:rnd % len(impls)]:
                    runner.measure(impl, mode, shape, sets, ref)
                if args.ablation and mode == "fwd":
                    fa3 = peers.make_impl("fa3")
                    for name, overrides in ABLATIONS:
                        try:
                            call = ablation_call(shape, sets, overrides)
                        except Exception as e:  # noqa: BLE001
                            runner.skip(f"fa3[{name}]", mode, shape, f"fa3.hopper.flash_fwd unavailable: {e!r}")
                            continue
                        runner.measure(fa3, mode, shape, sets, ref, label=f"fa3[{name}]", call=call,
                                       ablation=name, overrides=overrides)
            if args.rounds > 1:
                runner.rows[first:] = U.merge_rounds(runner.rows[first:])
            del sets, ref
            if cuda:
                torch.cuda.empty_cache()

    rows = runner.rows
    print()
    if gemm is not None:
        print(f"cuBLAS bf16 GEMM 8192^3: {gemm:.1f} TFLOP/s  ({device})")
    names = [i.name for i in impls]
    print(U.format_table(rows, sorted(names, key=lambda n: n != "fa3")))  # fa3 column first
    targets = U.format_targets(rows, gemm_tflops=gemm)
    if targets:
        print(targets)
    if args.ablation:
        print_ablation(rows)

    now = _dt.datetime.now(_dt.timezone.utc)
    tag = args.tag or ("quick" if args.quick else "custom" if (args.shape or args.hdim or args.seqlen) else "full")
    out = Path(args.out) if args.out else (
        HERE / "results" / f"{U.device_slug(device)}-{now.strftime('%Y%m%d-%H%M')}-{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "device": device,
        "date": now.isoformat(timespec="seconds"),
        "versions": ver,
        "gemm_tflops": gemm,
        "rows": rows,
        # extras, for reading the numbers later
        "timer": timer,
        "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "flops_rule": "fwd 4*b*h*sq*sk*d; causal: sq*sk/2 pairs if sq==sk else exact bottom-right count; bwd 2.5x fwd",
        "unavailable": runner.skipped,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {out}")
    if args.plot:
        try:
            import plot

            plot.plot_rows(doc, args.plot)
            print(f"wrote {args.plot}")
        except ImportError as e:
            print(f"no plot: matplotlib is not importable ({e})")
    return 0 if rows else 1



def main_fp8(args, shapes, device, ver, timer) -> int:
    """--dtype e4m3: fa3 FP8 rows (kernel, end-to-end, quantize and Vt costs, FA3 path) and fa3 bf16
    on the same shapes, with the e4m3 and bf16 GEMM rooflines of this run (see fp8_bench.py)."""
    import fp8_bench
    import torch
    from timing import gemm_tflops

    gemm = None if args.no_gemm else gemm_tflops()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    rows, extras = fp8_bench.run(shapes, args, log)
    if gemm is not None:
        print(f"cuBLAS bf16 GEMM 8192^3: {gemm:.1f} TFLOP/s  ({device})")
    print(f"torch._scaled_mm e4m3 8192^3: {extras['scaled_mm_e4m3_tflops']:.1f} TFLOP/s")
    impls = ["fa3", "fa3-e2e", "fa3-prequant", "fa3-quant", "fa3-vt", "fa3-vt-torch"]
    print(U.format_table([r for r in rows if r["dtype"] == "e4m3"], impls))
    print(U.format_table([r for r in rows if r["dtype"] == "bf16"], ["fa3"]))
    now = _dt.datetime.now(_dt.timezone.utc)
    out = Path(args.out) if args.out else (
        HERE / "results" / f"{U.device_slug(device)}-{now.strftime('%Y%m%d-%H%M')}-{args.tag or 'fp8-fwd'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"device": device, "date": now.isoformat(timespec="seconds"), "versions": ver,
           "gemm_tflops": gemm, **extras, "rows": rows, "timer": timer,
           "capability": list(torch.cuda.get_device_capability(0)), "argv": sys.argv[1:],
           "flops_rule": "fwd 4*b*h*sq*sk*d; causal: sq*sk/2 pairs if sq==sk",
           "notes": fp8_bench.__doc__}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

