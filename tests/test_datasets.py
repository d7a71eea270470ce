"""fastlstm.datasets: the IDX reader, lookup order, verified downloads, the bundled sample.

Downloads are exercised against HTTP servers on 127.0.0.1 that serve small generated IDX files;
every test runs behind a guard that fails it if anything tries to reach another address.
"""

import copy
import dataclasses
import gzip
import hashlib
import http.server
import inspect
import pickle
import socket
import socketserver
import struct
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.utils import Bunch

from fastlstm import datasets
from fastlstm.datasets import (
    DatasetUnavailable,
    load_fashion_mnist,
    load_mnist,
    load_mnist_sample,
)

LOOPBACK = "127.0.0.1"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"the real datasets are not at {SHARED_DATA} (../shared/data from the repository root)",
)
IDX_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array):
    """``array`` encoded as an IDX file (big-endian, as the format prescribes)."""
    array = np.asarray(array)
    code = IDX_CODES[array.dtype.kind + str(array.dtype.itemsize)]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, data, compress):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


# ---------------------------------------------------------------------------------------------
# Isolation: no real network, no real cache, no real system folders
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def network_guard(monkeypatch):
    """Record every outgoing connection; refuse and fail the test for any but 127.0.0.1."""
    connections, violations = [], []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(sock, address):
        connections.append(address)
        if not (isinstance(address, tuple) and address[0] == LOOPBACK):
            violations.append(address)
            raise ConnectionRefusedError(f"test guard: connection to {address!r} blocked")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host != LOOPBACK:
            violations.append(host)
            raise socket.gaierror(f"test guard: name lookup of {host!r} blocked")
        return real_getaddrinfo(host, *args, **kwargs)

    def reverse_lookup(*args, **kwargs):
        violations.append(args)
        raise socket.herror("test guard: reverse name lookup blocked")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "gethostbyaddr", reverse_lookup)
    yield connections
    assert not violations, f"the test tried to reach beyond {LOOPBACK}: {violations}"


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path):
    """A private cache folder and Debian folder; no proxies, data or offline settings."""
    for name in ("FASTLSTM_DATA", "FASTLSTM_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    system = dataclasses.replace(datasets._FASHION_MNIST, system_dirs=(str(tmp_path / "debian"),))
    monkeypatch.setattr(datasets, "_FASHION_MNIST", system)
    return SimpleNamespace(
        cache=tmp_path / "cache" / "fastlstm",
        debian=tmp_path / "debian",
        root=tmp_path,
    )


# ---------------------------------------------------------------------------------------------
# Local mirrors
# ---------------------------------------------------------------------------------------------


class _LoopbackServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        # HTTPServer.server_bind asks for the host's full name: a reverse DNS lookup.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


@pytest.fixture
def mirror():
    """An HTTP server on 127.0.0.1: ``routes`` maps a path to bytes or to a handler function."""
    routes, requests = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            action = routes.get(self.path)
            if action is None:
                self.send_error(404)
            elif callable(action):
                action(self)
            else:
                send(self, action)

        def log_message(self, *args):
            pass

    server = _LoopbackServer((LOOPBACK, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    url = f"http://{LOOPBACK}:{server.server_port}"
    yield SimpleNamespace(url=url, routes=routes, requests=requests)
    server.shutdown()
    server.server_close()
    thread.join()


def send(handler, body, content_length=None):
    handler.send_response(200)
    length = len(body) if content_length is None else content_length
    handler.send_header("Content-Length", str(length))
    handler.end_headers()
    handler.wfile.write(body)


def closed_port_url():
    """The URL of a port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    return f"http://{LOOPBACK}:{port}/mnist/"


@pytest.fixture
def fake_mnist(monkeypatch, mirror):
    """A small generated stand-in for MNIST, served by ``mirror`` under /mnist/.

    The module's MNIST description is patched to these files' shapes and SHA-256s.
    """
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 5, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8),
    }
    raw = {name: idx_bytes(a) for name, a in arrays.items()}
    specs = {
        name: datasets._IdxFile(name, arrays[name].shape, hashlib.sha256(raw[name]).hexdigest())
        for name in arrays
    }
    url = mirror.url + "/mnist/"
    dataset = dataclasses.replace(
        datasets._MNIST,
        mirrors=(url,),
        train_images=specs["train-images-idx3-ubyte"],
        train_labels=specs["train-labels-idx1-ubyte"],
        test_images=specs["t10k-images-idx3-ubyte"],
        test_labels=specs["t10k-labels-idx1-ubyte"],
    )
    monkeypatch.setattr(datasets, "_MNIST", dataset)
    for name, data in raw.items():
        mirror.routes[f"/mnist/{name}.gz"] = gzip.compress(data)

    def use_mirrors(*mirrors):
        monkeypatch.setattr(datasets, "_MNIST", dataclasses.replace(dataset, mirrors=mirrors))

    return SimpleNamespace(arrays=arrays, raw=raw, url=url, use_mirrors=use_mirrors)


def assert_is_fake(bunch, fake):
    np.testing.assert_array_equal(bunch.X_train, fake.arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(bunch.y_train, fake.arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(bunch.X_test, fake.arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(bunch.y_test, fake.arrays["t10k-labels-idx1-ubyte"])
    assert bunch.X_train.dtype == np.uint8 and bunch.y_train.dtype == np.int64


def place(fake, folder, compress=True):
    for name, data in fake.raw.items():
        write(folder / (name + ".gz" if compress else name), data, compress)


# ---------------------------------------------------------------------------------------------
# IDX reader
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5)])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_reader_round_trip(tmp_path, dtype, shape, compress):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    path = write(tmp_path / "a.idx", idx_bytes(array), compress)
    read = datasets._read_idx(path)
    np.testing.assert_array_equal(read, array)
    assert read.dtype == np.dtype(dtype).newbyteorder("=")
    assert read.flags.writeable


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
MALFORMED = {
    "empty": (b"", "is not an IDX file"),
    "bad magic": (b"\x01\x02" + GOOD[2:], "is not an IDX file"),
    "unknown type code": (GOOD[:2] + b"\x07" + GOOD[3:], "unknown IDX type code 0x07"),
    "zero dimensions": (GOOD[:3] + b"\x00", "zero dimensions"),
    "truncated header": (GOOD[:10], "is truncated: its header declares 3 dimensions"),
    "truncated data": (GOOD[:-1], r"is truncated: its header promises a \(2, 3, 4\) array"),
    "trailing bytes": (GOOD + b"\x00", "has trailing bytes"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_reader_rejects_malformed_files(tmp_path, case, compress):
    data, message = MALFORMED[case]
    path = write(tmp_path / "bad.idx", data, compress)
    with pytest.raises(ValueError, match=message) as info:
        datasets._read_idx(path)
    assert str(path) in str(info.value)


def test_reader_rejects_truncated_gzip(tmp_path):
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(gzip.compress(GOOD)[:-12])
    with pytest.raises(ValueError, match="damaged or truncated gzip"):
        datasets._read_idx(path)


def expected_file(shape=(2, 28, 28), data=None):
    data = idx_bytes(np.zeros(shape, np.uint8)) if data is None else data
    return datasets._IdxFile("t10k-images-idx3-ubyte", shape, hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((2, 28, 27), np.uint8),
        np.zeros((2, 784), np.uint8),
        np.zeros((2, 28, 28), np.float32),
    ],
    ids=["wrong width", "wrong rank", "wrong dtype"],
)
def test_reader_rejects_wrong_dimensions_and_dtype(tmp_path, array):
    path = write(tmp_path / "x.gz", idx_bytes(array), compress=True)
    with pytest.raises(ValueError, match=r"must hold a \(2, 28, 28\) array of uint8"):
        datasets._read_idx(path, expected_file())


def test_reader_rejects_wrong_content(tmp_path):
    path = write(tmp_path / "x", idx_bytes(np.ones((2, 28, 28), np.uint8)), compress=False)
    with pytest.raises(ValueError, match="is not the published t10k-images-idx3-ubyte: the SHA"):
        datasets._read_idx(path, expected_file())


# ---------------------------------------------------------------------------------------------
# The real files
# ---------------------------------------------------------------------------------------------

REAL_FILES = [
    (dataset, idx_file)
    for dataset in (datasets._MNIST, datasets._FASHION_MNIST)
    for idx_file in dataset.files
]


@needs_shared_data
@pytest.mark.parametrize(
    "dataset, idx_file", REAL_FILES, ids=[f"{d.subdir}/{f.name}" for d, f in REAL_FILES]
)
def test_real_files_match_their_published_sha256_and_shape(dataset, idx_file):
    path = SHARED_DATA / dataset.subdir / (idx_file.name + ".gz")
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")
    digest = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
    assert digest == idx_file.sha256
    array = datasets._read_idx(path, idx_file)
    assert array.shape == idx_file.shape and array.dtype == np.uint8


@needs_shared_data
def test_load_fashion_mnist_from_data_home():
    data = load_fashion_mnist(SHARED_DATA, download=False)
    assert data.X_train.shape == (60000, 28, 28) and data.X_test.shape == (10000, 28, 28)
    assert data.X_train.dtype == data.X_test.dtype == np.uint8
    assert data.y_train.dtype == data.y_test.dtype == np.int64
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    np.testing.assert_array_equal(np.bincount(data.y_train), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(data.y_test), np.full(10, 1000))


@needs_shared_data
def test_load_mnist_from_data_home_names_exactly_the_missing_files():
    folder = SHARED_DATA / "mnist"
    missing = [f.name for f in datasets._MNIST.files if not _present(folder, f.name)]
    if not missing:
        data = load_mnist(SHARED_DATA, download=False)
        assert data.X_train.shape == (60000, 28, 28) and data.y_test.shape == (10000,)
        return
    with pytest.raises(DatasetUnavailable) as info:
        load_mnist(SHARED_DATA, download=False)
    message = str(info.value)
    assert f"MNIST files not found: {', '.join(missing)}." in message
    assert str(folder) in message and "load_mnist_sample()" in message


def _present(folder, name):
    return (folder / name).exists() or (folder / (name + ".gz")).exists()


def test_bundled_sample_is_the_mnist_test_set():
    sample = load_mnist_sample()
    assert sample.X.shape == (10000, 28, 28) and sample.X.dtype == np.uint8
    assert sample.y.shape == (10000,) and sample.y.dtype == np.int64
    assert set(np.unique(sample.y)) == set(range(10))


@needs_shared_data
def test_bundled_sample_equals_the_shared_copy():
    sample = load_mnist_sample()
    folder = SHARED_DATA / "mnist"
    for array, idx_file in ((sample.X, datasets._MNIST.test_images),
                            (sample.y, datasets._MNIST.test_labels)):
        shared = datasets._read_idx(folder / (idx_file.name + ".gz"), idx_file)
        np.testing.assert_array_equal(array, shared)


# ---------------------------------------------------------------------------------------------
# Lookup order
# ---------------------------------------------------------------------------------------------


def test_search_order(monkeypatch, isolated_environment):
    env = isolated_environment.root / "env"
    home = isolated_environment.root / "home"
    monkeypatch.setenv("FASTLSTM_DATA", str(env))
    assert datasets._search_folders(datasets._MNIST, home) == [
        home / "mnist",
        env / "mnist",
        isolated_environment.cache / "mnist",
    ]
    assert datasets._search_folders(datasets._FASHION_MNIST, None) == [
        env / "fashion-mnist",
        isolated_environment.cache / "fashion-mnist",
        isolated_environment.debian,
    ]


@pytest.mark.parametrize("where", ["data_home", "FASTLSTM_DATA", "cache"])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_loads_from_each_location(monkeypatch, isolated_environment, fake_mnist, where, compress):
    root = isolated_environment.root
    monkeypatch.setenv("FASTLSTM_DATA", str(root / "env"))
    folder = {
        "data_home": root / "home",
        "FASTLSTM_DATA": root / "env",
        "cache": isolated_environment.cache,
    }[where]
    place(fake_mnist, folder / "mnist", compress)
    assert_is_fake(load_mnist(root / "home", download=False), fake_mnist)


def test_fashion_mnist_is_found_in_the_debian_folder(monkeypatch, isolated_environment, fake_mnist):
    fashion = dataclasses.replace(datasets._MNIST, title="Fashion-MNIST", subdir="fashion-mnist",
                                  system_dirs=(str(isolated_environment.debian),))
    monkeypatch.setattr(datasets, "_FASHION_MNIST", fashion)
    place(fake_mnist, isolated_environment.debian)
    assert_is_fake(load_fashion_mnist(download=False), fake_mnist)


@pytest.mark.parametrize("first, second", [("home", "env"), ("env", "cache")])
def test_earlier_location_wins(monkeypatch, isolated_environment, fake_mnist, first, second):
    """A damaged file in an earlier folder is reported, not skipped for a good one further on."""
    root = isolated_environment.root
    folders = {"home": root / "home", "env": root / "env", "cache": isolated_environment.cache}
    monkeypatch.setenv("FASTLSTM_DATA", str(folders["env"]))
    place(fake_mnist, folders[second] / "mnist")
    damaged = write(folders[first] / "mnist" / "t10k-labels-idx1-ubyte", b"\x00\x00\x08\x01", False)
    with pytest.raises(ValueError, match="delete it") as info:
        load_mnist(folders["home"] if first == "home" else None, download=False)
    assert str(damaged) in str(info.value)


# ---------------------------------------------------------------------------------------------
# Return forms: a Bunch by default, a tuple with return_X_y=True (scikit-learn's convention)
# ---------------------------------------------------------------------------------------------

TRAIN_TEST_KEYS = ["X_train", "y_train", "X_test", "y_test"]


@pytest.fixture(params=["load_mnist", "load_fashion_mnist"])
def fake_loader(request, monkeypatch, isolated_environment, fake_mnist):
    """Each train/test loader, reading the fake files from data_home without downloading."""
    if request.param == "load_fashion_mnist":
        fashion = dataclasses.replace(datasets._MNIST, title="Fashion-MNIST",
                                      subdir="fashion-mnist", mirrors=(), system_dirs=())
        monkeypatch.setattr(datasets, "_FASHION_MNIST", fashion)
    home = isolated_environment.root / "home"
    place(fake_mnist, home / ("mnist" if request.param == "load_mnist" else "fashion-mnist"))
    loader = getattr(datasets, request.param)
    return lambda **kwargs: loader(home, download=False, **kwargs)


@pytest.mark.parametrize("loader", [load_mnist, load_fashion_mnist, load_mnist_sample])
def test_return_X_y_is_keyword_only_and_off_by_default(loader):
    parameter = inspect.signature(loader).parameters["return_X_y"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is False


def test_train_test_loaders_return_a_bunch_by_default(fake_loader, fake_mnist):
    data = fake_loader()
    assert isinstance(data, Bunch) and list(data.keys()) == TRAIN_TEST_KEYS
    assert_is_fake(data, fake_mnist)
    assert all(data[key] is getattr(data, key) for key in TRAIN_TEST_KEYS)


def test_train_test_loaders_return_a_tuple_with_return_X_y(fake_loader, fake_mnist):
    result = fake_loader(return_X_y=True)
    assert type(result) is tuple and len(result) == 4
    X_train, y_train, X_test, y_test = result
    assert_is_fake(SimpleNamespace(X_train=X_train, y_train=y_train,
                                   X_test=X_test, y_test=y_test), fake_mnist)
    assert y_test.dtype == np.int64 and X_test.dtype == np.uint8


def test_sample_returns_a_bunch_by_default_and_X_y_with_return_X_y():
    data = load_mnist_sample()
    assert isinstance(data, Bunch) and list(data.keys()) == ["X", "y"]
    result = load_mnist_sample(return_X_y=True)
    assert type(result) is tuple and len(result) == 2
    X, y = result
    np.testing.assert_array_equal(X, data.X)
    np.testing.assert_array_equal(y, data.y)
    assert X.shape == (10000, 28, 28) and X.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64


def test_unpacking_the_sample_bunch_by_mistake_says_what_to_do():
    data = load_mnist_sample()
    with pytest.raises(TypeError, match=r"return_X_y=True.*\(\.X, \.y\)"):
        X, y = data
    with pytest.raises(TypeError, match="return_X_y=True"):
        list(data)


def test_unpacking_a_train_test_bunch_by_mistake_says_what_to_do(fake_loader):
    data = fake_loader()
    with pytest.raises(TypeError, match=r"return_X_y=True.*\.X_train, \.y_train, \.X_test"):
        X_train, y_train, X_test, y_test = data
    with pytest.raises(TypeError, match="return_X_y=True"):
        for _ in data:
            pass


def test_the_bunch_keeps_the_rest_of_dict_and_bunch_behaviour():
    data = load_mnist_sample()
    assert len(data) == 2 and "X" in data and "X_train" not in data
    assert list(data.keys()) == ["X", "y"] and [k for k, _ in data.items()] == ["X", "y"]
    assert [v is data.X for v in data.values()] == [True, False]
    plain = dict(data)
    assert type(plain) is dict and list(plain) == ["X", "y"] and plain["X"] is data.X
    assert sorted({**data}) == ["X", "y"]
    assert (lambda **kwargs: sorted(kwargs))(**data) == ["X", "y"]
    merged = {}
    merged.update(data)
    assert merged.keys() == data.keys()
    assert data == plain and sorted(dir(data)) == ["X", "y"]
    data.extra = 1  # attributes are keys, as in Bunch
    assert data["extra"] == 1
    del data["extra"]
    with pytest.raises(AttributeError):
        data.missing


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_the_bunch_pickles_and_copies_with_its_guard(protocol):
    data = load_mnist_sample()
    for clone in (pickle.loads(pickle.dumps(data, protocol)), copy.deepcopy(data),
                  copy.copy(data)):
        assert type(clone) is type(data) and list(clone.keys()) == ["X", "y"]
        np.testing.assert_array_equal(clone.X, data.X)
        np.testing.assert_array_equal(clone.y, data.y)
        with pytest.raises(TypeError, match="return_X_y=True"):
            X, y = clone


# ---------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offline_setting", [None, "0", ""])
def test_download_caches_verified_files(monkeypatch, isolated_environment, mirror, fake_mnist,
                                        offline_setting):
    if offline_setting is not None:
        monkeypatch.setenv("FASTLSTM_OFFLINE", offline_setting)
    assert_is_fake(load_mnist(), fake_mnist)
    folder = isolated_environment.cache / "mnist"
    expected = sorted(name + ".gz" for name in fake_mnist.raw)
    assert sorted(p.name for p in folder.iterdir()) == expected
    assert len(mirror.requests) == 4
    mirror.routes.clear()
    assert_is_fake(load_mnist(download=False), fake_mnist)
    assert len(mirror.requests) == 4


def test_download_goes_to_the_first_search_folder(monkeypatch, isolated_environment, fake_mnist):
    root = isolated_environment.root
    monkeypatch.setenv("FASTLSTM_DATA", str(root / "env"))
    assert_is_fake(load_mnist(root / "home", download=True), fake_mnist)
    assert len(list((root / "home" / "mnist").iterdir())) == 4
    assert not (root / "env").exists() and not isolated_environment.cache.exists()


def test_download_only_fetches_missing_files(isolated_environment, mirror, fake_mnist):
    folder = isolated_environment.cache / "mnist"
    name = "t10k-labels-idx1-ubyte"
    write(folder / name, fake_mnist.raw[name], compress=False)
    assert_is_fake(load_mnist(), fake_mnist)
    assert f"/mnist/{name}.gz" not in mirror.requests and len(mirror.requests) == 3


def _cut_transfer(body):
    """A response that promises ``body`` but the connection drops halfway."""
    return lambda handler: send(handler, body[: len(body) // 2], content_length=len(body))


def _gzip_idx_of_ones(shape):
    return lambda raw: gzip.compress(idx_bytes(np.ones(shape, np.uint8)))


BAD_DOWNLOADS = {
    "other content": (_gzip_idx_of_ones((5, 28, 28)), "SHA-256"),
    "wrong shape": (_gzip_idx_of_ones((5, 28, 27)), "must hold"),
    "cut transfer": (lambda raw: _cut_transfer(gzip.compress(raw)), "the transfer was cut"),
    "truncated gzip": (lambda raw: gzip.compress(raw)[:-12], "truncated gzip"),
    "html page": (lambda raw: b"<html>Please log in</html>", "is not an IDX file"),
    "oversized": (lambda raw: b"\x00" * (len(raw) + (1 << 20) + 1), "more than"),
}


@pytest.mark.parametrize("case", BAD_DOWNLOADS, ids=list(BAD_DOWNLOADS))
def test_bad_download_leaves_no_file(isolated_environment, mirror, fake_mnist, case):
    make_body, reason = BAD_DOWNLOADS[case]
    name = "train-images-idx3-ubyte"
    mirror.routes[f"/mnist/{name}.gz"] = make_body(fake_mnist.raw[name])
    with pytest.raises(DatasetUnavailable, match=reason) as info:
        load_mnist()
    message = str(info.value)
    assert f"Downloading {name} failed" in message and fake_mnist.url + name + ".gz" in message
    folder = isolated_environment.cache / "mnist"
    assert list(folder.iterdir()) == []  # not even a temporary file
    assert mirror.requests == [f"/mnist/{name}.gz"]  # the other files are not attempted


def test_server_gone_names_the_files_and_where_to_put_them(isolated_environment, fake_mnist):
    fake_mnist.use_mirrors(closed_port_url())
    with pytest.raises(DatasetUnavailable, match="Connection refused") as info:
        load_mnist()
    message = str(info.value)
    assert "MNIST files not found: " + ", ".join(fake_mnist.raw) + "." in message
    assert f"put them into {isolated_environment.cache / 'mnist'}" in message


def test_unresponsive_server_times_out(monkeypatch, isolated_environment, fake_mnist):
    monkeypatch.setattr(datasets, "DOWNLOAD_TIMEOUT", 0.2)
    with socket.socket() as listener:  # accepts connections (backlog), never answers
        listener.bind((LOOPBACK, 0))
        listener.listen()
        fake_mnist.use_mirrors(f"http://{LOOPBACK}:{listener.getsockname()[1]}/mnist/")
        with pytest.raises(DatasetUnavailable, match="timed out"):
            load_mnist()
    assert list((isolated_environment.cache / "mnist").iterdir()) == []


def test_next_mirror_is_tried_when_one_fails(mirror, fake_mnist):
    fake_mnist.use_mirrors(closed_port_url(), mirror.url + "/missing/", fake_mnist.url)
    assert_is_fake(load_mnist(), fake_mnist)
    assert mirror.requests.count("/missing/train-images-idx3-ubyte.gz") == 1
    assert len(mirror.requests) == 8  # each file: a 404, then the good copy


@pytest.mark.parametrize("how", ["FASTLSTM_OFFLINE=1", "download=False"])
def test_offline_never_opens_a_socket(monkeypatch, network_guard, mirror, fake_mnist, how):
    if how == "FASTLSTM_OFFLINE=1":
        monkeypatch.setenv("FASTLSTM_OFFLINE", "1")
        call, reason = load_mnist, "FASTLSTM_OFFLINE is set"
    else:
        call, reason = (lambda: load_mnist(download=False)), r"download=False"
    with pytest.raises(DatasetUnavailable, match=reason) as info:
        call()
    assert "train-images-idx3-ubyte" in str(info.value)
    assert network_guard == [] and mirror.requests == []


def test_explicit_download_overrides_offline_setting(monkeypatch, fake_mnist):
    monkeypatch.setenv("FASTLSTM_OFFLINE", "1")
    assert_is_fake(load_mnist(download=True), fake_mnist)


def test_leftover_partial_download_is_never_loaded(isolated_environment, mirror, fake_mnist):
    """What a killed download leaves (a hidden temporary file) is not taken for the file."""
    folder = isolated_environment.cache / "mnist"
    for name, data in fake_mnist.raw.items():
        write(folder / f".{name}.gz.x1y2z3.part", data, compress=True)
    with pytest.raises(DatasetUnavailable, match="download=False"):
        load_mnist(download=False)
