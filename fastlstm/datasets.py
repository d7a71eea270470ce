"""MNIST and Fashion-MNIST: IDX reader, local lookup, verified download, bundled sample.

Each dataset's four IDX files (gzip-compressed or raw) are looked up, in order, in

1. ``data_home/<dataset>/`` when ``data_home`` is given,
2. ``$FASTLSTM_DATA/<dataset>/`` when that environment variable is set,
3. the user cache, ``<cache>/fastlstm/<dataset>/``,
4. for Fashion-MNIST, Debian's ``/usr/share/datasets/fashion-mnist/``,

where ``<dataset>`` is ``mnist`` or ``fashion-mnist``. Missing files are downloaded into the
first of these folders from the dataset's public mirrors, tried in order. Every file, found or
downloaded, must match the published SHA-256 of its *decompressed* bytes: the gzip wrappers in
circulation differ between mirrors, the IDX content does not.
"""

import gzip
import hashlib
import http.client
import math
import os
import struct
import sys
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from sklearn.utils import Bunch

__all__ = [
    "DatasetUnavailable",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist_sample",
]

#: Tried in order. PyTorch's and TensorFlow Datasets' copies first: the original site often
#: refuses scripted downloads.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
#: Tried in order: Zalando's repository, then the download site its README links to.
FASHION_MNIST_MIRRORS = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
FASHION_MNIST_SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)
#: Seconds to wait for a connection and for each read from a mirror.
DOWNLOAD_TIMEOUT = 30.0

_IMAGE_SIDE = 28
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data is big-endian.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetUnavailable(OSError):
    """Dataset files are missing here and could not be downloaded."""


class _DatasetBunch(Bunch):
    """A scikit-learn ``Bunch`` that refuses to be iterated, and so to be unpacked.

    Iterating a dict gives its keys, so ``X, y = load_mnist_sample()`` would bind the strings
    ``"X"`` and ``"y"`` and fail much later, far from the mistake. Everything else is ``Bunch``:
    attribute and key access, ``keys()``, ``items()``, ``dict(bunch)``, ``**bunch``, pickling
    (which all go through the dict itself, not ``__iter__``).
    """

    def __iter__(self):
        attributes = ", ".join(f".{key}" for key in self.keys())
        raise TypeError(
            "A dataset Bunch cannot be iterated or unpacked (iterating a dict gives its keys, "
            "not its arrays): pass return_X_y=True to the loader to get a tuple, or read the "
            f"arrays as attributes ({attributes}). For the key names, use .keys()."
        )


def _bunch_or_tuple(return_X_y, **arrays):
    """``arrays`` as a tuple, in the order given, if ``return_X_y``; else as a Bunch."""
    if return_X_y:
        return tuple(arrays.values())
    return _DatasetBunch(**arrays)


@dataclass(frozen=True)
class _IdxFile:
    """One IDX file of a dataset: its name (without ``.gz``), shape and checksum."""

    name: str
    shape: tuple
    sha256: str  # of the decompressed bytes

    @property
    def nbytes(self):
        """Size of the decompressed file: the 4-byte magic, 4 bytes per dimension, uint8 data."""
        return 4 + 4 * len(self.shape) + math.prod(self.shape)


@dataclass(frozen=True)
class _Dataset:
    title: str
    subdir: str
    mirrors: tuple
    system_dirs: tuple
    train_images: _IdxFile
    train_labels: _IdxFile
    test_images: _IdxFile
    test_labels: _IdxFile
    offline_hint: str = ""  # appended to "files not found" errors

    @property
    def files(self):
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


def _images(name, n, sha256):
    return _IdxFile(name, (n, _IMAGE_SIDE, _IMAGE_SIDE), sha256)


def _labels(name, n, sha256):
    return _IdxFile(name, (n,), sha256)


