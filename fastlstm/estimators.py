"""scikit-learn estimators: :class:`LSTMClassifier` and :class:`LSTMRegressor`.

Both are an LSTM stack read over the time steps of each sample, followed by a
linear head on the top layer's last hidden state (exactly
``torch.nn.LSTM(batch_first=True, bidirectional=...)`` + ``torch.nn.Linear``, on
sequences packed by ``torch.nn.utils.rnn.pack_padded_sequence`` where their
lengths differ).  They share one
base class, :class:`BaseLSTM`, which owns input validation, the epoch loop and
the fitted state; the subclasses only say how targets are encoded and scored.

The training loop follows the contract of :mod:`fastlstm.backends`: the data
and the flat parameter buffer are moved to the backend once per ``fit``, one
:meth:`~fastlstm.backends.Backend.train_step` per minibatch (with the lengths of
its samples, a host array, where they differ, and their weights where there are
any), the loss is brought to the host once per epoch.  Fitted weights always
live on the host (NumPy), so a model trained on a GPU pickles and predicts on a
CPU-only box.

:meth:`BaseLSTM.save` hands its state to :mod:`fastlstm.persistence` as plain
data, and :func:`load` turns what that module reads back into the estimator
class named in the file.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import sys
import time
import warnings
from numbers import Integral, Real

import numpy as np
from scipy.special import log_softmax
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state, column_or_1d
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import _check_sample_weight, check_is_fitted

from ._version import __version__
from .backends import AdamConfig, AdamState, get_backend
from .dropout import Dropout
from .model import ModelSpec
from .persistence import _warn_if_other_version, load_state, save_state
from .precision import PRECISIONS
from .schedule import LearningRateSchedule
from .validation import DTYPE, check_regression_targets, check_same_length, check_sequences, \
    to_float32

__all__ = ["BaseLSTM", "LSTMClassifier", "LSTMRegressor", "load"]

#: samples per forward pass at inference: bounds memory whatever the size of X
PREDICT_BATCH_SIZE = 1024


class BaseLSTM(BaseEstimator):
    """LSTM stack + linear head trained with minibatch Adam (shared by the estimators).

    Not meant to be used directly: see :class:`LSTMClassifier` and
    :class:`LSTMRegressor`, which document the parameters.
    """

    _parameter_constraints = {
        "hidden_size": [Interval(Integral, 1, None, closed="left")],
        "num_layers": [Interval(Integral, 1, None, closed="left")],
        "bidirectional": ["boolean"],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "recurrent_dropout": [Interval(Real, 0, 1, closed="left")],
        "input_size": [Interval(Integral, 1, None, closed="left"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions({"constant", "adaptive"})],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "beta_1": [Interval(Real, 0, 1, closed="left")],
        "beta_2": [Interval(Real, 0, 1, closed="left")],
        "epsilon": [Interval(Real, 0, None, closed="neither")],
        "clip_grad_norm": [Interval(Real, 0, None, closed="neither"), None],
        "shuffle": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "warm_start": ["boolean"],
        "checkpoint": [str, os.PathLike, None],
        "verbose": ["verbose"],
        "random_state": ["random_state"],
        "device": [StrOptions({"auto", "cpu", "cuda"})],
        "precision": [StrOptions(set(PRECISIONS))],
    }

    #: loss of the backend: "cross_entropy" or "squared_error" (set by subclasses)
    _loss = None
    #: advice given when training diverges (set by subclasses)
    _what_to_scale = "X (e.g. StandardScaler in a Pipeline)"

    def __init__(self, hidden_size=128, num_layers=1, *, bidirectional=False, dropout=0.0,
                 recurrent_dropout=0.0, input_size=None, batch_size=64, learning_rate="constant",
                 learning_rate_init=2e-3, max_iter=15, alpha=0.0, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, clip_grad_norm=None, shuffle=True, early_stopping=False,
                 validation_fraction=0.1, n_iter_no_change=10, tol=1e-4, warm_start=False,
                 checkpoint=None, verbose=0, random_state=None, device="auto",
                 precision="float32"):
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.dropout = dropout
        self.recurrent_dropout = recurrent_dropout
        self.input_size = input_size
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.alpha = alpha
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.clip_grad_norm = clip_grad_norm
        self.shuffle = shuffle
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.warm_start = warm_start
        self.checkpoint = checkpoint
        self.verbose = verbose
        self.random_state = random_state
        self.device = device
        self.precision = precision

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        # allow_nan stays False: NaN is padding (whole time steps at the end of a sample of
        # 3-D X), not a missing value, and any other NaN is refused, as sklearn's NaN
        # checks expect of an estimator without the tag
        return tags

    # ------------------------------------------------------------------ input
    def _validate_X(self, X, reset):
        """``X`` as a float32 ``(n_samples, n_steps, n_inputs)`` array and the samples'
        lengths, or ``None`` where all have every step (see :mod:`.validation`)."""
        return to_float32(self, check_sequences(self, X, reset))

    # ------------------------------------------------------------- persistence
    def save(self, path):
        """Write the fitted model to ``path`` in a file that cannot run code when loaded.

        A ``.npz`` archive (read with ``allow_pickle=False`` by
        :func:`fastlstm.load`) of the weights, the hyper-parameters and the
        fitted attributes, with a format version and a SHA-256 digest.  Labels
        (``classes_``) may be ints, floats, strings or bools.

        Parameters
        ----------
        path : str or path-like
            Where to write (an existing file is replaced only once the new one is complete).
        """
        save_state(self._get_fitted_state(), path)

    def _get_fitted_state(self):
        """The fitted model as plain data, for :func:`~fastlstm.persistence.save_state`.

        Returns
        -------
        state : dict
            ``"metadata"``: JSON-encodable class name, hyper-parameters,
            fitted attributes, the network's :class:`~fastlstm.model.ModelSpec`
            (as a dict), Adam's step count, the state of the training
            generator, the schedule's count of epochs without improvement and,
            for the checkpoint of an unfinished fit, its progress
            (``"unfinished_fit"``, else ``None``); ``"arrays"``: the weights,
            Adam's moments, the fitted attributes that are arrays and, for an
            unfinished fit with early stopping, the best epoch's weights
            (``"best_params"``).
        """
        check_is_fitted(self)
        adam = self._adam  # None until trained (weights set by load_state_dict)
        arrays = {"params": self._params}
        if adam is not None:
            arrays.update(adam_m=adam.m, adam_v=adam.v)
        if self._best_params is not None:
            arrays["best_params"] = self._best_params
        attributes = {}
        for name, value in vars(self).items():
            if not name.endswith("_") or name.startswith("_"):
                continue  # hyper-parameters and private state are saved below
            if isinstance(value, np.ndarray):
                arrays[name] = value
            else:
                attributes[name] = _json_value(name, value)
        params = self.get_params(deep=False)
        if not (params["random_state"] is None or isinstance(params["random_state"], int)):
            # stacklevel 3: the line that called save
            warnings.warn("random_state is a RandomState instance, which a model file cannot "
                          "hold; it is saved as None (the fitted weights and the state of the "
                          "training generator are saved exactly).", UserWarning, stacklevel=3)
            params["random_state"] = None
        if params["checkpoint"] is not None:
            params["checkpoint"] = os.fspath(params["checkpoint"])
        if isinstance(params.get("class_weight"), dict):
            # JSON objects have string keys only, and labels may be numbers or bools
            params["class_weight"] = [[_json_label(label), weight]
                                      for label, weight in params["class_weight"].items()]
        spec = self._spec
        metadata = {
            "estimator": type(self).__name__,
            "params": {name: _json_value(name, value) for name, value in params.items()},
            "spec": dataclasses.asdict(spec),
            "adam_step": None if adam is None else int(adam.step),
            "rng_state": self._rng.bit_generator.state,
            "no_improvement_count": self._no_improvement_count,
            "unfinished_fit": self._unfinished_fit,
            "attributes": attributes,
        }
        return {"metadata": metadata, "arrays": arrays}

    @classmethod
    def _from_fitted_state(cls, state):
        """The fitted estimator that ``state`` describes (inverse of :meth:`_get_fitted_state`).

        Parameters
        ----------
        state : dict
            ``"metadata"`` and ``"arrays"``, as :meth:`_get_fitted_state`
            returns them or :func:`~fastlstm.persistence.load_state` reads them.

        Returns
        -------
        estimator : BaseLSTM
            An instance of ``cls`` that predicts and goes on training as the described one.
        """
        metadata, arrays = state["metadata"], dict(state["arrays"])
        params = dict(metadata["params"])
        if isinstance(params.get("class_weight"), list):  # [label, weight] pairs: see above
            params["class_weight"] = {label: weight for label, weight in params["class_weight"]}
        estimator = cls(**params)
        estimator._spec = ModelSpec(**metadata["spec"])
        estimator._params = arrays.pop("params")
        estimator._adam = None if metadata["adam_step"] is None else \
            AdamState(arrays.pop("adam_m"), arrays.pop("adam_v"), metadata["adam_step"])
        estimator._rng = np.random.default_rng()
        estimator._rng.bit_generator.state = metadata["rng_state"]
        estimator._no_improvement_count = metadata["no_improvement_count"]
        estimator._unfinished_fit = metadata["unfinished_fit"]
        estimator._best_params = arrays.pop("best_params", None)
        for name, value in metadata["attributes"].items():
            setattr(estimator, name, value)
        for name, value in arrays.items():
            setattr(estimator, name, value)
        return estimator

    def __getstate__(self):
        return {**super().__getstate__(), "_fastlstm_version": __version__}

    def __setstate__(self, state):
        state = dict(state)
        _warn_if_other_version(state.pop("_fastlstm_version", None),
                               f"this pickled {type(self).__name__}", stacklevel=2)
        layout = state.pop("_layout", None)
        if layout is not None and "_spec" not in state:  # pickled by fastlstm 0.1
            state["_spec"] = ModelSpec(layout.input_size, layout.hidden_size,
                                       layout.num_layers, layout.output_size)
        # parameters newer than the pickle (bidirectional since fastlstm 0.2, the others
        # after it) take their defaults; before the learning-rate schedule, the rate was constant
        signature = inspect.signature(type(self).__init__).parameters.values()
        state = {**{p.name: p.default for p in signature if p.default is not p.empty}, **state}
        if "_params" in state and "learning_rate_" not in state:
            state.update(learning_rate_=state["learning_rate_init"], _no_improvement_count=0,
                         _unfinished_fit=None, _best_params=None)
        super().__setstate__(state)

    # ---------------------------------------------------------- subclass hooks
    def _encode_targets(self, y, first, classes=None):
        """Validated targets in the form the loss takes (target attributes set when ``first``)."""
        raise NotImplementedError

    def _targets_from_state_dict(self, n_outputs):
        """Set the target attributes of an unfitted estimator from the head's size."""
        raise NotImplementedError

    def _validation_score(self, outputs, y, sample_weight):
        """Score of network ``outputs`` against encoded targets ``y`` (higher is better),
        weighted by ``sample_weight`` (or ``None``) as :meth:`score` weights it."""
        raise NotImplementedError

    def _sample_weight(self, sample_weight, X, y, incremental):
        """The weight of each sample in the loss (float64, validated), or ``None`` where
        every sample weighs 1.

        ``y`` holds the encoded targets; the classifier multiplies in its class weights.
        """
        if sample_weight is None:
            return None
        weights = _check_sample_weight(sample_weight, X, dtype=np.float64,
                                       ensure_non_negative=True)
        # scikit-learn refuses weights of zero sum itself only since 1.9
        if not weights.sum() > 0:
            raise ValueError("every sample has zero weight; give some samples a positive "
                             "weight.")
        return weights

    def _stratify(self, y):
        """What ``train_test_split`` stratifies the validation split on (or ``None``)."""
        return None

    @property
    def _n_outputs(self):
        raise NotImplementedError

    # ------------------------------------------------------------ fitted state
    def _initialize(self, spec, params=None):
        """Start a new training history of the network ``spec`` from ``params`` (a flat
        host buffer of ``spec.layout``).

        Without ``params``, the weights are drawn by ``spec.layout.init``.  Either way
        the estimator's generator (weights, shuffling, validation split) is
        seeded afresh from ``random_state``.
        """
        self._rng = np.random.default_rng(
            check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        self._spec = spec
        self._params = spec.layout.init(self._rng, DTYPE) if params is None else params
        self._adam = None
        self.input_size_ = spec.input_size
        self.n_iter_ = 0
        self.loss_curve_ = []
        self.best_loss_ = math.inf
        self.validation_scores_ = [] if self.early_stopping else None
        self.best_validation_score_ = -math.inf if self.early_stopping else None
        self.learning_rate_ = self.learning_rate_init
        self._no_improvement_count = 0
        # the record of the fit a checkpoint was saved in the midst of (see _fit_record), and
        # its best weights so far (early stopping): what resuming it needs
        self._unfinished_fit = None
        self._best_params = None

    def state_dict(self):
        """The fitted weights with PyTorch's names, shapes and gate order (i, f, g, o).

        Returns
        -------
        dict of str to ndarray
            ``lstm.weight_ih_l{k}``, ``lstm.weight_hh_l{k}``, ``lstm.bias_ih_l{k}``,
            ``lstm.bias_hh_l{k}`` for every layer ``k`` (and the same names ending in
            ``_reverse`` for the reverse direction of a bidirectional network),
            ``head.weight`` and ``head.bias`` (copies): what
            ``nn.LSTM(batch_first=True, bidirectional=...)`` and ``nn.Linear`` named
            ``lstm`` and ``head`` hold.
        """
        check_is_fitted(self)
        return {name: view.copy() for name, view in self._spec.layout.views(self._params).items()}

    def to_onnx(self, path=None, *, lengths=False):
        """The fitted model as an ONNX graph of standard operators, for ONNX Runtime and others.

        One ONNX ``LSTM`` node per layer (bidirectional where the network is),
        then the head (``Gemm``) and, for a classifier, ``Softmax`` and the
        label; opset 17, float32 weights.  Needs the ``onnx`` package
        (``pip install 'fastlstm[onnx]'``); serving needs only an ONNX runtime.

        Parameters
        ----------
        path : str or path-like, default=None
            If given, the model is also written there (e.g. ``"model.onnx"``).
        lengths : bool, default=False
            Add a second input ``lengths``, int32 ``[batch]``: each sequence's
            number of valid steps (1 to ``steps``), ONNX's ``sequence_lens``.
            Each sequence is then read up to its length only (the steps after it
            may hold anything finite, e.g. zeros), as ``predict`` reads a list
            of sequences of different lengths.  Without it, every step of ``X``
            is read.

        Returns
        -------
        onnx.ModelProto
            Inputs ``X``, float32 ``[batch, steps, n_inputs]`` (batch-first,
            ``batch`` and ``steps`` of any size; 2-D ``X`` of the estimator must
            be reshaped to ``(n_samples, -1, input_size_)``), and ``lengths``
            where asked for.  Outputs of a classifier: ``label`` ``[batch]``
            (what :meth:`predict` returns, in the dtype of ``classes_``: ints,
            floats, bools or strings) and ``probabilities``, float32 ``[batch,
            n_classes]`` (:meth:`predict_proba`); of a regressor:
            ``predictions``, float32 ``[batch, n_targets]``, or ``[batch]``
            where :meth:`predict` returns 1-D (one target).

        Raises
        ------
        sklearn.exceptions.NotFittedError
            The estimator is not fitted.
        ImportError
            The ``onnx`` package is not installed.

        See Also
        --------
        fastlstm.onnx : how the graph is built and the weights are converted.

        Notes
        -----
        ONNX Runtime refuses ``lengths`` above ``steps`` (or negative); a length
        of 0 gives the head's outputs for the initial (zero) states, where
        ``predict`` refuses an empty sequence.  ONNX Runtime 1.32's ``LSTM``
        aborts the process on an empty batch: send at least one sequence.

        Examples
        --------
        >>> import numpy as np
        >>> import onnxruntime as ort
        >>> from fastlstm import LSTMClassifier
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.standard_normal((40, 6, 2)), rng.integers(0, 2, 40)
        >>> clf = LSTMClassifier(hidden_size=4, max_iter=1, random_state=0).fit(X, y)
        >>> session = ort.InferenceSession(clf.to_onnx().SerializeToString(),
        ...                                providers=["CPUExecutionProvider"])
        >>> label, proba = session.run(None, {"X": X[:3].astype(np.float32)})
        >>> bool((label == clf.predict(X[:3])).all())
        True
        """
        from .onnx import to_onnx

        return to_onnx(self, path, lengths=lengths)

    def load_state_dict(self, state_dict):
        """Set the weights from a mapping such as :meth:`state_dict` returns.

        Arrays (or CPU torch tensors) with PyTorch's names and shapes; the
        network must match ``hidden_size``, ``num_layers`` and ``bidirectional``
        (names ending in ``_reverse``), and the sizes of the fitted model if
        there is one.  An unfitted estimator becomes usable for
        ``predict`` (an unfitted classifier gets ``classes_ = [0, ..., K-1]``),
        and ``warm_start=True`` continues training from these weights.

        Returns
        -------
        self
        """
        state = {name: np.asarray(value) for name, value in state_dict.items()}
        spec = ModelSpec.from_state_dict(state)
        if (spec.hidden_size, spec.num_layers, spec.bidirectional) != \
                (self.hidden_size, self.num_layers, bool(self.bidirectional)):
            raise ValueError(
                f"state_dict has hidden size {spec.hidden_size} and {spec.num_layers} "
                f"{'bidirectional' if spec.bidirectional else 'unidirectional'} layer(s), but "
                f"this estimator has hidden_size={self.hidden_size}, "
                f"num_layers={self.num_layers}, bidirectional={self.bidirectional}; set them "
                "with set_params first.")
        fitted = hasattr(self, "_params")
        if fitted and (spec.input_size, spec.output_size) != (self.input_size_, self._n_outputs):
            raise ValueError(
                f"state_dict has {spec.input_size} inputs and {spec.output_size} outputs, but "
                f"this estimator was fitted with {self.input_size_} and {self._n_outputs}; load "
                "it into an unfitted estimator instead.")
        params = spec.layout.from_state_dict(state, dtype=DTYPE)
        if not np.isfinite(params).all():
            bad = [name for name, view in spec.layout.views(params).items()
                   if not np.isfinite(view).all()]
            raise ValueError(f"state_dict has NaN or infinite values (or values beyond float32's "
                             f"range) in {bad}; load weights from a model that trained well.")
        if not fitted:
            self._targets_from_state_dict(spec.output_size)
        self._initialize(spec, params)
        return self

    # ---------------------------------------------------------------- training
    def fit(self, X, y, sample_weight=None):
        """Train on ``X`` and ``y`` for up to ``max_iter`` epochs.

        With ``warm_start``, training continues from the fitted state: a new
        run of up to ``max_iter`` epochs with a new optimizer, except for a
        model loaded from the ``checkpoint`` of an unfinished fit, which
        resumes that fit (its optimizer, learning-rate schedule, shuffling and
        validation split) for the rest of its ``max_iter`` epochs.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_steps, n_inputs) or (n_samples, n_features), \
or list of array-like of shape (n_steps_i, n_inputs)
            Sequences, in one of the input forms of the class docstring: 3-D
            (shorter samples may end in all-NaN time steps), 2-D rows cut into
            steps of ``input_size`` values (one value per step when
            ``input_size`` is None), or a list of sequences of different
            lengths.  Not rescaled.
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            Targets.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each sample's loss (see the class docstring):
            each minibatch's loss is the weighted mean of its samples' losses.
            ``None``: every sample weighs 1.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            A checkpoint of an unfinished fit is resumed on another number of
            samples, or with another ``early_stopping`` or
            ``validation_fraction``, than the fit's (the message says what to do).
        """
        self._validate_params()
        return self._fit(X, y, incremental=False, sample_weight=sample_weight)

    def _fit(self, X, y, incremental, classes=None, sample_weight=None):
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y "
                             "is None.")
        if self.checkpoint is not None:  # refused before any work rather than after an epoch
            folder = os.path.dirname(os.path.abspath(self.checkpoint))
            if not os.path.isdir(folder):
                raise ValueError(f"checkpoint={self.checkpoint!r} is in a folder that does not "
                                 f"exist ({folder}); create it, or pass another path.")
        first = not hasattr(self, "_params") or not (incremental or self.warm_start)
        X, lengths = self._validate_X(X, reset=first)
        y = self._encode_targets(y, first, classes)
        check_same_length(X, y)
        if first and self.dropout and self.num_layers == 1:
            warnings.warn(f"dropout={self.dropout} drops the output of every layer but the last, "
                          "and there is one layer: it does nothing. Set num_layers >= 2, or use "
                          "recurrent_dropout.", UserWarning, stacklevel=3)
        weights = self._sample_weight(sample_weight, X, y, incremental)
        spec = ModelSpec(X.shape[2], self.hidden_size, self.num_layers, self._n_outputs,
                         self.bidirectional)
        if first:
            self._initialize(spec)
        elif spec != self._spec:
            raise ValueError(
                f"cannot continue training a {self._spec!r} as a {spec!r}: the data or "
                "hidden_size/num_layers/bidirectional changed; set warm_start=False to start "
                "afresh.")
        # the checkpoint of an unfinished fit goes on with it; partial_fit trains an epoch of
        # its own instead (and the unfinished fit is over)
        resume = None if incremental else self._unfinished_fit
        record = None
        if not incremental:
            record = self._fit_record(resume, len(X))
        X_val = y_val = lengths_val = weights_val = None
        if self.early_stopping and not incremental:
            # the lengths and weights join the split where there are any; X and y split the
            # same either way
            per_sample = {name: a for name, a in (("lengths", lengths), ("weights", weights))
                          if a is not None}
            split = train_test_split(
                X, y, *per_sample.values(), test_size=self.validation_fraction,
                random_state=record["validation_seed"], stratify=self._stratify(y))
            X, X_val, y, y_val = split[:4]
            parts = dict(zip(per_sample, zip(split[4::2], split[5::2])))
            lengths, lengths_val = parts.get("lengths", (None, None))
            weights, weights_val = parts.get("weights", (None, None))
            for part, w in (("training", weights), ("validation", weights_val)):
                if w is not None and not w.sum() > 0:
                    raise ValueError(
                        f"every sample of the {part} part of the early_stopping split has zero "
                        "weight; change random_state or validation_fraction, or give more "
                        "samples a positive weight.")
        backend = get_backend(self.device, self.precision)
        with backend.session():  # per-call setup of the backend, held for the whole fit
            self._train(backend, X, y, lengths, weights, X_val, y_val, lengths_val, weights_val,
                        n_epochs=1 if incremental else max(0, self.max_iter - record["epochs"]),
                        record=record, resume=resume is not None)
        return self

    def _fit_record(self, resume, n_samples):
        """What a ``fit`` on ``n_samples`` samples records of itself, to be resumed exactly:
        its epochs so far, its sample count and validation split (fraction and seed, drawn
        from the generator here for a new fit), or ``resume``'s, checked against the data
        and parameters of this call."""
        fraction = self.validation_fraction if self.early_stopping else None
        if resume is None:
            seed = None if fraction is None else int(self._rng.integers(2**31))
            return {"epochs": 0, "n_samples": n_samples, "validation_fraction": fraction,
                    "validation_seed": seed}
        stopped = (f"this {type(self).__name__} is the checkpoint of a fit stopped after "
                   f"{resume['epochs']} of its epochs")
        if n_samples != resume["n_samples"]:
            raise ValueError(
                f"{stopped} on {resume['n_samples']} samples, but X has {n_samples}; resume it "
                "with the X and y of that fit, or set warm_start=False to start afresh.")
        if fraction != resume["validation_fraction"]:
            was = resume["validation_fraction"]
            raise ValueError(
                f"{stopped} with " + ("early_stopping=False" if was is None else
                                      f"early_stopping=True, validation_fraction={was}")
                + "; set them back with set_params to resume it on the same validation split, "
                "or set warm_start=False to start afresh.")
        return dict(resume)

    def _train(self, backend, X, y, lengths, weights, X_val, y_val, lengths_val, weights_val,
               n_epochs, record, resume):
        """The epoch loop; fitted state is committed to the host however it ends.

        ``lengths`` and ``lengths_val`` (host arrays, or ``None``: every sample has
        all steps) stay on the host, where the backends take them.  ``weights`` (float64,
        or ``None``: every sample weighs 1) go to the backend too; the sum of each
        batch's is taken on the host.  ``weights_val`` weigh the validation score.  ``record``
        is the fit's record of itself (see :meth:`_fit_record`), counted on
        and saved with each checkpoint, or ``None`` for ``partial_fit``, whose
        one epoch never stops training nor leaves a fit to resume.  A new
        ``fit`` starts a new optimizer (Adam's moments and the learning-rate
        schedule); ``partial_fit`` and a resumed fit go on with the
        estimator's.
        """
        spec = self._spec
        params = backend.asarray(self._params)
        adam = backend.adam_state(params)  # the backend's own kind (the GPU's counts on the GPU)
        fresh_optimizer = record is not None and not resume
        if not fresh_optimizer and self._adam is not None:
            adam.m[...] = backend.asarray(self._adam.m)
            adam.v[...] = backend.asarray(self._adam.v)
            adam.step = self._adam.step
        if fresh_optimizer:
            schedule = LearningRateSchedule(self.learning_rate, self.learning_rate_init,
                                            self.n_iter_no_change)
        else:
            schedule = LearningRateSchedule(self.learning_rate, self.learning_rate_init,
                                            self.n_iter_no_change, self.learning_rate_,
                                            self._no_improvement_count)
        self.learning_rate_ = schedule.rate
        X_dev, y_dev = backend.asarray(X), backend.asarray(y)
        w_dev = None if weights is None else backend.asarray(weights)
        X_val_dev = None if X_val is None else backend.asarray(X_val)
        n_samples = X.shape[0]
        # what the epoch's loss is the mean over: samples, or their weights
        epoch_weight = n_samples if weights is None else float(weights.sum())
        batch_size = min(self.batch_size, n_samples)
        best_params = self._best_params if resume else None
        if X_val is not None and not resume:  # each fit picks its best epoch on its own split
            self.validation_scores_ = self.validation_scores_ or []
            self.best_validation_score_ = -math.inf
        try:
            for epoch in range(n_epochs):
                start = time.perf_counter()
                # a diverging epoch is rolled back to here (copies on the backend: no transfer)
                epoch_start = (params.copy(), adam.m.copy(), adam.v.copy(), adam.step)
                permutation = self._rng.permutation(n_samples) if self.shuffle else None
                order = None if permutation is None else backend.asarray(permutation)
                progress = _ProgressBar(n_samples, f"epoch {self.n_iter_ + 1}") \
                    if self.verbose >= 2 else None
                total = 0.0
                for lo in range(0, n_samples, batch_size):
                    hi = lo + batch_size
                    rows = slice(lo, hi) if permutation is None else permutation[lo:hi]
                    batch = rows if order is None else order[lo:hi]  # the same, on the backend
                    xb, yb = X_dev[batch], y_dev[batch]
                    if weights is None:
                        wb, batch_weight = None, xb.shape[0]
                    else:
                        wb, batch_weight = w_dev[batch], float(weights[rows].sum())
                    loss = backend.train_step(spec, params, adam, xb, yb, self._loss,
                                              self._adam_config(batch_weight),
                                              lengths=_rows(lengths, rows), sample_weight=wb,
                                              dropout=self._dropout())
                    total = total + loss * batch_weight
                    if progress is not None:
                        progress.update(xb.shape[0])
                if progress is not None:
                    progress.close()
                epoch_loss = float(total) / epoch_weight
                if not math.isfinite(epoch_loss):
                    params[...], adam.m[...], adam.v[...], adam.step = epoch_start
                    raise FloatingPointError(
                        f"the training loss of epoch {self.n_iter_ + 1} is {epoch_loss}; "
                        "training stopped and the estimator keeps the weights it had before "
                        f"that epoch (after {self.n_iter_} epochs). Lower learning_rate_init, "
                        f"set clip_grad_norm (e.g. 1.0), or scale {self._what_to_scale}.")
                self.n_iter_ += 1
                self.loss_curve_.append(epoch_loss)
                if X_val is None:
                    score = None
                    improved = epoch_loss < self.best_loss_ - self.tol
                    self.best_loss_ = min(self.best_loss_, epoch_loss)
                else:
                    score = self._validation_score(
                        self._forward(backend, params, X_val_dev, lengths_val), y_val,
                        weights_val)
                    self.validation_scores_.append(score)
                    improved = score > self.best_validation_score_ + self.tol
                    if score > self.best_validation_score_:
                        self.best_validation_score_ = score
                        best_params = backend.to_host(params).copy()
                reason = schedule.end_epoch(improved)
                if self.verbose:
                    print(f"Epoch {self.n_iter_}: loss {epoch_loss:.4f}"
                          + ("" if score is None else f", validation score {score:.4f}")
                          + ("" if self.learning_rate == "constant"
                             else f", learning rate {self.learning_rate_:.3g}")
                          + f", {time.perf_counter() - start:.1f} s", flush=True)
                self.learning_rate_ = schedule.rate
                self._no_improvement_count = schedule.no_improvement_count
                stop = record is not None and reason is not None
                if record is not None:
                    record["epochs"] += 1
                if self.checkpoint is not None:
                    last = record is None or stop or epoch == n_epochs - 1
                    self._commit(backend, params, adam, best_params, None if last else record)
                    self.save(self.checkpoint)
                if stop:
                    if self.verbose:
                        print(f"No improvement of more than tol={self.tol} {reason}: stopping.",
                              flush=True)
                    break
        except KeyboardInterrupt:
            warnings.warn(f"training interrupted by the user during epoch {self.n_iter_ + 1}; "
                          "the estimator keeps the weights of the last completed step.",
                          UserWarning, stacklevel=3)
        finally:
            self._commit(backend, params, adam, best_params)

    def _commit(self, backend, params, adam, best_params, unfinished=None):
        """Hand the state of training over to the estimator's host attributes.

        A finished fit keeps the weights of its best epoch (``best_params``, where
        early stopping picked one).  The checkpoint of an ``unfinished`` one (its
        record, see :meth:`_fit_record`) keeps its current weights, and the
        best aside, to go on exactly from there.  Interrupted or diverged, a fit
        is finished too: its state in memory is not that of the end of an epoch.
        """
        current = backend.to_host(params)
        self._adam = AdamState(backend.to_host(adam.m), backend.to_host(adam.v), adam.step)
        if unfinished is None:
            self._params = current if best_params is None else best_params
            self._unfinished_fit = self._best_params = None
        else:
            self._params, self._best_params = current, best_params
            self._unfinished_fit = dict(unfinished)

    def _dropout(self):
        """The dropout of the next minibatch, its masks seeded from the training generator
        (``None`` without dropout: the generator then draws what it drew before dropout
        existed, so such fits are unchanged)."""
        if self.dropout == 0 and self.recurrent_dropout == 0:
            return None
        return Dropout(self.dropout, self.recurrent_dropout,
                       int(self._rng.integers(2**64, dtype=np.uint64)))

    def _adam_config(self, batch_weight):
        """The optimizer's settings for a minibatch of ``batch_weight`` (its number of
        samples, or the sum of their weights), at the current rate of the schedule
        (``learning_rate_``)."""
        # alpha as MLPClassifier's: penalty 0.5 * alpha * ||w||^2 / batch weight; a batch of
        # no weight takes no step, so its penalty does not matter
        decay = self.alpha / batch_weight if batch_weight > 0 else 0.0
        return AdamConfig(self.learning_rate_, self.beta_1, self.beta_2, self.epsilon,
                          decay, self.clip_grad_norm)

    # --------------------------------------------------------------- inference
    def _forward(self, backend, params, X, lengths=None, activation=None, prepare=None):
        """Network outputs for ``X`` in batches, as a float64 host array (computed in float32).

        ``X`` is on the backend (with the host array ``lengths``, or ``None``), or
        anything ``prepare(lo, hi)`` turns into the float32 batch ``lo:hi`` and its
        lengths (``predict`` validates and converts one batch at a time this way,
        so its memory does not grow with ``len(X)``).  ``activation`` (e.g.
        ``backend.softmax``) is applied on the backend.
        """
        outputs = np.empty((len(X), self._spec.output_size))
        with backend.session():
            for lo in range(0, len(X), PREDICT_BATCH_SIZE):
                hi = lo + PREDICT_BATCH_SIZE
                if prepare is None:
                    xb, lb = X[lo:hi], _rows(lengths, slice(lo, hi))
                else:
                    xb, lb = prepare(lo, hi)
                    xb = backend.asarray(xb)
                out, _ = backend.forward(self._spec, params, xb, lengths=lb)
                if activation is not None:
                    out = activation(out)
                outputs[lo:hi] = backend.to_host(out)
        return outputs

    def _predict_outputs(self, X, activation=None):
        """Validated ``X`` through the fitted network, streamed in batches: float64 on the host.

        Raises ``FloatingPointError`` rather than return non-finite outputs.
        """
        check_is_fitted(self)
        sequences = check_sequences(self, X, reset=False)
        backend = get_backend(self.device, self.precision)
        act = None if activation is None else getattr(backend, activation)
        outputs = self._forward(backend, backend.asarray(self._params), sequences,
                                activation=act,
                                prepare=lambda lo, hi: to_float32(self, sequences, lo, hi))
        if not np.isfinite(outputs).all():
            raise FloatingPointError(
                "the network's outputs overflowed float32 for some samples of X: the weights "
                "are too large (loaded with load_state_dict?); retrain, scale X (e.g. "
                "StandardScaler in a Pipeline) or set alpha to keep the weights small.")
        return outputs


