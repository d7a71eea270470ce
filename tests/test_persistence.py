"""Persistence: ``est.save`` / ``fastlstm.load`` (a file that cannot run code) and pickles.

Round trips predict identically and go on training identically (bidirectional
models and files of older format versions too); truncated, corrupted, edited,
foreign and newer-format files are refused with a clear error; pickles carry
the fastlstm version and warn on a mismatch.
"""

import json
import os
import pickle
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

import fastlstm
import fastlstm.estimators
from fastlstm import LSTMClassifier, LSTMRegressor
from fastlstm.persistence import FORMAT_VERSION, InconsistentVersionWarning, ModelFileError, \
    _digest

TINY = dict(hidden_size=4, batch_size=16, learning_rate_init=0.05, max_iter=2, random_state=0,
            device="cpu")
RNG = np.random.default_rng(0)
X = RNG.standard_normal((40, 5, 2)).astype(np.float32)

LABELS = {
    "int": np.array([3, -1, 7]),
    "float": np.array([1.0, 2.0, -3.0]),
    "str": np.array(["cat", "dog", "bird"]),
    "bool": np.array([True, False, True]),
}


def assert_same_model(loaded, original):
    assert type(loaded) is type(original)
    assert loaded.get_params() == original.get_params()
    for name, value in vars(original).items():
        if name.endswith("_") and not name.startswith("_"):
            loaded_value = getattr(loaded, name)
            if isinstance(value, np.ndarray):
                assert loaded_value.dtype == value.dtype, name
                np.testing.assert_array_equal(loaded_value, value, err_msg=name)
            else:
                assert loaded_value == value, name
    for key, value in original.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], value, err_msg=key)


@pytest.mark.parametrize("label_type", sorted(LABELS))
def test_classifier_round_trip_predicts_identically(tmp_path, label_type):
    y = LABELS[label_type][np.arange(40) % 3]
    clf = LSTMClassifier(**TINY).fit(X, y)
    clf.save(tmp_path / "model.npz")
    loaded = fastlstm.load(tmp_path / "model.npz")
    assert_same_model(loaded, clf)
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), clf.predict(X))
    assert loaded.predict(X).dtype == clf.predict(X).dtype


@pytest.mark.parametrize("n_targets", [1, 3])
def test_regressor_round_trip_predicts_identically(tmp_path, n_targets):
    y = RNG.standard_normal((40, n_targets)).squeeze()
    reg = LSTMRegressor(early_stopping=True, **TINY).fit(X, y)
    reg.save(tmp_path / "model.npz")
    loaded = fastlstm.load(tmp_path / "model.npz")
    assert_same_model(loaded, reg)
    np.testing.assert_array_equal(loaded.predict(X), reg.predict(X))


def test_2d_model_keeps_its_input_size_and_feature_count(tmp_path):
    rows = X.reshape(40, 10)
    clf = LSTMClassifier(input_size=2, **TINY).fit(rows, np.arange(40) % 2)
    clf.save(tmp_path / "model.npz")
    loaded = fastlstm.load(tmp_path / "model.npz")
    assert loaded.input_size == 2 and loaded.n_features_in_ == 10
    np.testing.assert_array_equal(loaded.predict_proba(rows), clf.predict_proba(rows))
    with pytest.raises(ValueError, match="X has 8 features"):
        loaded.predict(rows[:, :8])


def test_loaded_model_goes_on_training_exactly_as_the_original(tmp_path):
    y = np.arange(40) % 3
    clf = LSTMClassifier(**TINY).partial_fit(X, y, classes=[0, 1, 2])
    clf.save(tmp_path / "model.npz")
    loaded = fastlstm.load(tmp_path / "model.npz")
    clf.partial_fit(X, y)  # same Adam moments, step count and shuffling generator
    loaded.partial_fit(X, y)
    assert_same_model(loaded, clf)


