"""bfloat16 precision: the rounding rule (:mod:`fastlstm.precision`), the reference's bfloat16
mode, the bfloat16 GEMM kernel and the CPU backend's ``precision="bfloat16"``."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from numba import njit
from sklearn.base import clone

from fastlstm import LSTMClassifier, LSTMRegressor, backends, load, reference
from fastlstm.backends import AdamConfig, Backend, BackendUnavailable, get_backend
from fastlstm.backends.cpu import CPUBackend
from fastlstm.backends.cpu_choices import builtin_choices
from fastlstm.kernels import gemm_bf16_cpu
from fastlstm.precision import bf16_bits, check_precision, round_bf16

from conftest import in_float64, make_lengths, make_problem, rel_err, shape_id
from oracle import BF16_ORACLE, ORACLE
from test_benchmarks import run as run_benchmark
from test_dropout import KINDS, compare, run


def test_rounding_is_to_nearest_even_with_denormals_to_zero():
    ulp = 2.0 ** -7  # of bfloat16 at 1: 7 stored mantissa bits
    values = np.array([1.0, 1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2 ** -20, -1 - ulp / 2,
                       1e-40, -1e-40, np.inf, -np.inf, 3.4e38, 0.0, -0.0], np.float32)
    want = np.array([1.0, 1.0, 1 + 2 * ulp, 1 + ulp, -1.0, 0.0, -0.0, np.inf, -np.inf, np.inf,
                     0.0, -0.0], np.float32)
    got = round_bf16(values)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert list(np.signbit(got[[5, 6, 10, 11]])) == [False, True, False, True]
    nan = round_bf16(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(nan).all()
    assert (bf16_bits(np.float32(np.nan)) & 0x0040) != 0  # quiet


def test_rounding_matches_torch_on_normal_numbers():
    # torch rounds to nearest even too; it keeps denormals, which the instruction flushes
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(100_000) * np.exp(rng.uniform(-80, 80, 100_000)))
    values = values.astype(np.float32)
    want = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_bf16(values), want)
    # float64 is rounded to float32 first, the values the kernels read
    np.testing.assert_array_equal(round_bf16(values.astype(np.float64)), want.astype(np.float64))


def test_auto_precision_is_float32_and_unknown_ones_are_refused():
    assert check_precision("auto") == "float32"
    assert check_precision("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("float16")


def test_reference_bf16_mode_rounds_the_gemm_operands_only():
    # one step of one row from h0 = 0: z = x W_ih^T + b, so bfloat16 mode is float32 mode
    # on rounded x and W_ih (the head, the bias and the gates untouched); backwards, the
    # bias gradient of one row is dz itself, and dW_ih = round(dz)^T round(x),
    # dx = round(dz) round(W_ih)
    spec, params, x, y, _, _ = make_problem((1, 1, 5, 4, 1, 3), "cross_entropy", np.float32)
    views = spec.layout.views(params)
    w_ih = round_bf16(views["lstm.weight_ih_l0"])
    got, cache = reference.forward(views, x, precision="bfloat16")
    want, want_cache = reference.forward(dict(views, **{"lstm.weight_ih_l0": w_ih}), round_bf16(x))
    np.testing.assert_array_equal(got, want)
    d_out = np.random.default_rng(1).standard_normal(got.shape).astype(np.float32)
    grads, dx, _, _ = reference.backward(views, cache, d_out)
    want_grads = reference.backward(dict(views, **{"lstm.weight_ih_l0": w_ih}), want_cache,
                                    d_out)[0]
    for name in ("head.weight", "head.bias", "lstm.bias_ih_l0", "lstm.weight_hh_l0"):
        np.testing.assert_array_equal(grads[name], want_grads[name])
    dz = round_bf16(grads["lstm.bias_ih_l0"])
    np.testing.assert_array_equal(grads["lstm.weight_ih_l0"], np.outer(dz, round_bf16(x[0, 0])))
    np.testing.assert_array_equal(dx[0, 0], dz @ w_ih)


def test_reference_bf16_mode_is_close_to_float32_but_not_equal():
    spec, params, x, y, h0, c0 = make_problem((16, 7, 5, 8, 2, 3), "cross_entropy", np.float32,
                                              bidirectional=True)
    views = spec.layout.views(params)
    full = reference.loss_and_grad(views, x, y, "cross_entropy", h0, c0)
    half = reference.loss_and_grad(views, x, y, "cross_entropy", h0, c0, precision="bfloat16")
    for a, b in zip(full[1].values(), half[1].values()):
        assert rel_err(b, a) < 0.05
    assert 1e-4 < rel_err(half[-1], full[-1]) < 0.05


needs_bf16 = pytest.mark.skipif(not gemm_bf16_cpu.available(),
                                reason="this CPU (Numba's target) lacks AVX512-BF16 (vdpbf16ps)")
MR, NR = gemm_bf16_cpu.MR, gemm_bf16_cpu.NR
#: (M, K, N): single, odd inner dimensions, remainders of every block size, exact panels,
#: the LSTM's step shapes, a weight gradient's, and an inner dimension of three passes
GEMM_SHAPES = [(1, 1, 1), (3, 5, 7), (MR + 7, 9, NR + 1), (MR, 2, NR), (2 * MR + 3, 17, 3 * NR - 1),
               (16, 156, 512), (125, 156, 512), (16, 512, 128), (156, 449, 512),
               (9, 4 * gemm_bf16_cpu.KC_PAIRS + 101, 40)]


def bf16_product(a, b, accumulate_onto=None, a_transposed=False):
    """``a @ b`` by the kernels: both packed, then :func:`gemm_bf16_cpu.gemm`; ``a_transposed``:
    as the weight gradient, :func:`gemm_bf16_cpu.gemm_xt` of ``a.T``."""
    g = gemm_bf16_cpu
    (M, K), N = a.shape, b.shape[1]
    b16 = np.empty((g.pairs(K), g.panel_columns(N)), np.uint32)
    out = np.full((M, N), np.nan, np.float32) if accumulate_onto is None else accumulate_onto
    if a_transposed:  # the extra rows and columns of the scratch are not read
        a16 = np.empty(g.pairs(K) * g.panel_columns(M) + 3, np.uint32)
        g.gemm_xt(a.T, b, a16, np.empty(b16.size + 5, np.uint32), out,
                  accumulate_onto is not None)
        return out
    a16 = np.empty((M, g.pairs(K)), np.uint32)
    g.pack_rows(a, a16)
    g.pack_panels(b, b16)
    g.gemm(a16, b16, out, accumulate_onto is not None)
    return out


def test_packing_pairs_the_inner_dimension():
    a = np.arange(1, 16, dtype=np.float32).reshape(3, 5) + 1 / 3
    bits = bf16_bits(a).astype(np.uint32)
    a16 = np.empty((3, 3), np.uint32)
    gemm_bf16_cpu.pack_rows(a, a16)
    np.testing.assert_array_equal(a16[:, :2], bits[:, 0:4:2] | bits[:, 1:4:2] << 16)
    np.testing.assert_array_equal(a16[:, 2], bits[:, 4])  # padded with a zero
    b16 = np.empty((3, NR), np.uint32)
    gemm_bf16_cpu.pack_panels(a.T, b16)
    np.testing.assert_array_equal(b16[:, :3], a16.T)
    assert not b16[:, 3:].any()


@needs_bf16
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "M{}-K{}-N{}".format(*s))
def test_bf16_gemm_is_exact_where_every_sum_is(shape):
    # small integers are bfloat16 values, and all their sums exact in float32
    M, K, N = shape
    rng = np.random.default_rng(0)
    a, b = (rng.integers(-8, 9, s).astype(np.float32) for s in ((M, K), (K, N)))
    want = a.astype(np.int64) @ b.astype(np.int64)
    np.testing.assert_array_equal(bf16_product(a, b), want)
    np.testing.assert_array_equal(bf16_product(a, b, np.ones((M, N), np.float32)), want + 1)
    # a transposed (strided) A, and one packed as the weight gradient's
    np.testing.assert_array_equal(bf16_product(np.ascontiguousarray(a.T).T, b), want)
    np.testing.assert_array_equal(bf16_product(a, b, a_transposed=True), want)
    np.testing.assert_array_equal(bf16_product(a, b, np.ones((M, N), np.float32), True), want + 1)


@needs_bf16
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "M{}-K{}-N{}".format(*s))
def test_bf16_gemm_is_the_product_of_rounded_operands_up_to_float32_sums(shape):
    # Products of bfloat16 values are exact in float32; only the K float32 additions round,
    # so |got - exact| <= gamma_K sum_k |a_ik b_kj|, gamma_K = K u / (1 - K u), u = 2^-24,
    # whatever the order of the sums (Higham, Accuracy and Stability, 3.1); the exact
    # product of the rounded operands is float64's here (K < 2^13: exact to far below that)
    M, K, N = shape
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal(s).astype(np.float32) for s in ((M, K), (K, N)))
    ra, rb = round_bf16(a).astype(np.float64), round_bf16(b).astype(np.float64)
    u = 2.0 ** -24
    bound = K * u / (1 - K * u) * (np.abs(ra) @ np.abs(rb))
    for a_transposed in (False, True):
        got = bf16_product(a, b, a_transposed=a_transposed)
        assert (np.abs(got - ra @ rb) <= bound).all()
    # and the rounding matters: float32 operands differ from it far beyond that bound
    assert (np.abs(a.astype(np.float64) @ b - ra @ rb) > bound).any()


@needs_bf16
@pytest.mark.parametrize("N", [NR, 3 * NR + 5], ids=lambda n: f"N{n}")
def test_every_row_count_gives_each_row_what_it_gets_alone(N):
    # as the float32 GEMM's (tests/test_gemm_cpu.py): the blocks of the rows past the
    # last full one change no row's result
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3 * MR, 37)).astype(np.float32)
    b = rng.standard_normal((37, N)).astype(np.float32)
    alone = np.concatenate([bf16_product(a[i:i + 1], b) for i in range(3 * MR)])
    for M in range(1, 3 * MR):
        np.testing.assert_array_equal(bf16_product(a[:M], b), alone[:M], err_msg=f"M={M}")


@needs_bf16
def test_bf16_gemm_refuses_mismatched_operands():
    a16, b16 = np.zeros((4, 3), np.uint32), np.zeros((3, NR), np.uint32)
    with pytest.raises(ValueError, match="shapes"):
        gemm_bf16_cpu.gemm(a16, b16, np.empty((5, NR), np.float32), False)
    with pytest.raises(ValueError, match="shapes"):
        gemm_bf16_cpu.gemm(a16[:, :2], b16, np.empty((4, NR), np.float32), False)
    with pytest.raises(ValueError, match="contiguous rows"):
        gemm_bf16_cpu.gemm(a16, np.zeros((3, 2 * NR), np.uint32)[:, ::2],
                           np.empty((4, NR), np.float32), False)
    with pytest.raises(ValueError, match="contiguous rows"):
        gemm_bf16_cpu.gemm(a16, b16, np.empty((4, 2 * NR), np.float32)[:, ::2], False)


@needs_bf16
def test_bf16_gemm_runs_on_vdpbf16ps_over_zmm_registers():
    # compiled afresh (the cached kernel keeps no assembly to inspect)
    kernel = njit(gemm_bf16_cpu.gemm.py_func)
    a16, b16 = np.zeros((MR, 2), np.uint32), np.zeros((2, NR), np.uint32)
    kernel(a16, b16, np.empty((MR, NR), np.float32), False)
    asm = kernel.inspect_asm(kernel.signatures[0])
    dot_products = re.findall(r"vdpbf16ps\s+(.*)", asm)
    # AT&T order: the B operand (a register or memory), A's broadcast pair, the accumulator
    assert dot_products and all(re.search(r"%zmm\d+, %zmm\d+$", line.strip())
                                for line in dot_products)
    assert not re.search(r"\bvfmadd\w*ps\s", asm)  # no float32 products


#: (batch, steps, inputs, hidden, layers, outputs): an odd input (the padded pair of the
#: first step from h0 = 0), several chunks per thread and layers
BACKEND_SHAPES = [(5, 6, 3, 4, 2, 3), (37, 9, 4, 6, 2, 3)]
#: The kernels sum in float32 in their own order, the bfloat16 oracle in float64 (on the
#: same float32 inputs): most results agree to ~1e-6.  An operand the kernels compute (h, dz)
#: differs from the oracle's in float32's last bits, and now and then that puts it on the
#: other side of a bfloat16 rounding boundary: one operand off by 2^-8 of itself, which
#: showed in these cases as up to 1.1e-4 (one step of one row of dx).  The float32 oracle
#: is 5.6e-4 or more away in the outputs, and further in the gradients.
BF16_TOLERANCE = 2e-4


@needs_bf16
@pytest.mark.parametrize("dropout", [None, "both"])
@pytest.mark.parametrize("initial_states", [False, True], ids=["h0=0", "h0"])
@pytest.mark.parametrize("lengths_kind", ["full", "random"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("shape", BACKEND_SHAPES, ids=shape_id)
def test_cpu_bf16_matches_the_bf16_reference(shape, bidirectional, lengths_kind, initial_states,
                                            dropout):
    loss = "cross_entropy"
    problem = make_problem(shape, loss, np.float32, initial_states=initial_states,
                           bidirectional=bidirectional)
    lengths = make_lengths(shape[0], shape[1], lengths_kind)
    dropout = dropout and KINDS[dropout]
    got = run(CPUBackend(2, precision="bfloat16"), *problem, loss, lengths, dropout)
    want = run(BF16_ORACLE, *in_float64(*problem), loss, lengths, dropout)
    compare(got, want, BF16_TOLERANCE)
    # the float32 oracle is far from it: the comparison sees what is rounded
    float32 = run(ORACLE, *in_float64(*problem), loss, lengths, dropout)
    assert rel_err(got["outputs"], float32["outputs"]) > 2 * BF16_TOLERANCE
    assert max(rel_err(got["grads"][name], float32["grads"][name])
               for name in float32["grads"]) > 10 * BF16_TOLERANCE


@needs_bf16
@pytest.mark.parametrize("initial_states", [False, True], ids=["h0=0", "h0"])
def test_cpu_bf16_with_every_row_one_step_long(initial_states):
    # h0 = 0: the weight gradient of W_hh then runs over no step at all
    problem = make_problem((6, 4, 3, 5, 2, 3), "cross_entropy", np.float32,
                           initial_states=initial_states, bidirectional=True)
    lengths = make_lengths(6, 4, "ones")
    got = run(CPUBackend(2, precision="bfloat16"), *problem, "cross_entropy", lengths, None)
    want = run(BF16_ORACLE, *in_float64(*problem), "cross_entropy", lengths, None)
    compare(got, want, BF16_TOLERANCE)


@needs_bf16
def test_bf16_train_step_matches_forward_backward_and_learns():
    spec, params, x, y, _, _ = make_problem((64, 7, 5, 8, 2, 3), "cross_entropy", np.float32,
                                            bidirectional=True)
    lengths = make_lengths(64, 7, "random")
    choices = dataclasses.replace(builtin_choices(), train_chunk_bytes=1)  # chunks per thread
    backend = CPUBackend(num_threads=2, precision="bfloat16", choices=choices)
    p_step, p_ref = params.copy(), params.copy()
    s_step, s_ref = backend.adam_state(p_step), backend.adam_state(p_ref)
    config, losses = AdamConfig(1e-2), []
    for _ in range(5):
        losses.append(backend.train_step(spec, p_step, s_step, x, y, "cross_entropy", config,
                                         lengths=lengths, dropout=KINDS["both"]))
        outputs, cache = backend.forward(spec, p_ref, x, train=True, lengths=lengths,
                                         dropout=KINDS["both"])
        value, doutputs = backend.loss(outputs, y, "cross_entropy")
        grads = backend.backward(spec, p_ref, cache, doutputs).params
        backend.adam_step(p_ref, grads, s_ref, config)
        assert losses[-1] == pytest.approx(value, rel=1e-6)  # summed in another order
    np.testing.assert_array_equal(p_step, p_ref)
    assert losses[-1] < losses[0]
    # the parameters, the optimizer state and the loss stay float32, and so do inference's
    assert p_step.dtype == s_step.m.dtype == s_step.v.dtype == np.float32
    assert backend.forward(spec, p_step, x, lengths=lengths)[0].dtype == np.float32


@needs_bf16
def test_bf16_needs_float32_parameters():
    spec, params, x, _, _, _ = make_problem((3, 2, 2, 3, 1, 2), "cross_entropy", np.float64)
    with pytest.raises(ValueError, match="float32 parameters"):
        CPUBackend(1, precision="bfloat16").forward(spec, params, x)


def test_a_cpu_without_avx512_bf16_gets_a_clear_error_and_float32_keeps_working(monkeypatch):
    monkeypatch.setattr(gemm_bf16_cpu, "available", lambda: False)  # as on such a CPU
    monkeypatch.setattr(backends, "_instances", {})  # none made before
    for make in (lambda: CPUBackend(precision="bfloat16"),
                 lambda: get_backend("cpu", precision="bfloat16"),
                 lambda: get_backend("auto", precision="bfloat16")):
        with pytest.raises(BackendUnavailable, match=r"AVX512-BF16.*precision='float32'"):
            make()
    problem = make_problem((4, 3, 2, 5, 1, 3), "cross_entropy", np.float32)
    want = run(ORACLE, *in_float64(*problem), "cross_entropy", None, None)
    for backend in (CPUBackend(1, precision="float32"), get_backend("cpu", precision="auto")):
        assert backend.precision == "float32"
        compare(run(backend, *problem, "cross_entropy", None, None), want, 1e-4)


def test_auto_precision_is_the_float32_backend():
    assert get_backend("cpu", precision="auto") is get_backend("cpu")
    assert CPUBackend(1, precision="auto").precision == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        get_backend("cpu", precision="half")


@pytest.mark.parametrize("name", ["reference", "cuda"])
def test_only_the_cpu_backend_offers_bfloat16(name):
    with pytest.raises(ValueError, match=f"the {name} backend does not compute in "
                                         "precision='bfloat16'"):
        get_backend(name, precision="bfloat16")


def test_auto_with_a_usable_gpu_refuses_bfloat16_rather_than_leave_it(monkeypatch):
    monkeypatch.setitem(backends._instances, "cuda", Backend())  # a usable CUDA backend
    with pytest.raises(ValueError, match="the cuda backend does not compute"):
        get_backend("auto", precision="bfloat16")
    assert get_backend("auto") is backends._instances["cuda"]


@needs_bf16
def test_estimators_train_and_predict_in_bfloat16_and_save_it(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 6, 3)).astype(np.float32)
    y = (X[:, :, 0].sum(axis=1) > 0).astype(int)
    settings = dict(hidden_size=8, max_iter=3, random_state=0, device="cpu")
    full = LSTMClassifier(**settings).fit(X, y)
    half = LSTMClassifier(**settings, precision="bfloat16").fit(X, y)
    assert half.get_params()["precision"] == "bfloat16"
    assert clone(half).precision == "bfloat16"
    assert not np.array_equal(half._params, full._params)  # it did compute in bfloat16
    assert half._params.dtype == np.float32
    assert abs(half.score(X, y) - full.score(X, y)) < 0.1
    half.save(tmp_path / "half.npz")
    loaded = load(tmp_path / "half.npz")
    assert loaded.precision == "bfloat16"
    np.testing.assert_array_equal(loaded.predict_proba(X), half.predict_proba(X))
    LSTMRegressor(**settings, precision="bfloat16").fit(X, X[:, -1, :2]).save(tmp_path / "r.npz")
    assert load(tmp_path / "r.npz").precision == "bfloat16"


@pytest.mark.parametrize("make", [LSTMClassifier, LSTMRegressor])
def test_estimators_validate_precision_in_fit(make):
    X, y = np.zeros((4, 2, 1), np.float32), np.array([0, 1, 0, 1])
    estimator = make(precision="half", max_iter=1)  # stored as given
    assert estimator.precision == "half"
    with pytest.raises(ValueError, match="'precision' parameter"):
        estimator.fit(X, y)
    with pytest.raises(ValueError, match="the cuda backend does not compute in "
                                         "precision='bfloat16'"):
        make(precision="bfloat16", device="cuda", max_iter=1).fit(X, y)


def test_an_estimator_on_a_cpu_without_avx512_bf16_names_it(monkeypatch):
    monkeypatch.setattr(gemm_bf16_cpu, "available", lambda: False)
    monkeypatch.setattr(backends, "_instances", {})
    X, y = np.zeros((4, 2, 1), np.float32), np.array([0, 1, 0, 1])
    with pytest.raises(BackendUnavailable, match="AVX512-BF16"):
        LSTMClassifier(precision="bfloat16", device="cpu", max_iter=1).fit(X, y)
    assert LSTMClassifier(device="cpu", max_iter=1).fit(X, y).precision == "float32"


@needs_bf16
def test_bf16_benchmark_compares_the_four_contenders_and_writes_json(tmp_path):
    out = tmp_path / "bf16.json"
    text = run_benchmark("bf16.py", "--samples", "256", "--batch", "64", "--hidden", "8",
                         "--infer-samples", "64", "--infer-batch", "32", "--repeat", "1",
                         "--json", str(out))
    results = json.loads(out.read_text())
    assert set(results["medians"]) == {"fastlstm float32", "fastlstm bfloat16", "PyTorch float32",
                                       "PyTorch autocast bf16"}
    assert all(m["epoch_s"] > 0 and m["inference_samples_per_s"] > 0
               for m in results["medians"].values())
    assert "fastlstm bfloat16 over PyTorch autocast bf16" in results["ratios"]
    assert set(results["paired"]) == set(results["medians"])
    assert all(m["epoch_s"] > 0 and m["inference_samples_per_s"] > 0
               for m in results["paired"].values())
    assert results["paired_ratios"]["fastlstm bfloat16 over PyTorch autocast bf16"]["epoch"] > 0
    assert "load average" in text and "target" in text and "minibatch by minibatch" in text
    assert results["peaks_gflops"]["bfloat16"] > 0 and results["peaks_gflops"]["float32"] > 0


@needs_bf16
def test_bf16_accuracy_fits_both_precisions(tmp_path):
    out = tmp_path / "accuracy.json"
    text = run_benchmark("bf16_accuracy.py", "--samples", "256", "--max-iter", "1",
                         "--json", str(out))
    fits = json.loads(out.read_text())["fits"]
    assert set(fits) == {"float32", "bfloat16"}
    assert all(fit["epochs"] == 1 and 0 <= fit["test_accuracy"] <= 1 for fit in fits.values())
    assert "points of test accuracy" in text


#: a float32 forward and backward of a small bidirectional model, as the hex of its bytes
#: (``fingerprint``): run here and in a process built for another CPU, which must agree
FLOAT32_FINGERPRINT = """
import numpy as np
from fastlstm.backends.cpu import CPUBackend
from fastlstm.model import ModelSpec
spec = ModelSpec(3, 8, 2, 2, bidirectional=True)
params = spec.layout.init(np.random.default_rng(0), np.float32)
x = np.random.default_rng(1).standard_normal((5, 4, 3)).astype(np.float32)
backend = CPUBackend(1)
outputs, cache = backend.forward(spec, params, x, train=True)
_, d_out = backend.loss(outputs, np.array([0, 1, 0, 1, 0]), "cross_entropy")
grads = backend.backward(spec, params, cache, d_out, input_grads=True)
fingerprint = [outputs.tobytes().hex(), grads.params.tobytes().hex()]
"""

NO_BF16_CHILD = """
from fastlstm.backends import BackendUnavailable
from fastlstm.kernels import gemm_bf16_cpu
assert not gemm_bf16_cpu.available()
""" + FLOAT32_FINGERPRINT + """
try:
    CPUBackend(1, precision="bfloat16")
except BackendUnavailable:
    print(*fingerprint)
"""


def test_float32_compiles_and_runs_for_a_cpu_without_avx512_bf16(tmp_path):
    # Numba built for this CPU without AVX512-BF16 (in a fresh cache): the LSTM kernels, which
    # hold the bfloat16 GEMM's call site, still compile (LLVM cannot select vdpbf16ps there),
    # float32 gives the same bits as here, and bfloat16 is refused
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    features["avx512bf16"] = False
    env = dict(os.environ, NUMBA_CPU_NAME=llvm.get_host_cpu_name(), NUMBA_CACHE_DIR=str(tmp_path),
               NUMBA_CPU_FEATURES=features.flatten())
    done = subprocess.run([sys.executable, "-c", NO_BF16_CHILD], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    here = {}
    exec(FLOAT32_FINGERPRINT, here)
    assert done.stdout.split() == here["fingerprint"]
