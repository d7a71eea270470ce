"""The register-blocked GEMM of the CPU kernels against float64 products, and the CPU
backend with either GEMM (its own or BLAS) against the reference."""

import dataclasses

import numpy as np
import pytest

from fastlstm.backends import get_backend
from fastlstm.backends.cpu import CPUBackend
from fastlstm.backends.cpu_choices import builtin_choices
from fastlstm.kernels import gemm_cpu

from conftest import in_float64, make_problem, rel_err
from oracle import ORACLE

MR, NR = gemm_cpu.MR, gemm_cpu.NR
#: (M, K, N): empty, single, remainders of every block size, exact panels, LSTM step shapes
SHAPES = [(0, 3, 4), (3, 0, 4), (1, 1, 1), (3, 5, 7), (MR + 7, 9, NR + 1), (MR, 2, NR),
          (2 * MR + 3, 17, 3 * NR - 1), (64, 156, 512), (125, 156, 512), (64, 512, 128),
          (156, 300, 512)]
TOLERANCE = {np.float32: 1e-6, np.float64: 1e-14}


def reference(a, b):
    return a.astype(np.float64) @ b.astype(np.float64)


def random_operands(shape, dtype, seed):
    """The generator, and ``a`` (M, K) and ``b`` (K, N) drawn from it."""
    M, K, N = shape
    rng = np.random.default_rng(seed)
    return rng, rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}".format(*s))
def test_gemm_matches_float64_product(shape, dtype):
    M, K, N = shape
    rng, a, b = random_operands(shape, dtype, 0)
    out = np.full((M, N), np.nan, dtype)
    gemm_cpu.gemm(a, b, out, False)
    assert rel_err(out, reference(a, b)) < TOLERANCE[dtype]
    before = rng.standard_normal((M, N)).astype(dtype)
    acc = before.copy()
    gemm_cpu.gemm(a, b, acc, True)
    assert rel_err(acc, before + reference(a, b)) < TOLERANCE[dtype]


@pytest.mark.parametrize("N", [NR, 3 * NR + 5], ids=lambda n: f"N{n}")
def test_every_row_count_gives_each_row_what_it_gets_alone(N):
    # the rows past the last full block run in one block of as many rows: a row's result
    # may not depend on the block it falls in, bit for bit
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3 * MR, 37)).astype(np.float32)
    b = rng.standard_normal((37, N)).astype(np.float32)
    alone = np.empty((3 * MR, N), np.float32)
    for i in range(3 * MR):
        gemm_cpu.gemm(a[i:i + 1], b, alone[i:i + 1], False)
    assert rel_err(alone, reference(a, b)) < 1e-6
    for M in range(1, 3 * MR):
        out = np.full((M, N), np.nan, np.float32)
        gemm_cpu.gemm(a[:M], b, out, False)
        np.testing.assert_array_equal(out, alone[:M], err_msg=f"M={M}")


def test_gemm_reads_strided_and_wider_a():
    rng = np.random.default_rng(1)
    a_t = rng.standard_normal((40, 2 * MR + 1)).astype(np.float32)  # a = a_t.T, strided
    wide = rng.standard_normal((2 * MR + 1, 60)).astype(np.float32)  # only 40 columns used
    b = rng.standard_normal((40, NR + 5)).astype(np.float32)
    out_t, out_w = (np.empty((2 * MR + 1, NR + 5), np.float32) for _ in range(2))
    gemm_cpu.gemm(a_t.T, b, out_t, False)
    gemm_cpu.gemm(wide, b, out_w, False)
    assert rel_err(out_t, reference(a_t.T, b)) < 1e-6
    assert rel_err(out_w, reference(wide[:, :40], b)) < 1e-6


def test_gemm_refuses_mismatched_or_strided_operands():
    a = np.ones((4, 3), np.float32)
    b = np.ones((3, 2 * NR), np.float32)
    with pytest.raises(ValueError, match="shapes"):
        gemm_cpu.gemm(a, b, np.empty((5, 2 * NR), np.float32), False)
    with pytest.raises(ValueError, match="contiguous rows"):
        gemm_cpu.gemm(a, np.ones((3, 4 * NR), np.float32)[:, ::2], np.empty((4, 2 * NR),
                                                                            np.float32), False)


def packed(b):
    panels = np.full((gemm_cpu.panel_count(b.shape[1]), b.shape[0], NR), np.nan, b.dtype)
    gemm_cpu.pack_panels(b, panels)
    return panels


def test_pack_panels_lays_out_every_column_and_pads_with_zeros():
    b = np.arange(5 * (2 * NR + 3), dtype=np.float32).reshape(5, 2 * NR + 3)
    panels = packed(b[:, ::-1])  # any strides
    assert panels.shape == (3, 5, NR)
    padded = np.zeros((5, 3 * NR), np.float32)
    padded[:, :b.shape[1]] = b[:, ::-1]
    np.testing.assert_array_equal(np.concatenate(list(panels), axis=1), padded)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}".format(*s))
