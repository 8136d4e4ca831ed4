"""sm90 (Hopper) CuTe-DSL kernels. Each module imports the DSL itself, lazily, on first compile."""
