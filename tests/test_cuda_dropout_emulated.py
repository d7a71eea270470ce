"""Dropout between layers and recurrent dropout on the CUDA backend's own code and kernels, run on
the CPU emulator (see tests/test_cuda_emulated.py), against the oracle with the same masks.

The checks are tests/test_dropout.py's, which the emulated backend does not reach through
``available_backends()``.  The emulator is slow, so the product of shapes x kinds x directions x
lengths x dtypes x recurrence kernels is cut to a representative set (:data:`CASES`): every kind,
uni and bidirectional, with random lengths on both kernels in float64; every kind with every row
over every step (the fixed-length path, whose weight gradient of W_hh reads h_{t-1} in place
where there is no recurrent dropout); three layers, one sample, one layer (dropout between layers
a no-op), a batch of 37 over two chunks of rows; float32 on both kernels.  Besides: the kernels'
masks are :mod:`fastlstm.dropout`'s bit for bit, and a captured training step replays with a
new seed (and rates) at every step, launching the same kernels with the same arguments.
"""

import shutil

import numpy as np
import pytest

import test_dropout as dropout_cases
from conftest import make_lengths, make_problem, rel_err, shape_id
from fastlstm.backends import AdamConfig
from fastlstm.backends.cuda_support import dropout_masks
from fastlstm.dropout import Dropout
from fastlstm.model import ModelSpec
from oracle import ORACLE
from test_cuda_emulated import cuda_module  # noqa: F401  (the emulated CUDA module fixture)
from test_cuda_emulated import captures
from test_cuda_ragged_emulated import _record_step_body, emulated

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed here")

F64, F32 = np.float64, np.float32
SHAPES = dropout_cases.SHAPES
KINDS = tuple(dropout_cases.KINDS)
FIRST, THREE_LAYERS, ONE_SAMPLE, BIG_BATCH, ONE_LAYER = SHAPES

#: (recurrence, shape, kind, bidirectional, lengths kind, dtype)
CASES = (
    [(r, FIRST, kind, bi, "random", F64) for r in ("persistent", "step") for kind in KINDS
     for bi in (False, True)]
    + [(r, FIRST, kind, False, "full", F64) for r in ("persistent", "step") for kind in KINDS]
    + [("persistent", FIRST, "both", True, "full", F64),
       ("persistent", THREE_LAYERS, "both", True, "random", F64),
       ("step", THREE_LAYERS, "both", False, "full", F64),
       ("persistent", ONE_SAMPLE, "recurrent", True, "random", F64),
       ("step", BIG_BATCH, "both", True, "random", F64),
       ("persistent", BIG_BATCH, "between", False, "random", F64),
       ("persistent", ONE_LAYER, "between", True, "random", F64),
       ("step", ONE_LAYER, "recurrent", False, "full", F64),
       ("persistent", FIRST, "both", True, "random", F32),
       ("step", FIRST, "both", False, "full", F32),
       ("step", THREE_LAYERS, "recurrent", True, "random", F32)])


def case_id(case):
    recurrence, shape, kind, bi, lengths, dtype = case
    return (f"{recurrence}-{shape_id(shape)}-{kind}-{'bi' if bi else 'uni'}-{lengths}-"
            f"{np.dtype(dtype).name}")


@pytest.fixture(params=["persistent", "step"])
def backend(request, cuda_module):  # noqa: F811
    return emulated(cuda_module, request.param)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backend_matches_oracle_with_the_same_masks(cuda_module, case):  # noqa: F811
    recurrence, shape, kind, bidirectional, lengths_kind, dtype = case
    dropout_cases.test_backend_matches_oracle_with_the_same_masks(
        emulated(cuda_module, recurrence), shape, kind, bidirectional, lengths_kind, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_initial_states_under_recurrent_dropout(backend, kind):
    dropout_cases.test_initial_states_under_recurrent_dropout(backend, kind)


def test_inference_ignores_dropout(backend):
    dropout_cases.test_inference_ignores_dropout(backend)


@pytest.mark.parametrize("lengths_kind", ["random", "full"])
def test_train_step_with_dropout_matches_oracle(backend, lengths_kind):
    dropout_cases.test_train_step_with_dropout_matches_oracle(backend, lengths_kind)


def test_weighted_train_step_with_dropout_matches_oracle(backend):
    dropout_cases.test_weighted_train_step_with_dropout_matches_oracle(backend)


# -- the kernels' masks ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("dropout", [Dropout(0.3, 0.6, 0), Dropout(0.5, 1e-9, 2**64 - 1),
                                     Dropout(1 - 1e-12, 0.9, 12345)],
                         ids=["p0.3", "tiny-rate-max-seed", "nearly-all-dropped"])
