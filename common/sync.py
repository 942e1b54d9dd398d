"""Synchronized batch norm, framework-free: merging per-worker statistics exactly, checking a
sharded batch, splitting a batch into shards, and the float64 reference for one sync step.

A synchronized step normalises every worker's shard with the statistics of the WHOLE batch, so
its result must equal `common.reference.bn_step` on the concatenated shards. Workers exchange
per-channel (count, mean, M2 = Σ(x − mean)²) and merge them with Chan et al.'s pairwise formula,
count-weighted, so shards of unequal size (and empty shards) give the full-batch statistics;
E[x²] − E[x]² is never formed (it cancels catastrophically when |mean| ≫ std).

`merge_moments` uses only + − × ÷ and `==`, so the backends call it on their own arrays (torch
tensors after an all-gather, JAX values inside `shard_map`, MXNet NDArrays after a kvstore
all-reduce): one formula, written once.
"""
from __future__ import annotations

import numpy as np

from common import lenet
from common.reference import (RESULT_KEYS, bn_step, error, float_dtype, reduce_axes,
                              validate_inputs)
from common.spec import check_decay

# Agreement with the full-batch reference, relative to max(1, max |ref|) (common.reference.error):
# float64 differs only in summation order (Chan's merge vs one two-pass sum, ~1e-16 relative
# per operation on these sizes); float32 carries ~1.2e-7 per operation over sums of a few
# thousand terms.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}
SHARDED_KEYS = ("y", "dx")  # one array per worker; the other results are per channel


def at_least_one(n):
    """Counts `n` with zeros replaced by 1, to divide sums that are zero wherever the count is;
    works on Python numbers and on every framework's arrays."""
    return n + (n == 0)


def chan_merge(a, b):
    """Merge two (count, mean, M2) triples (Chan, Golub & LeVeque): n = n_a + n_b,
    δ = mean_b − mean_a, mean = mean_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n. An empty
    side (count 0) leaves the other unchanged; two empty sides give (0, 0, 0)."""
    (na, ma, qa), (nb, mb, qb) = a, b
    n = na + nb
    d = mb - ma
    f = nb / at_least_one(n)
    return n, ma + d * f, qa + qb + d * d * (na * f)


def merge_moments(moments):
    """(count, mean, M2) of the union of workers, from one (count, mean, M2) per worker, merged
    pairwise in a balanced tree (the rounding of each merge stays at the scale of its halves)."""
    moments = list(moments)
    if not moments:
        raise ValueError("merge_moments needs at least one worker's moments")
    while len(moments) > 1:
        pairs = [chan_merge(moments[i], moments[i + 1]) for i in range(0, len(moments) - 1, 2)]
        moments = pairs + ([moments[-1]] if len(moments) % 2 else [])
    return moments[0]


def local_moments(x) -> tuple:
    """Per-channel (count, mean, M2) of one NumPy shard in float64 (NCHW or N×C); an empty shard
    gives (0, zeros, zeros)."""
    x = np.asarray(x, np.float64)
    axes = reduce_axes(x.ndim)
    n = x.size // x.shape[1]
    if n == 0:
        zeros = np.zeros(x.shape[1])
        return 0, zeros, zeros.copy()
    mean = x.mean(axis=axes)
    centred = x - mean.reshape((1, -1) + (1,) * (x.ndim - 2))
    return n, mean, (centred ** 2).sum(axis=axes)


def moments_to_stats(count, mean, m2, *, unbiased=False):
    """(mean, variance) from merged moments: variance M2/n, or M2/(n−1) if `unbiased`."""
    return mean, m2 / (count - 1 if unbiased else count)


def equal_sizes(n: int, world_size: int) -> list[int]:
    """Shard sizes of an n-row batch over `world_size` workers as equal as possible, larger
    first (the split of `numpy.array_split`): 10 over 4 → [3, 3, 2, 2]."""
    n, world_size = _count("batch size", n, 0), _count("world size", world_size, 1)
    q, r = divmod(n, world_size)
    return [q + 1] * r + [q] * (world_size - r)


