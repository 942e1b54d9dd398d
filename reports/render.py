"""Rendering for compare.py: number formatting, Markdown tables, plots, JSON-safe values and
atomic writes. Pure functions apart from the files they are asked to write."""
from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import tempfile

import numpy as np

PASS, FAIL = "✓", "✗"


def mark(ok: bool) -> str:
    return PASS if ok else FAIL


def fmt(v, digits=3) -> str:
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) < 1e-3 or abs(v) >= 1e5:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def cell(value, ok) -> str:
    """A measured value with its verdict: "1.2e-13 ✓"; `ok=None` shows no verdict."""
    return fmt(value) if ok is None else f"{fmt(value)} {mark(ok)}"


def md_table(headers, rows) -> str:
    """A GitHub-flavoured Markdown table; cells are formatted with fmt(), pipes escaped."""
    cells = [[fmt(c) for c in row] for row in rows]
    head = "| " + " | ".join(str(h).replace("|", "\\|") for h in headers) + " |"
    sep = "|" + "|".join("---" for _ in headers) + "|"
    body = ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |"
            for row in cells]
    return "\n".join([head, sep, *body])


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


def to_json(obj) -> str:
    return json.dumps(jsonable(obj), indent=1, ensure_ascii=False)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, data: str | bytes) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half a
    file. The file gets the mode a plain open() would give it (0644 under the usual umask), not
    mkstemp's 0600."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w",
                       **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(directory) -> None:
    """Create `directory` if needed and write and delete a probe file in it; OSError if either
    fails (so a run that could not save its results is refused before it starts)."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".bn-compare-probe-")
    os.close(fd)
    os.unlink(tmp)


# -- plots ------------------------------------------------------------------------------------
def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def safe_plot(plot):
    """A plot that fails (no matplotlib, full disk, odd data) is skipped with a note, never
    fatal: the numbers are in the tables."""
    def wrapper(*args, **kwargs):
        try:
            return plot(*args, **kwargs)
        except Exception as e:
            print(f"plot skipped: {type(e).__name__}: {e}", file=sys.stderr)
            return None
    wrapper.__doc__, wrapper.__name__ = plot.__doc__, plot.__name__
    return wrapper


def _integer_ticks(ax):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, plt, path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


@safe_plot
def plot_training(runs: dict, path) -> str | None:
    """Loss and test-accuracy curves of every run on one figure; the path, or None when there is
    nothing to plot or no matplotlib."""
    curves = {k: r["history"] for k, r in runs.items() if isinstance(r, dict) and r.get("history")}
    plt = _pyplot() if curves else None
    if plt is None:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, hist in curves.items():
        epochs = [h["epoch"] for h in hist]
        style = "--" if "native" in label else "-"
        ax_loss.plot(epochs, [h["loss"] for h in hist], style, marker="o", ms=3, label=label)
        ax_acc.plot(epochs, [h["test_acc"] for h in hist], style, marker="o", ms=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="LeNet-BN training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="LeNet-BN test accuracy")
    for ax in (ax_loss, ax_acc):
        _integer_ticks(ax)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    return _save(fig, plt, path)


@safe_plot
def plot_log_curves(curves: dict, path, *, xlabel: str, ylabel: str, title: str,
                    floor: float = 1e-18) -> str | None:
    """Curves on a log y axis, one per label (x = 1, 2, ...); exact zeros drawn at `floor` (the
    title should say so) and non-finite values left out."""
    curves = {k: v for k, v in curves.items() if v}
    plt = _pyplot() if curves else None
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in curves.items():
        xs = [i + 1 for i, v in enumerate(values) if math.isfinite(v)]
        ys = [max(v, floor) for v in values if math.isfinite(v)]
        ax.semilogy(xs, ys, marker="o", ms=3, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    _integer_ticks(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


@safe_plot
def plot_layer_errors(panels: dict, path, *, layers, tol: float, title: str,
                      floor: float = 1e-12) -> str | None:
    """Per-layer errors on a log axis, one panel per entry of `panels` ({panel title: {label:
    {layer: error}}}), one line per label, the tolerance dashed; exact zeros drawn at `floor`
    (the title should say so), non-finite values left out."""
    panels = {k: v for k, v in panels.items() if v}
    plt = _pyplot() if panels else None
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), sharey=True,
                             squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, errors in series.items():
            xs = [i for i, layer in enumerate(layers) if math.isfinite(errors.get(layer, math.nan))]
            ax.semilogy(xs, [max(errors[layers[i]], floor) for i in xs], marker="o", ms=3,
                        label=label)
        ax.axhline(tol, color="black", linestyle="--", linewidth=1, label=f"tolerance {tol:g}")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=60, fontsize=8)
        ax.set(title=name, ylabel="max |activation error|")
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)


def plot_by_group(series: dict, path, *, group, xlabel: str, ylabel: str, title: str,
                  log: bool = False, floor: float = 1e-18) -> str | None:
    """One thin line per series {label: [y at x = 1, 2, ...]}, coloured by `group(label)`, with
    one legend entry per group (for many runs that fall into a few kinds, e.g. one line per
    backend/impl, one colour per dtype). `log`: log y axis, exact zeros drawn at `floor` and
    non-finite values left out."""
    series = {k: v for k, v in series.items() if v}
    plt = _pyplot() if series else None
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {}
    for label, values in series.items():
        g = group(label)
        colour = colours.setdefault(g, f"C{len(colours) % 10}")
        points = [(i + 1, max(v, floor) if log else v) for i, v in enumerate(values)
                  if math.isfinite(v)]
        ax.plot(*zip(*points), color=colour, lw=1, alpha=0.7, marker="o", ms=2)
    for g, colour in colours.items():
        ax.plot([], [], color=colour, lw=2, label=g)
    if log:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    _integer_ticks(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)
