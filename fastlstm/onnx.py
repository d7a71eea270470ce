"""Export a fitted estimator as an ONNX model (``est.to_onnx``), for ONNX Runtime and the like.

The graph is built with :mod:`onnx.helper` from standard operators only (default
domain, opset :data:`OPSET`), so any ONNX runtime serves it without fastlstm,
Numba or PyTorch:

- ``X`` (float32 ``[batch, steps, n_inputs]``, batch-first as the estimators take
  it) is transposed to time-major ``[steps, batch, n_inputs]``: ONNX's ``LSTM``
  has a ``layout=1`` (batch-first) attribute, but ONNX Runtime refuses it;
- one ``LSTM`` node per layer (``direction="bidirectional"`` for a bidirectional
  network), fed the optional input ``lengths`` as ``sequence_lens`` when
  exported with ``lengths=True``.  A layer's ``Y`` (``[steps, num_directions,
  batch, hidden]``) becomes the next layer's input ``[steps, batch,
  num_directions * hidden]`` (for two directions: Transpose, then Reshape), read
  with the same ``sequence_lens``;
- the top layer's ``Y_h`` (``[num_directions, batch, hidden]``: the forward
  direction's state after each sequence's last valid step, the reverse
  direction's after step 0, which is PyTorch's ``h_n`` for packed sequences) is
  laid out as ``[batch, num_directions * hidden]`` (PyTorch's ``cat(h_n[-2],
  h_n[-1])``) and goes through the head, a ``Gemm``;
- classifiers: ``Softmax`` gives ``probabilities``; ``ArgMax`` of the head's
  outputs then ``Gather`` from a constant tensor of ``classes_`` gives ``label``
  (ints, floats, bools or strings, in the dtype of ``classes_``); regressors:
  ``predictions``, squeezed to ``[batch]`` when the estimator predicts 1-D.

PyTorch's weights (gate order i, f, g, o; separate ``bias_ih`` and ``bias_hh``)
become ONNX's: gate order i, o, f, c; ``W`` ``[num_directions, 4*hidden,
input]``, ``R`` ``[num_directions, 4*hidden, hidden]`` and ``B``
``[num_directions, 8*hidden]`` = ``[Wb, Rb]`` per direction, the reverse
direction second.  All weights are float32.

Only this module imports :mod:`onnx`, and only when an export is asked for:
fastlstm works without the extra ``fastlstm[onnx]``.
"""

from __future__ import annotations

import os

import numpy as np
from sklearn.base import is_classifier
from sklearn.utils.validation import check_is_fitted

from ._version import __version__

__all__ = ["OPSET", "IR_VERSION", "to_onnx"]

#: opset of the default domain the graphs use (LSTM-14, Softmax-13, Squeeze-13, Gemm-13)
OPSET = 17
#: ONNX IR version of the models: that of opset 17 rather than the installed ``onnx``
#: package's default, so that older runtimes load them too
IR_VERSION = 8

#: where ONNX's gates (i, o, f, c) are in PyTorch's order (i, f, g, o)
_GATES_FROM_TORCH = (0, 3, 1, 2)

_INSTALL = "pip install 'fastlstm[onnx]'"


def _import_onnx():
    """The :mod:`onnx` package, or an ``ImportError`` that says how to install it."""
    try:
        import onnx
        import onnx.helper
        import onnx.numpy_helper
    except ImportError as exc:
        raise ImportError(f"exporting a fastlstm model to ONNX needs the onnx package, which "
                          f"is not installed: {_INSTALL}") from exc
    return onnx


def _onnx_gates(a, hidden_size):
    """``a`` (PyTorch's gate blocks i, f, g, o along axis 0) in ONNX's order i, o, f, c."""
    H = hidden_size
    return np.concatenate([a[g * H:(g + 1) * H] for g in _GATES_FROM_TORCH], axis=0)