def test_gemm_on_packed_panels_is_gemm_bit_for_bit(shape, dtype):
    M, K, N = shape
    rng, a, b = random_operands(shape, dtype, 3)
    want = np.empty((M, N), dtype)
    gemm_cpu.gemm(a, b, want, False)
    out = np.full((M, N), np.nan, dtype)
    gemm_cpu.gemm_panels(a, packed(b), out, False)
    np.testing.assert_array_equal(out, want)
    assert rel_err(out, reference(a, b)) < TOLERANCE[dtype]
    before = rng.standard_normal((M, N)).astype(dtype)
    want, acc = before.copy(), before.copy()
    gemm_cpu.gemm(a, b, want, True)
    gemm_cpu.gemm_panels(a, packed(b), acc, True)
    np.testing.assert_array_equal(acc, want)


def test_gemm_on_the_first_rows_of_packed_panels():
    # the LSTM's first step multiplies the input part of [W_ih, W_hh]^T alone: panels[:, :I]
    rng = np.random.default_rng(4)
    a = rng.standard_normal((MR + 3, 9)).astype(np.float32)
    b = rng.standard_normal((40, 2 * NR + 5)).astype(np.float32)
    out = np.empty((MR + 3, 2 * NR + 5), np.float32)
    gemm_cpu.gemm_panels(a, packed(b)[:, :9], out, False)
    want = np.empty_like(out)
    gemm_cpu.gemm(a, b[:9], want, False)
    np.testing.assert_array_equal(out, want)


def test_pack_panels_refuses_an_output_of_another_shape():
    b = np.ones((5, NR + 1), np.float32)
    for shape in ((1, 5, NR), (3, 5, NR), (2, 4, NR), (2, 5, NR + 1)):
        with pytest.raises(ValueError, match="panel_count"):
            gemm_cpu.pack_panels(b, np.empty(shape, np.float32))


def test_gemm_panels_refuses_mismatched_operands():
    a = np.ones((4, 3), np.float32)
    panels = packed(np.ones((3, NR + 1), np.float32))
    with pytest.raises(ValueError, match="shapes"):
        gemm_cpu.gemm_panels(a, panels, np.empty((5, NR), np.float32), False)
    with pytest.raises(ValueError, match="shapes"):  # more columns than the panels hold
        gemm_cpu.gemm_panels(a, panels, np.empty((4, 2 * NR + 1), np.float32), False)
    with pytest.raises(ValueError, match="contiguous"):
        gemm_cpu.gemm_panels(a, panels, np.empty((4, 4 * NR), np.float32)[:, ::2], False)


def test_gemm_keeps_non_finite_values():
    a = np.array([[np.inf, 1.0], [np.nan, 0.0]], np.float32)
    out = np.empty((2, NR), np.float32)
    gemm_cpu.gemm(a, np.ones((2, NR), np.float32), out, False)
    assert np.isposinf(out[0]).all() and np.isnan(out[1]).all()


@pytest.mark.parametrize("gemm", ["blas", "own"])
@pytest.mark.parametrize("shape", [(128, 28, 28, 128, 1, 10), (5, 6, 3, 40, 3, 4)],
                         ids=["mnist", "3-layers"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_cpu_backend_matches_reference_with_either_gemm(gemm, shape, dtype):
    spec, params, x, y, h0, c0 = make_problem(shape, "cross_entropy", dtype)
    want_backend = ORACLE
    results = []
    choices = dataclasses.replace(builtin_choices(), step_gemm=gemm, grad_gemm=gemm)
    for backend, args in ((CPUBackend(choices=choices), (params, x, h0, c0)),
                          (want_backend, in_float64(params, x, h0, c0))):
        p, xx, hh, cc = args
        outputs, cache = backend.forward(spec, p, xx, hh, cc, train=True)
        _, doutputs = backend.loss(outputs, y, "cross_entropy")
        grads = backend.backward(spec, p, cache, doutputs, input_grads=True)
        inference, _ = backend.forward(spec, p, xx)  # h0 = 0: the first step's shortcut
        results.append([outputs, inference, grads.params, grads.x, grads.h0, grads.c0])
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for got, want in zip(*results):
        assert rel_err(got, want) < tol


def test_backward_multiplies_by_the_parameters_it_is_given_with_either_gemm():
    # our GEMM reads W_hh packed; packed at forward, it would be forward's parameters, where
    # BLAS and the input gradient read backward's: both GEMMs must compute the same thing
    spec, params, x, y, h0, c0 = make_problem((20, 6, 3, 40, 2, 4), "cross_entropy", np.float32)
    others = (params * 1.5).astype(np.float32)
    results = []
    for gemm in ("own", "blas"):
        choices = dataclasses.replace(builtin_choices(), step_gemm=gemm, grad_gemm=gemm)
        backend = CPUBackend(choices=choices)
        outputs, cache = backend.forward(spec, params, x, h0, c0, train=True)
        _, doutputs = backend.loss(outputs, y, "cross_entropy")
        grads = backend.backward(spec, others, cache, doutputs, input_grads=True)
        results.append([grads.params, grads.x, grads.h0, grads.c0])
    for own, blas in zip(*results):
        assert rel_err(own, blas) < 1e-5
