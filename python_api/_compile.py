"""The one compile cache for every CuTe-DSL kernel in fa3.

Kernels are compiled with ``cute.compile`` on fake tensors (no GPU, no real data), keyed by a frozen
config dataclass. Two levels:

* in-process: a dict from config to the compiled function;
* on disk: the compiled host+device code exported as an object file (``export_to_c``) and reloaded
  with ``cutlass.runtime.load_module``, so a second process skips the DSL compiler entirely.

Disk entries are keyed by the config, the DSL version, the target arch and a digest of fa3's own
source files, so editing a kernel never serves a stale binary. Writes go to a unique temporary file
that is renamed into place (atomic on POSIX), which makes concurrent processes safe: at worst two
processes compile the same kernel and one rename wins.

Compiled functions use TVM-FFI: they take torch tensors directly and launch on torch's current
stream, which keeps host overhead per call small.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

_MEM: dict[Any, Any] = {}
_LOCK = threading.Lock()
_SRC_DIGEST: str | None = None

DEFAULT_ARCH = "sm_90a"


def dsl():
    """Import the CuTe DSL lazily; importing fa3 must not pay for it (or need it working)."""
    os.environ.setdefault("CUTE_DSL_ARCH", DEFAULT_ARCH)
    import cutlass  # noqa: F401
    import cutlass.cute as cute

    return cute


def dsl_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvidia-cutlass-dsl")
    except Exception:  # not installed as a distribution (e.g. on PYTHONPATH): ask the module
        try:
            import cutlass

            return str(cutlass.__version__)
        except Exception:
            return "unknown"


def compile_options(arch: str = DEFAULT_ARCH, extra: str = "") -> str:
    """Options for every fa3 ``cute.compile``: cross-compile for ``arch``, TVM-FFI calling convention."""
    return f"--gpu-arch {arch} --enable-tvm-ffi {extra}".strip()


def fake_attn_tensor(dtype: str, shape: tuple):
    """A fake (b, s, h, d)-style tensor for ``cute.compile``: last dim contiguous, the other strides
    symbolic multiples of 16 bytes (what TMA and 16-byte vector loads need), 16-byte aligned base.
    ``dtype``: "bfloat16" | "float16" | "float32"."""
    import cutlass
    from cutlass.cute.runtime import make_fake_tensor

    cute = dsl()
    dt = {"bfloat16": cutlass.BFloat16, "float16": cutlass.Float16, "float32": cutlass.Float32}[dtype]
    div = 16 // (dt.width // 8)
    stride = tuple(cute.sym_int64(divisibility=div) for _ in shape[:-1]) + (1,)
    return make_fake_tensor(dt, shape, stride=stride, assumed_align=16)


def fake_lse_tensor(shape: tuple):
    """A fake float32 (b, h, s) tensor: last dim contiguous, other strides free."""
    import cutlass
    from cutlass.cute.runtime import make_fake_tensor

    cute = dsl()
    stride = tuple(cute.sym_int64() for _ in shape[:-1]) + (1,)
    return make_fake_tensor(cutlass.Float32, shape, stride=stride, assumed_align=4)


def cache_dir() -> Path:
    root = os.environ.get("FA3_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fa3"
    )
    return Path(root) / f"dsl-{dsl_version()}"


def disk_cache_enabled() -> bool:
    return os.environ.get("FA3_DISK_CACHE", "1") not in ("0", "false", "no")


def _source_digest() -> str:
    global _SRC_DIGEST
    if _SRC_DIGEST is None:
        import fa3

        h = hashlib.sha256()
        roots = [Path(fa3.__file__).parent]
        for sub in ("hopper", "ampere"):
            mod = getattr(fa3, sub, None)
            if mod is not None:
                roots.append(Path(mod.__file__).parent)
        for root in roots:
            for p in sorted(root.glob("*.py")):
                h.update(p.name.encode())
                h.update(p.read_bytes())
        _SRC_DIGEST = h.hexdigest()
    return _SRC_DIGEST


def config_digest(cfg: Any, arch: str = DEFAULT_ARCH) -> str:
    if not (dataclasses.is_dataclass(cfg) and cfg.__dataclass_params__.frozen):
        raise TypeError(f"kernel configs must be frozen dataclasses, got {type(cfg).__name__}")
    text = "|".join([type(cfg).__module__, repr(cfg), arch, dsl_version(), _source_digest()])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def get_kernel(cfg: Any, build: Callable[[Any], Any], arch: str = DEFAULT_ARCH) -> Any:
    """Return the compiled kernel for ``cfg``; ``build(cfg)`` runs ``cute.compile`` on fake tensors."""
    fn = _MEM.get((cfg, arch))
    if fn is not None:
        return fn
    with _LOCK:
        fn = _MEM.get((cfg, arch))
        if fn is None:
            fn = _load_or_build(cfg, build, arch)
            _MEM[(cfg, arch)] = fn
    return fn


def _load_or_build(cfg: Any, build: Callable[[Any], Any], arch: str) -> Any:
    digest = config_digest(cfg, arch)
    name = f"fa3_{type(cfg).__name__.lower()}_{digest}"
    path = cache_dir() / f"{name}.o"
    if disk_cache_enabled() and path.is_file():
        try:
            import cutlass.runtime

            dsl()
            return getattr(cutlass.runtime.load_module(str(path), enable_tvm_ffi=True), name)
        except Exception:
            pass  # a corrupt or incompatible entry: rebuild and overwrite it
    compiled = build(cfg)
    if disk_cache_enabled():
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=name, suffix=".o.tmp", dir=path.parent)
            os.close(fd)
            compiled.export_to_c(tmp, name)
            os.replace(tmp, path)
        except Exception:  # a read-only or full disk must not fail the call: keep it in memory
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    return compiled


def cache_info() -> dict:
    d = cache_dir()
    files = list(d.glob("*.o")) if d.is_dir() else []
    return {
        "dir": str(d),
        "enabled": disk_cache_enabled(),
        "entries": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "in_process": len(_MEM),
    }


def clear_cache() -> int:
    """Delete every on-disk entry (and the in-process dict); returns how many files were removed."""
    _MEM.clear()
    n = 0
    d = cache_dir()
    if d.is_dir():
        for f in d.glob("*.o*"):
            f.unlink(missing_ok=True)
            n += 1
    return n