def lstm_weights(state_dict, spec, k):
    """ONNX's ``W``, ``R`` and ``B`` of layer ``k``: float32 arrays.

    Parameters
    ----------
    state_dict : dict of str to ndarray
        Weights with PyTorch's names (:meth:`BaseLSTM.state_dict`).
    spec : ModelSpec
        The network.
    k : int
        The layer.

    Returns
    -------
    W : ndarray of shape (num_directions, 4 * hidden_size, layer_input_size)
    R : ndarray of shape (num_directions, 4 * hidden_size, hidden_size)
    B : ndarray of shape (num_directions, 8 * hidden_size)
        Gate order i, o, f, c; ``B[d]`` is ``[Wb, Rb]`` (``bias_ih``, then ``bias_hh``).
    """
    H = spec.hidden_size
    W, R, B = [], [], []
    for suffix in ("", "_reverse")[:spec.num_directions]:
        W.append(_onnx_gates(state_dict[f"lstm.weight_ih_l{k}{suffix}"], H))
        R.append(_onnx_gates(state_dict[f"lstm.weight_hh_l{k}{suffix}"], H))
        B.append(np.concatenate([_onnx_gates(state_dict[f"lstm.bias_ih_l{k}{suffix}"], H),
                                 _onnx_gates(state_dict[f"lstm.bias_hh_l{k}{suffix}"], H)]))
    return tuple(np.ascontiguousarray(np.stack(a), dtype=np.float32) for a in (W, R, B))


def _label_tensor(onnx, classes):
    """``classes_`` as a constant tensor named ``classes``, in an ONNX type of its own."""
    classes = np.asarray(classes)
    if classes.dtype.kind == "O":
        if all(isinstance(c, str) for c in classes):
            classes = classes.astype(str)
        else:  # e.g. Python ints or floats in an object array
            numeric = np.asarray(classes.tolist())
            if numeric.dtype.kind not in "biuf":
                raise TypeError(f"classes_ of dtype object holding {type(classes[0]).__name__} "
                                "values cannot be ONNX labels: ONNX tensors hold numbers, "
                                "bools or strings.")
            classes = numeric
    if classes.dtype.kind in "US":
        # ONNX's strings are UTF-8 bytes; from_array encodes Python strs
        values = np.array([c.decode() if isinstance(c, bytes) else str(c) for c in classes],
                          dtype=object)
        return onnx.numpy_helper.from_array(values, "classes"), onnx.TensorProto.STRING
    if classes.dtype.kind not in "biuf":
        raise TypeError(f"classes_ of dtype {classes.dtype} cannot be ONNX labels: ONNX tensors "
                        "hold numbers, bools or strings.")
    tensor = onnx.numpy_helper.from_array(np.ascontiguousarray(classes), "classes")
    return tensor, tensor.data_type


