"""Tests for common/data.py against the real Fashion-MNIST sample (never copied into the repo)."""
import contextlib
import gzip
import hashlib
import http.server
import os
import re
import shutil
import socket
import struct
import threading
import urllib.request

import numpy as np
import pytest

from common import data
from common.data import DataError

ALL = data.TRAIN_FILES + data.TEST_FILES
COUNTS = {"train": 3615, "test": 4443}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test touches the real cache, a user's FASHION_MNIST_DIR or a proxy."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


@pytest.fixture(scope="session")
def raw(sample_dir):
    """Decompressed bytes of each sample file, read with gzip independently of the loader."""
    return {n: gzip.decompress((sample_dir / n).read_bytes()) for n in ALL}


@pytest.fixture(scope="session")
def sample_md5(sample_dir):
    return {n: hashlib.md5((sample_dir / n).read_bytes()).hexdigest() for n in ALL}


def copy_sample(sample_dir, dest):
    dest.mkdir(parents=True, exist_ok=True)
    for n in ALL:
        shutil.copyfile(sample_dir / n, dest / n)
    return dest


@pytest.fixture
def serve():
    """serve(directory) -> base URL of an HTTP server on 127.0.0.1; all are shut down after."""
    servers, requests = [], []

    def start(directory):
        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(directory), **kw)

            def log_message(self, *a):
                requests.append(self.path)

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
        t.start()
        servers.append((srv, t))
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    start.requests = requests
    yield start
    for srv, t in servers:
        srv.shutdown()
        srv.server_close()
        t.join(5)


