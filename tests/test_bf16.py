"""bfloat16 precision: the rounding rule (:mod:`fastlstm.precision`), the reference's bfloat16
mode, the bfloat16 GEMM kernel and the CPU backend's ``precision="bfloat16"``."""

import numpy as np
import pytest
import torch

from fastlstm import reference
from fastlstm.precision import bf16_bits, check_precision, round_bf16

from conftest import make_problem, rel_err


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
