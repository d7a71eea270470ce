"""``device="cuda"`` says why it cannot run; ``"auto"`` takes the GPU where usable, else the CPU."""

import pytest

from fastlstm.backends import BackendUnavailable, get_backend


def test_cuda_or_a_clear_reason_and_auto_follows():
    try:
        cuda = get_backend("cuda")
    except BackendUnavailable as exc:
        message = str(exc)
        assert "CuPy" in message and "device='cpu'" in message
        assert "\n" not in message
        assert get_backend("auto").name == "cpu"
        with pytest.raises(BackendUnavailable):
            get_backend("cuda")  # asked again: same answer, no half-loaded module
    else:
        assert cuda.name == "cuda"
        assert get_backend("auto") is cuda
