"""Saving and loading fitted estimators in a file that cannot run code when loaded.

``est.save(path)`` writes a ``.npz`` archive (NumPy's zip of ``.npy`` arrays)
holding only numeric, boolean and string arrays, and a JSON document of the
hyper-parameters and fitted attributes; :func:`load` reads it back with
``allow_pickle=False``, so unlike a pickle, loading a model never executes
code from the file.  The metadata carries a format version (files from a newer
version are refused) and a SHA-256 digest of the metadata and of every array,
so a truncated, corrupted or edited file is refused with a clear error rather
than giving a silently different model.

Pickles (``pickle``/``joblib``) keep working too; they record the fastlstm
version and warn when loaded by another one (see :class:`InconsistentVersionWarning`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile

import numpy as np

from ._version import __version__

__all__ = ["FORMAT_VERSION", "InconsistentVersionWarning", "ModelFileError", "load", "save"]

#: version of the file layout written by :func:`save`; bumped on any incompatible change
FORMAT_VERSION = 1
_FORMAT = "fastlstm-model"
#: what a native array's dtype kind may be: bool, int, unsigned, float, unicode string
_NATIVE_KINDS = "biufU"


class ModelFileError(ValueError):
    """The file is not a fastlstm model file, or it is truncated, corrupted or edited."""


class InconsistentVersionWarning(UserWarning):
    """A model was saved or pickled by another fastlstm version than the one loading it."""


def save(estimator, path):
    """Write the fitted ``estimator`` to ``path`` (see :meth:`BaseLSTM.save`)."""
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(estimator)
    adam = estimator._adam  # None until trained (weights set by load_state_dict)
    arrays = {"params": estimator._params}
    if adam is not None:
        arrays.update(adam_m=adam.m, adam_v=adam.v)
    attributes, object_arrays = {}, []
    for name, value in vars(estimator).items():
        if not name.endswith("_") or name.startswith("_"):
            continue  # hyper-parameters and private state are saved below
        if isinstance(value, np.ndarray):
            arrays[name], was_object = _native_array(name, value)
            if was_object:
                object_arrays.append(name)
        else:
            attributes[name] = _json_value(name, value)
    layout = estimator._layout
    metadata = {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "fastlstm_version": __version__,
        "estimator": type(estimator).__name__,
        "params": _hyper_parameters(estimator),
        "layout": [layout.input_size, layout.hidden_size, layout.num_layers, layout.output_size],
        "adam_step": None if adam is None else int(adam.step),
        "rng_state": estimator._rng.bit_generator.state,
        "attributes": attributes,
        "object_arrays": object_arrays,
        "arrays": {name: [array.dtype.str, list(array.shape)] for name, array in arrays.items()},
    }
    metadata_json = json.dumps(metadata, sort_keys=True)
    digest = _digest(metadata_json, arrays)
    _write_atomically(path, {**arrays, "metadata": np.array(metadata_json),
                             "sha256": np.array(digest)})


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
    ModelFileError
        The file is not a fastlstm model, is truncated or corrupted, was
        edited, or was written by a newer fastlstm (format version).
    """
    from .estimators import LSTMClassifier, LSTMRegressor

    path = os.fspath(path)
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ModelFileError(f"{path} holds a single array, not a fastlstm model; write "
                                 "models with est.save(path).")
        with archive:
            contents = {name: archive[name] for name in archive.files}
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ModelFileError(
            f"{path} is not a readable fastlstm model file ({type(exc).__name__}: {exc}); it "
            "may be truncated or corrupted, or not written by est.save(). Save the model "
            "again from a fitted estimator.") from exc
    if "metadata" not in contents or "sha256" not in contents:
        raise ModelFileError(f"{path} is a .npz archive but not a fastlstm model file (no "
                             "metadata); write models with est.save(path).")
    metadata_json = str(contents.pop("metadata"))
    digest = str(contents.pop("sha256"))
    try:
        metadata = json.loads(metadata_json)
    except ValueError as exc:
        raise ModelFileError(f"the metadata of {path} is not valid JSON: the file is "
                             "corrupted or was edited.") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
        raise ModelFileError(f"{path} is not a fastlstm model file; write models with "
                             "est.save(path).")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by fastlstm {metadata.get('fastlstm_version')} in model format "
            f"version {version}, but this fastlstm reads format versions up to "
            f"{FORMAT_VERSION}; upgrade fastlstm (pip install -U fastlstm) to load it.")
    if _digest(metadata_json, contents) != digest:
        raise ModelFileError(
            f"{path} fails its integrity check (SHA-256 of its contents differs from the one "
            "recorded when it was saved): the file is corrupted or was edited. Save the model "
            "again from a fitted estimator.")
    _warn_if_other_version(metadata["fastlstm_version"], f"model file {path}")
    classes = {cls.__name__: cls for cls in (LSTMClassifier, LSTMRegressor)}
    estimator = classes[metadata["estimator"]](**metadata["params"])
    return _restore(estimator, metadata, contents)


