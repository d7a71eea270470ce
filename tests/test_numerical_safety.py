"""Extreme but finite inputs give finite outputs and gradients on every backend."""

import numpy as np
import pytest

from fastlstm.model import ModelSpec
from fastlstm.backends import get_backend

from conftest import rel_err
from oracle import ORACLE


def forward_backward(backend, spec, params, x, y):
    p = backend.asarray(params)
    outputs, cache = backend.forward(spec, p, backend.asarray(x), train=True)
    value, doutputs = backend.loss(outputs, backend.asarray(y), "cross_entropy")
    grads = backend.backward(spec, p, cache, doutputs, input_grads=True)
    return value, backend.to_host(outputs), backend.to_host(grads.params), backend.to_host(grads.x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_inputs_of_magnitude_1e6_stay_finite(backend, dtype):
    rng = np.random.default_rng(0)
    spec = ModelSpec(5, 8, 2, 3)
    params = spec.layout.init(rng, dtype)
    x = (rng.choice([-1.0, 1.0], size=(4, 7, 5)) * 1e6).astype(dtype)
    with np.errstate(over="raise", invalid="raise"):
        value, *arrays = forward_backward(backend, spec, params, x, np.array([0, 1, 2, 0]))
    assert np.isfinite(value)
    for a in arrays:
        assert np.isfinite(a).all()


def test_sequences_of_length_2000_stay_finite_and_match_reference(backend):
    rng = np.random.default_rng(1)
    spec = ModelSpec(3, 6, 2, 2)
    params = spec.layout.init(rng, np.float64) * 4  # larger weights: saturating gates
    x = rng.standard_normal((2, 2000, 3))
    y = np.array([0, 1])
    got = forward_backward(backend, spec, params, x, y)
    want = forward_backward(ORACLE, spec, params, x, y)
    for actual, expected in zip(got, want):
        assert np.isfinite(actual).all()
        assert rel_err(actual, expected) < 1e-10