class LSTMClassifier(ClassifierMixin, BaseLSTM):
    """Sequence classifier: an LSTM stack and a softmax head on its last hidden state.

    The network is ``torch.nn.LSTM(batch_first=True, bidirectional=...)``
    followed by ``torch.nn.Linear`` on the top layer's hidden state after each
    sample's last step, with one output per class (binary included).  It is
    trained with minibatch Adam on the softmax cross-entropy; names follow
    :class:`sklearn.neural_network.MLPClassifier` where the concept exists.

    ``X`` (in ``fit``, ``partial_fit``, ``predict``, ``predict_proba``,
    ``predict_log_proba`` and ``score``) takes these forms:

    - a 3-D array ``(n_samples, n_steps, n_inputs)``;
    - a 2-D array ``(n_samples, n_features)``, each row cut into steps of
      ``input_size`` values;
    - sequences of different lengths, as a list (or tuple, or 1-D object
      array) of 2-D arrays ``(n_steps_i, n_inputs)``;
    - the same as one 3-D float array whose shorter samples end in time steps
      that are all NaN, which :func:`fastlstm.pad_sequences` makes from the
      list, and which scikit-learn's tools (``train_test_split``,
      ``cross_val_score``, ``GridSearchCV``) index as any array.

    Sequences of different lengths are read as
    ``torch.nn.utils.rnn.pack_padded_sequence`` reads them: each sample up to
    its last valid step only, the padding never.  NaN is padding only: a NaN
    inside a step, or an all-NaN step before a valid one, is refused, as are
    infinite values and sequences without a valid step.

    Samples may be weighted, as in scikit-learn: ``fit(X, y, sample_weight=w)``
    (and ``partial_fit``, ``score``) makes each minibatch's loss the weighted
    mean ``sum_i w_i l_i / sum_i w_i`` of its samples' losses, and
    ``class_weight`` multiplies each sample's weight by that of its class.  A
    minibatch whose weights sum to zero takes no step.  ``Pipeline`` and
    ``GridSearchCV`` pass ``sample_weight`` on (with metadata routing enabled,
    after ``set_fit_request(sample_weight=True)``).

    Parameters
    ----------
    hidden_size : int, default=128
        Number of hidden units of every LSTM layer (and direction).
    num_layers : int, default=1
        Number of stacked LSTM layers.
    bidirectional : bool, default=False
        Every layer also reads each sequence backwards, from its last valid
        step to its first; the layer above reads both directions' hidden
        states side by side, and the head the last state of each direction of
        the top layer (PyTorch's ``cat(h_n[-2], h_n[-1])``).  The weights of
        the reverse direction are named ``..._reverse`` in :meth:`state_dict`.
    dropout : float, default=0.0
        Probability of dropping each unit of every layer's output but the
        last's, where the layer above reads it (``torch.nn.LSTM(dropout=...)``),
        in training only; kept units are scaled by ``1 / (1 - dropout)``.
    recurrent_dropout : float, default=0.0
        Probability of dropping each unit of ``h_{t-1}`` where the recurrence
        reads it (variational dropout, as Keras's ``recurrent_dropout``): one
        mask per sample, layer and direction, the same at every step; training
        only, kept units scaled by ``1 / (1 - recurrent_dropout)``.  Both kinds
        run inside the recurrence kernels: ``python benchmarks/dropout.py``
        measures what they cost.  Their masks are drawn from ``random_state``'s
        generator, once per minibatch, and computed from a seed and each
        sample's place in the minibatch (:mod:`fastlstm.dropout`), so they do not
        depend on the number of threads.  Predictions never drop: they equal
        PyTorch's ``eval()`` mode for the same :meth:`state_dict`.
    input_size : int, default=None
        Inputs per time step when ``X`` is 2-D: rows of ``d`` values are read
        as ``d // input_size`` steps (``d`` must be a multiple). ``None`` reads
        one value per step. 3-D ``X`` and lists of sequences are used as they
        are (and must then have ``input_size`` inputs per step if it is set).
    batch_size : int, default=64
        Samples per minibatch (the last, smaller batch of an epoch is trained too).
    learning_rate : {"constant", "adaptive"}, default="constant"
        Adam's learning rate over the epochs, as
        :class:`~sklearn.neural_network.MLPClassifier` defines them:
        ``"constant"`` trains at ``learning_rate_init`` throughout;
        ``"adaptive"`` divides the rate by 5 each time two consecutive epochs
        fail to improve by ``tol`` (the training loss, or the validation score
        with ``early_stopping``), and stops training when the rate is at most
        1e-6 and would be divided again.  Either way ``n_iter_no_change``
        still stops training, counted from the last improvement across changes
        of the rate.  The current rate is ``learning_rate_``.
    learning_rate_init : float, default=2e-3
        Adam's (starting) learning rate.  Chosen together with ``batch_size=64`` and
        ``max_iter=15`` on Fashion-MNIST rows (pixels / 255), where they scored
        better than ``batch_size=128`` with ``1e-3``: the README's usage example
        is that fit, and ``benchmarks/RESULTS.md`` records its scores.
    max_iter : int, default=15
        Maximum number of epochs (passes over the data).
    alpha : float, default=0.0
        L2 penalty, scaled as :class:`~sklearn.neural_network.MLPClassifier`'s:
        ``alpha / batch length`` (with sample weights: ``alpha`` over the sum of
        the batch's weights) times the parameters is added to the gradient
        (``torch.optim.Adam``'s ``weight_decay``), here for every parameter.
    beta_1, beta_2, epsilon : float, default=0.9, 0.999, 1e-8
        Adam's moment decay rates and denominator term.
    clip_grad_norm : float, default=None
        If set, gradients whose Euclidean norm (over all parameters) exceeds
        it are rescaled to that norm before the update.
    shuffle : bool, default=True
        Shuffle the samples every epoch (from ``random_state``).
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training data (stratified),
        stop when its accuracy (weighted by the held-out samples' weights, times
        their class weights, where there are any) has not improved by ``tol`` for
        ``n_iter_no_change``
        epochs, and keep the weights of the best epoch.
    validation_fraction : float, default=0.1
        Share of the training data held out when ``early_stopping``.
    n_iter_no_change : int, default=10
        Epochs without an improvement of ``tol`` (of the validation score, or
        else of the training loss) after which training stops.
    tol : float, default=1e-4
        Smallest improvement that counts.
    class_weight : dict, "balanced" or None, default=None
        Weights of the classes, ``{label: weight}`` (labels left out weigh 1),
        multiplied into the samples' weights; ``"balanced"`` weighs each class
        by ``n_samples / (n_classes * np.bincount(y))`` of the ``y`` passed to
        ``fit``, as :func:`sklearn.utils.class_weight.compute_class_weight`
        does.  ``partial_fit`` takes a dict only (it sees part of ``y`` at a
        time).  ``None``: every class weighs 1.
    warm_start : bool, default=False
        Continue from the fitted weights on ``fit`` instead of starting afresh:
        another ``max_iter`` epochs with a new optimizer (Adam's moments and
        the learning rate restart).  A model loaded from the ``checkpoint`` of
        an unfinished fit instead resumes that fit exactly where it was saved:
        same optimizer, schedule, shuffling and validation split, up to
        ``max_iter`` epochs in all, so on the CPU (with the same number of
        threads) its weights end bit-identical to those of the fit had it
        never stopped.  It must then be given the same ``X``, ``y`` and
        ``sample_weight`` (only the number of samples is checked).
    checkpoint : str or path-like, default=None
        If set, the model is saved there (as by :meth:`save`, atomically,
        durably) at the end of every epoch, with what it takes to resume an
        unfinished fit: its optimizer's and generator's state and its
        progress.  A fit killed at any moment loses at most the epoch in
        flight: ``fastlstm.load(checkpoint)``, ``set_params(warm_start=True)``
        and ``fit`` continue it.  The checkpoint of the last epoch is the
        finished model.  Fits that run at the same time (e.g. in a
        ``GridSearchCV``) must not share one path.
    verbose : int, default=0
        1: one line per epoch (loss, validation score, learning rate where
        adaptive, seconds) on stdout, and why training stopped early;
        2: also a progress bar within each epoch when stderr is a terminal.
    random_state : int, RandomState instance or None, default=None
        Seeds the initial weights, the shuffling and the validation split; an
        int gives bit-identical fitted weights on the CPU.
    device : {"auto", "cpu", "cuda"}, default="auto"
        Where to train and predict. ``"auto"`` uses a CUDA GPU when the CUDA
        backend can run and passes its self-check (a tiny forward and backward
        against the NumPy reference, once per process), else the CPU, with a
        warning that says why where CuPy is installed; ``"cuda"`` raises then.
    precision : {"float32", "bfloat16", "auto"}, default="float32"
        What the LSTM's matrix products compute in, in training and prediction.
        ``"bfloat16"`` (the CPU only, on CPUs with the AVX512-BF16 instruction set;
        elsewhere a clear error) rounds their operands to bfloat16 and sums in float32
        (``python benchmarks/bf16.py`` times it against float32); the weights, the cell
        state, the gates, the loss and the optimizer stay float32
        (:mod:`fastlstm.precision` says exactly what is rounded).  Where the CPU's
        ``vdpbf16ps`` is no faster than its float32 multiply-adds (measured once per
        process), bfloat16 cannot be the faster, and a warning says so.  ``"auto"`` is
        ``"float32"``: a lower precision is never chosen for you.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels (any type ``np.unique`` sorts).
    input_size_ : int
        Inputs per time step of the fitted network.
    n_features_in_ : int
        Number of columns of ``X`` (only after fitting on 2-D ``X``).
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Column names of a DataFrame ``X`` (only when it had string names).
    n_iter_ : int
        Epochs trained so far.
    learning_rate_ : float
        Adam's learning rate at the end of the last epoch trained (the one the
        next epoch of ``partial_fit`` or of a resumed fit uses).
    loss_curve_ : list of float
        Mean training loss of each epoch (weighted by the samples' weights).
    best_loss_ : float
        Lowest training loss (``inf`` with early stopping, where the validation score rules).
    validation_scores_ : list of float or None
        Validation accuracy after each epoch (``None`` without early stopping).
    best_validation_score_ : float or None
        Best validation accuracy (``None`` without early stopping).

    Examples
    --------
    >>> from fastlstm import LSTMClassifier
    >>> from fastlstm.datasets import load_mnist_sample
    >>> data = load_mnist_sample()
    >>> X = data.X[:1000] / 255.0       # (1000, 28, 28): 28 steps of 28 pixels
    >>> clf = LSTMClassifier(hidden_size=32, max_iter=2, random_state=0).fit(X, data.y[:1000])
    >>> clf.predict_proba(X[:2]).shape
    (2, 10)

    Sequences of different lengths, here the first 10 to 28 rows of each image:

    >>> ragged = [image[:10 + i % 19] for i, image in enumerate(X[:200])]
    >>> clf = LSTMClassifier(hidden_size=16, max_iter=1, random_state=0)
    >>> clf.fit(ragged, data.y[:200]).predict(ragged[:3]).shape
    (3,)
    """

    _parameter_constraints = {
        **BaseLSTM._parameter_constraints,
        "class_weight": [StrOptions({"balanced"}), dict, None],
    }

    _loss = "cross_entropy"

    def __init__(self, hidden_size=128, num_layers=1, *, bidirectional=False, dropout=0.0,
                 recurrent_dropout=0.0, input_size=None, batch_size=64, learning_rate="constant",
                 learning_rate_init=2e-3, max_iter=15, alpha=0.0, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, clip_grad_norm=None, shuffle=True, early_stopping=False,
                 validation_fraction=0.1, n_iter_no_change=10, tol=1e-4, class_weight=None,
                 warm_start=False, checkpoint=None, verbose=0, random_state=None, device="auto",
                 precision="float32"):
        super().__init__(
            hidden_size, num_layers, bidirectional=bidirectional, dropout=dropout,
            recurrent_dropout=recurrent_dropout, input_size=input_size, batch_size=batch_size,
            learning_rate=learning_rate, learning_rate_init=learning_rate_init,
            max_iter=max_iter, alpha=alpha, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
            clip_grad_norm=clip_grad_norm, shuffle=shuffle, early_stopping=early_stopping,
            validation_fraction=validation_fraction, n_iter_no_change=n_iter_no_change,
            tol=tol, warm_start=warm_start, checkpoint=checkpoint, verbose=verbose,
            random_state=random_state, device=device, precision=precision)
        self.class_weight = class_weight

    @property
    def _n_outputs(self):
        return len(self.classes_)

    def _sample_weight(self, sample_weight, X, y, incremental):
        weights = super()._sample_weight(sample_weight, X, y, incremental)
        if self.class_weight is None:
            return weights
        if self.class_weight == "balanced" and incremental:
            raise ValueError(
                "class_weight='balanced' is not supported by partial_fit, which sees part of y "
                "at a time; compute the weights from y of the whole training set with "
                "sklearn.utils.class_weight.compute_class_weight('balanced', classes=classes, "
                "y=y) and pass them as class_weight={label: weight}.")
        per_class = compute_class_weight(self.class_weight, classes=self.classes_,
                                         y=self.classes_[y])
        weights = per_class[y] if weights is None else per_class[y] * weights
        if not weights.sum() > 0:
            raise ValueError("every sample has zero weight (class_weight times sample_weight); "
                             "give the classes of some samples a positive weight.")
        return weights

    def _encode_targets(self, y, first, classes=None):
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if first:
            labels = unique_labels(y) if classes is None else np.unique(classes)
            if len(labels) < 2:
                raise ValueError(
                    f"{type(self).__name__} needs at least 2 classes to learn, got 1 class "
                    f"({labels.tolist()}); pass y with at least two distinct labels.")
            self.classes_ = labels
        elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
            raise ValueError(f"classes={np.unique(classes).tolist()} differ from classes_="
                             f"{self.classes_.tolist()} "
                             "of the earlier partial_fit calls; pass the same classes each time.")
        known = np.isin(y, self.classes_)
        if not known.all():
            raise ValueError(
                f"y has labels {np.unique(y[~known]).tolist()} that are not in "
                f"classes_={self.classes_.tolist()}; pass every label in `classes` (partial_fit) "
                "or set warm_start=False.")
        return np.searchsorted(self.classes_, y).astype(np.int64)

    def _targets_from_state_dict(self, n_outputs):
        self.classes_ = np.arange(n_outputs)

    def _validation_score(self, outputs, y, sample_weight):
        return accuracy_score(y, outputs.argmax(axis=1), sample_weight=sample_weight)

    def _stratify(self, y):
        return y

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Train one epoch on ``X`` and ``y``, continuing from the current state.

        The optimizer goes on too: Adam's moments and the learning-rate
        schedule (whose stopping rule ends nothing here).  On a model loaded
        from the checkpoint of an unfinished fit, the epoch is one of its own
        and that fit is over.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_steps, n_inputs) or (n_samples, n_features), \