def test_object_labels_of_one_native_type_come_back_as_objects(tmp_path):
    classes = np.array(["no", "yes"], dtype=object)
    y = classes[np.arange(40) % 2]
    clf = LSTMClassifier(**TINY).partial_fit(X, y, classes=classes)
    assert clf.classes_.dtype == object
    clf.save(tmp_path / "model.npz")
    loaded = fastlstm.load(tmp_path / "model.npz")
    assert loaded.classes_.dtype == object and loaded.classes_.tolist() == ["no", "yes"]
    np.testing.assert_array_equal(loaded.predict(X), clf.predict(X))


def test_object_labels_a_file_cannot_hold_are_refused(tmp_path):
    clf = LSTMClassifier(**TINY).fit(X, np.arange(40) % 2)
    # fit only makes string or number labels; other objects get here by assignment
    clf.classes_ = np.array([None, (1, 2)], dtype=object)
    with pytest.raises(TypeError, match="classes_ holds values of type NoneType, tuple, which a "
                                        "model file cannot store without pickle.*LabelEncoder"):
        clf.save(tmp_path / "model.npz")
    assert not (tmp_path / "model.npz").exists()


def test_weights_set_by_load_state_dict_save_without_an_optimizer_state(tmp_path):
    trained = LSTMRegressor(**TINY).fit(X, X[:, -1, 0])
    clf = LSTMRegressor(**TINY).load_state_dict(trained.state_dict())
    clf.save(tmp_path / "model.npz")
    np.testing.assert_array_equal(fastlstm.load(tmp_path / "model.npz").predict(X),
                                  trained.predict(X))


def test_saving_an_unfitted_estimator_raises_not_fitted(tmp_path):
    with pytest.raises(NotFittedError):
        LSTMClassifier().save(tmp_path / "model.npz")


def test_file_is_written_at_the_exact_path_and_replaced_whole(tmp_path):
    path = tmp_path / "model.fastlstm"  # np.savez would append ".npz" to a name without it
    clf = LSTMClassifier(**TINY).fit(X, np.arange(40) % 2)
    clf.save(str(path))
    clf.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.fastlstm"]
    assert fastlstm.load(path).n_iter_ == clf.n_iter_


def test_the_file_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    # power loss: a rename may be durable before the data it names, unless they are synced
    # first; and the rename itself only once its folder is
    clf = LSTMClassifier(**TINY).fit(X, np.arange(40) % 2)
    path = tmp_path / "model.npz"
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", Path(dst).name))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    clf.save(path)
    assert events == [("fsync", "file"), ("replace", "model.npz"), ("fsync", "folder")]
    assert fastlstm.load(path).n_iter_ == clf.n_iter_


@pytest.mark.parametrize("Estimator", [LSTMClassifier, LSTMRegressor])
def test_bidirectional_model_round_trips(tmp_path, Estimator):
    lengths = np.arange(40) % 5 + 1
    seqs = [x[:k] for x, k in zip(X, lengths)]
    y = np.arange(40) % 3
    est = Estimator(**TINY, num_layers=2, bidirectional=True).fit(seqs, y)
    est.save(tmp_path / "model.npz")
    loaded = fastlstm.load(tmp_path / "model.npz")
    assert_same_model(loaded, est)
    assert loaded._spec == est._spec and loaded._spec.bidirectional
    np.testing.assert_array_equal(loaded.predict(seqs), est.predict(seqs))
    loaded.partial_fit(seqs, y)  # goes on training exactly as the original
    est.partial_fit(seqs, y)
    assert_same_model(loaded, est)


def test_the_file_stores_the_networks_spec(tmp_path):
    LSTMClassifier(**TINY, bidirectional=True).fit(X, np.arange(40) % 3).save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as archive:
        metadata = json.loads(str(archive["metadata"]))
    assert metadata["format_version"] == FORMAT_VERSION == 3 and "layout" not in metadata
    assert metadata["spec"] == {"input_size": 2, "hidden_size": 4, "num_layers": 1,
                                "output_size": 3, "bidirectional": True}
    assert metadata["unfinished_fit"] is None and metadata["no_improvement_count"] >= 0


