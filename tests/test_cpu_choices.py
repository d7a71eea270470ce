"""The CPU backend's measured choices: every candidate against the reference, the cache, the
override, and the calibration itself."""

import dataclasses
import json

import numpy as np
import pytest

from fastlstm.backends import AdamConfig, cpu_choices as cc
from fastlstm.backends.cpu import CPUBackend
from fastlstm.kernels import gemm_bf16_cpu

from conftest import in_float64, make_lengths, make_problem
from oracle import ORACLE
from test_dropout import KINDS, compare, run

#: every candidate of every choice, the others builtin
EVERY_CHOICE = [(field, value) for field, values in cc.CANDIDATES.items() for value in values]
#: more rows than the largest chunk, 2 layers, both directions, and enough state per row that
#: every candidate chunk size cuts the batch differently (test_every_candidate_is_another_plan)
SHAPE = (300, 28, 3, 24, 2, 3)


def with_choice(field, value):
    return dataclasses.replace(cc.builtin_choices(), **{field: value})


def choice_id(choice):
    return f"{choice[0]}={choice[1]}"


def plans(choices, shape=SHAPE, dtype=np.float64, threads=2):
    """The chunk rows of a training step and of inference under ``choices``."""
    spec = make_problem(shape, "cross_entropy", dtype, bidirectional=True)[0]
    backend = CPUBackend(threads, choices=choices)
    return tuple(tuple(backend._workspace(spec, shape[0], shape[1], dtype, mode).rows)
                 for mode in ("step", "inference"))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("field", ["train_chunk_bytes", "max_chunk_rows"])
def test_every_candidate_is_another_plan(field, dtype):
    # else the tests below would run one plan under several names
    got = [plans(with_choice(field, v), dtype=dtype) for v in cc.CANDIDATES[field]]
    assert len(set(got)) == len(got)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("choice", EVERY_CHOICE, ids=choice_id)
def test_every_choice_matches_the_reference(choice, dtype):
    problem = make_problem(SHAPE, "cross_entropy", dtype, bidirectional=True)
    lengths = make_lengths(SHAPE[0], SHAPE[1], "random")
    backend = CPUBackend(2, choices=with_choice(*choice))
    got = run(backend, *problem, "cross_entropy", lengths, KINDS["both"])
    want = run(ORACLE, *in_float64(*problem), "cross_entropy", lengths, KINDS["both"])
    compare(got, want, 1e-10 if dtype == np.float64 else 1e-4)
    inference, _ = backend.forward(*problem[:3], lengths=lengths)
    expected, _ = ORACLE.forward(*in_float64(*problem[:3]), lengths=lengths)
    np.testing.assert_allclose(inference, expected, rtol=0, atol=1e-10 if dtype == np.float64
                               else 1e-5)


@pytest.mark.skipif(not gemm_bf16_cpu.available(),
                    reason="this CPU (Numba's target) lacks AVX512-BF16 (vdpbf16ps)")
@pytest.mark.parametrize("choice", EVERY_CHOICE, ids=choice_id)
def test_every_choice_gives_bf16_what_the_builtin_choices_give(choice):
    # The builtin choices are checked against the bfloat16 reference in test_bf16.py, on shapes
    # small enough that no operand lands near a rounding boundary that float32's sums and the
    # oracle's float64 ones round apart; on SHAPE some do.  The choices change which rows share
    # a chunk, and the order of the weight gradient's sums over them: float32's rounding only.
    problem = make_problem(SHAPE, "cross_entropy", np.float32, bidirectional=True)
    lengths = make_lengths(SHAPE[0], SHAPE[1], "random")
    got, want = (run(CPUBackend(2, precision="bfloat16", choices=choices), *problem,
                     "cross_entropy", lengths, None)
                 for choices in (with_choice(*choice), cc.builtin_choices()))
    compare(got, want, 1e-5)


@pytest.mark.parametrize("choice", EVERY_CHOICE, ids=choice_id)
def test_a_fixed_choice_gives_bit_identical_training_runs(choice):
    spec, params, x, y, _, _ = make_problem(SHAPE, "cross_entropy", np.float32)
    runs = []
    for _ in range(2):  # a fresh backend each time: nothing carried over but the choice
        backend = CPUBackend(2, choices=with_choice(*choice))
        p = params.copy()
        state = backend.adam_state(p)
        for _ in range(3):
            backend.train_step(spec, p, state, x, y, "cross_entropy", AdamConfig(1e-2))
        runs.append(p)
    np.testing.assert_array_equal(*runs)


def test_the_override_fixes_some_choices_and_leaves_the_others_builtin():
    builtin = cc.builtin_choices()
    assert cc.parse_override("builtin") == builtin
    got = cc.parse_override('{"step_gemm": "blas", "max_chunk_rows": 64}')
    # BLAS in the time loop brings its own builtin chunks, as large as inference's
    assert got == dataclasses.replace(builtin, step_gemm="blas", max_chunk_rows=64,
                                      train_chunk_bytes=0)
    got = cc.parse_override('{"step_gemm": "blas", "train_chunk_bytes": 1}')
    assert got == dataclasses.replace(builtin, step_gemm="blas", train_chunk_bytes=1)


