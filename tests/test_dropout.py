"""Dropout between layers and recurrent dropout: the masks, and every backend against the oracle.

The oracle takes the masks as arrays (:func:`fastlstm.reference.forward`); the
backends compute them from the seed where they need them.  Same seed, same masks:
so each backend is checked against the oracle with the masks it used.
"""

import numpy as np
import pytest

from fastlstm import dropout as dropout_masks
from fastlstm.backends import AdamConfig
from fastlstm.dropout import Dropout

from conftest import LENGTH_KINDS, in_float64, make_lengths, make_problem, rel_err, shape_id
from oracle import ORACLE

TOLERANCE = {np.float64: 1e-10, np.float32: 1e-4}
#: (batch, steps, inputs, hidden, layers, outputs)
SHAPES = [(5, 6, 3, 4, 2, 3), (4, 4, 3, 5, 3, 3), (1, 5, 2, 3, 2, 2), (37, 9, 4, 6, 2, 3),
          (6, 5, 2, 3, 1, 2)]
KINDS = {"between": Dropout(p=0.3, seed=11), "recurrent": Dropout(recurrent_p=0.3, seed=12),
         "both": Dropout(p=0.25, recurrent_p=0.4, seed=2**64 - 1)}


def run(backend, spec, params, x, y, h0, c0, loss, lengths, dropout):
    params, x, y = backend.asarray(params), backend.asarray(x), backend.asarray(y)
    h0 = None if h0 is None else backend.asarray(h0)
    c0 = None if c0 is None else backend.asarray(c0)
    outputs, cache = backend.forward(spec, params, x, h0, c0, train=True, lengths=lengths,
                                     dropout=dropout)
    value, doutputs = backend.loss(outputs, y, loss)
    grads = backend.backward(spec, params, cache, doutputs, input_grads=True)
    host = backend.to_host
    return dict(outputs=host(outputs), loss=float(value),
                grads=spec.layout.views(host(grads.params)), x=host(grads.x),
                h0=host(grads.h0), c0=host(grads.c0))