def _count(name, v, least):
    if isinstance(v, bool) or not hasattr(v, "__index__") or v < least:
        raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
    return int(v)


def check_sizes(sizes, n: int) -> list[int]:
    """`sizes` as a list of ints >= 0 that add up to `n` (a batch's rows), else ValueError."""
    try:
        sizes = [_count(f"shard size #{i}", s, 0) for i, s in enumerate(sizes)]
    except TypeError:
        raise ValueError(f"shard sizes must be a sequence of ints, got {sizes!r}") from None
    if not sizes:
        raise ValueError("shard sizes are empty: a sync step needs at least one worker")
    if sum(sizes) != n:
        raise ValueError(f"shard sizes {sizes} add up to {sum(sizes)}, but the batch has {n} rows")
    return sizes


def split(a, sizes) -> list[np.ndarray]:
    """`a` split along axis 0 into consecutive shards of `sizes` rows (e.g. 64 rows as
    [40, 16, 8, 0]); empty shards keep the other dimensions."""
    a = np.asarray(a)
    sizes = check_sizes(sizes, len(a))
    return np.split(a, np.cumsum(sizes)[:-1])


def shard_batches(batches, world_size, shard_sizes=None, *, sync=True) -> list[list[tuple]]:
    """Data-parallel training input: every (x, y) batch split into `world_size` shards of
    `shard_sizes` rows (default: as equal as possible); returns, per batch, the list of
    (x, y) shards. ValueError for a world larger than a batch, sizes that do not add up, a
    batch of fewer than 2 rows, or, with local batch norm (`sync=False`), a shard of 1 row (the
    N×C layers would have one value per channel)."""
    world_size = _count("world size", world_size, 1)
    per_step = []
    for i, (x, y) in enumerate(batches):
        x, y = np.asarray(x), np.asarray(y)
        if len(x) != len(y):
            raise ValueError(f"batch {i}: {len(x)} images but {len(y)} labels")
        if world_size > len(x):
            raise ValueError(f"world size {world_size} is larger than batch {i} ({len(x)} rows)")
        if len(x) < 2:
            raise ValueError(f"batch {i} has {len(x)} row(s); a batch variance needs 2")
        sizes = (equal_sizes(len(x), world_size) if shard_sizes is None
                 else check_sizes(shard_sizes, len(x)))
        if len(sizes) != world_size:
            raise ValueError(f"shard_sizes has {len(sizes)} entries for world size {world_size}")
        if not sync and 1 in sizes:
            raise ValueError(f"local batch norm: batch {i} gives worker {sizes.index(1)} a "
                             "shard of 1 row, too few for a batch variance (use sync=True)")
        per_step.append(list(zip(split(x, sizes), split(y, sizes))))
    return per_step


def training_job(params, batches, *, world_size, shard_sizes, sync, lr, eps, decay, unbiased,
                 dtype):
    """What every backend's `sync_lenet_train` hands its workers, checked: (the canonical
    parameters cast to `dtype`, the per-batch shards of `shard_batches`, the options dict
    {sync, lr, eps, decay, unbiased, dtype name})."""
    lenet.validate_params(params)
    dt = float_dtype(dtype)
    check_decay(decay)
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    per_step = shard_batches(batches, world_size, shard_sizes, sync=sync)
    opts = dict(sync=bool(sync), lr=float(lr), eps=float(eps), decay=float(decay),
                unbiased=bool(unbiased), dtype=dt.name)
    return lenet.cast(params, dt), per_step, opts


