"""Fashion-MNIST loader: IDX parsing with strict validation, local-first file search, verified
download, and backend-independent batching.

Every backend (PyTorch, MXNet, JAX) gets its data from here, so all of them see the same bytes
in the same order; any data problem is a DataError naming the file and what is wrong with it.
Standard library + NumPy only.
"""
import dataclasses
import gzip
import hashlib
import http.client
import math
import os
import pathlib
import struct
import tempfile
import urllib.request
import zlib

import numpy as np

TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
ALL_FILES = TRAIN_FILES + TEST_FILES
# MD5s published in https://github.com/zalandoresearch/fashion-mnist (README, "Get the Data").
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# The README's download links, then the copy in the official repository (data/fashion).
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
ENV_VAR = "FASHION_MNIST_DIR"
TIMEOUT_S = 30.0
_IDX_MAGIC = {0x00000801: 1, 0x00000803: 3}  # unsigned-byte labels (1-D) and images (3-D)
_CHUNK = 1 << 16


class DataError(ValueError):
    """A data file is missing, corrupt, inconsistent or could not be fetched."""


def cache_dir() -> pathlib.Path:
    """Per-user cache: $XDG_CACHE_HOME (if absolute) or ~/.cache, + bn-compare/fashion-mnist."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = pathlib.Path(base) if base and os.path.isabs(base) else pathlib.Path.home() / ".cache"
    return root / "bn-compare" / "fashion-mnist"


def read_idx(path) -> np.ndarray:
    """Read one IDX file (gzip detected by its magic bytes, not its name) into a uint8 array.

    Only the two layouts Fashion-MNIST uses are accepted (u8 labels 1-D, u8 images 3-D), and the
    payload length must match the header exactly, so truncation or trailing bytes cannot slip by."""
    path = pathlib.Path(path).absolute()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip stream ({type(e).__name__}: {e})") from None
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    ndim = _IDX_MAGIC.get(magic)
    if ndim is None:
        raise DataError(f"{path}: bad IDX magic 0x{magic:08x} (expected 0x00000801 for u8 labels "
                        "or 0x00000803 for u8 images)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header: expected {header} bytes, got {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes"
        raise DataError(f"{path}: {what}: header dims {dims} need {expected} bytes, "
                        f"file has {len(data)} bytes (uncompressed)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _locate(directory, name):
    """The file `name` in `directory`, or its gunzipped twin name[:-3]; None if neither exists."""
    for candidate in (name, name[:-3]):
        p = pathlib.Path(directory) / candidate
        if p.is_file():
            return p
    return None


def _missing(directory):
    return [n for n in ALL_FILES if _locate(directory, n) is None]


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def find_data_dir(data_dir=None, *, download=True, mirrors=MIRRORS, md5=OFFICIAL_MD5,
                  progress=None) -> pathlib.Path:
    """Directory holding all four files: `data_dir`, then $FASHION_MNIST_DIR, then cache_dir().

    Local files always win so runs work offline; if none is complete and `download` is allowed,
    the files are fetched into the first candidate given (explicit, else env, else cache)."""
    candidates = []
    if data_dir is not None:
        candidates.append(("data_dir / --data", pathlib.Path(data_dir).expanduser()))
    if os.environ.get(ENV_VAR):
        candidates.append((f"${ENV_VAR}", pathlib.Path(os.environ[ENV_VAR]).expanduser()))
    candidates.append(("cache", cache_dir()))
    for _, d in candidates:
        if not _missing(d):
            return d
    failure = "download disabled"
    if download:
        target = candidates[0][1]
        try:
            _fetch(target, mirrors=mirrors, md5=md5, progress=progress)
            return target
        except DataError as e:
            failure = f"download into {target.absolute()} failed: {e}"
    looked = "\n".join(f"  {label}: {d.absolute()} (missing: {', '.join(_missing(d))})"
                       for label, d in candidates)
    if not os.environ.get(ENV_VAR):
        looked += f"\n  ${ENV_VAR}: not set"
    raise DataError(
        f"Fashion-MNIST files not found ({failure}). Looked in:\n{looked}\n"
        f"To use local files, put {', '.join(ALL_FILES)} (gzipped or not) in one directory DIR "
        f"and pass `--data DIR` or set {ENV_VAR}=DIR. Get them from {MIRRORS[0]} (see "
        "https://github.com/zalandoresearch/fashion-mnist#get-the-data), or from "
        f"{MIRRORS[1]}.")


def download(dest_dir, *, mirrors=MIRRORS, md5=OFFICIAL_MD5, files=None, progress=None,
             timeout=TIMEOUT_S) -> None:
    """Fetch `files` (default: all four) into `dest_dir`, verifying each against `md5`.

    Each file streams into a temporary file beside its destination and is renamed into place
    only after its checksum matches, so a failed or interrupted download never leaves a file
    under the final name. Mirrors are tried in order; files already present and correct are kept."""
    say = progress or (lambda msg: None)
    dest = pathlib.Path(dest_dir).expanduser().absolute()
    dest.mkdir(parents=True, exist_ok=True)
    for name in (ALL_FILES if files is None else files):
        final = dest / name
        expected = md5.get(name)
        if expected is None:
            raise DataError(f"{final}: no MD5 checksum known for {name}; refusing to download")
        if final.is_file() and _md5(final) == expected:
            say(f"{final}: present, checksum ok")
            continue
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + name
            say(f"downloading {url}")
            tmp = tempfile.NamedTemporaryFile(dir=dest, prefix=f".{name}.", suffix=".part",
                                              delete=False)
            done = False
            try:
                h = hashlib.md5()
                with tmp, urllib.request.urlopen(url, timeout=timeout) as resp:
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        h.update(chunk)
                        tmp.write(chunk)
                if h.hexdigest() != expected:
                    raise DataError(f"checksum mismatch: md5 {h.hexdigest()}, expected {expected}")
                os.replace(tmp.name, final)
                done = True
            except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is OSError
                errors.append(f"{url}: {type(e).__name__}: {e}")
                say(f"failed: {errors[-1]}")
            finally:
                if not done:
                    try:
                        os.unlink(tmp.name)
                    except FileNotFoundError:
                        pass
            if done:
                say(f"{final}: ok")
                break
        else:
            raise DataError(f"{final}: every mirror failed:\n  " + "\n  ".join(errors))


_fetch = download  # find_data_dir's `download` flag shadows the function name


def load(split="train", data_dir=None, *, limit=None, download=True):
    """(images uint8 N×28×28, labels int64 N) for split 'train' or 'test', fully validated.

    `limit=K` keeps the first K examples (file order), so small runs are reproducible."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                              or limit <= 0):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    d = find_data_dir(data_dir, download=download)
    img_name, lab_name = TRAIN_FILES if split == "train" else TEST_FILES
    paths = []
    for name in (img_name, lab_name):
        p = _locate(d, name)
        if p is None:
            raise DataError(f"{(d / name).absolute()}: missing (also looked for {name[:-3]})")
        paths.append(p.absolute())
    img_path, lab_path = paths
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{img_path}: expected N×28×28 images, got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{lab_path}: expected 1-D labels, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"count mismatch: {img_path} has {len(images)} images but "
                        f"{lab_path} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{lab_path}: label {int(labels[bad])} at index {bad} is outside 0..9")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return np.ascontiguousarray(images), labels.astype(np.int64)