def test_kernel_masks_are_the_definitions_bit_for_bit(cuda_module, dtype, dropout):  # noqa: F811
    # The masks through the kernels' hash (the gather through a mask, on ones), for every
    # mask of a bidirectional 3-layer network, at steps up to 999: fastlstm.dropout's exactly.
    backend = emulated(cuda_module, "step")
    cupy = cuda_module.cupy
    B, T, H = 6, 1000, 5
    spec = ModelSpec(2, H, 3, 2, bidirectional=True)
    masks = cupy.asarray(dropout_masks(dropout, spec, B))
    rows = np.arange(B)
    between = dropout.between_masks(spec, rows, T, dtype)
    recurrent = dropout.recurrent_masks(spec, rows, dtype)
    steps = np.random.default_rng(0).integers(0, T, 40)
    cols = (rows[:, None] * T + steps[None, :]).ravel()  # each (row, step) pair: one column
    ones = cupy.ones((H, cols.size), dtype)
    got = cupy.empty((H, cols.size), dtype)
    run = backend._mask_columns
    for k in range(spec.num_layers):
        for d in range(spec.num_directions):
            run(ones, cols.size, None, got, cols.size, H, cols.size, masks[k, d, 1],
                cupy.asarray(cols.astype(np.int32)), T)
            want = recurrent[k * 2 + d][cols // T].T
            np.testing.assert_array_equal(got, want, err_msg=f"recurrent mask {k}, {d}")
            if k == spec.num_layers - 1:
                continue
            run(ones, cols.size, None, got, cols.size, H, cols.size, masks[k, d, 0],
                cupy.asarray(cols.astype(np.int32)), T)
            want = between[k][cols // T, cols % T, d * H:(d + 1) * H].T
            np.testing.assert_array_equal(got, want, err_msg=f"mask between layers {k}, {d}")
    assert recurrent.dtype == between[0].dtype == dtype


# -- CUDA graphs --------------------------------------------------------------------------

#: the dropout of each step: new seeds and rates, then none (a graph of its own), then again
DROPOUTS = [Dropout(0.3, 0.3, 0), Dropout(0.5, 0.2, 2**64 - 1), None, Dropout(0.1, 0.6, 7)]


@pytest.mark.parametrize("ragged", [False, True], ids=["fixed", "ragged"])
def test_a_graph_replays_with_new_dropout_seeds_and_rates(cuda_module, monkeypatch,
                                                          ragged):  # noqa: F811
    # The step captured once per kind of dropout, its graph replayed with the next steps'
    # seeds and rates.
    backend = emulated(cuda_module, "persistent", graphs=True)
    captured = captures(backend, monkeypatch)
    spec, params, x, y, _, _ = make_problem((7, 5, 3, 4, 2, 3), "cross_entropy",
                                            bidirectional=True)
    lengths = make_lengths(7, 5, "random") if ragged else None
    p_ref, p_dev = params.copy(), backend.asarray(params.copy())
    s_ref, s_dev = ORACLE.adam_state(p_ref), backend.adam_state(p_dev)
    config = AdamConfig(1e-2)
    for dropout in DROPOUTS:
        l_ref = ORACLE.train_step(spec, p_ref, s_ref, x, y, "cross_entropy", config, lengths,
                                  dropout=dropout)
        l_dev = backend.train_step(spec, p_dev, s_dev, backend.asarray(x), backend.asarray(y),
                                   "cross_entropy", config, lengths=lengths, dropout=dropout)
        assert abs(float(l_dev) - l_ref) < 1e-10
    assert len(captured) == 2, "new seeds and rates must not need a new capture"
    assert len(backend._slots) == 1
    assert rel_err(backend.to_host(p_dev), p_ref) < 1e-10


@pytest.mark.parametrize("recurrence", ["persistent", "step"])
def test_a_dropout_step_launches_the_same_whatever_the_seed(cuda_module, monkeypatch,
                                                            recurrence):  # noqa: F811
    # What a replay relies on: the same kernels, arguments and GEMMs for every seed and rate,
    # none of which reaches a launch but through the slot's mask buffer.
    backend = emulated(cuda_module, recurrence)
    spec, params, x, y, _, _ = make_problem((5, 4, 2, 3, 2, 3), "cross_entropy",
                                            bidirectional=True)
    p = backend.asarray(params)
    state = backend.adam_state(p)
    records = []
    for dropout in DROPOUTS[:2] + DROPOUTS[3:]:
        records.append(_record_step_body(backend, monkeypatch, cuda_module, lambda: (
            backend.train_step(spec, p, state, backend.asarray(x), backend.asarray(y),
                               "cross_entropy", AdamConfig(1e-2),
                               lengths=np.array([4, 1, 3, 2, 4]), dropout=dropout))))
    assert records[0] and records[0] == records[1] == records[2]
    launched = [a for call in records[0] if call[0] == "kernel" for a in call[5]]
    assert not [a for a in launched if isinstance(a, (float, np.floating))]
    (slot,) = backend._slots.values()
    buffers = [a for a in launched if isinstance(a, tuple)]
    assert ("ptr", slot.work.masks.__array_interface__["data"][0]) in buffers
