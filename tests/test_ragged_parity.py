"""Variable length and bidirectional layers: every backend against the oracle.

Lengths are unsorted (the backends sort rows themselves); the shapes include one
step, one sample, and lengths that are all 1 or all the full length.
"""

import numpy as np
import pytest

from fastlstm.backends import AdamConfig

from conftest import LENGTH_KINDS, in_float64, make_lengths, make_problem, rel_err, shape_id
from oracle import ORACLE

TOLERANCE = {np.float64: 1e-10, np.float32: 1e-4}
#: (batch, steps, inputs, hidden, layers, outputs)
SHAPES = [(5, 6, 3, 4, 1, 3), (7, 5, 2, 3, 2, 2), (4, 4, 3, 5, 3, 3), (1, 5, 2, 3, 2, 2),
          (3, 1, 2, 3, 2, 2), (37, 9, 4, 6, 2, 3)]


def run(backend, spec, params, x, y, h0, c0, loss, lengths):
    params, x, y = backend.asarray(params), backend.asarray(x), backend.asarray(y)
    h0 = None if h0 is None else backend.asarray(h0)
    c0 = None if c0 is None else backend.asarray(c0)
    outputs, cache = backend.forward(spec, params, x, h0, c0, train=True, lengths=lengths)
    value, doutputs = backend.loss(outputs, y, loss)
    grads = backend.backward(spec, params, cache, doutputs, input_grads=True)
    inference, _ = backend.forward(spec, params, x, h0, c0, lengths=lengths)
    host = backend.to_host
    return dict(outputs=host(outputs), inference=host(inference), loss=float(value),
                grads=spec.layout.views(host(grads.params)), x=host(grads.x),
                h0=host(grads.h0), c0=host(grads.c0))


def compare(got, want, tol):
    pairs = {name: (got[name], want[name]) for name in ("outputs", "loss", "x", "h0", "c0")}
    pairs["inference outputs"] = (got["inference"], want["outputs"])
    pairs.update({name: (got["grads"][name], want["grads"][name]) for name in want["grads"]})
    for name, (actual, expected) in pairs.items():
        err = rel_err(actual, expected)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:g}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("lengths_kind", LENGTH_KINDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_backend_matches_oracle(backend, shape, bidirectional, lengths_kind, dtype):
    loss = "cross_entropy" if shape[5] > 2 else "squared_error"
    problem = make_problem(shape, loss, dtype, bidirectional=bidirectional)
    lengths = make_lengths(shape[0], shape[1], lengths_kind)
    got = run(backend, *problem, loss, lengths)
    want = run(ORACLE, *in_float64(*problem), loss, lengths)
    compare(got, want, TOLERANCE[dtype])
    past = np.arange(shape[1])[None, :] >= lengths[:, None]
    assert not got["x"][past].any(), "gradient w.r.t. steps past a sample's length"


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_padding_is_never_read(backend, bidirectional):
    spec, params, x, y, _, _ = make_problem((6, 7, 3, 4, 2, 3), "cross_entropy", np.float32,
                                            initial_states=False, bidirectional=bidirectional)
    lengths = make_lengths(6, 7, "random")
    changed = x.copy()
    for row, n in enumerate(lengths):
        changed[row, n:] = 1e6 * (row + 1)
    a, _ = backend.forward(spec, backend.asarray(params), backend.asarray(x), lengths=lengths)
    b, _ = backend.forward(spec, backend.asarray(params), backend.asarray(changed),
                           lengths=lengths)
    np.testing.assert_array_equal(backend.to_host(a), backend.to_host(b))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_train_step_with_lengths_matches_oracle(backend, bidirectional):
    spec, params, x, y, _, _ = make_problem((9, 6, 3, 4, 2, 3), "cross_entropy",
                                            bidirectional=bidirectional)
    lengths = make_lengths(9, 6, "random")
    p_ref, p_dev = params.copy(), backend.asarray(params.copy())
    s_ref, s_dev = ORACLE.adam_state(p_ref), backend.adam_state(p_dev)
    config = AdamConfig(1e-2, clip_grad_norm=0.5)
    for _ in range(3):
        l_ref = ORACLE.train_step(spec, p_ref, s_ref, x, y, "cross_entropy", config, lengths)
        l_dev = backend.train_step(spec, p_dev, s_dev, backend.asarray(x), backend.asarray(y),
                                   "cross_entropy", config, lengths=lengths)
        assert abs(float(l_dev) - l_ref) < 1e-10
    assert rel_err(backend.to_host(p_dev), p_ref) < 1e-10


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_full_lengths_on_the_cpu_are_bit_identical_to_fixed_length(bidirectional):
    from fastlstm.backends import get_backend
    cpu = get_backend("cpu")
    spec, params, x, y, _, _ = make_problem((37, 6, 3, 8, 2, 3), "cross_entropy", np.float32,
                                            bidirectional=bidirectional)
    full = np.full(37, 6)
    a, _ = cpu.forward(spec, params, x)
    b, _ = cpu.forward(spec, params, x, lengths=full)
    np.testing.assert_array_equal(a, b)
    p_a, p_b = params.copy(), params.copy()
    s_a, s_b = cpu.adam_state(p_a), cpu.adam_state(p_b)
    for _ in range(2):
        cpu.train_step(spec, p_a, s_a, x, y, "cross_entropy", AdamConfig(1e-2))
        cpu.train_step(spec, p_b, s_b, x, y, "cross_entropy", AdamConfig(1e-2), lengths=full)
    np.testing.assert_array_equal(p_a, p_b)


def test_lengths_out_of_range_are_refused(backend):
    spec, params, x, _, _, _ = make_problem((3, 4, 2, 3, 1, 2), "cross_entropy")
    for bad in ([0, 1, 2], [1, 5, 2], [1, 2]):
        with pytest.raises(ValueError, match="lengths"):
            backend.forward(spec, backend.asarray(params), backend.asarray(x),
                            lengths=np.array(bad))
