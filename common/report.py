"""Markdown tables, number formatting and plots for compare.py's reports."""
from __future__ import annotations

import math

PASS, FAIL = "✓", "✗"


def fmt(v, digits=3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) < 1e-3 or abs(v) >= 1e5:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def md_table(headers, rows) -> str:
    """A GitHub-flavoured Markdown table; cells are formatted with fmt()."""
    cells = [[fmt(c) for c in row] for row in rows]
    head = "| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |"
    sep = "|" + "|".join("---" for _ in headers) + "|"
    body = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join([head, sep, *body])


def _safe(plot):
    """A plot that fails (no display, full disk, odd data) is skipped with a note, never fatal."""
    def wrapper(*args, **kwargs):
        try:
            return plot(*args, **kwargs)
        except Exception as e:
            import sys

            print(f"plot skipped: {type(e).__name__}: {e}", file=sys.stderr)
            return None
    return wrapper


@_safe
def plot_training(runs: dict, path) -> str | None:
    """Loss and test-accuracy curves of every run on one figure; returns the path or None when
    matplotlib is missing or there is nothing to plot."""
    curves = {k: r["history"] for k, r in runs.items() if r.get("history")}
    if not curves:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, hist in curves.items():
        epochs = [h["epoch"] for h in hist]
        style = "--" if "native" in label else "-"
        ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_loss.plot(epochs, [h["loss"] for h in hist], style, marker="o", ms=3, label=label)
        ax_acc.plot(epochs, [h["test_acc"] for h in hist], style, marker="o", ms=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="LeNet-BN training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="LeNet-BN test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


@_safe
def plot_trajectory(diffs: dict, path, baseline: str) -> str | None:
    """Per-step |loss - baseline loss| of every run (log scale)."""
    if not diffs:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, d in diffs.items():
        ax.semilogy(range(1, len(d) + 1), [max(v, 1e-18) for v in d], marker="o", ms=3, label=label)
    ax.set(xlabel="SGD step", ylabel=f"|loss − {baseline} loss|",
           title="LeNet-BN trajectory agreement (exact 0 drawn at 1e-18)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def epoch_line(row: dict, epochs: int, device: str) -> str:
    """One progress line per training epoch, the same for every backend (compare.py prefixes the
    backend/impl)."""
    return (f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, train acc {row['train_acc']:.3f}, "
            f"test acc {row['test_acc']:.3f}, {row['examples_per_s']:,.0f} examples/s on {device}")
