"""Synchronized batch norm on real engines: torch.distributed gloo with 4 processes, JAX
shard_map over 4 virtual CPU devices (in a child process), MXNet over 4 CPU contexts with its
kvstore. Every result is held against `common.sync.reference_step` (the float64 NumPy reference
on the concatenated batch): float64 within 1e-12 relative, float32 within 1e-5 (common.sync).

Each backend's SyncGroup of 4 workers is started once for the module and serves world sizes 1-4.
The natives are measured as they are: torch.nn.SyncBatchNorm refuses CPU tensors, Flax and MXNet
average per-device moments unweighted (exact for equal shards only)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import backends
from backends.pool import WorkerError, WorkerPool
from common import data, lenet
from common import sync as cs
from common.reference import random_case
from conftest import REPO, load_backend

import sync_faults

WORLD = 4


@pytest.fixture(scope="module")
def engine():
    """name -> (backend module, its SyncGroup of 4), each started on first use (again if a test
    killed it), all closed at the end of the module."""
    started = {}

    def get(name):
        if name not in started or started[name][1].pool.closed:
            b = load_backend(name)
            kw = {"timeout": 30.0, "job_timeout": 300.0} if name == "torch" else {"timeout": 300.0}
            started[name] = (b, b.SyncGroup(WORLD, **kw))
        return started[name]

    yield get
    for _, group in started.values():
        group.close()


def _case(shape, sizes, dtype, seed=0):
    """Seeded inputs with a non-zero mean (so the merge has work to do), split into shards."""
    c = random_case(shape, seed=seed, dtype=dtype, mean=3.0, scale=2.0)
    return dict(xs=cs.split(c["x"], sizes), dys=cs.split(c["dy"], sizes), gamma=c["gamma"],
                beta=c["beta"], running_mean=c["running_mean"], running_var=c["running_var"])


def _check(out, ref, dtype, sizes):
    for key in cs.SHARDED_KEYS:
        assert [len(a) for a in out[key]] == sizes, key
        for got, want in zip(out[key], ref[key]):
            assert got.shape == want.shape and got.dtype == dtype, (key, got.shape, got.dtype)
    errs = cs.errors(out, ref)
    tol = cs.TOLERANCE[np.dtype(dtype).name]
    bad = {k: e for k, e in errs.items() if not (e <= tol)}
    assert not bad, f"errors above {tol:g}: {bad}"
    return errs


# --- common.sync: the merge and the checks, framework-free --------------------------------------

@pytest.mark.parametrize("sizes", [[40, 16, 8, 0], [1, 0, 0, 63], [64], [0, 32, 32]])
def test_chan_merge_gives_the_full_batch_statistics(sizes):
    """Unequal and empty shards, data with |mean| ≫ std: the merged (count, mean, M2) equals the
    two-pass statistics of the whole batch, while E[x²]−E[x]² loses most digits."""
    rng = np.random.default_rng(1)
    x = rng.normal(1e6, 1.0, size=(64, 3, 2, 2))
    count, mean, m2 = cs.merge_moments(cs.local_moments(s) for s in cs.split(x, sizes))
    want_mean, want_var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    _, var = cs.moments_to_stats(count, mean, m2)
    assert count == 64 * 4
    assert np.max(np.abs(mean - want_mean)) <= 1e-12 * 1e6
    assert np.max(np.abs(var - want_var) / want_var) <= 1e-9
    naive = (x ** 2).mean(axis=(0, 2, 3)) - want_mean ** 2
    assert np.max(np.abs(naive - want_var) / want_var) > 1e-6  # why the merge is Chan's


def test_merge_of_empty_workers_is_empty_and_unbiased_variance_uses_the_global_count():
    zeros = np.zeros(2)
    assert cs.chan_merge((0, zeros, zeros), (0, zeros, zeros))[0] == 0
    x = np.arange(10.0).reshape(5, 2)
    n, mean, m2 = cs.merge_moments([cs.local_moments(x[:2]), cs.local_moments(x[2:])])
    np.testing.assert_allclose(cs.moments_to_stats(n, mean, m2, unbiased=True)[1],
                               x.var(axis=0, ddof=1), rtol=1e-15)


def test_sizes_and_split():
    assert cs.equal_sizes(10, 4) == [3, 3, 2, 2]
    assert cs.equal_sizes(64, 4) == [16] * 4
    shards = cs.split(np.arange(64 * 3).reshape(64, 3), [40, 16, 8, 0])
    assert [s.shape for s in shards] == [(40, 3), (16, 3), (8, 3), (0, 3)]
    for bad, msg in (([40, 16], "add up to 56"), ([65, -1], ">= 0"), ([], "at least one"),
                     ([1.5, 62.5], "int")):
        with pytest.raises(ValueError, match=msg):
            cs.split(np.zeros((64, 3)), bad)


def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


BAD_SHARDS = {
    "world larger than batch": (lambda c: dict(c, xs=cs.split(c["xs"][0][:2], [1, 1, 0]),
                                               dys=cs.split(c["dys"][0][:2], [1, 1, 0])),
                                "world size 3 is larger than the batch"),
    "every shard empty": (lambda c: dict(c, xs=[x[:0] for x in c["xs"]],
                                         dys=[d[:0] for d in c["dys"]]), "every shard is empty"),
    "channels differ": (lambda c: dict(c, xs=[c["xs"][0], c["xs"][1][:, :2]],
                                       dys=[c["dys"][0], c["dys"][1][:, :2]]),
                        "xs\\[1\\] has 2 channels but xs\\[0\\] has 3"),
    "ndim differs": (lambda c: dict(c, xs=[c["xs"][0], c["xs"][1][:, :, 0]],
                                    dys=[c["dys"][0], c["dys"][1][:, :, 0]]), "is 3-D but"),
    "dtype differs": (lambda c: dict(c, xs=[c["xs"][0], c["xs"][1].astype(np.float32)]),
                      "float32 but xs\\[0\\] is float64"),
    "dy shape": (lambda c: dict(c, dys=[c["dys"][0], c["dys"][1][:1]]), "dys\\[1\\] has shape"),
    "dy count": (lambda c: dict(c, dys=c["dys"][:1]), "dys has 1 arrays but xs has 2"),
    "not a list": (lambda c: dict(c, xs=np.concatenate(c["xs"])), "one array per worker"),
    "no workers": (lambda c: dict(c, xs=[], dys=[]), "at least one worker"),
}


@pytest.mark.parametrize("bad", BAD_SHARDS, ids=list(BAD_SHARDS))
def test_bad_shards_are_one_line_value_errors(bad):
    make, match = BAD_SHARDS[bad]
    case = make(_case((6, 3, 2, 2), [4, 2], np.float64))
    _one_line_error(lambda: cs.reference_step(**case, training=True), match)


def test_errors_are_nan_safe():
    case = _case((8, 3), [5, 3], np.float64)
    ref = cs.reference_step(**case, training=True)
    lying = {k: [a.copy() for a in v] if k in cs.SHARDED_KEYS else v.copy() for k, v in ref.items()}
    lying["dx"][1][0, 0] = np.nan
    assert np.isnan(cs.errors(lying, ref)["dx"]) and not cs.within_tolerance(lying, ref, np.float64)
    short = dict(ref, y=ref["y"][:1])
    assert cs.errors(short, ref)["y"] == float("inf")
    assert cs.within_tolerance(ref, ref, np.float64)


# --- every backend's from-scratch sync step on its engine ---------------------------------------

STEP_CASES = {  # name: (shape, shard sizes, dtype, training, unbiased)
    "4d-40+16+8+0-f64": ((64, 3, 4, 4), [40, 16, 8, 0], np.float64, True, False),
    "4d-40+16+8+0-f64-unbiased": ((64, 3, 4, 4), [40, 16, 8, 0], np.float64, True, True),
    "2d-equal-4x8-f32": ((32, 5), [8, 8, 8, 8], np.float32, True, False),
    "2d-7+3-f64": ((10, 4), [7, 3], np.float64, True, False),
    "2d-0+5+6-f64-inference": ((11, 4), [0, 5, 6], np.float64, False, False),
}


@pytest.mark.parametrize("name", backends.names())
@pytest.mark.parametrize("case", STEP_CASES, ids=list(STEP_CASES))
def test_scratch_sync_step_equals_full_batch_reference(engine, name, case):
    b, group = engine(name)
    shape, sizes, dtype, training, unbiased = STEP_CASES[case]
    inputs = _case(shape, sizes, dtype, seed=len(case))
    kw = dict(training=training, unbiased=unbiased, eps=1e-5, decay=0.9)
    out = b.sync_bn_step(**inputs, **kw, impl="scratch", group=group)
    _check(out, cs.reference_step(**inputs, **kw), np.dtype(dtype), sizes)


@pytest.mark.parametrize("name", backends.names())
def test_bad_input_to_the_engines_is_a_value_error_and_the_group_survives(engine, name):
    b, group = engine(name)
    good = _case((6, 3, 2, 2), [4, 2], np.float64)
    for bad in ("world larger than batch", "every shard empty", "channels differ"):
        make, match = BAD_SHARDS[bad]
        _one_line_error(lambda: b.sync_bn_step(**make(good), training=True, group=group), match)
    five = _case((10, 3), [2] * 5, np.float64)
    _one_line_error(lambda: b.sync_bn_step(**five, training=True, group=group), "4")
    with pytest.raises(ValueError, match="impl"):
        b.sync_bn_step(**good, training=True, impl="no-such-impl", group=group)
    out = b.sync_bn_step(**good, training=True, group=group)
    _check(out, cs.reference_step(**good, training=True), np.dtype(np.float64), [4, 2])


# --- the natives, measured ------------------------------------------------------------------------

def test_torch_native_sync_batch_norm_on_cpu_is_unavailable_with_torchs_message(engine):
    b, group = engine("torch")
    inputs = _case((16, 3, 2, 2), [8, 8], np.float64)
    with pytest.raises(backends.UnsupportedSetting, match="unbiased"):
        b.sync_bn_step(**inputs, training=True, unbiased=False, impl="native", group=group)
    if group.backend == "nccl":  # CUDA: measured like the others
        out = b.sync_bn_step(**inputs, training=True, unbiased=True, impl="native", group=group)
        _check(out, cs.reference_step(**inputs, training=True, unbiased=True),
               np.dtype(np.float64), [8, 8])
        return
    with pytest.raises(backends.DeviceUnavailable,
                       match="SyncBatchNorm expected input tensor to be on GPU") as e:
        b.sync_bn_step(**inputs, training=True, unbiased=True, impl="native", group=group)
    assert "78081" in str(e.value)
    # inference needs no synchronisation, and runs
    out = b.sync_bn_step(**inputs, training=False, impl="native", group=group)
    _check(out, cs.reference_step(**inputs, training=False), np.dtype(np.float64), [8, 8])


def _native_error(b, group, shape, sizes, dtype):
    inputs = _case(shape, sizes, dtype, seed=3)
    out = b.sync_bn_step(**inputs, training=True, impl="native", group=group)
    return cs.errors(out, cs.reference_step(**inputs, training=True)), out


def test_flax_native_is_exact_on_equal_shards_and_unweighted_on_unequal_ones(engine):
    b, group = engine("jax")
    errs, _ = _native_error(b, group, (32, 3, 2, 2), [8, 8, 8, 8], np.float64)
    assert max(errs.values()) <= 1e-12, errs
    errs, _ = _native_error(b, group, (10, 3, 2, 2), [7, 3], np.float64)
    # pmean of per-device masked means: the mean is off, so is everything downstream of it;
    # dbeta = Σdy does not depend on the statistics
    assert errs["y"] > 1e-2 and errs["running_mean"] > 1e-3, errs
    assert errs["dbeta"] <= 1e-12, errs
    _, out = _native_error(b, group, (12, 3), [6, 6, 0], np.float64)
    assert np.isnan(np.concatenate(out["y"])).any()  # an empty device's 0/0 mean reaches everyone


def test_mxnet_contrib_sync_batch_norm_float32_only_unweighted(engine):
    b, group = engine("mxnet")
    errs, _ = _native_error(b, group, (32, 3, 2, 2), [8, 8, 8, 8], np.float32)
    assert max(errs.values()) <= 1e-5, errs
    errs, _ = _native_error(b, group, (10, 3, 2, 2), [7, 3], np.float32)
    assert errs["y"] > 1e-2 and errs["running_mean"] > 1e-3, errs
    for shape, sizes, dtype, match in (((8, 3), [4, 4], np.float64, "float64"),
                                       ((8, 3), [4, 4, 0], np.float32, "empty shard")):
        with pytest.raises(backends.UnsupportedSetting, match=match):
            _native_error(b, group, shape, sizes, dtype)


# --- data-parallel LeNet-BN --------------------------------------------------------------------

@pytest.fixture(scope="module")
def lenet_batches(sample_dir):
    images, labels = data.load("train", sample_dir, limit=3 * 32)
    x = data.to_nchw_float(images, np.float64)
    return [(x[i], labels[i]) for i in data.batch_indices(len(x), 32, seed=0)]


@pytest.mark.parametrize("name", backends.names())
def test_data_parallel_lenet_with_sync_bn_follows_full_batch_training(engine, name, lenet_batches):
    """3 SGD steps on 4 workers holding 20+8+4+0 of each 32-row batch: with synchronized batch
    norm the float64 trajectory is the single-process one; with local batch norm it is not."""
    b, group = engine(name)
    params = lenet.init_params(0)
    single = b.lenet_train(params, lenet_batches, lr=0.5, impl="scratch", unbiased=False)
    kw = dict(world_size=4, shard_sizes=[20, 8, 4, 0], lr=0.5, group=group)
    synced = b.sync_lenet_train(params, lenet_batches, sync=True, **kw)
    np.testing.assert_allclose(synced["losses"], single["losses"], rtol=0, atol=1e-10)
    diffs = lenet.max_abs_diff(synced["params"], single["params"])
    assert max(diffs.values()) <= 1e-10, {k: v for k, v in diffs.items() if v > 1e-10}
    assert synced["seconds"] > 0
    local = b.sync_lenet_train(params, lenet_batches, sync=False, **kw)
    drift = lenet.max_abs_diff(local["params"], single["params"])
    assert max(drift.values()) > 1e-3, drift  # local statistics change the trajectory
    assert abs(local["losses"][-1] - single["losses"][-1]) > 1e-4


@pytest.mark.parametrize("name", backends.names())
def test_data_parallel_bad_input(engine, name, lenet_batches):
    b, group = engine(name)
    params = lenet.init_params(0)
    for kw, match in ((dict(world_size=40), "world size 40 is larger than batch 0"),
                      (dict(world_size=2, shard_sizes=[20, 8]), "add up to 28"),
                      (dict(world_size=2, shard_sizes=[31, 1], sync=False), "1 row")):
        _one_line_error(lambda: b.sync_lenet_train(params, lenet_batches, lr=0.5, group=group,
                                                   **kw), match)


# --- reliability: crashes and hangs end in a clear error, and leave no process behind -------------

def _children():
    """Live child processes of this process (the multiprocessing resource tracker aside)."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and b"resource_tracker" not in cmd:
            found.add(int(entry))
    return found


