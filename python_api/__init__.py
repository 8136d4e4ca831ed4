"""fa3: FlashAttention-3 for NVIDIA Hopper in CuTe DSL, with FA3's ``flash_attn_interface`` API.

Importing fa3 needs no GPU and compiles nothing; kernels compile on first use (or load from the
on-disk cache, see ``fa3 info``).
"""
__version__ = "0.1.0"

from fa3 import ampere, hopper  # noqa: F401  (kernel packages: plain modules, no DSL import)
from fa3.interface import (  # noqa: F401
    flash_attn_combine,
    flash_attn_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)
from fa3.fp8 import flash_attn_fp8_func  # noqa: F401

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_with_kvcache",
    "flash_attn_combine",
    "flash_attn_fp8_func",
]