def validate_shards(xs, gamma, beta, running_mean, running_var, dys, *, training, eps, decay,
                    world_size=None):
    """Check one sharded batch-norm step; returns (x, dy, sizes): the concatenated batch and
    the shard sizes. Every problem is one ValueError line: a world of no workers, or of more
    workers than the batch has rows (or than `world_size`, the engine's); every shard empty;
    shards that disagree in ndim, channels, spatial size or dtype; a dy per shard that is
    missing or shaped otherwise; then `common.reference.validate_inputs` on the whole batch."""
    if isinstance(xs, np.ndarray) or not hasattr(xs, "__len__"):
        raise ValueError("xs must be a list with one array per worker, "
                         f"got {type(xs).__name__}")
    if isinstance(dys, np.ndarray) or not hasattr(dys, "__len__"):
        raise ValueError(f"dys must be a list with one array per worker, got {type(dys).__name__}")
    xs, dys = [np.asarray(x) for x in xs], [np.asarray(d) for d in dys]
    if not xs:
        raise ValueError("xs is empty: a sync step needs at least one worker")
    if len(dys) != len(xs):
        raise ValueError(f"dys has {len(dys)} arrays but xs has {len(xs)}: one dy per worker")
    first = xs[0]
    if first.ndim not in (2, 4):
        raise ValueError(f"xs[0] must be 2-D (N, C) or 4-D (N, C, H, W); got shape {first.shape}")
    for i, x in enumerate(xs):
        if x.ndim != first.ndim:
            raise ValueError(f"xs[{i}] is {x.ndim}-D but xs[0] is {first.ndim}-D")
        if x.shape[1] != first.shape[1]:
            raise ValueError(f"xs[{i}] has {x.shape[1]} channels but xs[0] has {first.shape[1]}")
        if x.shape[2:] != first.shape[2:]:
            raise ValueError(f"xs[{i}] has spatial size {x.shape[2:]} but xs[0] has "
                             f"{first.shape[2:]}")
        if x.dtype != first.dtype:
            raise ValueError(f"xs[{i}] is {x.dtype} but xs[0] is {first.dtype}")
        if dys[i].shape != x.shape:
            raise ValueError(f"dys[{i}] has shape {dys[i].shape} but xs[{i}] has {x.shape}")
    float_dtype(first)
    sizes = [len(x) for x in xs]
    n = sum(sizes)
    if n == 0:
        raise ValueError(f"every shard is empty ({len(xs)} workers, 0 rows)")
    if len(xs) > n:
        raise ValueError(f"world size {len(xs)} is larger than the batch ({n} rows)")
    if world_size is not None and len(xs) > world_size:
        raise ValueError(f"{len(xs)} shards but the engine has {world_size} workers")
    x, dy = np.concatenate(xs), np.concatenate(dys)
    validate_inputs(x, gamma, beta, running_mean, running_var, dy, training=training, eps=eps,
                    decay=decay)
    return x, dy, sizes


def reference_step(xs, gamma, beta, running_mean, running_var, dys, *, training, eps=1e-5,
                   decay=0.9, unbiased=False) -> dict:
    """The float64 result a sync step must give: `common.reference.bn_step` on the concatenated
    batch, y and dx split back into one array per worker."""
    x, dy, sizes = validate_shards(xs, gamma, beta, running_mean, running_var, dys,
                                   training=training, eps=eps, decay=decay)
    out = bn_step(x, gamma, beta, running_mean, running_var, dy, training=training, eps=eps,
                  decay=decay, unbiased=unbiased)
    return {k: split(v, sizes) if k in SHARDED_KEYS else v for k, v in out.items()}


def _joined(out, ref, k):
    """`out[k]` and `ref[k]` as two arrays (y and dx: every shard concatenated), or None when
    their shard counts or shapes differ."""
    got, want = out[k], ref[k]
    if k in SHARDED_KEYS:
        if len(got) != len(want) or any(np.shape(g) != np.shape(w) for g, w in zip(got, want)):
            return None
        got, want = np.concatenate(got), np.concatenate(want)
    return got, want