def as_version(path, version):
    """Rewrite the model file at ``path`` as format ``version`` (1 or 2) wrote it.

    Version 2 had no learning-rate schedule (``learning_rate`` and ``learning_rate_``,
    the count of epochs without improvement), no checkpoints (``checkpoint``, the record
    of an unfinished fit); version 1 also had the network as ``layout``,
    ``[input_size, hidden_size, num_layers, output_size]``, and no ``bidirectional``.
    """
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    metadata = json.loads(str(arrays["metadata"]))
    assert metadata["params"].pop("learning_rate") == "constant"
    del metadata["params"]["checkpoint"], metadata["attributes"]["learning_rate_"]
    assert metadata.pop("no_improvement_count") == 0 and metadata.pop("unfinished_fit") is None
    metadata["format_version"] = 2
    if version == 1:
        spec = metadata.pop("spec")
        assert not spec.pop("bidirectional")
        metadata["layout"] = [spec["input_size"], spec["hidden_size"], spec["num_layers"],
                              spec["output_size"]]
        del metadata["params"]["bidirectional"]
        metadata["format_version"] = 1
    rewrite(path, arrays, metadata)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("Estimator", [LSTMClassifier, LSTMRegressor])
def test_older_format_file_loads_and_predicts_identically(tmp_path, Estimator, version):
    est = Estimator(**{**TINY, "num_layers": 2}).partial_fit(X, np.arange(40) % 2,
                                                             **_classes(Estimator))
    path = tmp_path / f"v{version}.npz"
    est.save(path)
    as_version(path, version)
    loaded = fastlstm.load(path)
    assert_same_model(loaded, est)
    assert loaded._spec == est._spec and not loaded.bidirectional
    assert loaded.learning_rate == "constant" and loaded.learning_rate_ == TINY["learning_rate_init"]
    np.testing.assert_array_equal(loaded.predict(X), est.predict(X))
    loaded.partial_fit(X, np.arange(40) % 2)
    est.partial_fit(X, np.arange(40) % 2)
    assert_same_model(loaded, est)
    loaded.save(path)  # written again in the current version
    with np.load(path, allow_pickle=False) as archive:
        assert json.loads(str(archive["metadata"]))["format_version"] == FORMAT_VERSION


def _classes(Estimator):
    return {"classes": [0, 1]} if Estimator is LSTMClassifier else {}


def test_random_state_instance_is_saved_as_none_with_a_warning(tmp_path):
    clf = LSTMClassifier(**{**TINY, "random_state": np.random.RandomState(0)})
    clf.fit(X, np.arange(40) % 2)
    with pytest.warns(UserWarning, match="random_state is a RandomState instance"):
        clf.save(tmp_path / "model.npz")
    loaded = fastlstm.load(tmp_path / "model.npz")
    assert loaded.random_state is None
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))


# ----------------------------------------------------------------- bad files
@pytest.fixture
def saved(tmp_path):
    """A saved classifier's path, and its archive's arrays."""
    path = tmp_path / "model.npz"
    LSTMClassifier(**TINY).fit(X, np.arange(40) % 3).save(path)
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    return path, arrays


def rewrite(path, arrays, metadata=None, digest=True):
    """Write ``arrays`` (with ``metadata`` if given) back to ``path``, re-digested if asked."""
    arrays = dict(arrays)
    if metadata is not None:
        arrays["metadata"] = np.array(json.dumps(metadata, sort_keys=True))
    if digest:
        payload = {k: v for k, v in arrays.items() if k not in ("metadata", "sha256")}
        arrays["sha256"] = np.array(_digest(str(arrays["metadata"]), payload))
    np.savez(path, **arrays)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_truncated_file_is_refused(saved, keep):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ModelFileError, match="truncated or corrupted"):
        fastlstm.load(path)


