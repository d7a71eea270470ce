"""The CPU backend's own machinery: batches cut into chunks over threads, reused buffers."""

import dataclasses
import weakref

import numpy as np
import pytest

from fastlstm.backends import AdamConfig, cpu, get_backend
from fastlstm.model import ModelSpec
from fastlstm.backends.cpu import HUGE_PAGE, CPUBackend, _carve, _chunk_plan, _Overlay
from fastlstm.backends.cpu_choices import builtin_choices
from fastlstm.kernels import gemm_cpu, lstm_cpu

from conftest import make_problem, rel_err
from oracle import ORACLE
from test_backend_parity import TOLERANCE, run


@pytest.mark.parametrize("small_chunks", [False, True], ids=["chunks-of-128", "smallest-chunks"])
@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count_and_many_chunks_match_reference(threads, small_chunks):
    # more rows than one chunk holds, an uneven split, several chunks per thread, 2 layers
    choices = builtin_choices()
    if small_chunks:  # training chunks of one GEMM row block (inference keeps its own)
        choices = dataclasses.replace(choices, train_chunk_bytes=1)
    shape = (3 * choices.max_chunk_rows + 7, 4, 3, 5, 2, 3)
    problem = make_problem(shape, "cross_entropy", np.float64)
    backend = CPUBackend(threads, choices=choices)
    got = run(backend, *problem, "cross_entropy")
    want = run(ORACLE, *problem, "cross_entropy")
    rows = backend._workspace(problem[0], shape[0], shape[1], np.float64, "train").rows
    assert (max(hi - lo for lo, hi in rows) <= gemm_cpu.MR) == small_chunks
    for name in ("outputs", "inference", "x", "h0", "c0"):
        assert rel_err(got[name], want[name]) < TOLERANCE[np.float64], name
    for name in want["grads"]:
        assert rel_err(got["grads"][name], want["grads"][name]) < TOLERANCE[np.float64], name


@pytest.mark.parametrize("hidden, chunk_bytes, small", [
    (16, 1, True),        # as small as they come: one row block
    (512, 1, False),      # 4.4 MB of weights: each small chunk would stream them from L3
    (16, 0, False),       # no small chunks chosen
])
def test_training_chunks_are_small_where_that_pays_off(hidden, chunk_bytes, small):
    choices = dataclasses.replace(builtin_choices(), train_chunk_bytes=chunk_bytes)
    backend = CPUBackend(num_threads=2, choices=choices)
    spec = ModelSpec(28, hidden, 1, 10)
    for mode in ("train", "step"):
        rows = backend._workspace(spec, 64, 2, np.float32, mode).rows
        assert max(hi - lo for lo, hi in rows) == (gemm_cpu.MR if small else 32)


@pytest.mark.parametrize("rows, threads, max_rows, sizes", [
    (128, 2, 16, [[16] * 4, [16] * 4]),
    (100, 2, 17, [[16, 16, 18], [16, 16, 18]]),   # whole blocks of 8 rows first
    (1000, 2, 128, [[128, 120, 128, 124]] * 2),
    (22, 2, 4, [[3, 4, 4]] * 2),                  # too few rows for blocks of 8: even
    (3, 4, 128, [[1], [1], [1]]),
    (0, 2, 128, [[]]),
])
def test_chunk_plan_covers_the_batch_in_order(rows, threads, max_rows, sizes):
    bounds, groups = _chunk_plan(rows, threads, max_rows, 8)
    assert [[bounds[i][1] - bounds[i][0] for i in group] for group in groups] == sizes
    edges = [0] + [hi for _, hi in bounds]
    assert [lo for lo, _ in bounds] == edges[:-1] and edges[-1] == rows
    assert [i for group in groups for i in group] == list(range(len(bounds)))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 7, 33, 128])
def test_rows_are_dealt_longest_first_and_evenly(batch, threads):
    # each worker's rows sorted by length, their total steps as even as dealing in turn
    # makes them: the i-th longest row goes to worker i % workers, while it has room
    ws = CPUBackend(num_threads=threads)._workspace(ModelSpec(3, 4, 1, 2), batch, 9,
                                                    np.float32, "step")
    lengths = np.random.default_rng(batch).integers(1, 10, batch)
    order = ws.order(lengths)
    assert sorted(order) == list(range(batch))
    ranked = list(np.argsort(-lengths, kind="stable"))
    start = 0
    for w, group in enumerate(ws.groups):
        size = sum(ws.rows[i][1] - ws.rows[i][0] for i in group)
        share = list(order[start:start + size])
        assert share == sorted(share, key=ranked.index)  # longest first, ties in order
        assert share[:size - 1] == ranked[w:(size - 1) * len(ws.groups):len(ws.groups)]
        start += size


