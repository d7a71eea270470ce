"""Input validation of the estimators: every bad ``X`` or ``y`` gets an error that says what to do.

``X`` comes in three forms: a 2-D or 3-D array of sequences of one length; a 3-D
float array whose shorter samples end in time steps that are all NaN (tslearn's
convention, which :func:`pad_sequences` makes); a list of 2-D arrays ``(n_steps_i,
n_inputs)`` of different lengths.  NaN marks padding only: the estimators hand the
backends each sample's number of valid steps (its length) and a copy with the
padded steps set to zero, which the kernels do not read.

``X`` is checked in two stages so that ``predict`` can stream: :func:`check_sequences`
looks at the shape and dtype of the whole ``X`` without copying it, and
:func:`to_float32` converts (and checks for NaN/inf) one slice of samples at a
time.  ``fit`` converts all of ``X`` at once; ``predict`` one batch at a time,
so its memory does not grow with the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import numpy as np
import scipy.sparse
from sklearn.utils.validation import _check_feature_names, _check_n_features, check_array

__all__ = ["DTYPE", "Sequences", "check_regression_targets", "check_same_length",
           "check_sequences", "pad_sequences", "to_float32"]

#: what the estimators train and predict in: the Numba kernels specialise on dtype, and
#: float32 is what GPUs and PyTorch train in
DTYPE = np.float32

_SHAPES = "2-D (n_samples, n_features) or 3-D (n_samples, n_steps, n_inputs)"
_NON_FINITE_X_ADVICE = ("LSTMs need finite inputs: drop or impute those samples (e.g. "
                        "SimpleImputer in a Pipeline), and scale X so its values fit in float32.")
_RAGGED_ADVICE = ("Sequences of different lengths are passed as a list of 2-D arrays "
                  "(n_steps_i, n_inputs), or as 3-D X whose shorter samples end in time steps "
                  "that are all NaN (fastlstm.pad_sequences makes it from the list).")
_PADDING_RULE = ("NaN marks padding only as whole time steps (every input NaN) after a "
                 "sample's last valid step")


@dataclass
class Sequences:
    """``X`` checked but not converted, read as ``(n_samples, n_steps, n_inputs)``.

    ``data`` is a 2-D or 3-D array in its own dtype, or a list of 2-D arrays
    ``(n_steps_i, n_inputs)`` of different lengths; ``n_steps`` is the longest.
    """

    data: np.ndarray | list
    n_steps: int
    n_inputs: int

    def __len__(self):
        return len(self.data)


def check_sequences(estimator, X, reset):
    """Check the shape and dtype of ``X`` for ``estimator`` without converting it.

    2-D ``X`` has ``n_features_in_`` / ``feature_names_in_`` checked (or set when
    ``reset``) and its rows are read as steps of ``input_size`` values.  3-D ``X``
    and lists of sequences are sequences already: only their number of inputs per
    step must match, so a model reads sequences of another length than it was
    trained on.
    """
    if scipy.sparse.issparse(X):
        raise TypeError("sparse input is not supported: an LSTM reads dense sequences; pass "
                        "X.toarray().")
    _check_feature_names(estimator, X, reset=reset)
    data = _as_array(X)
    if isinstance(data, list):
        if reset:
            _forget_n_features(estimator)
        samples, n_inputs = _check_samples(data)
        _check_input_size(estimator, n_inputs)
        sequences = Sequences(samples, max(len(s) for s in samples), n_inputs)
    else:
        sequences = _check_array_shape(estimator, data, reset)
    if not reset and sequences.n_inputs != estimator.input_size_:
        raise ValueError(
            f"X has {sequences.n_inputs} inputs per step, but {type(estimator).__name__} was "
            f"fitted with {estimator.input_size_}; reshape X as at fit time.")
    return sequences


def _check_array_shape(estimator, data, reset):
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
            _forget_n_features(estimator)
        n_samples, n_steps, n_inputs = data.shape
        _check_input_size(estimator, n_inputs)
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
    return Sequences(data, n_steps, n_inputs)


def _forget_n_features(estimator):
    """Drop the 2-D fitted attributes: a model fitted on sequences reads any length."""
    for name in ("n_features_in_", "feature_names_in_"):
        estimator.__dict__.pop(name, None)


def _check_input_size(estimator, n_inputs):
    if estimator.input_size is not None and n_inputs != estimator.input_size:
        raise ValueError(
            f"X has {n_inputs} inputs per step but input_size={estimator.input_size}; "
            "set input_size=None (or to the last dimension of X) to read 3-D X as is.")


def _as_array(X):
    """``X`` as a NumPy array without copying arrays, or as a list of its samples where
    they have different shapes (a list, tuple or 1-D object array of sequences)."""
    if isinstance(X, np.ndarray):
        data = X
    else:
        try:
            data = np.asarray(X)
        except ValueError as exc:
            if "inhomogeneous" not in str(exc):
                raise
            return list(X)
    if data.dtype.kind == "O" and data.ndim == 1 and len(data) and all(
            isinstance(sample, (np.ndarray, list, tuple)) for sample in data):
        return list(data)
    return data


def _check_samples(samples, name="X"):
    """``samples`` (a list of sequences of different lengths) as 2-D arrays, checked, and
    their number of inputs per step (``name``: what the errors call the list)."""
    if not samples:
        raise ValueError(f"Found {name} with 0 sample(s) while a minimum of 1 is required: "
                         "pass at least one sample.")
    arrays = []
    for i, sample in enumerate(samples):
        try:
            array = np.asarray(sample)
        except ValueError as exc:
            if "inhomogeneous" not in str(exc):
                raise
            raise ValueError(f"sample {i} of {name} is ragged: its time steps have different "
                             "numbers of inputs; every step needs the same inputs.") from exc
        if array.ndim != 2:
            raise ValueError(
                f"sample {i} of {name} has shape {array.shape}, but each sample of a list of "
                "sequences must be 2-D (n_steps, n_inputs); reshape a sequence of one input "
                "per step with np.reshape(sequence, (-1, 1)).")
        if array.shape[0] == 0:
            raise ValueError(f"sample {i} of {name} has no time steps (shape {array.shape}); each "
                             "sample needs at least one step: drop the empty ones.")
        if array.shape[1] == 0:
            raise ValueError(f"sample {i} of {name} has no inputs per step (shape {array.shape}); "
                             "each step needs at least one input.")
        if arrays and array.shape[1] != arrays[0].shape[1]:
            raise ValueError(
                f"sample {i} of {name} has {array.shape[1]} inputs per step, but sample 0 has "
                f"{arrays[0].shape[1]}; every step of every sample needs the same inputs.")
        try:
            _check_dtype(array)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"sample {i}: {exc}") from exc
        arrays.append(array)
    return arrays, arrays[0].shape[1]


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
    """Samples ``lo:hi`` of checked ``sequences`` as the batch a backend reads.

    Returns
    -------
    x : ndarray of shape (n, n_steps, n_inputs)
        C-contiguous float32; ``n_steps`` is that of the longest of these samples, and
        the steps past a sample's length are 0.
    lengths : ndarray of shape (n,) or None
        Each sample's number of valid steps (int64, on the host), or ``None`` where
        every sample has all ``n_steps``: the fixed-length path, as for X without NaN.

    Raises a ``ValueError`` for infinite values (also those float32 cannot hold)
    and for NaN other than padding, naming the sample; and the conversion's own
    error, with advice, for object arrays holding something other than numbers.
    """
    if isinstance(sequences.data, list):
        return _padding(_pad(sequences.data[lo:hi], sequences.n_inputs, lo), lo)
    chunk = sequences.data[lo:hi]
    # 2-D rows are features: NaN there is a missing value, refused by sklearn's check
    fixed = chunk.ndim == 2
    try:
        chunk = check_array(chunk, dtype=DTYPE, order="C", allow_nd=True, ensure_min_samples=0,
                            ensure_all_finite=fixed, estimator=estimator, input_name="X")
    except (TypeError, ValueError) as exc:
        message = str(exc)
        if "NaN" in message:
            raise ValueError(f"{message}\n{_NON_FINITE_X_ADVICE} {_RAGGED_ADVICE}") from exc
        if "infinity" in message:
            raise ValueError(f"{message}\n{_NON_FINITE_X_ADVICE}") from exc
        if chunk.dtype.kind == "O":  # keep the exception type: sklearn's checks look for it
            raise type(exc)(f"{message}: X has dtype object and holds values that are not "
                            "numbers; pass a numeric array.") from exc
        raise
    x = chunk.reshape(chunk.shape[0], sequences.n_steps, sequences.n_inputs)
    return (x, None) if fixed else _padding(x, lo)


def _pad(samples, n_inputs, lo, n_steps=None, dtype=DTYPE):
    """``samples`` (2-D arrays) in one array of ``n_steps`` (default: the longest's), NaN
    after each one's last step (``lo``: the index of ``samples[0]`` in ``X``, for errors)."""
    n_steps = max(len(s) for s in samples) if n_steps is None else n_steps
    x = np.full((len(samples), n_steps, n_inputs), np.nan, dtype)
    for i, sample in enumerate(samples):
        try:
            x[i, :len(sample)] = sample
        except (TypeError, ValueError) as exc:  # keep the type: sklearn's checks look for it
            raise type(exc)(f"{exc}: sample {lo + i} of X holds values that are not numbers; "
                            "pass numeric arrays.") from exc
    return x


def _padding(x, lo):
    """``x`` with its NaN padding found and checked: ``(x, lengths)`` as :func:`to_float32`
    returns them (``lo``: the index of ``x[0]`` in ``X``, for the errors)."""
    finite = np.isfinite(x)
    if finite.all():
        return x, None
    infinite = np.isinf(x)
    if infinite.any():
        i = lo + int(infinite.any(axis=(1, 2)).argmax())
        raise ValueError(f"Input X contains infinity or a value too large for "
                         f"dtype('float32') in sample {i}.\n{_NON_FINITE_X_ADVICE}")
    padded = ~finite.any(axis=2)  # steps whose every input is NaN
    partial = ~finite.all(axis=2) & ~padded
    if partial.any():
        i, t = np.argwhere(partial)[0]
        raise ValueError(
            f"Input X contains NaN in sample {lo + i} at step {t} in some of its inputs only; "
            f"{_PADDING_RULE}. Impute the missing values (or drop the sample).")
    valid = ~padded
    n_steps = x.shape[1]
    lengths = n_steps - valid[:, ::-1].argmax(axis=1)  # one past each sample's last valid step
    empty = ~valid.any(axis=1)
    if empty.any():
        raise ValueError(f"Input X contains NaN in every step of sample "
                         f"{lo + int(empty.argmax())}: it has no valid time step; drop it.")
    gap = valid.sum(axis=1) != lengths
    if gap.any():
        i = int(gap.argmax())
        raise ValueError(
            f"Input X contains NaN in sample {lo + i}: step {int(padded[i].argmax())} is all "
            f"NaN but a later step is not; {_PADDING_RULE}. Pad at the end only, and impute "
            "missing steps inside a sequence (or drop the sample).")
    longest = int(lengths.max())
    # the kernels never read the padding, but nothing non-finite reaches them anyway
    x = np.where(valid[:, :longest, None], x[:, :longest], DTYPE(0))
    return x, None if lengths.min() == longest else lengths.astype(np.int64)


def pad_sequences(sequences, *, dtype=DTYPE, n_steps=None):
    """Sequences of different lengths as one 3-D array, padded with NaN at the end.

    The estimators read the result as they read the list itself: the time steps
    of NaN after each sequence's last step are padding, never read by the network.
    As one array, ragged data goes through scikit-learn's tools that index
    ``X`` (``train_test_split``, ``cross_val_score``, ``GridSearchCV``).

    Parameters
    ----------
    sequences : list of array-like of shape (n_steps_i, n_inputs)
        The sequences, each with at least one step and all with the same number
        of inputs per step.
    dtype : floating dtype, default=np.float32
        Of the result (float32 is what the estimators compute in).
    n_steps : int, default=None
        Time steps of the result; ``None``: those of the longest sequence.

    Returns
    -------
    X : ndarray of shape (n_samples, n_steps, n_inputs)
        ``X[i, :len(sequences[i])]`` is ``sequences[i]``; the later steps are NaN.

    Examples
    --------
    >>> from fastlstm import pad_sequences
    >>> pad_sequences([[[1.0], [2.0]], [[3.0]]])[:, :, 0]
    array([[ 1.,  2.],
           [ 3., nan]], dtype=float32)
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating dtype, which can hold the NaN padding; got "
                         f"{dtype}.")
    samples, n_inputs = _check_samples(list(sequences), "sequences")
    longest = max(len(s) for s in samples)
    if n_steps is None:
        n_steps = longest
    elif isinstance(n_steps, bool) or not isinstance(n_steps, Integral) or n_steps < longest:
        raise ValueError(f"n_steps={n_steps!r} is not an integer at least the length of the "
                         f"longest sequence ({longest} steps); pass n_steps >= {longest} or "
                         "None.")
    return _pad(samples, n_inputs, 0, n_steps, dtype)


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