def test_corrupted_bytes_are_refused(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    start = data.index(b"\x93NUMPY", data.index(b"params.npy"))
    data[start + 200] ^= 0xFF  # a byte of the weights
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupted"):
        fastlstm.load(path)


def test_edited_weights_fail_the_integrity_check(saved):
    path, arrays = saved
    arrays["params"] = arrays["params"].copy()
    arrays["params"][0] += 1.0
    rewrite(path, arrays, digest=False)
    with pytest.raises(ModelFileError, match="fails its integrity check.*SHA-256"):
        fastlstm.load(path)


def test_edited_metadata_fails_the_integrity_check(saved):
    path, arrays = saved
    metadata = json.loads(str(arrays["metadata"]))
    metadata["attributes"]["n_iter_"] = 99
    arrays["metadata"] = np.array(json.dumps(metadata, sort_keys=True))
    rewrite(path, arrays, digest=False)
    with pytest.raises(ModelFileError, match="fails its integrity check"):
        fastlstm.load(path)


def test_newer_format_version_is_refused_with_a_message(saved):
    path, arrays = saved
    metadata = json.loads(str(arrays["metadata"]))
    metadata["format_version"] = FORMAT_VERSION + 1
    metadata["fastlstm_version"] = "9.0.0"
    rewrite(path, arrays, metadata)
    with pytest.raises(ModelFileError, match=f"written by fastlstm 9.0.0 in model format version "
                                             f"{FORMAT_VERSION + 1}.*upgrade fastlstm"):
        fastlstm.load(path)


def test_format_version_no_fastlstm_writes_is_refused(saved):
    path, arrays = saved
    metadata = json.loads(str(arrays["metadata"]))
    metadata["format_version"] = 0
    rewrite(path, arrays, metadata)
    with pytest.raises(ModelFileError, match="format version 0, which no fastlstm writes"):
        fastlstm.load(path)


def test_file_from_another_fastlstm_version_warns(saved):
    path, arrays = saved
    metadata = json.loads(str(arrays["metadata"]))
    metadata["fastlstm_version"] = "0.0.1"
    rewrite(path, arrays, metadata)
    with pytest.warns(InconsistentVersionWarning, match="written by fastlstm 0.0.1 and is loaded"):
        fastlstm.load(path)


def test_npz_that_is_not_a_model_is_refused(tmp_path):
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ModelFileError, match="not a fastlstm model file"):
        fastlstm.load(tmp_path / "other.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(ModelFileError, match="single array, not a fastlstm model"):
        fastlstm.load(tmp_path / "array.npy")


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_a_pickle_never_runs_its_code(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "model.npz"
    path.write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(marker)))
    with pytest.raises(ModelFileError, match="not a readable fastlstm model file"):
        fastlstm.load(path)
    np.savez(path, metadata=np.array([_RunsCodeWhenUnpickled(marker)], dtype=object),
             sha256=np.array("0"))  # an object array inside a .npz is a pickle too
    with pytest.raises(ModelFileError, match="not a readable fastlstm model file"):
        fastlstm.load(path)
    assert not marker.exists()


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        fastlstm.load(tmp_path / "nothing.npz")


# -------------------------------------------------------------------- pickles
@pytest.mark.parametrize("Estimator", [LSTMClassifier, LSTMRegressor])
def test_pickle_carries_the_version_and_loads_silently_with_the_same(Estimator):
    est = Estimator(**TINY).fit(X, np.arange(40) % 2)
    assert est.__getstate__()["_fastlstm_version"] == fastlstm.__version__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = pickle.loads(pickle.dumps(est))
    assert "_fastlstm_version" not in vars(loaded)
    np.testing.assert_array_equal(loaded.predict(X), est.predict(X))


@pytest.mark.parametrize("version, shown", [("0.0.1", "0.0.1"), (None, "(unknown version)")])
def test_pickle_from_another_version_warns_and_still_loads(version, shown):
    est = LSTMClassifier(**TINY).fit(X, np.arange(40) % 2)
    state = est.__getstate__()
    if version is None:
        del state["_fastlstm_version"]
    else:
        state["_fastlstm_version"] = version
    loaded = LSTMClassifier.__new__(LSTMClassifier)
    with pytest.warns(InconsistentVersionWarning,
                      match=re.escape(f"pickled LSTMClassifier was written by fastlstm {shown}")):
        loaded.__setstate__(state)
    np.testing.assert_array_equal(loaded.predict(X), est.predict(X))


