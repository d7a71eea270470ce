"""The float32 gate non-linearities of the Numba kernels against float64 ground truth."""

import math

import numpy as np
import pytest
from numba import njit

from fastlstm.kernels.activations_cpu import sigmoid, tanh
from fastlstm.kernels._fastmath import NO_REASSOC


def _apply(x, out_sigmoid, out_tanh):
    for n in range(x.shape[0]):
        out_sigmoid[n] = sigmoid(x[n])
        out_tanh[n] = tanh(x[n])


#: the functions are inlined into their callers and compiled with the callers' flags:
#: checked as the LSTM kernels compile them (vectorised, fast-math) and plainly
COMPILED = {"as in the kernels": njit(fastmath=NO_REASSOC, error_model="numpy")(_apply),
            "plain": njit(_apply)}


def evaluate(x, compiled="as in the kernels"):
    s, t = np.empty_like(x), np.empty_like(x)
    COMPILED[compiled](x, s, t)
    return s, t


def float32_grid():
    """Every magnitude from 1e-30 to 120 (both signs), and a dense uniform sweep of [-120, 120]."""
    tiny = np.geomspace(1e-30, 120, 100_000)
    return np.concatenate([np.linspace(-120, 120, 1_000_001), tiny, -tiny, [0.0]]).astype(np.float32)


def ulp_error(actual, exact):
    """|actual - exact| in units of the float32 spacing at ``exact`` (subnormals included)."""
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return np.abs(actual.astype(np.float64) - exact) / spacing


@pytest.mark.parametrize("compiled", sorted(COMPILED))
def test_float32_sigmoid_and_tanh_are_within_a_few_ulp(compiled):
    x = float32_grid()
    s, t = evaluate(x, compiled)
    x64 = x.astype(np.float64)
    assert s.dtype == t.dtype == np.float32
    assert ulp_error(s, 1.0 / (1.0 + np.exp(-x64))).max() <= 4
    assert ulp_error(t, np.tanh(x64)).max() <= 4


@pytest.mark.parametrize("compiled", sorted(COMPILED))
def test_float32_special_values(compiled):
    s, t = evaluate(np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32), compiled)
    assert np.isnan(s[0]) and np.isnan(t[0])
    np.testing.assert_array_equal(s[1:], [1, 0, 0.5, 0.5])
    np.testing.assert_array_equal(t[1:], [1, -1, 0, 0])
    assert not np.signbit(t[3]) and np.signbit(t[4])  # tanh keeps the sign of zero


@pytest.mark.parametrize("value", [-1e4, -30.0, -1e-3, 0.0, 2.5, 700.0])
def test_float64_is_the_exact_library_math(value):
    s, t = evaluate(np.array([value]))
    assert s.dtype == np.float64
    assert t[0] == math.tanh(value)
    assert s[0] == (1 / (1 + math.exp(-value)) if value >= 0
                    else math.exp(value) / (1 + math.exp(value)))