def _assert_gone(pids, before):
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} is still there"
    assert _children() <= before, f"new child processes left: {_children() - before}"


def _fault(group, fault, match, before):
    pids = group.pool.pids
    start = time.monotonic()
    with pytest.raises(WorkerError, match=match) as e:
        group.run(fault, [(1,)] * group.world_size)
    assert time.monotonic() - start < 30
    assert f"killed all {group.world_size} workers" in str(e.value) and "\n" not in str(e.value)
    _assert_gone(pids, before)
    with pytest.raises(WorkerError, match="closed"):
        group.run(sync_faults.pid, [()] * group.world_size)


def test_a_crashed_gloo_worker_ends_in_a_clear_error_and_no_orphans(engine):
    """Rank 1 of the module's 4-process gloo group dies while the others are in an all-reduce:
    WorkerError at once, every worker killed and reaped (the fixture restarts the group for
    any later test)."""
    _, group = engine("torch")
    before = _children() - set(group.pool.pids)
    _fault(group, sync_faults.crash_or_allreduce,
           "rank 1 died \\(exit code 3\\) during crash_or_allreduce", before)


def test_a_hung_gloo_worker_ends_in_a_clear_error_and_no_orphans():
    """A 2-process gloo group with a 3 s collective timeout: rank 1 hangs while rank 0 waits in
    an all-reduce, which times out; WorkerError within seconds, every worker killed."""
    tb = load_backend("torch")
    before = _children()
    group = tb.SyncGroup(2, backend="gloo", timeout=3.0, job_timeout=60.0)
    _fault(group, sync_faults.hang_or_allreduce,
           "rank 0 failed in hang_or_allreduce: .*(imed out|imeout).*; rank\\(s\\) \\[1\\] had "
           "not answered", before)