def errors(out, ref) -> dict[str, float]:
    """{result key: relative error (common.reference.error) of `out` against `ref`}; y and dx
    are compared over all shards together, a shard count or shape mismatch is inf, a NaN
    anywhere is NaN."""
    result = {}
    for k in RESULT_KEYS:
        pair = _joined(out, ref, k)
        result[k] = float("inf") if pair is None else error(*pair)[1]
    return result


def within_tolerance(out, ref, dtype) -> bool:
    """Every key within TOLERANCE[dtype] (NaN-safe: a NaN error fails)."""
    tol = TOLERANCE[float_dtype(dtype).name]
    return all(err <= tol for err in errors(out, ref).values())


def unweighted_reference_step(xs, gamma, beta, running_mean, running_var, dys, *, eps=1e-5,
                              decay=0.9) -> dict:
    """The float64 result of a training step under the convention of Flax's
    `BatchNorm(axis_name=...)` and MXNet's contrib `SyncBatchNorm`: every worker's per-channel
    moments averaged UNWEIGHTED (`lax.pmean`), so each worker counts 1/W whatever its rows
    (google/flax#2417). That is batch norm with a weight w = 1/(W·m_i) on each value of worker
    i's shard (m_i: its values per channel): mean = Σ w·x, var = Σ w·(x − mean)² (biased, also
    for the running variance), dx = γ/σ · (dy − w·Σdy − w·x̂·Σdy·x̂). It equals `reference_step`
    for equal shards. An empty shard's mean is 0/0: the statistics, and everything that
    depends on them, are NaN, as in those frameworks. Same inputs and output layout as
    `reference_step`, training mode only."""
    x, dy, sizes = validate_shards(xs, gamma, beta, running_mean, running_var, dys,
                                   training=True, eps=eps, decay=decay)
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    gamma, beta, running_mean, running_var = (np.asarray(a, np.float64) for a in (
        gamma, beta, running_mean, running_var))
    axes = reduce_axes(x.ndim)
    per_row = x[0].size // x.shape[1] if len(x) else 1  # values per channel in one row
    shape = (1, -1) + (1,) * (x.ndim - 2)
    w = np.concatenate([np.full(n, 1.0 / (len(sizes) * max(n, 1) * per_row)) for n in sizes])
    w = w.reshape((-1,) + (1,) * (x.ndim - 1))
    if 0 in sizes:
        mean = var = np.full(x.shape[1], np.nan)
    else:
        mean = (w * x).sum(axis=axes)
        var = (w * (x - mean.reshape(shape)) ** 2).sum(axis=axes)
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    sum_dy, sum_dy_xhat = dy.sum(axis=axes), (dy * xhat).sum(axis=axes)
    dx = (gamma * inv_std).reshape(shape) * (dy - w * sum_dy.reshape(shape)
                                             - w * xhat * sum_dy_xhat.reshape(shape))
    out = dict(y=gamma.reshape(shape) * xhat + beta.reshape(shape), dx=dx, dgamma=sum_dy_xhat,
               dbeta=sum_dy, running_mean=decay * running_mean + (1 - decay) * mean,
               running_var=decay * running_var + (1 - decay) * var)
    return {k: split(v, sizes) if k in SHARDED_KEYS else v for k, v in out.items()}


def model_errors(out, model) -> dict[str, float]:
    """`errors` of `out` against a convention's `model` that may predict non-finite values: a
    key agrees where both are non-finite at the same places and the finite values are within
    the error shown; non-finite values anywhere else make it NaN (a mismatch, never a pass)."""
    result = {}
    for k in RESULT_KEYS:
        pair = _joined(out, model, k)
        if pair is None or np.shape(pair[0]) != np.shape(pair[1]):
            result[k] = float("inf")
            continue
        got, want = (np.asarray(a, np.float64) for a in pair)
        predicted = ~np.isfinite(want)
        if not np.array_equal(predicted, ~np.isfinite(got)):
            result[k] = float("nan")
            continue
        result[k] = error(got[~predicted], want[~predicted])[1]
    return result
