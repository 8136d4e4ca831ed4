"""softmax.exp2_poly's arithmetic, step by step in numpy float32 (the PTX it emits, on the CPU): the
floor by adding 1.5 * 2^23 rounding down, the degree-4 polynomial by fused multiply-adds, the
exponent added as an integer. It must match 2^x to 3e-6 relative where P matters, give exactly +0
for masked scores (-inf) and anything <= -127, and exact powers of two at integers."""
import math

import numpy as np
import pytest

from fa3.hopper.softmax import EXP2_POLY

MAGIC = np.float32(1.5 * 2**23)


def _fma(a, b, c):  # one rounding, as fma.rn.f32 (the product of two float32 is exact in float64)
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def _add_rm(a, b):  # add.rm.f32: the exact sum rounded toward -inf
    s = np.float64(a) + np.float64(b)
    r = np.float32(s)
    return np.nextafter(r, np.float32(-np.inf)) if np.float64(r) > s else r


def exp2_poly_model(x: float) -> np.float32:
    xc = np.float32(max(np.float32(x), np.float32(-127.0)))
    t = _add_rm(xc, MAGIC)
    fl = np.float32(t - MAGIC)
    fr = np.float32(xc - fl)
    c1, c2, c3, c4 = (np.float32(c) for c in EXP2_POLY)
    p = _fma(fr, c4, c3)
    p = _fma(p, fr, c2)
    p = _fma(p, fr, c1)
    p = _fma(p, fr, np.float32(1.0))
    e = (int(t.view(np.uint32)) << 23) & 0xFFFFFFFF
    return np.uint32((int(p.view(np.uint32)) + e) & 0xFFFFFFFF).view(np.float32)


def test_relative_error_where_p_matters():
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.uniform(-126, 8.75, 20000), rng.uniform(-1, 1, 5000),
                         np.linspace(-3, 0, 3001)]).astype(np.float32)
    worst = max(abs(float(exp2_poly_model(x)) / 2.0 ** float(x) - 1) for x in xs)
    assert worst < 3e-6, worst


@pytest.mark.parametrize("x", [-math.inf, -127.0, -127.5, -300.0, -1e30])
def test_masked_scores_give_zero(x):
    assert exp2_poly_model(x) == 0.0 and not np.signbit(exp2_poly_model(x))


@pytest.mark.parametrize("k", [-126, -20, -1, 0, 1, 8])
def test_integers_are_exact_powers_of_two(k):
    assert exp2_poly_model(float(k)) == np.float32(2.0**k)


def test_monotone_across_integer_boundaries():
    for k in range(-20, 9):
        below = exp2_poly_model(np.nextafter(np.float32(k), np.float32(-np.inf)))
        assert below <= exp2_poly_model(float(k))
