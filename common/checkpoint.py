"""What every backend's checkpoint files share: atomic writes, and the JSON sidecar that keeps the
batch-norm settings beside the weights, since no framework's weight file stores eps or momentum.

The sidecar (`<checkpoint>.bn.json`) holds the framework's own layer settings (momentum in its
own meaning, eps under its own keyword, MXNet's fix_gamma), the impl, and the SHA-256 of the
weights it belongs to: a sidecar left beside a file it was not written with is an error, never
silently applied. A file without a sidecar (a user's own `torch.save(model.state_dict())`) loads
with the framework's default settings.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import tempfile

from common import convert

SIDECAR_SUFFIX = ".bn.json"
FORMAT = "bn-compare LeNet-BN checkpoint settings"
VERSION = 1


def sidecar_path(path) -> pathlib.Path:
    return pathlib.Path(f"{path}{SIDECAR_SUFFIX}")


def reason(e: BaseException, limit: int = 160) -> str:
    """An exception as one short line (framework errors can span many)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # MXNet puts "Traceback ..." first and the message last
    text = next((ln for ln in reversed(lines) if "Error" in ln), lines[0] if lines else "")
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def atomic_path(path):
    """A temporary file beside `path` to write to; renamed onto `path` when the block succeeds,
    removed when it fails, so readers never see half a file."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(path, write, *, framework: str, impl: str, settings: dict, bn_config: dict) -> None:
    """Write a checkpoint: `write(tmp_path)` writes the weights, then the sidecar with `settings`
    and (where the weights have no place for it) bn_config's num_batches_tracked. Each file is
    written atomically; the sidecar goes first, so a crash in between leaves a sidecar whose
    digest does not match, which loading reports."""
    doc = {"format": FORMAT, "version": VERSION, "framework": framework, "impl": impl,
           "settings": settings}
    keeps_count = framework == "torch" and convert.family(impl) == "native"
    if bn_config.get("num_batches_tracked") and not keeps_count:
        doc["num_batches_tracked"] = bn_config["num_batches_tracked"]
    with atomic_path(path) as tmp:
        write(tmp)
        doc["sha256"] = _sha256(tmp)
        with atomic_path(sidecar_path(path)) as side:
            pathlib.Path(side).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def write_bytes(data: bytes):
    """A `write` for `save` that writes `data`."""
    return lambda tmp: pathlib.Path(tmp).write_bytes(data)


def read_bytes(path) -> bytes:
    """The file's bytes, or a one-line ValueError (missing, a directory, unreadable, empty)."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e.strerror or reason(e)}") from None
    if not data:
        raise ValueError(f"checkpoint {path} is empty")
    return data


def read_sidecar(path, framework: str) -> dict | None:
    """The sidecar of checkpoint `path` (None if there is none), checked to belong to it."""
    side = sidecar_path(path)
    if not side.exists():
        return None
    try:
        doc = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{side}: unreadable settings sidecar ({reason(e)})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{side}: not a {FORMAT!r} file")
    if doc.get("version") != VERSION:
        raise ValueError(f"{side}: version {doc.get('version')!r}, this reader knows {VERSION}")
    if doc.get("framework") != framework:
        raise ValueError(f"{side}: written for framework {doc.get('framework')!r}, not "
                         f"{framework!r}")
    for key, kind in (("impl", str), ("settings", dict), ("sha256", str)):
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"{side}: {key!r} missing or not a {kind.__name__}")
    if doc["sha256"] != _sha256(path):
        raise ValueError(f"{side} belongs to another version of {pathlib.Path(path).name} "
                         f"(SHA-256 differs); delete it to load the file with the framework's "
                         f"default settings")
    return doc


def resolve(path, framework: str, params, fmt: dict, *, impls, conventions) -> dict:
    """The loaded checkpoint {"params", "bn_config", "impl", "layout", "sidecar"} from the
    weights' canonical `params`, what their names tell (`fmt`: layout, family or None,
    num_batches_tracked or None) and the sidecar; without a sidecar, the impl the names tell
    (native where they cannot) with its layer's defaults from the backend's `conventions()`."""
    doc = read_sidecar(path, framework)
    if doc is not None:
        impl = doc["impl"]
        if impl not in impls:
            raise ValueError(f"{sidecar_path(path)}: unknown {framework} impl {impl!r}; "
                             f"known: {', '.join(impls)}")
        if fmt["family"] and convert.family(impl) != fmt["family"]:
            raise ValueError(f"{sidecar_path(path)} says impl {impl!r}, but {path} has "
                             f"{fmt['family']} batch-norm names")
        settings = doc["settings"]
    else:
        impl = fmt["family"] or "native"
        settings = convert.default_settings(framework, conventions()[impl])
    try:
        cfg = convert.config_from_settings(framework, impl, settings)
    except ValueError as e:
        raise type(e)(f"{sidecar_path(path)}: {e}") from None
    if settings.get("fix_gamma"):
        params = convert.fixed_gamma(params)
    count = fmt.get("num_batches_tracked")
    if count is None and doc is not None:
        count = doc.get("num_batches_tracked")
    if count:  # 0, what a fresh model holds, is the same as no count
        cfg = convert.check_bn_config(dict(cfg, num_batches_tracked=count))
    return {"params": params, "bn_config": cfg, "impl": impl, "layout": fmt["layout"],
            "sidecar": str(sidecar_path(path)) if doc is not None else None}


def resolve_flat(path, framework: str, arrays, *, impls, conventions) -> dict:
    """`resolve` for a flat file's {key: array} (PyTorch state_dict, Gluon parameters)."""
    fmt = convert.flat_format(framework, arrays, str(path))
    params = convert.from_flat(framework, arrays, str(path))
    return resolve(path, framework, params, fmt, impls=impls, conventions=conventions)
