"""fastlstm: fast LSTM sequence models with hand-written Numba and CUDA kernels."""

from ._version import __version__
from .estimators import LSTMClassifier, LSTMRegressor, load
from .params import ParamLayout
from .validation import pad_sequences

__all__ = ["LSTMClassifier", "LSTMRegressor", "ParamLayout", "__version__", "load",
           "pad_sequences"]