def test_a_call_without_a_group_starts_its_own_and_leaves_nothing_behind():
    """jax: a temporary child process (torch and mxnet start theirs through the same
    backends.pool.group_for)."""
    b = load_backend("jax")
    before = _children()
    inputs = _case((6, 3), [5, 1], np.float64)
    out = b.sync_bn_step(**inputs, training=True)
    _check(out, cs.reference_step(**inputs, training=True), np.dtype(np.float64), [5, 1])
    assert _children() <= before


def test_a_silent_worker_is_killed_at_the_job_timeout():
    before = _children()
    with WorkerPool(2, "sync_faults:no_state", timeout=60.0, name="test worker") as pool:
        pids = pool.pids
        assert sorted(pool.run(sync_faults.pid, [(), ()])) == sorted(pids)
        start = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank\(s\) \[0, 1\] gave no answer to sleep "
                                              r"within 1 s; killed all 2 workers"):
            pool.run(sync_faults.sleep, [(60,), (60,)], timeout=1.0)
        assert time.monotonic() - start < 15
    _assert_gone(pids, before)


def test_a_worker_that_cannot_start_is_reported():
    with pytest.raises(WorkerError, match="rank 0 failed in start: ModuleNotFoundError"):
        WorkerPool(1, "no_such_module_here:init", start_timeout=60.0)


# --- the multi-machine command, on one machine ---------------------------------------------------

def test_torchrun_runs_the_checked_step(tmp_path):
    """`torchrun ... -m backends.torch.sync` (what runs across machines with --nnodes): 2 ranks
    on loopback, one of them empty, checked on rank 0 against the reference."""
    load_backend("torch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "backends.torch.sync", "--sizes", "5,0", "--shape", "3,2,2", "--timeout", "30"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert result["ok"] and result["sizes"] == [5, 0] and result["world_size"] == 2
    assert max(result["errors"].values()) <= 1e-12
