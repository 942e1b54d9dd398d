"""The backend contract, written once as code: what every `backends.<name>` package exports, with
each signature and its meaning, and `check(module)`, which lists where a module departs from it.

`Backend` is a `typing.Protocol` whose methods are the backend's module-level functions (a module
satisfies it the way PEP 544 lets modules satisfy protocols; the `self` of each stub stands for the
module). Arrays in and out are NumPy; the framework stays inside the backend.

Extending it: a new function is one stub in `Backend` (with its docstring). One that only some
backends have yet is marked `@optional`: `check` then verifies its signature where a backend
defines it and says nothing where it does not. Backends may add keyword-only parameters WITH
defaults to any function (framework-specific options such as jax's `fast_variance`); anything else
that differs (a missing, renamed, reordered or extra parameter, another kind or default) is a
problem.

Importing this module imports no framework.
"""
from __future__ import annotations

import inspect
import typing
from typing import Any, Protocol

REQUIRED_IMPLS = ("scratch", "native")  # every backend has both; more are allowed


def optional(stub):
    """Mark a contract function that only some backends have: checked only where present."""
    stub.__contract_optional__ = True
    return stub


def is_optional(stub) -> bool:
    return getattr(stub, "__contract_optional__", False)


class Timer(Protocol):
    """What `speed_timer` returns: built, compiled and warmed up on creation."""

    info: dict
    """{"compile_s": seconds of building, compiling and warming up, "device": description,
    "path": what is timed (e.g. "CUDA graph", "jit + lax.scan", "eager"), ...}"""

    def run(self) -> dict:
        """Time `steps` training steps with proper synchronisation: {"examples_per_s": ..., ...}."""