def to_onnx(estimator, path=None, *, lengths=False):
    """The ONNX model of a fitted :class:`LSTMClassifier` or :class:`LSTMRegressor`.

    See :meth:`fastlstm.estimators.BaseLSTM.to_onnx`, which calls this.

    Parameters
    ----------
    estimator : LSTMClassifier or LSTMRegressor
        A fitted estimator (or one given weights by ``load_state_dict``).
    path : str or path-like, default=None
        Where to write the model as well (``.onnx``).
    lengths : bool, default=False
        Add the input ``lengths`` (int32 ``[batch]``), each sequence's number of
        valid steps, for batches of sequences of different lengths.

    Returns
    -------
    onnx.ModelProto
    """
    check_is_fitted(estimator)
    onnx = _import_onnx()
    helper, TensorProto = onnx.helper, onnx.TensorProto
    spec = estimator._spec
    state = estimator.state_dict()
    H, D = spec.hidden_size, spec.num_directions
    classifier = is_classifier(estimator)

    initializers, nodes = [], []

    def const(name, array):
        initializers.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, outputs, name=None, **attributes):
        nodes.append(helper.make_node(op, inputs, outputs, name=name or f"{op}_{outputs[0]}",
                                      **attributes))
        return outputs[0]

    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                            ["batch", "steps", spec.input_size])]
    inputs[0].doc_string = ("float32 [batch, steps, n_inputs], batch-first; "
                            + ("steps at and after a sequence's length are not read"
                               if lengths else "every step is read"))
    if lengths:
        inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]))
        inputs[1].doc_string = "int32 [batch]: valid steps of each sequence, 1 to steps"
    sequence_lens = ["lengths"] if lengths else []  # the LSTM's optional 5th input

    # time-major input: ONNX Runtime refuses the LSTM's layout=1
    seq = node("Transpose", ["X"], ["X_time_major"], perm=[1, 0, 2])
    for k in range(spec.num_layers):
        W, R, B = lstm_weights(state, spec, k)
        top = k == spec.num_layers - 1
        # Y: [steps, D, batch, H], Y_h: [D, batch, H]; the top layer needs only Y_h
        Y, Y_h = ("" if top else f"Y_l{k}"), f"Y_h_l{k}"
        node("LSTM", [seq, const(f"W_l{k}", W), const(f"R_l{k}", R), const(f"B_l{k}", B),
                      *sequence_lens], [Y, Y_h], name=f"LSTM_l{k}",
             hidden_size=H, direction="bidirectional" if D == 2 else "forward")
        if top:
            break
        # the next layer's input: [steps, batch, D * H], [h_forward, h_reverse] at each step
        if D == 1:
            seq = node("Squeeze", [Y, const(f"axes_l{k}", np.array([1], np.int64))],
                       [f"X_l{k + 1}"])
        else:
            node("Transpose", [Y], [f"Y_l{k}_steps_batch"], perm=[0, 2, 1, 3])
            seq = node("Reshape", [f"Y_l{k}_steps_batch",
                                   const(f"shape_l{k}", np.array([0, 0, D * H], np.int64))],
                       [f"X_l{k + 1}"])
    # the top layer's last states, [batch, D * H]: PyTorch's cat(h_n[-2], h_n[-1])
    if D == 1:
        last = node("Squeeze", [Y_h, const("axes_h_n", np.array([0], np.int64))], ["h_n"])
    else:
        node("Transpose", [Y_h], ["h_n_batch"], perm=[1, 0, 2])
        last = node("Reshape", ["h_n_batch", const("shape_h_n", np.array([0, D * H], np.int64))],
                    ["h_n"])
    O = spec.output_size
    squeeze = not classifier and estimator.n_outputs_ == 1  # predict is 1-D then
    outputs_name = "logits" if classifier else "outputs" if squeeze else "predictions"
    node("Gemm", [last, const("head_weight", state["head.weight"].astype(np.float32)),
                  const("head_bias", state["head.bias"].astype(np.float32))],
         [outputs_name], transB=1)

    if classifier:
        labels, label_type = _label_tensor(onnx, estimator.classes_)
        initializers.append(labels)
        node("Softmax", ["logits"], ["probabilities"], axis=1)
        # the estimator's argmax is of the head's outputs (the first of equal ones)
        node("ArgMax", ["logits"], ["class_index"], axis=1, keepdims=0)
        node("Gather", ["classes", "class_index"], ["label"], axis=0)
        outputs = [helper.make_tensor_value_info("label", label_type, ["batch"]),
                   helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                                 ["batch", O])]
        outputs[0].doc_string = "predict: the most probable class of each sequence"
        outputs[1].doc_string = "predict_proba: columns in the order of classes_"
    else:
        if squeeze:
            node("Squeeze", ["outputs", const("axes_predictions", np.array([1], np.int64))],
                 ["predictions"])
            shape = ["batch"]
        else:
            shape = ["batch", O]
        outputs = [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, shape)]
        outputs[0].doc_string = "predict"

    name = type(estimator).__name__
    graph = helper.make_graph(
        nodes, name, inputs, outputs, initializer=initializers,
        doc_string=f"fastlstm {name}: {spec!r}")
    model = helper.make_model(graph, producer_name="fastlstm", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION,
                              doc_string=f"fastlstm {__version__} {name}, exported by to_onnx")
    helper.set_model_props(model, {"estimator": name, "fastlstm_version": __version__,
                                   "lengths": str(bool(lengths))})
    if path is not None:
        onnx.save_model(model, os.fspath(path))
    return model
