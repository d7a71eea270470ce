"""Saving and loading fitted estimators in a file that cannot run code when loaded.

``est.save(path)`` writes a ``.npz`` archive (NumPy's zip of ``.npy`` arrays)
holding only numeric, boolean and string arrays, and a JSON document of the
hyper-parameters and fitted attributes; ``fastlstm.load`` reads it back with
``allow_pickle=False``, so unlike a pickle, loading a model never executes
code from the file.  The metadata carries a format version (files from a newer
version are refused) and a SHA-256 digest of the metadata and of every array,
so a truncated, corrupted or edited file is refused with a clear error rather
than giving a silently different model.  Files of an older format version are
read too: :func:`load_state` upgrades their metadata, the estimator's part
included, to the current version's, so the estimators read one version only.

This module knows the file, not the estimators (it imports none of them): an
estimator hands :func:`save_state` its state as plain data (JSON-encodable
metadata and named arrays), and :func:`load_state` gives that data back for
the estimator class named in it to rebuild the model (see
:func:`fastlstm.estimators.load`).

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

__all__ = ["FORMAT_VERSION", "InconsistentVersionWarning", "ModelFileError", "load_state",
           "save_state"]

#: version of the file layout written by :func:`save_state`; bumped on any incompatible change,
#: with an upgrade of the previous version's metadata in :data:`_UPGRADES`
FORMAT_VERSION = 3
_FORMAT = "fastlstm-model"
#: metadata keys that the file writes around the estimator's own
_FILE_KEYS = frozenset({"format", "format_version", "fastlstm_version", "object_arrays", "arrays"})
#: what a native array's dtype kind may be: bool, int, unsigned, float, unicode string
_NATIVE_KINDS = "biufU"


def _spec_from_layout(metadata):
    """Version 1 -> 2: the network as ``"spec"``, the fields of
    :class:`fastlstm.model.ModelSpec`, instead of ``"layout"``, ``[input_size,
    hidden_size, num_layers, output_size]`` of a unidirectional network."""
    metadata = dict(metadata)
    sizes = metadata.pop("layout")
    metadata["spec"] = {**dict(zip(("input_size", "hidden_size", "num_layers", "output_size"),
                                   sizes)), "bidirectional": False}
    return metadata


def _optimizer_schedule(metadata):
    """Version 2 -> 3: the state of the learning-rate schedule (``learning_rate_`` among
    the fitted attributes, ``"no_improvement_count"``) and ``"unfinished_fit"`` (``None``:
    the file is of a finished fit).  Version 2 trained at ``learning_rate_init``
    throughout and counted epochs without improvement afresh at every call."""
    metadata = dict(metadata)
    metadata["attributes"] = {**metadata["attributes"],
                              "learning_rate_": metadata["params"]["learning_rate_init"]}
    metadata.update(no_improvement_count=0, unfinished_fit=None)
    return metadata


#: the upgrade of the metadata of each format version to the next
_UPGRADES = {1: _spec_from_layout, 2: _optimizer_schedule}


class ModelFileError(ValueError):
    """The file is not a fastlstm model file, or it is truncated, corrupted or edited."""


class InconsistentVersionWarning(UserWarning):
    """A model was saved or pickled by another fastlstm version than the one loading it."""


def save_state(state, path):
    """Write ``state``, the plain data an estimator hands over, to ``path`` as a model file.

    Parameters
    ----------
    state : dict
        ``"metadata"``: a dict that JSON encodes, none of whose keys is one
        the file itself writes (the format, its version, the fastlstm
        version, the list of arrays); ``"arrays"``: ndarrays by name, of bool,
        integer, float or string dtype, or ``object`` arrays of such values.
    path : str or path-like
        Where to write (an existing file is replaced only once the new one is complete).

    Raises
    ------
    TypeError
        An ``object`` array holds values that a file cannot store without pickle.
    ValueError
        A key of the metadata is one the file writes itself.
    """
    taken = _FILE_KEYS & state["metadata"].keys()
    if taken:
        raise ValueError(f"the metadata keys {sorted(taken)} are written by the file format "
                         "itself; rename them.")
    arrays, object_arrays = {}, []
    for name, array in state["arrays"].items():
        arrays[name], was_object = _native_array(name, array)
        if was_object:
            object_arrays.append(name)
    metadata = {
        **state["metadata"],
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "fastlstm_version": __version__,
        "object_arrays": object_arrays,
        "arrays": {name: [array.dtype.str, list(array.shape)] for name, array in arrays.items()},
    }
    metadata_json = json.dumps(metadata, sort_keys=True)
    digest = _digest(metadata_json, arrays)
    _write_atomically(path, {**arrays, "metadata": np.array(metadata_json),
                             "sha256": np.array(digest)})


def load_state(path):
    """The state :func:`save_state` wrote to ``path``, checked; never runs code from the file.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save_state` (``est.save(path)``).

    Returns
    -------
    state : dict
        ``"metadata"`` and ``"arrays"`` as they were saved (through JSON:
        tuples come back as lists; the metadata of an older format version
        upgraded to the current one's); ``object`` arrays come back as
        ``object`` arrays of equal items.

    Raises
    ------
    ModelFileError
        The file is not a fastlstm model, is truncated or corrupted, was
        edited, or was written by a newer fastlstm (format version).

    Warns
    -----
    InconsistentVersionWarning
        The file was written by another fastlstm version.
    """
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
    if version < 1:
        raise ModelFileError(f"{path} has model format version {version}, which no fastlstm "
                             "writes: the file was edited. Save the model again from a fitted "
                             "estimator.")
    if _digest(metadata_json, contents) != digest:
        raise ModelFileError(
            f"{path} fails its integrity check (SHA-256 of its contents differs from the one "
            "recorded when it was saved): the file is corrupted or was edited. Save the model "
            "again from a fitted estimator.")
    # stacklevel 3: the line that called fastlstm.load (which calls this function)
    _warn_if_other_version(metadata["fastlstm_version"], f"model file {path}", stacklevel=3)
    arrays = {name: value.astype(object) if name in metadata["object_arrays"] else value
              for name, value in contents.items()}
    metadata = {key: value for key, value in metadata.items() if key not in _FILE_KEYS}
    for older in range(version, FORMAT_VERSION):
        metadata = _UPGRADES[older](metadata)
    return {"metadata": metadata, "arrays": arrays}


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
    file that was there, whole, even after a power loss.

    The data reach the disk (``fsync``) before the rename, and the rename before
    this returns (``fsync`` of the folder): otherwise a crash soon after could leave
    ``path`` naming a file whose blocks were never written, or the old file back.
    A crash during the write leaves only a partial temporary file (``.fastlstm-*.npz.tmp``,
    next to ``path``), which nothing reads.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fastlstm-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # a file object: np.savez adds no ".npz" to the name
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder):
    """Make the entries of ``folder`` (a rename into it) durable, where the system can."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames are written through
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _warn_if_other_version(version, what, stacklevel):
    """Warn that ``what`` was written by fastlstm ``version`` if it is not this one.

    ``stacklevel`` is that of :func:`warnings.warn` as seen from the caller
    of this function (2: the line that called the caller).
    """
    if version != __version__:
        warnings.warn(
            f"{what} was written by fastlstm {version or '(unknown version)'} and is loaded by "
            f"fastlstm {__version__}; predictions may differ. Refit the model or save it again "
            "with this version.", InconsistentVersionWarning, stacklevel=stacklevel + 1)
