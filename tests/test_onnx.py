"""``est.to_onnx``: the exported graph is valid ONNX and ONNX Runtime serves it as the estimator.

Every variant (1-3 layers, uni/bidirectional, classifier with int or string
labels, regressor with one or two targets) is a tiny fitted model checked by
``onnx.checker`` and run by ONNX Runtime's CPU provider on batches and sequence
lengths other than the fitted ones, fixed-length and ragged (through the input
``lengths``).  The tests that need ``onnx`` / ``onnxruntime`` are skipped
without the extra ``fastlstm[onnx]``; the error raised without it is checked
either way.
"""

import functools
import sys

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from fastlstm import LSTMClassifier, LSTMRegressor

N_INPUTS = 2
#: the shape of the training data: every check runs on other batch sizes and lengths
FIT_SAMPLES, FIT_STEPS = 24, 5
#: (batch, steps) of the fixed-length checks
SHAPES = [(1, 1), (1, 9), (7, 3), (33, 12)]
#: lengths of the ragged batch: unsorted, the edge cases 1 and the longest included
RAGGED_LENGTHS = [4, 1, 9, 6, 1, 2, 9, 3, 7]
#: ONNX Runtime against the estimator (both compute in float32)
ATOL = 1e-5

KINDS = ["int-labels", "str-labels", "regressor-1d", "regressor-2d"]
VARIANTS = [(kind, bidirectional, num_layers) for kind in KINDS
            for bidirectional in (False, True) for num_layers in (1, 2, 3)]


def variant_id(variant):
    kind, bidirectional, num_layers = variant
    return f"{kind}-{'bi' if bidirectional else 'uni'}-L{num_layers}"


@pytest.fixture(scope="module")
def onnx():
    return pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def ort():
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


def session(ort, model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=None)
def fitted(kind, bidirectional, num_layers):
    """A tiny fitted estimator of ``kind`` (cached: each variant is fitted once)."""
    rng = np.random.default_rng(100 * num_layers + 10 * bidirectional + KINDS.index(kind))
    X = rng.standard_normal((FIT_SAMPLES, FIT_STEPS, N_INPUTS))
    if kind == "int-labels":  # not 0..K-1, so that the label is looked up, not the index
        y = rng.choice(np.array([-3, 4, 10]), FIT_SAMPLES)
    elif kind == "str-labels":
        y = rng.choice(np.array(["ant", "bee", "cat", "dog"]), FIT_SAMPLES)
    elif kind == "regressor-1d":
        y = rng.standard_normal(FIT_SAMPLES)
    else:
        y = rng.standard_normal((FIT_SAMPLES, 2))
    cls = LSTMRegressor if kind.startswith("regressor") else LSTMClassifier
    est = cls(hidden_size=3, num_layers=num_layers, bidirectional=bidirectional, max_iter=2,
              random_state=0, device="cpu").fit(X, y)
    return spread(est)


def spread(est):
    """``est`` with the head's bias set so that the predicted labels differ from sample to
    sample (after an epoch or two, a tiny model predicts one class for almost any input):
    each class's mean log-probability on random sequences becomes 0 (a fitted estimator
    keeps its classes_ through load_state_dict)."""
    if not isinstance(est, LSTMClassifier):
        return est
    X = np.random.default_rng(1).standard_normal((64, FIT_STEPS, N_INPUTS))
    state = est.state_dict()
    state["head.bias"][...] = 0
    state["head.bias"] = -est.load_state_dict(state).predict_log_proba(X).mean(axis=0)
    # wider gaps between the logits: no near-ties for float32 rounding to flip
    return est.load_state_dict({name: 3 * w if name.startswith("head") else w
                                for name, w in state.items()})


def expected_outputs(est, X):
    """What the ONNX model's outputs should be, by name."""
    if isinstance(est, LSTMClassifier):
        return {"label": est.predict(X), "probabilities": est.predict_proba(X)}
    return {"predictions": est.predict(X)}


def check_outputs(est, names, got, expected):
    outputs = dict(zip(names, got))
    assert set(outputs) == set(expected)
    for name, value in expected.items():
        if name == "label":
            assert outputs["label"].shape == value.shape
            if value.dtype.kind in "US":  # ONNX Runtime returns strings as an object array
                assert outputs["label"].dtype == object
            else:
                assert outputs["label"].dtype == value.dtype
            np.testing.assert_array_equal(outputs["label"], value)
        else:
            assert outputs[name].dtype == np.float32
            assert outputs[name].shape == value.shape
            np.testing.assert_allclose(outputs[name], value, rtol=0, atol=ATOL)
    return set(expected["label"].tolist()) if "label" in expected else set()