class Backend(Protocol):
    """One framework's batch norm and LeNet-BN behind one interface (module-level functions)."""

    IMPLS: tuple[str, ...]
    """Impl names; "scratch" and "native" in every backend (torch adds "scratch-analytic")."""

    # --- bn.py ------------------------------------------------------------------------------

    def make_layer(self, impl, num_features, num_dims, *, eps=1e-5, decay=0.9, unbiased=None,
                   accumulate="float32"):
        """A fresh, training-ready batch-norm layer of `impl`, in the framework's own type (a
        torch `nn.Module`, a Gluon `HybridBlock`, a Flax linen `Module`), for `num_features`
        channels of `num_dims`-D input (2: N×C, 4: images), configured in canonical terms:
        `decay` (`common.spec`: the weight kept on the old running value), translated through
        `common.spec` to the impl's own `momentum`; `eps`; `unbiased` (True: the running variance
        takes the ÷(m-1) batch variance, False: the ÷m one, None: the impl's own convention);
        `accumulate` (`common.dtypes.ACCUMULATE`): the precision of the statistics for float16
        and bfloat16 input, "float32" (at least float32, the default) or "input" (the input's
        dtype; from-scratch impls, and native ones whose framework has that switch).
        A setting the impl cannot express raises `UnsupportedSetting`; bad `num_features` or
        `num_dims` raise ValueError. Flax modules take their feature count from the input at
        `init`, so there `num_features` is validated but not stored."""

    def bn_step(self, x, gamma, beta, running_mean, running_var, dy, *, training, eps=1e-5,
                decay=0.9, unbiased=False, impl="scratch", accumulate="float32",
                device="cpu") -> dict:
        """The signature and return dict of `common.reference.bn_step` (y, dx, dgamma, dbeta,
        running_mean, running_var), computed by `impl` in the input's dtype on NCHW (or N×C)
        arrays. float32/float64: every array in that dtype. float16/bfloat16 (NumPy float16,
        `ml_dtypes.bfloat16`): the framework's mixed-precision idiom (float32 parameters and
        statistics) or, with `accumulate="input"`, the layer in the input dtype; y and dx come
        back in the input dtype, dgamma/dbeta in the parameters' dtype and the running statistics
        in the dtype the impl keeps them (what `precision_probe` reports). `decay` is canonical
        (`common.spec`) and translated to the impl's own `momentum`. `device` as in `fit` ("cpu",
        "gpu", "auto"). A setting the impl cannot express raises `UnsupportedSetting` (a
        ValueError) instead of computing something else; bad shapes raise ValueError
        (`common.reference.validate_inputs`)."""

    def conventions(self) -> dict:
        """{impl: {field: value for field in common.spec.CONVENTION_FIELDS}, plus "notes"}. For
        "native", defaults read from the installed framework, not hard-coded."""

    # --- probe.py ---------------------------------------------------------------------------

    def observe(self, impl, *, seed=0) -> dict:
        """Evidence for conventions(): `common.conventions.experiment` on fresh layers of `impl`
        built with their own defaults, through the backend's adapter (`probe.Adapter`, the
        protocol in common/conventions.py: float64, the framework's own training/inference
        switch, statistics read after forward and after backward, several steps). Returns
        {"family", "built", "claimed", "observations"}; `common.conventions.measure(
        observations)` turns the record into the convention fields, so the conventions table is
        an experiment, not a claim."""

    def experiment(self, factory, args=(), kwargs=None, *, name, seed=0) -> dict:
        """`observe` for any layer class or factory of this framework (behind `compare.py
        probe`): layers built by `factory(*args, **kwargs)`. What cannot be probed raises
        `common.conventions.ProbeInputError` (one line)."""

    @optional
    def precision_probe(self, impl, dtype, *, accumulate="float32", device="cpu") -> dict:
        """The precision `impl` really computes and keeps in a `dtype` (float16/bfloat16)
        training step, measured on `common.precision.probe_input(dtype)` with gamma 1, beta 0:
        {"output_dtype", "grad_dtype" (dx), "param_dtype" (gamma's gradient), "running_dtype"
        (the running statistics as kept), read from the framework's arrays; "stats_dtype",
        "stats_error", "candidate_errors" from `common.precision.stats_precision` (the output's
        error against float64 next to what each candidate precision gives); "device"}."""

    # --- lenet.py ---------------------------------------------------------------------------

    def lenet_train(self, params, batches, *, lr, impl, eps=1e-5, decay=0.9, unbiased=None,
                    dtype="float64", device="cpu", record=False, loss_scale=None) -> dict:
        """Plain SGD on mean cross-entropy from the canonical parameter dict (`common.lenet`)
        over `batches`, an iterable of (x N×1×28×28 float, y int) NumPy pairs; one step per
        batch. Returns {"losses": [float per step], "params": canonical dict}. `unbiased=None`
        keeps the impl's own running-variance convention. `record=True` adds "history": the
        canonical dict (NumPy, in `dtype`) after every step, for
        `common.lenet_reference.check_trajectory`. float16/bfloat16 train in the framework's
        mixed-precision idiom with float32 master parameters (returned as float32) and static
        loss scaling (`loss_scale`, `common.dtypes.loss_scale`: None is ×1024 for float16, none
        for bfloat16); the result then holds "precision": {"compute", "params", "idiom",
        "loss_scale", "skipped_steps"}. A dtype the framework cannot train in on the device
        raises `UnsupportedSetting` saying why."""

    def lenet_eval(self, params, x, *, impl, dtype="float64", device="cpu", eps=1e-5,
                   fix_gamma=False):
        """Logits (N×10 NumPy array) of LeNet-BN with canonical `params` on N×1×28×28 `x`, in
        inference mode (running statistics), with the checkpoint's `eps`. `fix_gamma=True`
        computes as MXNet's fix_gamma=True does (every gamma taken as 1): MXNet's native layer
        with its own option, every other impl with gamma replaced by ones."""

    def lenet_layers(self, params, x, *, impl, dtype="float64", device="cpu", eps=1e-5,
                     fix_gamma=False, inputs=None) -> dict:
        """`lenet_eval`'s forward, every layer's output (`common.lenet.LAYERS`: conv1, bn1,
        sigmoid1, pool1, ..., flatten, fc1, ..., fc3) in canonical layouts (NCHW; flatten in
        C×H×W order). `inputs={layer: array}` (same layouts) feeds that layer the given input
        instead of the previous layer's output (isolated mode, see `common.divergence`)."""

    # --- checkpoint.py ----------------------------------------------------------------------

    def save_checkpoint(self, params, path, *, impl, bn_config) -> None:
        """LeNet-BN in the framework's own format: PyTorch state_dict (torch.save), Flax
        variables (flax.serialization msgpack), Gluon parameters (save_parameters); params keep
        their dtype. `bn_config` is canonical {eps, decay, unbiased[, num_batches_tracked]}
        (`common.convert.check_bn_config`), kept as the framework's own settings in a JSON
        sidecar (`common.checkpoint`); a setting the impl cannot run raises UnsupportedSetting.
        Writes are atomic."""

    def load_checkpoint(self, path) -> tuple:
        """(params, bn_config) of a checkpoint in the framework's own format. Loading tells the
        impl from the file's names where they differ (and the sidecar), takes the textbook
        nn.Sequential layouts too, and without a sidecar uses the layer's defaults. A truncated,
        foreign or mismatched file is a one-line ValueError naming the problem (the key, for a
        mismatch)."""

    def read_checkpoint(self, path) -> dict:
        """`load_checkpoint` with what it found: {"params", "bn_config", "impl", "layout",
        "sidecar"}."""

    # --- train.py ---------------------------------------------------------------------------

    def fit(self, data, *, impl, epochs, batch_size=256, lr=1.0, seed=0, device="auto",
            dtype="float32", eps=1e-5, decay=0.9, params=None, progress=None,
            loss_scale=None) -> dict:
        """Train LeNet-BN on `data` (a `common.data.Dataset`: NCHW float train/test arrays) with
        minibatches from `common.data.batch_indices(n, batch_size, seed=seed, epoch=e)`, so
        every backend sees the same batches in the same order. `device`: "auto" (the GPU where
        this backend can use one), "cpu" or "gpu" (raises `DeviceUnavailable`, with a clear
        reason, if it cannot). `progress(str)` gets a line per epoch (`backends.epoch_line`).
        Returns {"device": description of the device actually used, "history": [{"epoch",
        "loss", "train_acc", "test_acc", "examples_per_s", "seconds"}], "final_loss",
        "train_acc", "test_acc", "examples_per_s", "wall_s"}; examples_per_s counts training
        steps only. `dtype` and `loss_scale` as in `lenet_train` (float16/bfloat16 add
        "precision")."""

    def speed_timer(self, *, impl, device="auto", batch_size=256, dtype="float32",
                    steps=50) -> Timer:
        """Training-step throughput of LeNet-BN on the fastest path this backend has for `impl`
        on `device` (data resident on the device, compiled/fused steps where the framework
        offers them), on synthetic Fashion-MNIST-shaped data. Creating the timer builds,
        compiles and warms up (`Timer.info`); `timer.run()` times `steps` steps. compare.py
        creates every impl's timer and then takes the runs round-robin, so that a slow spell of
        a shared machine hits every impl alike and the scratch/native ratio is measured fairly.
        The fast path must give the same losses as the plain `lenet_train` path (tested).
        float16/bfloat16 run the framework's mixed-precision idiom, as in `lenet_train` (the info
        then holds "precision"), or raise `UnsupportedSetting` where the device cannot."""

    def source_timer(self, *, impl, device="auto", batch_size=256, dtype="float32",
                     steps=50) -> Timer:
        """The speed report's baseline, measured in the same run as `speed_timer`: LeNet-BN
        trained the way the sources train it (`source.py`): the source's from-scratch layer
        (`textbook_batch_norm` in the source's module, impl="scratch") or the framework's own
        layer (impl="native") in the textbook's model, and the source's loop: a host→device copy
        of every batch, the source's step (eager, or jitted as the source jits it) and the loss
        read back per batch. Same timer interface as `speed_timer`."""

    def speed(self, *, impl, device="auto", batch_size=256, dtype="float32", steps=50,
              repeats=5) -> dict:
        """One impl alone: `backends.time_alone(speed_timer(...), repeats)`."""

    # --- sync.py: synchronized batch norm (framework-free parts in common/sync.py, worker
    # processes in backends/pool.py) ----------------------------------------------------------

    SYNC_IMPLS: tuple[str, ...]
    """("scratch", "native"). "scratch" merges per-worker (count, mean, M2) count-weighted
    (Chan), so unequal and empty shards give the full-batch statistics; "native" is the
    framework's own layer, measured as it is (torch.nn.SyncBatchNorm, flax BatchNorm(axis_name),
    MXNet contrib SyncBatchNorm). Each backend also has `SyncGroup(world_size, *, timeout=...)`:
    the engine's workers, started once and reused (torch: a torch.distributed group, gloo on CPU
    over loopback, nccl with a GPU per worker; jax: a child process that sees `world_size`
    devices; mxnet: a child process with `world_size` CPU contexts and a kvstore)."""

    def sync_bn_step(self, xs, gamma, beta, running_mean, running_var, dys, *, training,
                     eps=1e-5, decay=0.9, unbiased=False, impl="scratch") -> dict:
        """One step on len(xs) workers, NumPy in and out: `xs`/`dys` one array per worker (2-D
        or 4-D, row counts may differ, 0 included). Returns {"y": [per worker], "dx": [per
        worker], "dgamma", "dbeta" (all-reduced totals), "running_mean", "running_var"}; it must
        equal `common.sync.reference_step` (`common.reference.bn_step` on the concatenated
        batch: float64 within 1e-12 relative, float32 within 1e-5). Backends add `group=None`:
        a SyncGroup to run on (None: one started for the call). Bad shards raise one-line
        ValueErrors (`common.sync.validate_shards`); a setting or device the impl cannot serve
        raises UnsupportedSetting / DeviceUnavailable with the framework's own reason."""

    def sync_lenet_train(self, params, batches, *, world_size, shard_sizes=None, sync=True, lr,
                         eps=1e-5, decay=0.9, unbiased=None, dtype="float64") -> dict:
        """Data-parallel LeNet-BN (from-scratch batch norm): each batch split by `shard_sizes`
        (default as equal as possible), the loss Σ cross-entropy / batch size, gradients
        all-reduced, so the update is full-batch SGD. sync=True normalises over the whole
        batch (the float64 trajectory equals `lenet_train`'s to 1e-10); sync=False with each
        worker's own statistics (running statistics then rank 0's). Returns {"losses",
        "params", "seconds"} (seconds: the training loop on the workers after compilation,
        communication included). Backends add `group=None` as for `sync_bn_step`."""

    def exact_numerics(self) -> None:
        """Turn off TF32 and reduced-precision matmuls in this process (for agreement and
        trajectory runs on a GPU). A no-op where the framework has none."""

    def versions(self) -> dict:
        """{package: version} of the framework packages this backend uses."""