@pytest.mark.parametrize("text, message", [
    ("fast", "FASTLSTM_CPU_CHOICES must be 'builtin' or a JSON object"),
    ("[1, 2]", "FASTLSTM_CPU_CHOICES must be 'builtin' or a JSON object"),
    ('{"chunk": 3}', r"unknown choices \['chunk'\]"),
    ('{"step_gemm": "mkl"}', "step_gemm must be 'own' or 'blas'"),
    ('{"max_chunk_rows": 2}', "max_chunk_rows must be a whole number >= "),
    ('{"train_chunk_bytes": 1.5}', "train_chunk_bytes must be a whole number"),
    ('{"train_chunk_bytes": true}', "train_chunk_bytes must be a whole number"),
])
def test_a_bad_override_is_refused_with_what_to_do(text, message):
    with pytest.raises(ValueError, match=message):
        cc.parse_override(text)


@pytest.fixture
def calibrating(monkeypatch, tmp_path):
    """No override, the cache in ``tmp_path``, and a calibration that counts its calls."""
    monkeypatch.delenv(cc.ENV, raising=False)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    calls = []
    measured = dataclasses.replace(cc.builtin_choices(), max_chunk_rows=256)

    def calibrate():
        calls.append(1)
        return measured, {"max_chunk_rows": {"256": 0.01}}
    monkeypatch.setattr(cc, "calibrate", calibrate)
    cc.cpu_choices.cache_clear()
    yield calls, measured, tmp_path
    cc.cpu_choices.cache_clear()


def test_the_first_use_calibrates_and_later_processes_read_the_cache(calibrating):
    calls, measured, folder = calibrating
    assert cc.cpu_choices() == measured
    (path,) = folder.glob("fastlstm-cpu-choices-*.json")
    assert path == cc.cache_path()
    record = json.loads(path.read_text())
    assert record["identity"] == cc.cpu_identity()
    assert record["timings"] == {"max_chunk_rows": {"256": 0.01}}
    cc.cpu_choices.cache_clear()  # as a new process
    assert cc.cpu_choices() == measured and len(calls) == 1
    assert CPUBackend(1).choices == measured


def test_a_damaged_cache_is_measured_anew(calibrating):
    calls, measured, _ = calibrating
    path = cc.cache_path()
    path.write_text('{"choices": {"step_gemm": "own"')  # cut short
    assert cc.cpu_choices() == measured and len(calls) == 1
    assert cc._read(path) == measured


def test_the_override_wins_over_the_cache(calibrating, monkeypatch):
    calls, measured, _ = calibrating
    assert cc.cpu_choices() == measured
    monkeypatch.setenv(cc.ENV, "builtin")
    cc.cpu_choices.cache_clear()
    assert cc.cpu_choices() == cc.builtin_choices()


def test_a_failed_calibration_warns_and_uses_the_builtin_choices(calibrating, monkeypatch):
    def fails():
        raise MemoryError("no room")
    monkeypatch.setattr(cc, "calibrate", fails)
    with pytest.warns(RuntimeWarning, match="could not measure or cache its CPU choices"):
        assert cc.cpu_choices() == cc.builtin_choices()
    assert cc._read(cc.cache_path()) is None  # nothing cached: the next process tries again


def test_without_a_writable_cache_the_builtin_choices_are_used(calibrating, monkeypatch):
    calls, _, _ = calibrating
    monkeypatch.setattr(cc, "cache_path", lambda identity=None: None)
    assert cc.cpu_choices() == cc.builtin_choices() and not calls


def test_a_change_of_kernels_or_cpu_is_another_cache_file(calibrating, monkeypatch):
    identity = cc.cpu_identity()
    paths = {cc.cache_path(identity)}
    for key, value in (("kernels", "0" * 64), ("model", "another CPU"), ("features", ["avx2"])):
        paths.add(cc.cache_path(dict(identity, **{key: value})))
    assert len(paths) == 4


def test_the_calibration_measures_every_candidate_and_picks_one():
    choices, timings = cc.calibrate(rounds=3)
    assert set(timings) == set(cc.CANDIDATES)
    for field, values in cc.CANDIDATES.items():
        assert set(timings[field]) == {str(v) for v in values}
        assert all(0 < t["seconds"] < 10 and t["ratio"] > 0 for t in timings[field].values())
        assert getattr(choices, field) in values
        # a choice is the current one (ratio 1) or won by more than the margin
        chosen = timings[field][str(getattr(choices, field))]["ratio"]
        assert chosen == 1 or chosen < 1 - cc.MARGIN


def test_the_command_line_prints_the_choices(capsys):
    cc.main([])
    out = capsys.readouterr().out
    assert "CPU: " in out and "choices (FASTLSTM_CPU_CHOICES='builtin')" in out


def test_the_source_of_the_choices_is_said(calibrating, monkeypatch):
    assert cc.source().startswith("measured on this CPU, cached in ")
    monkeypatch.setattr(cc, "cache_path", lambda identity=None: None)
    assert cc.source().startswith("builtin: no writable cache folder")


def test_a_cache_that_cannot_be_written_warns_and_uses_the_builtin_choices(calibrating,
                                                                          monkeypatch):
    def cannot(*args):
        raise PermissionError("read-only")
    monkeypatch.setattr(cc, "write", cannot)
    with pytest.warns(RuntimeWarning, match="could not measure or cache"):
        assert cc.cpu_choices() == cc.builtin_choices()