def test_packed_steps_count_the_rows_longer_than_each_step():
    lengths = np.array([5, 5, 3, 1], np.int64)
    active, slot, cslot = lstm_cpu.packed_steps(lengths, 4, False, False)
    np.testing.assert_array_equal(active, [4, 3, 3, 2, 2, 0])
    np.testing.assert_array_equal(slot, [0, 4, 7, 10, 12, 14])  # the steps one after another
    np.testing.assert_array_equal(cslot, [0, 0, 4, 7, 10, 12])
    active, slot, _ = lstm_cpu.packed_steps(lengths, 4, False, True)  # from the last step back
    np.testing.assert_array_equal(active, [2, 2, 3, 3, 4, 0])
    np.testing.assert_array_equal(slot, [0, 2, 4, 7, 10, 14])
    active, slot, cslot = lstm_cpu.packed_steps(lengths, 4, True, False)  # two slots in turn
    np.testing.assert_array_equal(active, [4, 3, 3, 2, 2, 0])
    np.testing.assert_array_equal(slot, [0, 4, 0, 4, 0, 4])
    np.testing.assert_array_equal(cslot, slot)


def test_a_training_cache_survives_later_calls():
    backend = get_backend("cpu")
    spec, params, x, y, h0, c0 = make_problem((6, 5, 3, 4, 2, 3), "cross_entropy", np.float32)
    outputs, cache = backend.forward(spec, params, x, train=True)
    _, doutputs = backend.loss(outputs, y, "cross_entropy")
    before = backend.backward(spec, params, cache, doutputs).params.copy()
    backend.forward(spec, params, 2 * x, train=True)
    backend.forward(spec, params, 3 * x)
    state = backend.adam_state(params.copy())
    backend.train_step(spec, params.copy(), state, 4 * x, y, "cross_entropy", AdamConfig(1e-2))
    np.testing.assert_array_equal(backend.backward(spec, params, cache, doutputs).params, before)


@pytest.mark.parametrize("small_chunks", [False, True], ids=["a-chunk-a-thread", "small-chunks"])
def test_train_step_reuses_its_buffers_and_matches_forward_backward(small_chunks, monkeypatch):
    spec, params, x, y, _, _ = make_problem((23, 5, 3, 4, 2, 3), "cross_entropy", np.float64)
    choices = builtin_choices()
    if small_chunks:  # the smallest chunks allowed, 3 rows: 23 rows in 2 or 3, four per thread
        choices = dataclasses.replace(choices, train_chunk_bytes=1)
        monkeypatch.setattr(cpu.gemm_cpu, "MR", 3)
    backend = CPUBackend(num_threads=2, choices=choices)
    p_step, p_ref = params.copy(), params.copy()
    s_step, s_ref = backend.adam_state(p_step), backend.adam_state(p_ref)
    for _ in range(3):
        loss = backend.train_step(spec, p_step, s_step, x, y, "cross_entropy", AdamConfig(1e-2))
        outputs, cache = backend.forward(spec, p_ref, x, train=True)
        value, doutputs = backend.loss(outputs, y, "cross_entropy")
        grads = backend.backward(spec, p_ref, cache, doutputs).params
        backend.adam_step(p_ref, grads, s_ref, AdamConfig(1e-2))
        assert loss == value
    np.testing.assert_array_equal(p_step, p_ref)
    ws = backend._workspace(spec, 23, 5, np.float64, "step")
    if small_chunks:
        assert [len(group) for group in ws.groups] == [4, 4]
        # a thread's chunks lie on the same memory, the threads' do not overlap
        spans = [_span(chunk)[0] for chunk in ws.chunks]
        assert len({lo for lo, _ in spans[:4]}) == len({lo for lo, _ in spans[4:]}) == 1
        assert max(hi for _, hi in spans[:4]) <= spans[4][0]
    else:
        assert [len(group) for group in ws.groups] == [1, 1]


def _span(buffers):
    """First and last address (+1) of the non-empty arrays in nested dicts and lists."""
    if isinstance(buffers, np.ndarray):
        return [(buffers.ctypes.data, buffers.ctypes.data + buffers.nbytes)] if buffers.size else []
    spans = [span for b in (buffers.values() if isinstance(buffers, dict) else buffers)
             for span in _span(b)]
    return [(min(lo for lo, _ in spans), max(hi for _, hi in spans))] if spans else []


def test_a_dropped_training_cache_gives_its_buffers_to_the_next_forward():
    backend = get_backend("cpu")
    spec, params, x, _, _, _ = make_problem((6, 5, 3, 4, 2, 3), "cross_entropy", np.float32)
    _, cache = backend.forward(spec, params, x, train=True)
    first = weakref.ref(cache["ws"])
    del cache
    _, cache = backend.forward(spec, params, x, train=True)
    assert cache["ws"] is first()
    _, held = backend.forward(spec, params, x, train=True)
    assert held["ws"] is not cache["ws"]