def functions(contract=Backend) -> dict:
    """{name: stub} of the contract's functions, in the order they are written (the protocols
    it extends first)."""
    out = {}
    for klass in reversed(contract.__mro__):
        if klass is not object and klass.__module__ != "typing":  # not Protocol, Generic
            out.update((k, v) for k, v in vars(klass).items()
                       if inspect.isfunction(v) and not k.startswith("_"))
    return out


def attributes(contract=Backend) -> dict:
    """{name: type} of the contract's data members (e.g. IMPLS)."""
    return typing.get_type_hints(contract)


def names(contract=Backend, *, include_optional=True) -> list[str]:
    """Every member name of the contract (data members first)."""
    fns = [k for k, v in functions(contract).items() if include_optional or not is_optional(v)]
    return list(attributes(contract)) + fns


def _stub_parameters(stub) -> list[inspect.Parameter]:
    params = list(inspect.signature(stub).parameters.values())
    return params[1:] if params and params[0].name == "self" else params


def _same_default(a, b) -> bool:
    return a is b or (type(a) is type(b) and a == b)


def _kind(p: inspect.Parameter) -> str:
    return p.kind.description


def _default(p: inspect.Parameter) -> str:
    return "no default" if p.default is p.empty else f"default {p.default!r}"


def signature_problems(stub, function) -> list[str]:
    """Where `function`'s parameters depart from the contract `stub`'s (empty if they agree)."""
    try:
        have = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError) as e:
        return [f"has no inspectable signature ({e})"]
    want = _stub_parameters(stub)
    want_names = [p.name for p in want]
    by_name = {p.name: p for p in have}
    problems = []
    missing = [n for n in want_names if n not in by_name]
    if missing:
        problems.append(f"missing parameter(s) {', '.join(missing)}")
    for p in have:
        if p.name not in want_names and (p.kind is not p.KEYWORD_ONLY or p.default is p.empty):
            problems.append(f"extra parameter {p.name!r} ({_kind(p)}, {_default(p)}): only "
                            "keyword-only parameters with a default may be added")
    order = [p.name for p in have if p.name in want_names]
    if order != [n for n in want_names if n in by_name]:
        problems.append(f"parameter order ({', '.join(order)}), the contract's is "
                        f"({', '.join(want_names)})")
    for p in want:
        q = by_name.get(p.name)
        if q is None:
            continue
        if q.kind != p.kind:
            problems.append(f"parameter {p.name!r} is {_kind(q)}, the contract's is {_kind(p)}")
        if not _same_default(q.default, p.default):
            problems.append(f"parameter {p.name!r} has {_default(q)}, the contract's has "
                            f"{_default(p)}")
    return problems


