"""One progress line per training epoch, the same for every backend."""
from __future__ import annotations


def epoch_line(row: dict, epochs: int, device: str) -> str:
    """compare.py prefixes the backend/impl."""
    return (f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, train acc {row['train_acc']:.3f}, "
            f"test acc {row['test_acc']:.3f}, {row['examples_per_s']:,.0f} examples/s on {device}")
