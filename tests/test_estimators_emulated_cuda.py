"""The estimators' training loop on the real CUDA backend code, run on the CPU emulator.

What a GPU run relies on and a CPU run does not show: losses that stay 0-d device
arrays, the GPU's own Adam state (step count on the device) carried across
``partial_fit`` calls, batches indexed on the device, and fitted weights brought back
to the host so the model predicts on the CPU, and an adaptive learning rate that a captured
training step follows without a new capture (the emulator captures the step and replays its
graph).
"""

import shutil

import numpy as np
import pytest

import fastlstm.estimators
from fastlstm import LSTMClassifier
from cuda_emulator import fake_cupy
from fastlstm.backends.cuda_support import ADAM_SETTINGS
from test_cuda_emulated import cuda_module  # noqa: F401  (the emulated CUDA module fixture)
from test_cuda_emulated import captures

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed here")


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_training_on_the_cuda_backend_matches_the_cpu_and_predicts_on_the_cpu(
        cuda_module, monkeypatch, weighted):  # noqa: F811
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 4, 3)).astype(np.float32)
    y = np.digitize(X[:, :, 0].sum(axis=1), [-1.0, 1.0])
    params = dict(hidden_size=5, batch_size=8, learning_rate_init=0.01, random_state=0,
                  device="cpu")
    if weighted:  # in order, so that the first batch weighs nothing: a step the device skips
        params.update(class_weight={0: 2.0}, shuffle=False)
    fit = dict(classes=[0, 1, 2], sample_weight=np.r_[np.zeros(8), rng.random(12)]
               if weighted else None)

    cpu = LSTMClassifier(**params)
    for _ in range(2):
        cpu.partial_fit(X, y, **fit)

    gpu = LSTMClassifier(**params)
    emulated = cuda_module.CUDABackend(recurrence="step", graphs=False)
    with monkeypatch.context() as patch:
        patch.setattr(fastlstm.estimators, "get_backend", lambda device, precision: emulated)
        for _ in range(2):
            gpu.partial_fit(X, y, **fit)
        assert gpu._adam.step == (4 if weighted else 6) and isinstance(gpu._adam.m, np.ndarray)
        on_gpu = gpu.predict_proba(X)

    assert isinstance(gpu.loss_curve_[-1], float)
    np.testing.assert_allclose(gpu.loss_curve_, cpu.loss_curve_, rtol=1e-4)
    for name, value in gpu.state_dict().items():
        np.testing.assert_allclose(value, cpu.state_dict()[name], rtol=1e-3, atol=1e-5,
                                   err_msg=name)
    # the same fitted estimator, now on the CPU backend
    np.testing.assert_allclose(gpu.predict_proba(X), on_gpu, rtol=1e-4, atol=1e-6)


def test_an_adaptive_rate_is_read_by_the_captured_step_without_a_new_capture(
        cuda_module, monkeypatch):  # noqa: F811
    rng = np.random.default_rng(0)
    X = rng.standard_normal((16, 4, 3)).astype(np.float32)
    y = np.digitize(X[:, :, 0].sum(axis=1), [-1.0, 1.0])
    # 2 minibatches of 8 an epoch, none of them after the first epoch an improvement
    params = dict(hidden_size=5, batch_size=8, learning_rate="adaptive", learning_rate_init=0.01,
                  max_iter=5, tol=1e9, n_iter_no_change=100, random_state=0, device="cpu")
    cpu = LSTMClassifier(**params).fit(X, y)

    emulated = cuda_module.CUDABackend(recurrence="step", graphs=True)
    captured = captures(emulated, monkeypatch)
    read = []
    launch = fake_cupy.Function.__call__
    adam = cuda_module._kernel("adam", "adam", np.float32).kernel

    def recording(function, grid, block, args, shared_mem=0, stream=None,
                  enable_cooperative_groups=False):
        if function is adam:
            settings = args[5]  # the state's buffer, which the Adam kernel reads its rate from
            assert settings.shape == (len(ADAM_SETTINGS),)

            def read_rate():  # when the launch runs: at each replay of a captured one
                read.append(float(settings[ADAM_SETTINGS.index("learning_rate")]))
            fake_cupy._enqueue(read_rate)
        return launch(function, grid, block, args, shared_mem, stream, enable_cooperative_groups)

    monkeypatch.setattr(fake_cupy.Function, "__call__", recording)
    gpu = LSTMClassifier(**params)
    with monkeypatch.context() as patch:
        patch.setattr(fastlstm.estimators, "get_backend", lambda device, precision: emulated)
        gpu.fit(X, y)

    # epochs 1 to 3 at the initial rate, 4 and 5 at a fifth of it: 10 steps, one capture
    rate = params["learning_rate_init"]
    assert read == pytest.approx([rate] * 6 + [rate / 5] * 4, rel=1e-12)
    assert len(captured) == 1 and emulated.graph_replays == 9
    assert gpu.learning_rate_ == cpu.learning_rate_ == rate / 5 / 5
    np.testing.assert_allclose(gpu.loss_curve_, cpu.loss_curve_, rtol=1e-4)
    for name, value in gpu.state_dict().items():
        np.testing.assert_allclose(value, cpu.state_dict()[name], rtol=1e-3, atol=1e-5,
                                   err_msg=name)