def _attribute_problems(name, value, hint) -> list[str]:
    origin = typing.get_origin(hint) or hint
    if isinstance(origin, type) and not isinstance(value, origin):
        return [f"{name}: is a {type(value).__name__}, the contract's is {hint}"]
    args = typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        wrong = [v for v in value if not isinstance(v, args[0])]
        if wrong or not value:
            return [f"{name}: must be a non-empty {hint}, got {value!r}"]
    if name == "IMPLS":
        lacking = [i for i in REQUIRED_IMPLS if i not in value]
        if lacking:
            return [f"IMPLS: lacks {', '.join(map(repr, lacking))} (every backend has "
                    f"{' and '.join(REQUIRED_IMPLS)}), got {value!r}"]
    return []


def check(module: Any, contract=Backend) -> list[str]:
    """Problems of `module` (a backend package, or any object with attributes) against
    `contract`, one readable line each; empty when it conforms."""
    problems = []
    for name, hint in attributes(contract).items():
        if not hasattr(module, name):
            problems.append(f"{name}: missing")
        else:
            problems += _attribute_problems(name, getattr(module, name), hint)
    for name, stub in functions(contract).items():
        if not hasattr(module, name):
            if not is_optional(stub):
                problems.append(f"{name}: missing")
            continue
        member = getattr(module, name)
        if not callable(member):
            problems.append(f"{name}: is a {type(member).__name__}, not a function")
            continue
        problems += [f"{name}: {p}" for p in signature_problems(stub, member)]
    return problems