def _restore(estimator, metadata, arrays):
    from .backends import AdamState
    from .params import ParamLayout

    layout = ParamLayout(*metadata["layout"])
    estimator._layout = layout
    estimator._params = arrays.pop("params")
    estimator._adam = None if metadata["adam_step"] is None else \
        AdamState(arrays.pop("adam_m"), arrays.pop("adam_v"), metadata["adam_step"])
    estimator._rng = np.random.default_rng()
    estimator._rng.bit_generator.state = metadata["rng_state"]
    for name, value in metadata["attributes"].items():
        setattr(estimator, name, value)
    for name, value in arrays.items():
        setattr(estimator, name, value.astype(object) if name in metadata["object_arrays"]
                else value)
    return estimator


def _native_array(name, array):
    """``array`` in a dtype ``.npz`` stores without pickle, and whether it was ``object``.

    Object arrays (labels or feature names from pandas, lists of strings) are
    stored natively when NumPy holds their items natively (strings, numbers,
    bools); they come back as ``object`` arrays of equal items.
    """
    if array.dtype.kind in _NATIVE_KINDS:
        return array, False
    if array.dtype.kind == "O":
        items = array.ravel().tolist()
        try:
            native = np.array(items)
        except ValueError:  # items that are sequences of different lengths
            native = np.array(items, dtype=object)
        # equal items rule out conversions such as [1, "a"] -> ["1", "a"]
        if native.dtype.kind in _NATIVE_KINDS and native.tolist() == items:
            return native.reshape(array.shape), True
        found = sorted({type(item).__name__ for item in items})
    else:
        found = [str(array.dtype)]
    raise TypeError(
        f"{name} holds values of type {', '.join(found)}, which a model file cannot store "
        "without pickle; use labels of one type among int, float, str or bool (e.g. encode "
        "them with sklearn.preprocessing.LabelEncoder), or pickle the model instead (and only "
        "load pickles you trust).")


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


def _hyper_parameters(estimator):
    params = estimator.get_params(deep=False)
    if not (params["random_state"] is None or isinstance(params["random_state"], int)):
        warnings.warn("random_state is a RandomState instance, which a model file cannot hold; "
                      "it is saved as None (the fitted weights and the state of the training "
                      "generator are saved exactly).", UserWarning, stacklevel=3)
        params["random_state"] = None
    return {name: _json_value(name, value) for name, value in params.items()}


def _digest(metadata_json, arrays):
    """SHA-256 of the metadata and of every array's name, dtype, shape and bytes."""
    sha = hashlib.sha256(metadata_json.encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        sha.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def _write_atomically(path, arrays):
    """``np.savez`` to ``path`` through a temporary file, so an interrupted save leaves the
    file that was there."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fastlstm-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # a file object: np.savez adds no ".npz" to the name
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _warn_if_other_version(version, what):
    if version != __version__:
        warnings.warn(
            f"{what} was written by fastlstm {version or '(unknown version)'} and is loaded by "
            f"fastlstm {__version__}; predictions may differ. Refit the model or save it again "
            "with this version.", InconsistentVersionWarning, stacklevel=3)
