"""fastlstm: fast LSTM sequence models with hand-written Numba and CUDA kernels."""

__version__ = "0.1.0"

from .params import ParamLayout  # noqa: E402

__all__ = ["ParamLayout", "__version__"]
