"""``fa3`` command line: ``fa3 info``, ``fa3 fp8-eval``, ``fa3 cache clear``."""
from __future__ import annotations

import argparse
import os
import platform
import sys


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "not installed"


def info(args) -> int:
    import torch

    import fa3
    from fa3 import _compile, _dispatch

    print(f"fa3             {fa3.__version__} ({os.path.dirname(fa3.__file__)})")
    print(f"python          {platform.python_version()}")
    print(f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"cutlass-dsl     {_compile.dsl_version()}")
    print(f"apache-tvm-ffi  {_version('apache-tvm-ffi')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"gpu {i}           {p.name}, compute capability {p.major}.{p.minor}, "
                  f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
        try:
            be = _dispatch.resolve_backend(torch.device("cuda"))
        except NotImplementedError as e:
            be = None
            print(f"kernel family   none ({e})")
    else:
        be = None
        print("gpu             none (fa3's kernels need a CUDA GPU; fa3.reference and "
              "`fa3 fp8-eval` run on the CPU)")
    print("kernels         (family: feature -> status)")
    for fam in ("sm90", "sm80"):
        mark = " <- this GPU" if fam == be else ""
        for label, req in _feature_probe():
            missing = _dispatch.fwd_missing(fam, req)
            print(f"  {fam}: fwd {label:28s} {'ready' if missing is None else 'not built'}{mark}")
            mark = ""
    print("  sm90: hadamard_quant (fused rotate + e4m3 block quantize)   ready")
    print("  sm80+: bwd_preprocess (rowsum(dO*O), log2 LSE)             ready")
    c = _compile.cache_info()
    print(f"compile cache   {c['dir']} ({c['entries']} kernels, {c['bytes'] / 2**20:.1f} MiB"
          f"{'' if c['enabled'] else ', disabled by FA3_DISK_CACHE=0'})")
    return 0


def _feature_probe():
    import torch

    from fa3._dispatch import FwdRequest

    base = dict(dtype=torch.bfloat16, d=128, dv=128, causal=False, window=(-1, -1), softcap=0.0,
                varlen=False, has_sink=False, has_seqused=False, fp8=False)
    yield "bf16/fp16 hd64/128/256", FwdRequest(**base)
    yield "causal", FwdRequest(**{**base, "causal": True})
    yield "varlen", FwdRequest(**{**base, "varlen": True})
    yield "sliding window", FwdRequest(**{**base, "window": (128, 0)})
    yield "softcap", FwdRequest(**{**base, "softcap": 30.0})
    yield "fp8 e4m3", FwdRequest(**{**base, "fp8": True, "dtype": torch.float8_e4m3fn})


def fp8_eval(args) -> int:
    import torch

    from fa3 import fp8_eval as ev

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fams = args.family or list(ev.FAMILIES)
    print(f"fa3 fp8-eval: b={args.batch} s={args.seqlen} h={args.heads} d={args.hdim} on {device}; "
          f"seeds {args.seeds}; RMSE vs float64 attention", file=sys.stderr)
    res = ev.evaluate(fams, args.batch, args.seqlen, args.heads, args.hdim,
                      tuple(range(args.seeds)), device,
                      progress=lambda s: print(s, file=sys.stderr))
    print(ev.summarize(res))
    if hasattr(ev, "summarize_kernel") and ev.summarize_kernel(res):
        print(ev.summarize_kernel(res))  # a Hopper GPU: the real kernels beside the emulation
    if args.json:
        ev.save(res, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {args.plot}" if ev.plot(res, args.plot) else "plot skipped: no matplotlib")
    return 0


# Every kernel family that ships compiled variants: (module, arch of its variants or None when the
# config carries its own arch). `fa3 cache warm` compiles them all ahead of time, e.g. for an image.
KERNEL_MODULES = (("fa3.hopper.flash_fwd", "sm_90a"), ("fa3.hopper.flash_fwd_fp8", "sm_90a"),
                  ("fa3.hopper.fp8_vt", "sm_90a"), ("fa3.hopper.hadamard_quant", "sm_90a"),
                  ("fa3.hopper.bwd_preprocess", "sm_90a"), ("fa3.hopper.flash_bwd", "sm_90a"),
                  ("fa3.ampere.flash_fwd_sm80", None),
                  ("fa3.ampere.flash_bwd_sm80", None))


def _warm_one(job):
    import importlib

    from fa3 import _compile

    modname, cfg, arch = job
    mod = importlib.import_module(modname)
    _compile.get_kernel(cfg, mod.build, arch or cfg.arch)
    return modname


def cache(args) -> int:
    from fa3 import _compile

    if args.action == "clear":
        print(f"removed {_compile.clear_cache()} files from {_compile.cache_dir()}")
    elif args.action == "warm":
        import concurrent.futures
        import importlib

        jobs = []
        for modname, arch in KERNEL_MODULES:
            try:
                mod = importlib.import_module(modname)
            except ImportError:
                continue
            cfgs = mod.variants(args.sm80_arch) if arch is None else mod.variants()
            jobs += [(modname, cfg, arch) for cfg in cfgs]
        with concurrent.futures.ProcessPoolExecutor(args.jobs or os.cpu_count()) as ex:
            for i, name in enumerate(ex.map(_warm_one, jobs), 1):
                print(f"\r{i}/{len(jobs)} compiled ({name})", end="", file=sys.stderr, flush=True)
        print(f"\n{_compile.cache_info()}")
    else:
        print(_compile.cache_info())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fa3", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, GPU, kernel families and the compile cache").set_defaults(fn=info)
    e = sub.add_parser("fp8-eval", help="FP8 attention accuracy study (FA3 Table 3 and more)")
    e.add_argument("--family", action="append", help="input family (repeatable): outliers, "
                   "normal, channel-outliers; default all")
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--seqlen", type=int, default=1024)
    e.add_argument("--heads", type=int, default=4)
    e.add_argument("--hdim", type=int, default=128, choices=(64, 128, 256))
    e.add_argument("--seeds", type=int, default=2, help="independent input draws per family")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    e.add_argument("--json", default=None, help="write all rows to this JSON file")
    e.add_argument("--plot", default=None, help="write a PNG bar chart (needs matplotlib)")
    e.set_defaults(fn=fp8_eval)
    c = sub.add_parser("cache", help="show, clear, or warm (compile every shipped variant) the "
                       "on-disk kernel cache")
    c.add_argument("action", choices=("show", "clear", "warm"), nargs="?", default="show")
    c.add_argument("--jobs", type=int, default=None, help="parallel compiles for warm")
    c.add_argument("--sm80-arch", default="sm_80", help="arch of the sm80 kernels to warm "
                   "(sm_80, sm_86, sm_89, or sm_90 to run them on Hopper)")
    c.set_defaults(fn=cache)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
