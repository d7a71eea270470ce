"""Smoke test of examples/mnist_rows.py: offline, on a slice of the bundled MNIST sample."""

import importlib.util
import pickle
from pathlib import Path

import joblib
import numpy as np
import pytest

import fastlstm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist_rows.py"


@pytest.fixture
def mnist_rows(monkeypatch, tmp_path):
    """The example as a module, with no MNIST anywhere it looks (so it falls back to the sample)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTLSTM_OFFLINE", "1")
    monkeypatch.delenv("FASTLSTM_DATA", raising=False)
    spec = importlib.util.spec_from_file_location("mnist_rows", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("suffix", [".npz", ".pkl", ".joblib"])
def test_offline_run_on_the_sample_trains_reports_and_saves(mnist_rows, tmp_path, capsys, suffix):
    model_path = tmp_path / f"model{suffix}"
    status = mnist_rows.main(["--offline", "--epochs", "2", "--hidden-size", "8",
                              "--subset", "300", "--save", str(model_path),
                              "--plot", str(tmp_path / "curve.png")])
    out = capsys.readouterr().out
    assert status == 0
    assert "Using the bundled MNIST sample instead" in out
    assert "Epoch 2: loss" in out and "Test accuracy:" in out and "s/epoch" in out
    if suffix == ".npz":
        model = fastlstm.load(model_path)
    elif suffix == ".joblib":
        model = joblib.load(model_path)
    else:
        model = pickle.loads(model_path.read_bytes())
    assert model.n_iter_ == 2 and model.predict(np.zeros((1, 28, 28), np.float32)).shape == (1,)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out
    else:
        assert (tmp_path / "curve.png").stat().st_size > 0


def test_fashion_without_files_is_a_clear_error(mnist_rows, capsys):
    if Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is installed here, so Fashion-MNIST is found")
    assert mnist_rows.main(["--dataset", "fashion", "--offline"]) == 1
    assert "error: Fashion-MNIST files not found" in capsys.readouterr().err
