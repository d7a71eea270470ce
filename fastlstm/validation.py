"""Input validation of the estimators: every bad ``X`` or ``y`` gets an error that says what to do.

``X`` is checked in two stages so that ``predict`` can stream: :func:`check_sequences`
looks at the shape and dtype of the whole ``X`` without copying it, and
:func:`to_float32` converts (and checks for NaN/inf) one slice of samples at a
time.  ``fit`` converts all of ``X`` at once; ``predict`` one batch at a time,
so its memory does not grow with the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
from sklearn.utils.validation import _check_feature_names, _check_n_features, check_array

#: what the estimators train and predict in: the Numba kernels specialise on dtype, and
#: float32 is what GPUs and PyTorch train in
DTYPE = np.float32

_SHAPES = "2-D (n_samples, n_features) or 3-D (n_samples, n_steps, n_inputs)"
_NON_FINITE_X_ADVICE = ("LSTMs need finite inputs: drop or impute those samples (e.g. "
                        "SimpleImputer in a Pipeline), and scale X so its values fit in float32.")


@dataclass
class Sequences:
    """``X`` checked but not converted: ``data`` (2-D or 3-D, its own dtype) read as
    ``(n_samples, n_steps, n_inputs)``."""

    data: np.ndarray
    n_steps: int
    n_inputs: int

    def __len__(self):
        return self.data.shape[0]


def check_sequences(estimator, X, reset):
    """Check the shape and dtype of ``X`` for ``estimator`` without converting it.

    2-D ``X`` has ``n_features_in_`` / ``feature_names_in_`` checked (or set when
    ``reset``) and its rows are read as steps of ``input_size`` values.  3-D ``X``
    is already sequences: only its number of inputs per step must match, so a
    model reads sequences of another length than it was trained on.
    """
    if scipy.sparse.issparse(X):
        raise TypeError("sparse input is not supported: an LSTM reads dense sequences; pass "
                        "X.toarray().")
    _check_feature_names(estimator, X, reset=reset)
    data = _as_array(X)
    _check_dtype(data)
    if data.ndim == 2:
        _check_n_features(estimator, data, reset=reset)
        n_samples, width = data.shape
        size = 1 if estimator.input_size is None else estimator.input_size
        if width == 0:  # sklearn's wording, which its estimator checks look for
            raise ValueError(f"Found array with 0 feature(s) (shape={data.shape}) while a "
                             "minimum of 1 is required: each sample needs at least one value.")
        if width % size:
            raise ValueError(
                f"X has {width} columns, which is not a multiple of input_size={size}; "
                f"set input_size to a divisor of {width} or pass 3-D X of shape "
                "(n_samples, n_steps, n_inputs).")
        n_steps, n_inputs = width // size, size
    elif data.ndim == 3:
        if reset:
            for name in ("n_features_in_", "feature_names_in_"):
                estimator.__dict__.pop(name, None)
        n_samples, n_steps, n_inputs = data.shape
        if estimator.input_size is not None and n_inputs != estimator.input_size:
            raise ValueError(
                f"X has {n_inputs} inputs per step but input_size={estimator.input_size}; "
                "set input_size=None (or to the last dimension of X) to read 3-D X as is.")
        if n_steps == 0 or n_inputs == 0:
            raise ValueError(f"X of shape {data.shape} has no time steps or no inputs per step; "
                             "each sample needs at least one step of at least one input.")
    elif data.ndim < 2:
        raise ValueError(
            f"Expected 2D or 3D array, got {data.ndim}D array instead (shape {data.shape}); X "
            f"must be {_SHAPES}. Reshape your data: one sequence with X.reshape(1, -1) (or "
            "X[None] for 3-D), or samples of one value each with X.reshape(-1, 1).")
    else:
        raise ValueError(
            f"X has {data.ndim} dimensions (shape {data.shape}), but it must be {_SHAPES}; "
            "reshape it, e.g. X.reshape(len(X), n_steps, -1).")
    if n_samples == 0:
        raise ValueError(f"Found array with 0 sample(s) (shape={data.shape}) while a minimum of "
                         "1 is required: pass at least one sample.")
    if not reset and n_inputs != estimator.input_size_:
        raise ValueError(
            f"X has {n_inputs} inputs per step, but {type(estimator).__name__} was fitted with "
            f"{estimator.input_size_}; reshape X as at fit time.")
    return Sequences(data, n_steps, n_inputs)


def _as_array(X):
    """``X`` as a NumPy array without copying arrays; ragged nesting is named as such."""
    if isinstance(X, np.ndarray):
        return X
    try:
        return np.asarray(X)
    except ValueError as exc:
        if "inhomogeneous" not in str(exc):
            raise
        raise ValueError(
            "X is ragged: its samples (or their steps) have different lengths. Pad the "
            "sequences to one length (e.g. with zeros before the first step) and pass a "
            f"{_SHAPES} array.") from exc


def _check_dtype(data):
    kind = data.dtype.kind
    if kind == "c":  # sklearn's wording, which its estimator checks look for
        raise ValueError("Complex data not supported: X must be real; pass X.real, np.abs(X), or "
                         "the real and imaginary parts as separate inputs per step.")
    if kind in "US":
        raise ValueError(f"X has dtype {data.dtype} (strings); pass numbers, e.g. "
                         "X.astype(np.float32) after checking the strings hold numbers.")
    if kind not in "biufO":
        raise TypeError(f"X has dtype {data.dtype}, which is not numeric; pass a numeric array "
                        "(bool, int, unsigned or float).")


def to_float32(estimator, sequences, lo=0, hi=None):
    """Samples ``lo:hi`` of checked ``sequences`` as a C-contiguous float32 ``(n, T, I)`` array.

    Raises a ``ValueError`` for NaN or infinite values (also those float32
    cannot hold) and the conversion's own error, with advice, for object
    arrays holding something other than numbers.
    """
    chunk = sequences.data[lo:hi]
    try:
        chunk = check_array(chunk, dtype=DTYPE, order="C", allow_nd=True, ensure_min_samples=0,
                            estimator=estimator, input_name="X")
    except (TypeError, ValueError) as exc:
        message = str(exc)
        if "NaN" in message or "infinity" in message:
            raise ValueError(f"{message}\n{_NON_FINITE_X_ADVICE}") from exc
        if chunk.dtype.kind == "O":  # keep the exception type: sklearn's checks look for it
            raise type(exc)(f"{message}: X has dtype object and holds values that are not "
                            "numbers; pass a numeric array.") from exc
        raise
    return chunk.reshape(chunk.shape[0], sequences.n_steps, sequences.n_inputs)


def check_regression_targets(estimator, y):
    """Regression targets as a float32 ``(n_samples, n_targets)`` array, all finite."""
    try:
        y = check_array(y, ensure_2d=False, dtype=DTYPE, input_name="y", estimator=estimator)
    except ValueError as exc:
        message = str(exc)
        if "NaN" in message or "infinity" in message:
            raise ValueError(f"{message} Drop or impute those samples, and scale y so its values "
                             "fit in float32.") from exc
        if "Complex" in message:
            raise ValueError("Complex data not supported: y must be real.") from exc
        raise
    if y.ndim == 1:
        y = y[:, None]
    elif y.ndim != 2:
        raise ValueError(f"y must have shape (n_samples,) or (n_samples, n_targets), "
                         f"got {y.shape}.")
    return y


def check_same_length(X, y):
    if len(X) != len(y):
        raise ValueError(
            f"Found input variables with inconsistent numbers of samples: X has {len(X)} "
            f"samples but y has {len(y)}; pass one target per sample.")