def test_warnings_point_at_the_line_that_saved_or_loaded(saved, monkeypatch):
    path, arrays = saved
    metadata = json.loads(str(arrays["metadata"]))
    metadata["fastlstm_version"] = "0.0.1"
    rewrite(path, arrays, metadata)
    with pytest.warns(InconsistentVersionWarning) as record:
        fastlstm.load(path)
    assert record[0].filename == __file__
    clf = LSTMClassifier(**{**TINY, "random_state": np.random.RandomState(0)})
    clf.fit(X, np.arange(40) % 2)
    with pytest.warns(UserWarning, match="random_state") as record:
        clf.save(path)
    assert record[0].filename == __file__
    monkeypatch.setattr(fastlstm.estimators, "__version__", "0.0.1")
    data = pickle.dumps(clf)
    monkeypatch.undo()
    with pytest.warns(InconsistentVersionWarning) as record:
        pickle.loads(data)
    assert record[0].filename == __file__


# ------------------------------------------------------------------ layering
#: run with the package folder and a file path: writes and reads a state with
#: fastlstm.persistence alone, then prints the fastlstm modules that got imported
PERSISTENCE_ALONE = """
import sys
import types

import numpy as np

# a bare package in place of fastlstm/__init__.py, which imports the estimators
package = types.ModuleType("fastlstm")
package.__path__ = [sys.argv[1]]
sys.modules["fastlstm"] = package
from fastlstm import persistence

state = {"metadata": {"estimator": "Anything", "sizes": [1, 2]},
         "arrays": {"w": np.arange(3.0), "labels": np.array(["a", "b"], dtype=object)}}
persistence.save_state(state, sys.argv[2])
back = persistence.load_state(sys.argv[2])
assert back["metadata"] == state["metadata"], back["metadata"]
assert back["arrays"]["labels"].dtype == object, back["arrays"]["labels"].dtype
assert back["arrays"]["labels"].tolist() == ["a", "b"]
np.testing.assert_array_equal(back["arrays"]["w"], state["arrays"]["w"])
np.savez(sys.argv[2], other=np.zeros(1))
try:
    persistence.load_state(sys.argv[2])
except persistence.ModelFileError:
    pass
print(" ".join(sorted(name for name in sys.modules if name.partition(".")[0] == "fastlstm")))
"""


def test_persistence_works_without_importing_the_estimators(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", PERSISTENCE_ALONE, str(Path(fastlstm.__file__).parent),
         str(tmp_path / "state.npz")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fastlstm", "fastlstm._version", "fastlstm.persistence"]


def test_metadata_keys_of_the_file_format_are_refused(tmp_path):
    from fastlstm.persistence import save_state

    with pytest.raises(ValueError, match=r"\['arrays', 'format'\] are written by the file"):
        save_state({"metadata": {"format": 0, "arrays": 1}, "arrays": {}}, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_a_pickle_of_fastlstm_0_1_loads_predicts_and_trains():
    """``tests/data/fastlstm-0.1.0-classifier.pkl``: ``pickle.dump((clf, X, clf.predict_proba(X)))``
    of an ``LSTMClassifier(hidden_size=4, max_iter=2, random_state=0, device="cpu")`` fitted by
    fastlstm 0.1.0 (commit 786601c) on ``X`` (40, 5, 3) and ``y = X[:, -1, 0] > 0``."""
    from fastlstm.persistence import InconsistentVersionWarning
    path = Path(__file__).parent / "data" / "fastlstm-0.1.0-classifier.pkl"
    with pytest.warns(InconsistentVersionWarning, match="0.1.0"):
        clf, X, proba = pickle.loads(path.read_bytes())
    # Bit-identical on the kind of CPU the pickle was made on (the project's AMD EPYC), as the
    # README promises; not across kinds of CPU: on an Intel Xeon (Emerald Rapids) 6 of the 80
    # probabilities came out 1 ulp apart, at the commit that had passed here on the AMD machine
    # too (Numba compiles for each CPU's own instruction sets, with reassociation allowed in
    # places, and OpenBLAS and NumPy pick their SIMD code by CPU: any may round differently)
    np.testing.assert_allclose(clf.predict_proba(X), proba, rtol=4 * np.finfo(np.float32).eps,
                               atol=0)
    assert clf.get_params()["bidirectional"] is False
    clf.set_params(warm_start=True).fit(X, (X[:, -1, 0] > 0).astype(int))