def compare(got, want, tol):
    pairs = {name: (got[name], want[name]) for name in ("outputs", "loss", "x", "h0", "c0")}
    pairs.update({name: (got["grads"][name], want["grads"][name]) for name in want["grads"]})
    for name, (actual, expected) in pairs.items():
        err = rel_err(actual, expected)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:g}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("lengths_kind", ["full", "random"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_backend_matches_oracle_with_the_same_masks(backend, shape, kind, bidirectional,
                                                    lengths_kind, dtype):
    loss = "cross_entropy" if shape[5] > 2 else "squared_error"
    problem = make_problem(shape, loss, dtype, bidirectional=bidirectional)
    lengths = make_lengths(shape[0], shape[1], lengths_kind)
    got = run(backend, *problem, loss, lengths, KINDS[kind])
    want = run(ORACLE, *in_float64(*problem), loss, lengths, KINDS[kind])
    compare(got, want, TOLERANCE[dtype])
    without = run(ORACLE, *in_float64(*problem), loss, lengths, None)
    changed = rel_err(want["outputs"], without["outputs"]) > 1e-3
    # one layer has no output that another layer reads: dropout between layers is a no-op
    assert changed == (kind != "between" or shape[4] > 1)


@pytest.mark.parametrize("kind", KINDS)
def test_initial_states_under_recurrent_dropout(backend, kind):
    """A given ``h0`` is read through the recurrent mask too (it is ``h_{-1}``)."""
    shape = (5, 4, 2, 3, 2, 3)
    problem = make_problem(shape, "cross_entropy", initial_states=True, bidirectional=True)
    got = run(backend, *problem, "cross_entropy", None, KINDS[kind])
    want = run(ORACLE, *problem, "cross_entropy", None, KINDS[kind])
    compare(got, want, TOLERANCE[np.float64])


def test_inference_ignores_dropout(backend):
    spec, params, x, *_ = make_problem((4, 5, 2, 3, 2, 3), "cross_entropy", np.float32,
                                       initial_states=False)
    params, x = backend.asarray(params), backend.asarray(x)
    plain, _ = backend.forward(spec, params, x)
    dropped, _ = backend.forward(spec, params, x, dropout=KINDS["both"])
    np.testing.assert_array_equal(backend.to_host(plain), backend.to_host(dropped))


@pytest.mark.parametrize("lengths_kind", LENGTH_KINDS)
def test_train_step_with_dropout_matches_oracle(backend, lengths_kind):
    shape = (9, 6, 3, 4, 2, 3)
    spec, flat, x, y, _, _ = make_problem(shape, "cross_entropy", initial_states=False,
                                          bidirectional=True)
    lengths = make_lengths(shape[0], shape[1], lengths_kind)
    config = AdamConfig(1e-2, clip_grad_norm=0.5)
    results = []
    for b in (backend, ORACLE):
        params = b.asarray(flat.copy())
        state = b.adam_state(params)
        for seed in range(3):  # new masks at every step
            b.train_step(spec, params, state, b.asarray(x), b.asarray(y), "cross_entropy",
                         config, lengths=lengths, dropout=Dropout(0.3, 0.3, seed))
        results.append(b.to_host(params))
    assert rel_err(*results) < 1e-10


def test_weighted_train_step_with_dropout_matches_oracle(backend):
    """Weights and dropout together, with lengths, on a bidirectional stack: the rows' weights
    and masks both follow the rows through the backend's reordering."""
    shape = (11, 5, 3, 4, 2, 3)
    spec, flat, x, y, _, _ = make_problem(shape, "cross_entropy", initial_states=False,
                                          bidirectional=True)
    lengths = make_lengths(shape[0], shape[1], "random")
    weights = np.random.default_rng(4).uniform(0, 2, shape[0])
    weights[2] = 0
    results = []
    for b in (backend, ORACLE):
        params = b.asarray(flat.copy())
        state = b.adam_state(params)
        for seed in range(2):
            b.train_step(spec, params, state, b.asarray(x), b.asarray(y), "cross_entropy",
                         AdamConfig(1e-2), lengths=lengths, sample_weight=b.asarray(weights),
                         dropout=Dropout(0.3, 0.3, seed))
        results.append(b.to_host(params))
    assert rel_err(*results) < 1e-10


# -- the masks ------------------------------------------------------------------------------

def test_masks_keep_the_expected_share_and_scale():
    for p in (0.1, 0.25, 0.5, 0.9):
        keys = dropout_masks.row_keys(3, 5, np.arange(64))
        masks = dropout_masks.unit_masks(keys, 0, 4096, p, np.float32)
        kept = masks != 0
        # 262,144 draws: the kept share is within 5 standard deviations of 1 - p
        sd = np.sqrt(p * (1 - p) / kept.size)
        assert abs(kept.mean() - (1 - p)) < 5 * sd
        assert np.all(masks[kept] == np.float32(1 / (1 - p)))


def test_masks_differ_by_seed_stream_row_and_unit():
    def mask(seed, stream, rows, start=0):
        return dropout_masks.unit_masks(dropout_masks.row_keys(seed, stream, rows), start, 256,
                                        0.5, np.float64)

    base = mask(0, 1, np.arange(8))
    assert not (base[:, None] == base[None, :]).all(axis=2)[~np.eye(8, dtype=bool)].any()
    for other in (mask(1, 1, np.arange(8)), mask(0, 3, np.arange(8)),
                  mask(0, 1, np.arange(8) + 8), mask(0, 1, np.arange(8), start=256)):
        assert 0.3 < (other != base).mean() < 0.7
    # a unit's mask depends on its own index only: a window of the sequence is the same
    np.testing.assert_array_equal(mask(0, 1, np.arange(8), start=10)[:, :246], base[:, 10:])


def test_streams_are_distinct_per_layer_direction_and_kind():
    streams = [dropout_masks.between_stream(k) for k in range(4)] + \
        [dropout_masks.recurrent_stream(k, d) for k in range(4) for d in range(2)]
    assert len(set(streams)) == len(streams)


@pytest.mark.parametrize("bad", [dict(p=1.0), dict(p=-0.1), dict(recurrent_p=1.5),
                                 dict(seed=-1), dict(seed=2**64)])
def test_bad_dropout_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Dropout(**bad)


# -- the CPU backend's own promises ---------------------------------------------------------

def test_kernel_masks_equal_the_definition():
    from fastlstm.kernels import dropout_cpu
    keys = dropout_masks.row_keys(2**63 + 5, 9, np.arange(7))
    for p in (0.05, 0.5, 0.75):
        for dtype in (np.float32, np.float64):
            out = np.empty((7, 300), dtype)
            dropout_cpu.fill_masks(keys, np.uint64(dropout_masks.threshold(p)),
                                   np.dtype(dtype).type(1 / (1 - p)), out)
            np.testing.assert_array_equal(out, dropout_masks.unit_masks(keys, 0, 300, p, dtype))


@pytest.mark.parametrize("lengths_kind", ["full", "random"])
def test_cpu_masks_do_not_depend_on_threads_or_chunks(lengths_kind):
    """A row's masks follow its place in the caller's batch, not the chunk or thread that
    runs it: training outputs are bit-identical on 1 and 3 threads (the weight gradients
    are not: they are summed over the threads' rows)."""
    from fastlstm.backends.cpu import CPUBackend
    shape = (70, 6, 3, 8, 3, 3)
    spec, params, x, *_ = make_problem(shape, "cross_entropy", np.float32,
                                       initial_states=False, bidirectional=True)
    lengths = make_lengths(shape[0], shape[1], lengths_kind)
    outputs = [CPUBackend(num_threads=n).forward(spec, params, x, train=True, lengths=lengths,
                                                 dropout=KINDS["both"])[0] for n in (1, 3)]
    np.testing.assert_array_equal(*outputs)


def test_estimator_fit_with_dropout_is_reproducible_and_differs_from_without():
    from fastlstm import LSTMClassifier
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 5, 3)).astype(np.float32)
    y = (X[:, :, 0].sum(axis=1) > 0).astype(int)
    settings = dict(hidden_size=6, num_layers=2, max_iter=2, batch_size=16, random_state=3,
                    device="cpu")
    fits = [LSTMClassifier(dropout=0.3, recurrent_dropout=0.2, **settings).fit(X, y)
            for _ in range(2)]
    np.testing.assert_array_equal(fits[0]._params, fits[1]._params)
    plain = LSTMClassifier(**settings).fit(X, y)
    assert not np.allclose(plain._params, fits[0]._params)
    # the probabilities at inference do not drop: the same every time
    np.testing.assert_array_equal(fits[0].predict_proba(X), fits[0].predict_proba(X))


def test_dropout_with_one_layer_warns_that_it_does_nothing():
    from fastlstm import LSTMClassifier
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 4, 2)), np.arange(20) % 2
    with pytest.warns(UserWarning, match="one layer"):
        LSTMClassifier(hidden_size=3, dropout=0.5, max_iter=1, device="cpu").fit(X, y)