@pytest.mark.parametrize("shapes", [
    dict(a=(3, 5), b=[(7,), dict(c=(2, 2, 2))]),           # small: aligned to a cache line
    dict(a=(600, 1024), b=[(300, 3), dict(c=(5, 7))]),     # over 2 MiB: aligned to a huge page
])
def test_carved_buffers_are_aligned_and_disjoint(shapes):
    arrays = _carve(shapes, np.float32)
    flat = [arrays["a"], arrays["b"][0], arrays["b"][1]["c"]]
    assert [a.shape for a in flat] == [shapes["a"], shapes["b"][0], shapes["b"][1]["c"]]
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in flat)
    starts = [a.ctypes.data for a in flat]
    assert all(s % 64 == 0 for s in starts)
    if sum(a.nbytes for a in flat) >= HUGE_PAGE:
        assert starts[0] % HUGE_PAGE == 0
    for a in flat:  # writing one leaves the others alone
        for b in flat:
            b[...] = 0
        a[...] = 1
        assert [b.sum() for b in flat] == [a.size if b is a else 0 for b in flat]


def test_overlaid_buffers_share_their_memory_and_only_that():
    arrays = _carve(dict(a=(3,), b=_Overlay([dict(c=(4,), d=(50,)), dict(c=(40,))]), e=(5,)),
                    np.float32)
    first, second = arrays["b"]
    assert first["c"].ctypes.data == second["c"].ctypes.data
    ends = {name: a.ctypes.data + a.nbytes for name, a in
            dict(a=arrays["a"], d=first["d"], c=second["c"]).items()}
    assert ends["a"] <= first["c"].ctypes.data
    assert max(ends["d"], ends["c"]) <= arrays["e"].ctypes.data


def test_sessions_hold_blas_on_one_thread_and_restore_it():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    backend = get_backend("cpu")
    before = blas_threads()
    spec, params, x, _, _, _ = make_problem((6, 5, 3, 4, 1, 3), "cross_entropy", np.float32)
    with backend.session():
        assert set(blas_threads()) == {1}
        with backend.session():  # sessions nest
            backend.forward(spec, params, x)
            assert set(blas_threads()) == {1}
        backend.forward(spec, params, x)
        assert set(blas_threads()) == {1}
    assert blas_threads() == before
    backend.forward(spec, params, x)  # a call on its own restores too
    assert blas_threads() == before


def test_a_rows_outputs_do_not_depend_on_its_place_in_the_batch():
    # scikit-learn's check_methods_sample_order_invariance, made deterministic: with
    # BLAS computing a one-output head, some rows came out an ulp apart.  The property
    # of our GEMM in the time loop (step_gemm="own"); BLAS does not promise it (OpenBLAS's
    # Haswell kernels give such rows in the time loop too)
    spec, params, x, _, _, _ = make_problem((20, 4, 3, 8, 1, 1), "squared_error", np.float32)
    backend = CPUBackend(num_threads=2,
                         choices=dataclasses.replace(builtin_choices(), step_gemm="own"))
    outputs, _ = backend.forward(spec, params, x)
    for seed in range(20):
        order = np.random.default_rng(seed).permutation(len(x))
        shuffled, _ = backend.forward(spec, params, x[order])
        np.testing.assert_array_equal(shuffled, outputs[order])


def test_a_thread_count_that_is_no_number_is_named(monkeypatch):
    monkeypatch.setenv("FASTLSTM_NUM_THREADS", "auto")
    with pytest.raises(ValueError, match="FASTLSTM_NUM_THREADS must be a whole number"):
        cpu.default_num_threads()


def test_a_bidirectional_head_is_initialised_for_its_fan_in():
    from fastlstm.model import ModelSpec
    uni, bi = ModelSpec(3, 16, 1, 5), ModelSpec(3, 16, 1, 5, bidirectional=True)
    head = bi.layout.views(bi.layout.init(0, np.float64))["head.weight"]
    lstm = bi.layout.views(bi.layout.init(0, np.float64))["lstm.weight_hh_l0"]
    assert np.abs(head).max() <= 1 / np.sqrt(32) < np.abs(lstm).max() <= 1 / np.sqrt(16)
    # a unidirectional network's draws are unchanged
    np.testing.assert_array_equal(uni.layout.init(0), ModelSpec(3, 16, 1, 5).layout.init(0))


@pytest.mark.parametrize("hidden", [24, 64], ids=lambda h: f"H{h}")
def test_full_width_kernels_give_the_same_bits(hidden, monkeypatch):
    # the _full_width kernels differ from the others in how LLVM vectorises their loops
    # only: a fit must not depend on which the hidden size picks (FULL_WIDTH_FROM_HIDDEN);
    # H=24 leaves a remainder past the vectors of 16 lanes
    spec, params, x, y, h0, c0 = make_problem((19, 7, 3, hidden, 2, 4), "cross_entropy",
                                              np.float32, bidirectional=True)
    results = []
    for first_full in (0, 10**9):
        monkeypatch.setattr(lstm_cpu, "FULL_WIDTH_FROM_HIDDEN", first_full)
        backend = CPUBackend(num_threads=2)
        outputs, cache = backend.forward(spec, params, x, h0, c0, train=True)
        _, doutputs = backend.loss(outputs, y, "cross_entropy")
        grads = backend.backward(spec, params, cache, doutputs, input_grads=True)
        inference, _ = backend.forward(spec, params, x)
        results.append([outputs, inference, grads.params, grads.x, grads.h0, grads.c0])
    for full, default in zip(*results):
        np.testing.assert_array_equal(full, default)