@dataclasses.dataclass
class Dataset:
    """Train and test splits as NCHW floats in [0, 1] and int64 labels: what every backend's
    `fit` takes."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str = ""

    def describe(self) -> str:
        return f"{len(self.train_y)} train / {len(self.test_y)} test images from {self.source}"


def load_dataset(data_dir=None, *, limit_train=None, limit_test=None, dtype=np.float32,
                 download=True, progress=None) -> Dataset:
    """Both splits, located (or downloaded) once, as a Dataset."""
    d = find_data_dir(data_dir, download=download, progress=progress)
    train = load("train", d, limit=limit_train, download=False)
    test = load("test", d, limit=limit_test, download=False)
    return Dataset(to_nchw_float(train[0], dtype), train[1], to_nchw_float(test[0], dtype), test[1],
                   str(d))


def to_nchw_float(images, dtype=np.float32) -> np.ndarray:
    """uint8 N×28×28 → N×1×28×28 floats in [0, 1] (exact division by 255, so 255 → 1.0)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 N×H×W images, got {images.dtype} {images.shape}")
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise ValueError(f"dtype must be a float type, got {dtype!r}")
    out = images[:, None, :, :].astype(dtype)
    out /= np.asarray(255, dtype=dtype)
    return out


def batch_indices(n, batch_size, *, seed, epoch=0, shuffle=True, drop_last=False):
    """Index arrays (int64) for one epoch: the same on every machine and for every backend.

    The order comes from np.random.default_rng([seed, epoch]).permutation(n) (or arange(n)), so
    it depends only on (seed, epoch) and never on global RNG state or the framework in use."""
    for arg, value, lo in (("n", n, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ValueError(f"{arg} must be an int >= {lo}, got {value!r}")
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
    else:
        order = np.arange(n, dtype=np.int64)
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks.pop()
    return chunks


def batches(x, y, batch_size, *, seed, epoch=0, shuffle=True, drop_last=False):
    """Iterate (x[idx], y[idx]) over batch_indices(len(x), ...)."""
    if len(x) != len(y):
        raise ValueError(f"x and y lengths differ: {len(x)} vs {len(y)}")
    for idx in batch_indices(len(x), batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                             drop_last=drop_last):
        yield x[idx], y[idx]
