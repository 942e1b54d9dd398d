"""Exchange of nested results between compare.py and backend child processes, and atomic writes.

Arrays travel in an .npz beside a JSON file (never pickle), so a child running numpy 1.x and a
parent running numpy 2.x, or two different interpreters, read each other's files.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile

import numpy as np


def _split(obj, arrays):
    if isinstance(obj, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = obj
        return {"__array__": key}
    if isinstance(obj, dict):
        return {str(k): _split(v, arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, arrays) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _join(obj, arrays):
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return arrays[obj["__array__"]]
        return {k: _join(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, arrays) for v in obj]
    return obj


def save(prefix, obj) -> None:
    """Write `obj` (dicts, lists, numbers, strings, arrays) to prefix.json + prefix.npz."""
    arrays = {}
    meta = _split(obj, arrays)
    np.savez(f"{prefix}.npz", **arrays)
    pathlib.Path(f"{prefix}.json").write_text(json.dumps(meta))


def load(prefix):
    with np.load(f"{prefix}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return _join(json.loads(pathlib.Path(f"{prefix}.json").read_text()), arrays)


def jsonable(obj):
    """Arrays to lists, numpy scalars to Python, non-finite floats to strings (valid JSON)."""
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def write_atomic(path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half a file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
