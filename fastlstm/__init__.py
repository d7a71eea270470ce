"""fastlstm: fast LSTM sequence models with hand-written Numba and CUDA kernels."""

__version__ = "0.1.0"

from .estimators import LSTMClassifier, LSTMRegressor  # noqa: E402
from .params import ParamLayout  # noqa: E402
from .persistence import load  # noqa: E402

__all__ = ["LSTMClassifier", "LSTMRegressor", "ParamLayout", "__version__", "load"]