or list of array-like of shape (n_steps_i, n_inputs)
            Sequences (see :meth:`fit`).
        y : array-like of shape (n_samples,)
            Labels, each one of ``classes``.
        classes : array-like of shape (n_classes,), default=None
            Every label the model will ever see: required on the first call,
            optional (and then equal) afterwards.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each sample's loss (see :meth:`fit`).

        Returns
        -------
        self
        """
        if not hasattr(self, "_params"):
            self._validate_params()
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit "
                                 "(every label the model will see, e.g. classes=np.unique(y)).")
        return self._fit(X, y, incremental=True, classes=classes, sample_weight=sample_weight)

    def predict_proba(self, X):
        """Class probabilities (softmax of the head), columns in the order of ``classes_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_steps, n_inputs) or (n_samples, n_features), \
or list of array-like of shape (n_steps_i, n_inputs)
            Sequences (see :meth:`fit`), of any number of steps.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        return self._predict_outputs(X, "softmax")

    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`, computed stably from the head's outputs.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_steps, n_inputs) or (n_samples, n_features), \
or list of array-like of shape (n_steps_i, n_inputs)
            Sequences (see :meth:`fit`), of any number of steps.

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        return log_softmax(self._predict_outputs(X), axis=1)

    def predict(self, X):
        """Most probable class of each sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_steps, n_inputs) or (n_samples, n_features), \
or list of array-like of shape (n_steps_i, n_inputs)
            Sequences (see :meth:`fit`), of any number of steps.

        Returns
        -------
        ndarray of shape (n_samples,)
            Labels from ``classes_``.
        """
        # softmax keeps the order of the head's outputs: the argmax needs no probabilities
        best = self._predict_outputs(X).argmax(axis=1)
        return self.classes_[best]


class LSTMRegressor(RegressorMixin, BaseLSTM):
    """Sequence regressor: an LSTM stack and a linear head on its last hidden state.

    The network is ``torch.nn.LSTM(batch_first=True, bidirectional=...)``
    followed by ``torch.nn.Linear`` on the top layer's hidden state after each
    sample's last step, with one output per target.  It is trained with
    minibatch Adam on half the mean squared error, as
    :class:`sklearn.neural_network.MLPRegressor`; ``y`` is not rescaled.
    Parameters, attributes and input forms of ``X`` (sequences of different
    lengths included) and sample weights are those of :class:`LSTMClassifier`,
    except that scores are R², there are no ``classes_``, no ``class_weight``
    and no stratification.

    Attributes
    ----------
    n_outputs_ : int
        Number of targets.
    """

    _loss = "squared_error"
    _what_to_scale = ("X (e.g. StandardScaler in a Pipeline) and y (e.g. "
                      "TransformedTargetRegressor)")

    @property
    def _n_outputs(self):
        return self.n_outputs_

    def _encode_targets(self, y, first, classes=None):
        y = check_regression_targets(self, y)
        if first:
            self.n_outputs_ = y.shape[1]
        elif y.shape[1] != self.n_outputs_:
            raise ValueError(f"y has {y.shape[1]} targets, but {type(self).__name__} was fitted "
                             f"with {self.n_outputs_}; set warm_start=False to start afresh.")
        return y

    def _targets_from_state_dict(self, n_outputs):
        self.n_outputs_ = n_outputs

    def _validation_score(self, outputs, y, sample_weight):
        return r2_score(y, outputs, sample_weight=sample_weight)

    def partial_fit(self, X, y, sample_weight=None):
        """Train one epoch on ``X`` and ``y``, continuing from the current state.

        The optimizer goes on too: Adam's moments and the learning-rate
        schedule (whose stopping rule ends nothing here).  On a model loaded
        from the checkpoint of an unfinished fit, the epoch is one of its own
        and that fit is over.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_steps, n_inputs) or (n_samples, n_features), \
or list of array-like of shape (n_steps_i, n_inputs)
            Sequences (see :meth:`fit`).
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            Targets, as many as at the first call.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each sample's loss (see :meth:`fit`).

        Returns
        -------
        self
        """
        if not hasattr(self, "_params"):
            self._validate_params()
        return self._fit(X, y, incremental=True, sample_weight=sample_weight)

    def predict(self, X):
        """Predicted targets.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_steps, n_inputs) or (n_samples, n_features), \
or list of array-like of shape (n_steps_i, n_inputs)
            Sequences (see :meth:`fit`), of any number of steps.

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_targets)
            1-D when the model has one target.
        """
        outputs = self._predict_outputs(X)
        return outputs.ravel() if self.n_outputs_ == 1 else outputs

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


def load(path):
    """Load an estimator written by ``est.save(path)``; never runs code from the file.

    Parameters
    ----------
    path : str or path-like
        A file written by :meth:`LSTMClassifier.save` or :meth:`LSTMRegressor.save`.

    Returns
    -------
    LSTMClassifier or LSTMRegressor
        The fitted estimator: same hyper-parameters, weights and fitted
        attributes, so it predicts exactly as the saved one and can go on
        training (``partial_fit``, ``warm_start``).

    Raises
    ------
    ~fastlstm.persistence.ModelFileError
        The file is not a fastlstm model, is truncated or corrupted, was
        edited, or was written by a newer fastlstm (format version).

    Warns
    -----
    ~fastlstm.persistence.InconsistentVersionWarning
        The file was written by another fastlstm version.
    """
    state = load_state(path)
    classes = {cls.__name__: cls for cls in (LSTMClassifier, LSTMRegressor)}
    return classes[state["metadata"]["estimator"]]._from_fitted_state(state)


def _rows(lengths, rows):
    """The lengths of the samples ``rows`` (``None``, every sample has all steps, stays)."""
    return None if lengths is None else lengths[rows]


def _json_value(name, value):
    """``value`` as JSON (NumPy scalars become Python numbers), or a ``TypeError`` naming it."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(name, item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"the fitted attribute {name} (a {type(value).__name__}) cannot be saved "
                    "in a model file; pickle the model instead.")


def _json_label(label):
    """A label of ``class_weight`` as JSON, or a ``TypeError`` saying what a file can hold."""
    if isinstance(label, np.generic):
        label = label.item()
    if isinstance(label, (bool, int, float, str)):
        return label
    raise TypeError(f"class_weight has the label {label!r} (a {type(label).__name__}), which "
                    "a model file cannot hold; use labels of one type among int, float, str or "
                    "bool, or pickle the model instead.")


class _ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    width = 30

    def __init__(self, total, label, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self.total, self.label, self.done = total, label, 0
        self.start = time.perf_counter()

    def update(self, n):
        self.done += n
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        self.stream.write(f"\r{self.label} [{'=' * filled}{' ' * (self.width - filled)}] "
                          f"{self.done}/{self.total} {time.perf_counter() - self.start:.1f} s")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\r" + " " * (len(self.label) + self.width + 40) + "\r")
            self.stream.flush()