@pytest.fixture
def closed_url():
    """A URL on a port that nothing listens on (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# ---------------------------------------------------------------- loading the real sample

@pytest.mark.parametrize("split,prefix", [("train", "train"), ("test", "t10k")])
def test_load_sample(sample_dir, raw, split, prefix):
    x, y = data.load(split, sample_dir, download=False)
    n = COUNTS[split]
    assert x.shape == (n, 28, 28) and x.dtype == np.uint8
    assert y.shape == (n,) and y.dtype == np.int64
    assert y.min() >= 0 and y.max() <= 9 and set(np.unique(y)) == set(range(10))
    img, lab = raw[f"{prefix}-images-idx3-ubyte.gz"], raw[f"{prefix}-labels-idx1-ubyte.gz"]
    assert struct.unpack(">IIII", img[:16]) == (0x803, n, 28, 28)
    assert x[0].tobytes() == img[16:16 + 784] and x[-1].tobytes() == img[-784:]
    assert y[:50].tolist() == list(lab[8:58]) and y[-1] == lab[-1]


def test_known_first_train_labels(sample_dir):
    # First ten labels of the official train file: ankle boot, T-shirt, T-shirt, dress, ...
    _, y = data.load("train", sample_dir, download=False)
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def test_limit(sample_dir):
    x, y = data.load("test", sample_dir, download=False)
    xl, yl = data.load("test", sample_dir, limit=100, download=False)
    assert xl.shape == (100, 28, 28) and yl.shape == (100,)
    np.testing.assert_array_equal(xl, x[:100])
    np.testing.assert_array_equal(yl, y[:100])
    for bad in (0, -1, 1.5, "3", True):
        with pytest.raises(ValueError, match="limit"):
            data.load("test", sample_dir, limit=bad, download=False)
    with pytest.raises(ValueError, match="split"):
        data.load("valid", sample_dir, download=False)


def test_uncompressed_and_misnamed_raw(sample_dir, raw, tmp_path):
    plain, misnamed = tmp_path / "plain", tmp_path / "misnamed"
    plain.mkdir(), misnamed.mkdir()
    for n in ALL:
        (plain / n[:-3]).write_bytes(raw[n])
        (misnamed / n).write_bytes(raw[n])  # raw IDX under a .gz name: detected by magic bytes
    assert data.find_data_dir(plain, download=False) == plain
    ref = data.load("train", sample_dir, download=False)
    for d in (plain, misnamed):
        x, y = data.load("train", d, download=False)
        np.testing.assert_array_equal(x, ref[0])
        np.testing.assert_array_equal(y, ref[1])


# ---------------------------------------------------------------- corruption

LABELS = "train-labels-idx1-ubyte.gz"
IMAGES = "train-images-idx3-ubyte.gz"


def corrupt_dir(sample_dir, tmp_path, name, content):
    d = copy_sample(sample_dir, tmp_path / "bad")
    (d / name).write_bytes(content)
    return d, d / name


@pytest.mark.parametrize("magic", [b"\x00\x00\x08\x02", b"\x00\x00\x0d\x01", b"\x12\x34\x08\x01",
                                   b"\x00\x00\x08\x03"])
def test_wrong_magic(sample_dir, raw, tmp_path, magic):
    d, p = corrupt_dir(sample_dir, tmp_path, LABELS, gzip.compress(magic + raw[LABELS][4:]))
    with pytest.raises(DataError, match=re.escape(str(p))):
        data.load("train", d, download=False)


@pytest.mark.parametrize("compress", [lambda b: gzip.compress(b, 1), lambda b: b])
@pytest.mark.parametrize("change,word", [(-100, "truncated"), (+5, "trailing")])
def test_truncated_or_trailing(sample_dir, raw, tmp_path, compress, change, word):
    body = raw[IMAGES][:change] if change < 0 else raw[IMAGES] + b"\x00" * change
    d, p = corrupt_dir(sample_dir, tmp_path, IMAGES, compress(body))
    n = len(raw[IMAGES])
    with pytest.raises(DataError, match=re.escape(str(p))) as e:
        data.load("train", d, download=False)
    assert word in str(e.value) and str(n) in str(e.value) and str(n + change) in str(e.value)


def test_corrupt_gzip(sample_dir, tmp_path):
    good = (sample_dir / IMAGES).read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    variants = {"flip": bytes(flipped), "cut": good[: len(good) // 2], "crc": good[:-8] + b"\0" * 8,
                "junk": b"\x1f\x8b" + b"not really gzip"}
    for tag, content in variants.items():
        p = tmp_path / f"{tag}-{IMAGES}"
        p.write_bytes(content)
        with pytest.raises(DataError, match=re.escape(str(p))):
            data.read_idx(p)


def test_count_mismatch(sample_dir, raw, tmp_path):
    n = COUNTS["train"]
    short = struct.pack(">II", 0x801, n - 1) + raw[LABELS][8:-1]
    d, p = corrupt_dir(sample_dir, tmp_path, LABELS, gzip.compress(short))
    with pytest.raises(DataError, match=re.escape(str(p))) as e:
        data.load("train", d, download=False)
    msg = str(e.value)
    assert str(d / IMAGES) in msg and f"{n} images" in msg and f"{n - 1} labels" in msg


def test_bad_labels_and_shapes(sample_dir, raw, tmp_path):
    d, p = corrupt_dir(sample_dir, tmp_path, LABELS, raw[LABELS][:-1] + b"\x0a")
    with pytest.raises(DataError, match=re.escape(str(p)) + ".*outside 0..9"):
        data.load("train", d, download=False)
    small = struct.pack(">IIII", 0x803, 2, 4, 4) + bytes(32)
    d, p = corrupt_dir(sample_dir, tmp_path, IMAGES, small)
    with pytest.raises(DataError, match=re.escape(str(p)) + ".*28"):
        data.load("train", d, download=False)
    d, p = corrupt_dir(sample_dir, tmp_path, IMAGES, raw[LABELS])  # labels where images belong
    with pytest.raises(DataError, match=re.escape(str(p))):
        data.load("train", d, download=False)


def test_missing_file(sample_dir, tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope.gz"))):
        data.read_idx(tmp_path / "nope.gz")
    d = copy_sample(sample_dir, tmp_path / "partial")
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz") as e:
        data.load("test", d, download=False)
    assert str(d) in str(e.value) and "FASHION_MNIST_DIR" in str(e.value)


# ---------------------------------------------------------------- search order

def test_search_order(sample_dir, tmp_path, monkeypatch):
    explicit, env, empty = tmp_path / "explicit", tmp_path / "env", tmp_path / "empty"
    cache = data.cache_dir()
    assert cache == tmp_path / "xdg" / "bn-compare" / "fashion-mnist"
    for d in (explicit, env, cache):
        copy_sample(sample_dir, d)
    empty.mkdir()
    monkeypatch.setenv("FASHION_MNIST_DIR", str(env))
    assert data.find_data_dir(explicit, download=False) == explicit
    assert data.find_data_dir(None, download=False) == env
    assert data.find_data_dir(empty, download=False) == env  # incomplete dir falls through
    monkeypatch.delenv("FASHION_MNIST_DIR")
    assert data.find_data_dir(None, download=False) == cache
    assert data.find_data_dir(empty, download=False) == cache


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "bn-compare" / "fashion-mnist"


def test_not_found_no_download(tmp_path, serve, sample_dir, sample_md5):
    url = serve(copy_sample(sample_dir, tmp_path / "srv"))
    with pytest.raises(DataError) as e:
        data.find_data_dir(tmp_path / "none", download=False, mirrors=(url,), md5=sample_md5)
    msg = str(e.value)
    for needle in ("FASHION_MNIST_DIR", "--data DIR", str(tmp_path / "none"), str(data.cache_dir()),
                   data.MIRRORS[0], "download disabled"):
        assert needle in msg
    assert serve.requests == []  # download=False never touches the network


# ---------------------------------------------------------------- download

def assert_only_final_files(d, names):
    assert sorted(os.listdir(d)) == sorted(names)  # no temp/partial leftovers


def test_download_into_empty_cache(sample_dir, sample_md5, tmp_path, serve):
    url = serve(copy_sample(sample_dir, tmp_path / "srv"))
    msgs = []
    d = data.find_data_dir(mirrors=(url,), md5=sample_md5, progress=msgs.append)
    assert d == data.cache_dir()
    assert_only_final_files(d, ALL)
    for n in ALL:
        assert hashlib.md5((d / n).read_bytes()).hexdigest() == sample_md5[n]
    assert any("downloading" in m for m in msgs)
    x, y = data.load("test", d, download=False)
    assert x.shape == (4443, 28, 28) and y.shape == (4443,)
    # Second call: everything present and verified, so a dead mirror does not matter.
    data.download(d, mirrors=("http://127.0.0.1:9/",), md5=sample_md5)
    assert sorted(serve.requests) == sorted("/" + n for n in ALL)


def test_fallback_after_404_and_unreachable(sample_dir, sample_md5, tmp_path, serve, closed_url):
    url = serve(copy_sample(sample_dir, tmp_path / "srv"))
    dest = tmp_path / "dest"
    msgs = []
    data.download(dest, mirrors=(closed_url, url + "nothing-here/", url), md5=sample_md5,
                  progress=msgs.append)
    assert_only_final_files(dest, ALL)
    assert any("404" in m for m in msgs) and any(closed_url in m for m in msgs)
    assert data.load("train", dest, download=False)[0].shape == (3615, 28, 28)


def test_checksum_mismatch(sample_dir, sample_md5, tmp_path, serve):
    srv = copy_sample(sample_dir, tmp_path / "srv")
    good_bytes = (sample_dir / LABELS).read_bytes()
    bad_bytes = bytearray(good_bytes)
    bad_bytes[100] ^= 0xFF
    (srv / LABELS).write_bytes(bytes(bad_bytes))
    url = serve(srv)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=re.escape(str(dest / LABELS)) + "(?s:.*)checksum mismatch"):
        data.download(dest, mirrors=(url,), md5=sample_md5, files=(LABELS,))
    assert_only_final_files(dest, [])
    good = serve(copy_sample(sample_dir, tmp_path / "srv2"))  # bad first mirror, good second
    data.download(dest, mirrors=(url, good), md5=sample_md5, files=(LABELS,))
    assert_only_final_files(dest, [LABELS])
    # A wrong file under the final name is replaced by a verified one.
    (dest / LABELS).write_bytes(b"stale")
    data.download(dest, mirrors=(good,), md5=sample_md5, files=(LABELS,))
    assert hashlib.md5((dest / LABELS).read_bytes()).hexdigest() == sample_md5[LABELS]


def test_truncated_transfer(sample_dir, sample_md5, tmp_path):
    """Server promises more bytes than it sends: IncompleteRead, nothing left behind."""
    body = (sample_dir / LABELS).read_bytes()

    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:500])
            self.close_connection = True

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Short)
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        dest = tmp_path / "dest"
        with pytest.raises(DataError, match=re.escape(str(dest / LABELS))):
            data.download(dest, mirrors=(f"http://127.0.0.1:{srv.server_address[1]}/",),
                          md5=sample_md5, files=(LABELS,))
        assert_only_final_files(dest, [])
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_interrupted_download_leaves_nothing(sample_md5, tmp_path, monkeypatch):
    class Interrupting:
        def __init__(self):
            self.calls = 0

        def read(self, n):
            self.calls += 1
            if self.calls > 1:
                raise KeyboardInterrupt
            return b"x" * n

    @contextlib.contextmanager
    def fake_urlopen(url, timeout=None):
        yield Interrupting()

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    dest = tmp_path / "dest"
    with pytest.raises(KeyboardInterrupt):
        data.download(dest, mirrors=("http://example.invalid/",), md5=sample_md5, files=(LABELS,))
    assert_only_final_files(dest, [])


def test_offline_with_no_data(tmp_path, closed_url, sample_md5):
    with pytest.raises(DataError) as e:
        data.find_data_dir(mirrors=(closed_url,), md5=sample_md5)
    msg = str(e.value)
    assert "FASHION_MNIST_DIR" in msg and "--data DIR" in msg and closed_url in msg
    assert str(data.cache_dir()) in msg
    assert not any(data.cache_dir().glob("*.gz"))  # no file under a final name
    assert not any(p.is_file() for p in data.cache_dir().iterdir())  # nor a stray temp file


def test_official_constants():
    assert data.MIRRORS[0] == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    assert all(m.endswith("/") for m in data.MIRRORS)
    assert set(data.OFFICIAL_MD5) == set(ALL)
    assert data.OFFICIAL_MD5["train-images-idx3-ubyte.gz"] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in data.OFFICIAL_MD5.values())


# ---------------------------------------------------------------- batching and conversion

def test_batch_indices_deterministic():
    a = data.batch_indices(1000, 64, seed=7, epoch=2)
    b = data.batch_indices(1000, 64, seed=7, epoch=2)
    assert len(a) == len(b) == 16 and all(np.array_equal(i, j) for i, j in zip(a, b))
    assert all(i.dtype == np.int64 for i in a)
    flat = np.concatenate(a)
    assert np.array_equal(np.sort(flat), np.arange(1000))
    assert not np.array_equal(flat, np.arange(1000))
    assert not np.array_equal(flat, np.concatenate(data.batch_indices(1000, 64, seed=7, epoch=3)))
    assert not np.array_equal(flat, np.concatenate(data.batch_indices(1000, 64, seed=8, epoch=2)))
    # Golden value: pins the order across machines and NumPy versions.
    golden = [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]
    assert np.concatenate(data.batch_indices(10, 3, seed=0)).tolist() == golden
    assert [len(i) for i in data.batch_indices(10, 3, seed=0)] == [3, 3, 3, 1]
    assert np.concatenate(data.batch_indices(12, 5, seed=1234, epoch=3)).tolist() == [
        4, 11, 10, 6, 1, 8, 5, 7, 3, 9, 2, 0]


def test_batch_indices_drop_last_and_no_shuffle():
    kept = data.batch_indices(10, 3, seed=0, drop_last=True)
    assert [len(i) for i in kept] == [3, 3, 3]
    assert [len(i) for i in data.batch_indices(9, 3, seed=0, drop_last=True)] == [3, 3, 3]
    assert data.batch_indices(2, 3, seed=0, drop_last=True) == []
    plain = data.batch_indices(7, 3, seed=0, shuffle=False)
    assert [i.tolist() for i in plain] == [[0, 1, 2], [3, 4, 5], [6]]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            data.batch_indices(10, bad, seed=0)


def test_batches_match_indices(sample_dir):
    x, y = data.load("train", sample_dir, limit=200, download=False)
    idx = data.batch_indices(200, 32, seed=3, epoch=1)
    got = list(data.batches(x, y, 32, seed=3, epoch=1))
    assert len(got) == len(idx)
    for (bx, by), i in zip(got, idx):
        np.testing.assert_array_equal(bx, x[i])
        np.testing.assert_array_equal(by, y[i])
    with pytest.raises(ValueError):
        list(data.batches(x, y[:-1], 32, seed=0))


def test_to_nchw_float(sample_dir):
    x, _ = data.load("train", sample_dir, limit=64, download=False)
    f = data.to_nchw_float(x)
    assert f.shape == (64, 1, 28, 28) and f.dtype == np.float32
    assert f.min() >= 0.0 and f.max() <= 1.0
    np.testing.assert_allclose(f[:, 0], x / 255.0, rtol=0, atol=1e-7)
    d = data.to_nchw_float(np.array([[[0, 51, 255]]], dtype=np.uint8), dtype=np.float64)
    assert d.dtype == np.float64 and d.tolist() == [[[[0.0, 0.2, 1.0]]]]
    assert data.to_nchw_float(np.full((1, 2, 2), 255, np.uint8))[0, 0, 0, 0] == 1.0
    # Exact (correctly rounded) division by 255 for every pixel value, not a reciprocal multiply.
    every = data.to_nchw_float(np.arange(256, dtype=np.uint8).reshape(1, 16, 16))
    assert np.array_equal(every.ravel(), np.arange(256, dtype=np.float32) / np.float32(255))
    with pytest.raises(ValueError):
        data.to_nchw_float(x.astype(np.float32))


def test_load_dataset_gives_both_splits_as_nchw_floats(sample_dir):
    ds = data.load_dataset(sample_dir, limit_train=100, limit_test=50, dtype=np.float64)
    assert ds.train_x.shape == (100, 1, 28, 28) and ds.test_x.shape == (50, 1, 28, 28)
    assert ds.train_x.dtype == np.float64 and ds.train_y.dtype == np.int64
    images, labels = data.load("test", sample_dir, limit=50)
    np.testing.assert_array_equal(ds.test_x[:, 0] * 255, images.astype(np.float64))
    np.testing.assert_array_equal(ds.test_y, labels)
    assert str(sample_dir) in ds.describe()
