"""sm80 (Ampere) CuTe-DSL fallback kernels (FA2 algorithm)."""