# The SHA-256s of MNIST's test files and training labels were computed here from the official
# files. The training images were not at hand: their SHA-256 is the one that many independent
# public download scripts pin for the decompressed official file, each next to the other three
# below (which we verified), one also next to TensorFlow Datasets' SHA-256 of the official gzip
# (440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609). Were it wrong, downloads
# of that file would fail loudly; no other file could pass for it.
_MNIST = _Dataset(
    title="MNIST",
    subdir="mnist",
    mirrors=MNIST_MIRRORS,
    system_dirs=(),
    train_images=_images(
        "train-images-idx3-ubyte",
        60000,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    train_labels=_labels(
        "train-labels-idx1-ubyte",
        60000,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    test_images=_images(
        "t10k-images-idx3-ubyte",
        10000,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    test_labels=_labels(
        "t10k-labels-idx1-ubyte",
        10000,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
    offline_hint="Offline, fastlstm.datasets.load_mnist_sample() gives the bundled test set.",
)

_FASHION_MNIST = _Dataset(
    title="Fashion-MNIST",
    subdir="fashion-mnist",
    mirrors=FASHION_MNIST_MIRRORS,
    system_dirs=FASHION_MNIST_SYSTEM_DIRS,
    train_images=_images(
        "train-images-idx3-ubyte",
        60000,
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    train_labels=_labels(
        "train-labels-idx1-ubyte",
        60000,
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    test_images=_images(
        "t10k-images-idx3-ubyte",
        10000,
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    test_labels=_labels(
        "t10k-labels-idx1-ubyte",
        10000,
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
)


# ---------------------------------------------------------------------------------------------
# IDX reader
# ---------------------------------------------------------------------------------------------


def _idx_header(data, source):
    """The element type, shape and header length of the IDX file whose bytes are ``data``."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{source} is not an IDX file: it starts with bytes {bytes(data[:4]).hex(' ')!r}, "
            "while an IDX file starts with two zero bytes, a type code and a dimension count."
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X} ({d.name})" for c, d in _IDX_DTYPES.items())
        raise ValueError(f"{source} has unknown IDX type code 0x{code:02X}; known codes: {known}.")
    if ndim == 0:
        raise ValueError(f"{source} declares zero dimensions; an IDX array needs at least one.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{source} is truncated: its header declares {ndim} dimensions "
            f"({header} bytes of header) but the file holds only {len(data)} bytes."
        )
    return _IDX_DTYPES[code], struct.unpack(f">{ndim}I", data[4:header]), header


def _parse_idx(data, source, expected=None):
    """Decode the bytes of an IDX file into a native-endian array; ``source`` names it in errors.

    With ``expected`` (an ``_IdxFile``), the header must declare its shape and uint8 data.
    """
    dtype, shape, header = _idx_header(data, source)
    if expected is not None and (dtype != np.uint8 or shape != expected.shape):
        raise ValueError(
            f"{source} holds a {shape} array of {dtype.name}, but {expected.name} must "
            f"hold a {expected.shape} array of uint8: it is a different file under that name."
        )
    count = math.prod(shape)
    nbytes = header + count * dtype.itemsize
    if len(data) < nbytes:
        raise ValueError(
            f"{source} is truncated: its header promises a {shape} array of {dtype.name} "
            f"({nbytes} bytes in all) but the file holds only {len(data)} bytes."
        )
    if len(data) > nbytes:
        raise ValueError(
            f"{source} has trailing bytes: its header promises a {shape} array of {dtype.name} "
            f"({nbytes} bytes in all) but the file holds more. It is damaged or not one IDX file."
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a native-endian, writable copy


def _read_decompressed(path, source, limit=None):
    """Bytes of ``path``, gunzipped when it is gzip; at most ``limit + 1`` bytes are read."""
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        try:
            # One byte past the limit is enough to report "trailing bytes" on an oversized file
            # without inflating a gzip bomb.
            return stream.read(-1 if limit is None else limit + 1)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise ValueError(f"{source} is a damaged or truncated gzip file: {exc}") from exc


def _read_idx(path, expected=None, source=None):
    """Read the IDX file ``path`` (gzip or raw) into a NumPy array.

    Parameters
    ----------
    path : path-like
        An IDX file, optionally gzip-compressed (recognised by its content, not its name).
    expected : _IdxFile, optional
        When given, the file must hold a uint8 array of ``expected.shape`` whose decompressed
        bytes have SHA-256 ``expected.sha256``.
    source : str, optional
        How error messages name the file; ``path`` by default.

    Returns
    -------
    ndarray
        The array, native-endian and writable.

    Raises
    ------
    ValueError
        If the file is not an IDX file, is truncated or damaged, or does not match ``expected``.
    """
    source = str(path) if source is None else source
    data = _read_decompressed(path, source, None if expected is None else expected.nbytes)
    array = _parse_idx(data, source, expected)
    if expected is None:
        return array
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected.sha256:
        raise ValueError(
            f"{source} is not the published {expected.name}: the SHA-256 of its decompressed "
            f"bytes is {digest}, expected {expected.sha256}."
        )
    return array


# ---------------------------------------------------------------------------------------------
# Lookup
# ---------------------------------------------------------------------------------------------


def _user_cache_dir():
    """fastlstm's folder in the per-user cache of this platform (XDG_CACHE_HOME wins everywhere)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "fastlstm"
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        base = Path(local) if local else Path.home() / "AppData" / "Local"
        return base / "fastlstm" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "fastlstm"
    return Path.home() / ".cache" / "fastlstm"


def _search_folders(dataset, data_home):
    """The folders searched for ``dataset``'s files, in order; downloads go to the first."""
    roots = []
    if data_home is not None:
        roots.append(Path(data_home).expanduser())
    env = os.environ.get("FASTLSTM_DATA")
    if env:
        roots.append(Path(env).expanduser())
    roots.append(_user_cache_dir())
    return [root / dataset.subdir for root in roots] + [Path(d) for d in dataset.system_dirs]


def _find(idx_file, folders):
    """The first existing ``name`` or ``name.gz`` in ``folders``, or None."""
    for folder in folders:
        for candidate in (folder / idx_file.name, folder / (idx_file.name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def _download_enabled(download):
    if download is not None:
        return bool(download)
    return os.environ.get("FASTLSTM_OFFLINE", "") in ("", "0")


# ---------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------


def _fetch_verified(url, idx_file, target, timeout):
    """Download ``url`` to ``target`` only if its content is ``idx_file``; else leave no file."""
    # Any gzip of the file is smaller than the file plus a little framing: more is not our file.
    max_bytes = idx_file.nbytes + (1 << 20)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                received = 0
                while chunk := response.read(_CHUNK):
                    received += len(chunk)
                    if received > max_bytes:
                        raise ValueError(f"the server sent more than {max_bytes} bytes")
                    out.write(chunk)
                # http.client ends a body cut short as if it were complete.
                promised = response.headers.get("Content-Length")
                if promised is not None and promised.isdigit() and int(promised) != received:
                    raise ValueError(f"the transfer was cut: {received} of {promised} bytes came")
            out.flush()
            os.fsync(out.fileno())
        _read_idx(partial, idx_file, source="the file served")
        os.chmod(partial, 0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(partial, target)
    except BaseException:
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
        raise


def _download(idx_file, folder, mirrors, timeout=None):
    """Fetch ``idx_file`` into ``folder`` from the first mirror that serves it intact.

    Returns the path written, or raises DatasetUnavailable listing every mirror's failure.
    """
    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    target = folder / (idx_file.name + ".gz")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetUnavailable(f"cannot create {folder} to download into: {exc}") from exc
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + idx_file.name + ".gz"
        try:
            _fetch_verified(url, idx_file, target, timeout)
            return target
        # URLError, timeouts and refused connections are OSErrors; a malformed response is an
        # HTTPException; a cut transfer, a damaged or a foreign file, ValueError.
        except (OSError, http.client.HTTPException, ValueError) as exc:
            failures.append(f"  {url}: {exc}")
    raise DatasetUnavailable("\n".join(failures))


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def _unavailable(dataset, missing, folders, reason):
    names = ", ".join(f.name for f in missing)
    lines = [
        f"{dataset.title} files not found: {names}.",
        reason,
        "Searched (each file may be gzip-compressed, named with .gz, or raw):",
        *(f"  {folder}" for folder in folders),
        f"To use your own copies, put them into {folders[0]} (or pass data_home=DIR, or set "
        f"FASTLSTM_DATA=DIR, to use DIR/{dataset.subdir}).",
    ]
    if dataset.mirrors:
        example = missing[0].name + ".gz"
        lines.append(f"Download them (as {example} etc.) from any of: {', '.join(dataset.mirrors)}")
    if dataset.offline_hint:
        lines.append(dataset.offline_hint)
    return DatasetUnavailable("\n".join(lines))


def _load(dataset, data_home, download, return_X_y):
    folders = _search_folders(dataset, data_home)
    paths = {f.name: _find(f, folders) for f in dataset.files}
    missing = [f for f in dataset.files if paths[f.name] is None]
    if missing and not _download_enabled(download):
        reason = (
            "Downloading is off (download=False)."
            if download is not None
            else "Downloading is off: the environment variable FASTLSTM_OFFLINE is set."
        )
        raise _unavailable(dataset, missing, folders, reason)
    for position, idx_file in enumerate(missing):
        try:
            paths[idx_file.name] = _download(idx_file, folders[0], dataset.mirrors)
        except DatasetUnavailable as exc:
            # Every mirror failed for this file; the rest would most likely fail the same way.
            raise _unavailable(
                dataset,
                missing[position:],
                folders,
                f"Downloading {idx_file.name} failed:\n{exc}",
            ) from exc
    arrays = {}
    for idx_file in dataset.files:
        try:
            arrays[idx_file.name] = _read_idx(paths[idx_file.name], idx_file)
        except ValueError as exc:
            raise ValueError(
                f"{exc}\nThe file is damaged or holds other data: delete it (missing files are "
                "downloaded again) or replace it with the official file."
            ) from exc
    return _bunch_or_tuple(
        return_X_y,
        X_train=arrays[dataset.train_images.name],
        y_train=arrays[dataset.train_labels.name].astype(np.int64),
        X_test=arrays[dataset.test_images.name],
        y_test=arrays[dataset.test_labels.name].astype(np.int64),
    )


_LOADER_DOC = """Load {title}: 60,000 training and 10,000 test images of 28 x 28 pixels.

    {credit}

    Files are looked up in ``data_home/{subdir}``, ``$FASTLSTM_DATA/{subdir}`` and the user
    cache (``$XDG_CACHE_HOME/fastlstm/{subdir}``, by default ``~/.cache/fastlstm/{subdir}`` on
    Linux){system}, in that order; missing ones are downloaded into the first of these folders.
    Every file must match the published SHA-256 of its decompressed bytes.

    Parameters
    ----------
    data_home : path-like, optional
        A folder holding a ``{subdir}`` folder with the four IDX files (gzip or raw).
    download : bool, optional
        Whether to download missing files. By default they are downloaded unless the environment
        variable ``FASTLSTM_OFFLINE`` is set to a non-empty value other than ``"0"``.
        ``download=False`` never touches the network.
    return_X_y : bool, default=False
        If True, return the tuple ``(X_train, y_train, X_test, y_test)`` instead of a Bunch.

    Returns
    -------
    data : Bunch
        Dictionary-like object with the attributes (and keys) below. It cannot be iterated or
        unpacked: ``X_train, y_train, X_test, y_test = {name}()`` raises a ``TypeError``
        (use ``return_X_y=True`` for that).

        X_train : ndarray of uint8, shape (60000, 28, 28)
            The training images, one row of 28 pixels per time step.
        y_train : ndarray of int64, shape (60000,)
            Their labels, 0 to 9.
        X_test : ndarray of uint8, shape (10000, 28, 28)
            The test images.
        y_test : ndarray of int64, shape (10000,)
            Their labels, 0 to 9.

    (X_train, y_train, X_test, y_test) : tuple of ndarray if ``return_X_y`` is True
        The same four arrays, in this order.

    Raises
    ------
    DatasetUnavailable
        If files are missing and cannot be downloaded; the message names them, the folders
        searched and where to put them.
    ValueError
        If a file found is damaged or does not hold the published data.
    """


def load_mnist(data_home=None, *, download=None, return_X_y=False):
    return _load(_MNIST, data_home, download, return_X_y)


def load_fashion_mnist(data_home=None, *, download=None, return_X_y=False):
    return _load(_FASHION_MNIST, data_home, download, return_X_y)


load_mnist.__doc__ = _LOADER_DOC.format(
    title="MNIST",
    name="load_mnist",
    credit="Handwritten digits by Y. LeCun, C. Cortes and C. J. C. Burges (CC BY-SA 3.0).",
    subdir=_MNIST.subdir,
    system="",
)
load_fashion_mnist.__doc__ = _LOADER_DOC.format(
    title="Fashion-MNIST",
    name="load_fashion_mnist",
    credit="Images of clothing by Zalando Research (MIT licence).",
    subdir=_FASHION_MNIST.subdir,
    system=", then Debian's ``/usr/share/datasets/fashion-mnist``",
)


def load_mnist_sample(*, return_X_y=False):
    """Load the MNIST test set bundled with fastlstm: 10,000 images, no download needed.

    The official MNIST test set (Y. LeCun, C. Cortes, C. J. C. Burges; CC BY-SA 3.0), shipped
    inside the package for offline use. Its digits come from other writers than MNIST's
    training set; split it yourself (e.g. 8,000 / 2,000) to train and test on it.

    Parameters
    ----------
    return_X_y : bool, default=False
        If True, return the tuple ``(X, y)`` instead of a Bunch.

    Returns
    -------
    data : Bunch
        Dictionary-like object with the attributes (and keys) below. It cannot be iterated or
        unpacked: ``X, y = load_mnist_sample()`` raises a ``TypeError`` (use
        ``return_X_y=True`` for that).

        X : ndarray of uint8, shape (10000, 28, 28)
            The images, one row of 28 pixels per time step.
        y : ndarray of int64, shape (10000,)
            Their labels, 0 to 9.

    (X, y) : tuple of ndarray if ``return_X_y`` is True
        The same two arrays, in this order.

    Examples
    --------
    >>> from fastlstm.datasets import load_mnist_sample
    >>> data = load_mnist_sample()
    >>> data.X.shape, data.y.shape
    ((10000, 28, 28), (10000,))
    >>> X, y = load_mnist_sample(return_X_y=True)
    """
    package_data = resources.files("fastlstm") / "data"
    arrays = []
    for idx_file in (_MNIST.test_images, _MNIST.test_labels):
        with resources.as_file(package_data / (idx_file.name + ".gz")) as path:
            arrays.append(_read_idx(path, idx_file))
    return _bunch_or_tuple(return_X_y, X=arrays[0], y=arrays[1].astype(np.int64))