def check_labels_differ(est, labels):
    """The predicted labels are not all one class, so the label lookup was tested."""
    if isinstance(est, LSTMClassifier):
        assert len(labels) > 1, labels


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_graph_is_valid_onnx_of_one_lstm_node_per_layer(onnx, variant):
    kind, bidirectional, num_layers = variant
    est = fitted(*variant)
    for lengths in (False, True):
        model = est.to_onnx(lengths=lengths)
        assert isinstance(model, onnx.ModelProto)
        onnx.checker.check_model(model, full_check=True)
        opsets = {o.domain: o.version for o in model.opset_import}
        assert set(opsets) == {""} and opsets[""] >= 14
        lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
        assert len(lstms) == num_layers
        for node in lstms:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attributes["direction"] == (b"bidirectional" if bidirectional else b"forward")
            assert attributes["hidden_size"] == 3
            assert attributes.get("layout", 0) == 0  # ONNX Runtime refuses layout=1
            assert list(node.input[4:]) == (["lengths"] if lengths else [])
        for tensor in model.graph.initializer:
            if tensor.name[0] in "WRB" or tensor.name.startswith("head"):
                assert tensor.data_type == onnx.TensorProto.FLOAT
        inputs = {i.name: i.type.tensor_type for i in model.graph.input}
        assert list(inputs) == (["X", "lengths"] if lengths else ["X"])
        dims = inputs["X"].shape.dim
        assert inputs["X"].elem_type == onnx.TensorProto.FLOAT
        assert [d.dim_param for d in dims[:2]] == ["batch", "steps"]
        assert dims[2].dim_value == N_INPUTS
        if lengths:
            assert inputs["lengths"].elem_type == onnx.TensorProto.INT32
            assert [d.dim_param for d in inputs["lengths"].shape.dim] == ["batch"]


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_onnx_runtime_predicts_as_the_estimator(ort, variant):
    est = fitted(*variant)
    sess = session(ort, est.to_onnx())
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(7)
    labels = set()
    for batch, steps in SHAPES:
        X = rng.standard_normal((batch, steps, N_INPUTS)).astype(np.float32)
        labels |= check_outputs(est, names, sess.run(None, {"X": X}), expected_outputs(est, X))
    check_labels_differ(est, labels)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_ragged_batch_through_lengths_equals_the_estimator_on_a_list(ort, variant):
    est = fitted(*variant)
    sess = session(ort, est.to_onnx(lengths=True))
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(11)
    sequences = [rng.standard_normal((n, N_INPUTS)).astype(np.float32) for n in RAGGED_LENGTHS]
    lengths = np.array(RAGGED_LENGTHS, np.int32)
    # padding of large values: it must not be read by either direction of any layer
    X = 1e3 * rng.standard_normal((len(sequences), max(RAGGED_LENGTHS), N_INPUTS))
    X = X.astype(np.float32)
    for i, sequence in enumerate(sequences):
        X[i, :len(sequence)] = sequence
    labels = check_outputs(est, names, sess.run(None, {"X": X, "lengths": lengths}),
                           expected_outputs(est, sequences))
    check_labels_differ(est, labels)
    # one sequence alone, padded; a batch of one length through lengths
    check_outputs(est, names, sess.run(None, {"X": X[:1, :6], "lengths": lengths[:1]}),
                  expected_outputs(est, sequences[:1]))
    X = rng.standard_normal((5, 8, N_INPUTS)).astype(np.float32)
    check_outputs(est, names, sess.run(None, {"X": X, "lengths": np.full(5, 8, np.int32)}),
                  expected_outputs(est, X))


@pytest.mark.parametrize("variant", [("str-labels", True, 2), ("regressor-2d", False, 3),
                                     ("int-labels", True, 1)], ids=variant_id)
def test_onnx_reference_implementation_agrees(onnx, variant):
    """ONNX's own reference runtime reads the graph (gate order, biases, layout) the same way."""
    from onnx.reference import ReferenceEvaluator

    est = fitted(*variant)
    evaluator = ReferenceEvaluator(est.to_onnx())
    X = np.random.default_rng(3).standard_normal((6, 4, N_INPUTS)).astype(np.float32)
    got = evaluator.run(None, {"X": X})
    check_labels_differ(est, check_outputs(est, [o.name for o in est.to_onnx().graph.output],
                                           got, expected_outputs(est, X)))


@pytest.mark.parametrize("y", [
    np.array([True, False] * 12),
    np.array([0, 2, 5] * 8, np.int32),
    np.array([1.0, 2.0, -3.0] * 8),
    np.array(["yes", "no", "maybe"] * 8, dtype=object),
    [3, 1] * 12,
], ids=["bool", "int32", "float64", "object-str", "list-int"])
def test_labels_keep_the_type_of_classes(ort, y):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((24, 3, N_INPUTS))
    clf = LSTMClassifier(hidden_size=2, max_iter=1, random_state=0, device="cpu").fit(X, y)
    spread(clf)
    sess = session(ort, clf.to_onnx())
    Xt = rng.standard_normal((9, 4, N_INPUTS)).astype(np.float32)
    check_labels_differ(clf, check_outputs(clf, ["label", "probabilities"],
                                           sess.run(None, {"X": Xt}), expected_outputs(clf, Xt)))


def test_to_onnx_writes_a_file_that_loads(onnx, ort, tmp_path):
    est = fitted("str-labels", True, 2)
    path = tmp_path / "model.onnx"
    model = est.to_onnx(path, lengths=True)
    assert path.is_file()
    loaded = onnx.load(path)
    assert loaded.SerializeToString() == model.SerializeToString()
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    X = np.random.default_rng(0).standard_normal((5, 7, N_INPUTS)).astype(np.float32)
    lengths = np.array([7, 2, 5, 1, 7], np.int32)
    check_outputs(est, ["label", "probabilities"], sess.run(None, {"X": X, "lengths": lengths}),
                  expected_outputs(est, [x[:n] for x, n in zip(X, lengths)]))
    est.to_onnx(str(tmp_path / "again.onnx"))  # a str path too
    assert onnx.load(str(tmp_path / "again.onnx")).graph.input[0].name == "X"


@pytest.mark.parametrize("cls", [LSTMClassifier, LSTMRegressor])
def test_unfitted_estimator_raises_not_fitted(cls):
    with pytest.raises(NotFittedError):
        cls(hidden_size=2).to_onnx()


def test_missing_onnx_raises_import_error_naming_the_extra(monkeypatch, tmp_path):
    est = fitted("int-labels", False, 1)
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'fastlstm\[onnx\]'"):
        est.to_onnx(tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
