"""softmax.exp2_poly's arithmetic replayed in float32 numpy (the kernel runs it as PTX): the clamp,
the polynomial's coefficients and the exponent-field add; np.floor stands in for the PTX's floor by
a rounding-down add (the GPU tests, test_fwd_exp2_emu, run the real one)."""
import struct

import numpy as np


def _f32(hexlit: str) -> np.float32:
    return np.float32(struct.unpack(">f", bytes.fromhex(hexlit[2:]))[0])


def exp2_poly_np(x: np.ndarray) -> np.ndarray:
    from fa3.hopper.softmax import EXP2_POLY

    c1, c2, c3 = (_f32(h) for h in EXP2_POLY)
    xc = np.maximum(x.astype(np.float32), np.float32(-127.0))
    j = np.floor(xc)  # the PTX: add.rm of 1.5 * 2^23 leaves floor(xc) in the mantissa's low bits
    f = (xc - j).astype(np.float32)
    p = (c3 * f + c2).astype(np.float32)
    p = (p * f + c1).astype(np.float32)
    p = (p * f + np.float32(1.0)).astype(np.float32)
    bits = (p.view(np.uint32).astype(np.int64) + (j.astype(np.int64) << 23)) & 0xFFFFFFFF
    return bits.astype(np.uint32).view(np.float32)


def test_relative_error_over_the_softmax_range():
    # P = exp2(S c - m): x <= 0, or <= 8 with the lazy rescale, and fp8's 2^8 offset adds 8 more
    x = np.concatenate([np.linspace(-125.0, 16.0, 1_000_001, dtype=np.float32),
                        np.arange(-125, 17, dtype=np.float32)])
    rel = np.abs(exp2_poly_np(x).astype(np.float64) / np.exp2(x.astype(np.float64)) - 1.0)
    assert rel.max() < 1e-4, rel.max()  # under a fifth of fp16's half ulp (2^-11)
    ints = np.arange(-125, 17, dtype=np.float32)
    assert np.array_equal(exp2_poly_np(ints), np.exp2(ints))  # p(0) = 1: powers of two exact


def test_masked_and_tiny_inputs_give_zero():
    x = np.array([-np.inf, -1e30, -200.0, -127.0], dtype=np.float32)
    assert np.array_equal(exp2_poly_np(x), np.zeros(4, np.float32))
    assert np.all(exp2_poly_np(np.array([-126.5], np.float32)) < 2.0 ** -126)
