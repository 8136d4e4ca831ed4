"""A minimal CuTe-DSL kernel (y = 2x) to exercise the compile cache without a big compile."""
import dataclasses

from fa3 import _compile

BUILDS = []


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    threads: int = 128


def build(cfg: TinyConfig):
    BUILDS.append(cfg)
    cute = _compile.dsl()
    import cutlass
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream

    @cute.kernel
    def kernel(x: cute.Tensor, y: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        i = bidx * cfg.threads + tidx
        if i < x.shape[0]:
            y[i] = x[i] * 2.0

    @cute.jit
    def launch(x: cute.Tensor, y: cute.Tensor, stream):
        n = x.shape[0]
        kernel(x, y).launch(grid=[(n + cfg.threads - 1) // cfg.threads, 1, 1],
                            block=[cfg.threads, 1, 1], stream=stream)

    n = cute.sym_int()
    x = make_fake_compact_tensor(cutlass.Float32, (n,), assumed_align=16)
    y = make_fake_compact_tensor(cutlass.Float32, (n,), assumed_align=16)
    return cute.compile(launch, x, y, make_fake_stream(use_tvm_ffi_env_stream=True),
                        options=_compile.compile_options())


def get(cfg=TinyConfig()):
    return _compile.get_kernel(cfg, build)
