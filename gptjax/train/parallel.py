"""Parallel strategies: how the one training step is spread over devices, on one host or many.

`pmap` (the default): parameters and optimizer state replicated on every device, each device
takes an equal slice of the global batch, and gradients and loss are averaged with
`lax.pmean`. One device runs the same code with a device axis of one.

`fsdp`: the same step compiled with `jax.jit` over a one-axis device mesh. Every parameter and
optimizer-state leaf is split along one of its dimensions (ZeRO-3, fully sharded data parallel),
the batch along its batch axis, and XLA inserts the all-gathers and reduce-scatters. jit sees
the global batch, so the loss's own mean is already the mean over all devices: no `reduce`.
With `--train.mesh=data:M,model:N` the mesh has a second axis: the attention's and the feed-forward
layer's matrices are split over `model` along their heads and width (Megatron's column- and
row-parallel layout: c_attn and c_fc by their outputs, both c_proj by their inputs), every leaf is
also split over `data` as above, and the batch only over `data`; the compiler places the activations
and inserts the collectives, so the step is the same function on any mesh.

Both take the global batch in its natural layout (micro-batch A, row B, position T) and span
every device of every process: with several processes, each one passes only its own rows
(`rows`), and the union over processes is the global batch one process would have read.
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax.errors import UserError
from gptjax.train.step import LOSS_CHUNK, make_eval_step, make_train_step

AXIS = "data"
MODEL = "model"


def parse_mesh(spec: str, n: int, processes: int = 1) -> tuple[int, int]:
    """(data, model) sizes of --train.mesh ('', 'model:2', 'data:4,model:2') on n devices."""
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition(":")
        if name not in (AXIS, MODEL) or not size.isdigit() or int(size) < 1 or name in sizes:
            raise UserError(f"--train.mesh={spec!r}: expected axes data:M and model:N, each once, with sizes of at "
                            "least 1 (e.g. data:4,model:2, or model:2 for every other device on data).")
        sizes[name] = int(size)
    model = sizes.get(MODEL, 1)
    data = sizes.get(AXIS, n // model if n % model == 0 else 0)
    if data * model != n:
        raise UserError(f"--train.mesh={spec!r} needs {data * model or 'a multiple of ' + str(model)} devices, and this "
                        f"run has {_count(n, processes)}; the sizes must multiply to the device count.")
    if model > 1 and (n // processes) % model:
        raise UserError(f"--train.mesh={spec!r}: the model axis ({model}) must split each process's "
                        f"{n // processes} devices evenly, so that a process's devices hold whole rows of the batch.")
    return data, model


def select_devices(count: int = 0) -> list:
    """`count` devices of this process (0: all), and as many of every other process's, process by process."""
    local = jax.local_devices()
    if count > len(local):
        raise UserError(f"--train.devices={count} asks for more devices than the {len(local)} this process sees.")
    count = count or len(local)
    if jax.process_count() == 1:
        return local[:count]
    # the same list on every process; a process's devices stay together, as its rows of the batch do
    return [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)[:count]]


def describe(devices: list) -> str:
    """'8 cpu devices (2 processes x 4)'."""
    return _count(len(devices), jax.process_count(), f"{devices[0].platform} ")


def _count(n: int, processes: int = 1, kind: str = "") -> str:
    per = f" ({processes} processes x {n // processes})" if processes > 1 else ""
    return f"{n} {kind}device{'s' if n > 1 else ''}{per}"


def plan_batch(batch_size: int, grad_accum: int, n: int, processes: int = 1) -> tuple[int, int]:
    """(micro-batches, rows per micro-batch) for a step of batch_size x grad_accum sequences on n devices.

    Every micro-batch must split evenly over the devices. When batch_size does not but the whole
    step does and gradient accumulation was asked for (grad_accum > 1), the step's rows are re-cut
    into equal micro-batches that do: the same rows and the same mean loss, so the same update up
    to float rounding. Otherwise the nearest valid sizes are named; this runs before any compilation.
    """
    if batch_size % n == 0:
        return grad_accum, batch_size
    total = batch_size * grad_accum
    if grad_accum > 1 and total % n == 0:
        micro = min((m for m in range(n, total + 1, n) if total % m == 0), key=lambda m: (abs(m - batch_size), m))
        return total // micro, micro
    lower = batch_size // n * n
    options = " or ".join(str(v) for v in (lower, lower + n) if v > 0)
    raise UserError(
        f"--train.batch_size={batch_size} does not split evenly over {_count(n, processes)}; use {options} "
        f"(a multiple of {n}), or --train.devices to use fewer devices per process, or a --train.grad_accum "
        f"that makes batch_size x grad_accum a multiple of {n} (the micro-batches are then re-cut to fit)."
    )


class Strategy(abc.ABC):
    """What the trainer asks of a way of spreading the step over devices. A state is a dict of params,
    opt_state and step; a batch is (micro-batch A, row B, position T) integer arrays, this process's rows
    of the global batch (`rows`). Each strategy says where a state lives (`placement`), moves a state
    there and back (`put_state`, `get_state`, `host_params`), and runs the compiled steps."""

    def __init__(self, devices: list):
        self.devices, self.n = devices, len(devices)
        self.mesh = Mesh(np.array(devices), (AXIS,))
        self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
        self.traces = 0  # how often the step was traced, i.e. compiled; once per run is right

    def rows(self, batch_size: int) -> slice:
        """This process's rows of every global (micro-)batch: the p-th of equal parts."""
        share = batch_size // jax.process_count()
        return slice(jax.process_index() * share, (jax.process_index() + 1) * share)

    @staticmethod
    def _key_like():
        return jax.eval_shape(lambda: jax.random.key(0))

    def init_state(self, make):
        """The state that `make()` (pure, jit-able) returns, created in `placement` and put on the devices."""
        shapes = jax.eval_shape(make)
        return self.put_state(jax.jit(make, out_shardings=self.placement(shapes))())

    @abc.abstractmethod
    def placement(self, tree):
        """The sharding of each leaf of `tree` (shapes) where a state is created or restored."""

    @abc.abstractmethod
    def put_state(self, state):
        """A state (placed or whole) as the step takes it."""

    @abc.abstractmethod
    def get_state(self, state):
        """The state as a checkpoint is written from it."""

    @abc.abstractmethod
    def host_params(self, state):
        """A full copy of the parameters, for sampling and task scores; every process calls it."""

    @abc.abstractmethod
    def train_step(self, state, x_ABT, y_ABT, key):
        """One optimizer step on a batch: (new state, metrics with loss, grad_norm and finite)."""

    @abc.abstractmethod
    def eval_loss(self, state, x_BT, y_BT):
        """The mean loss of one batch, without an update."""

    @staticmethod
    @abc.abstractmethod
    def first(metrics):
        """The step's metrics as one value each, read on the host."""

    @abc.abstractmethod
    def lower(self, state, x_ABT):
        """The step lowered for abstract inputs, for the memory report."""


class Pmap(Strategy):
    """Replicated state, batch split over the leading device axis."""

    def __init__(self, graphdef, tx: optax.GradientTransformation, dropout: float, devices: list,
                 skip_nonfinite: bool = False, loss_chunk: int = LOSS_CHUNK, remat: str = "none", mesh: str = ""):
        super().__init__(devices)
        if parse_mesh(mesh, self.n, jax.process_count())[1] > 1:
            raise UserError(f"--train.mesh={mesh!r} splits the model over devices, which needs --train.parallel=fsdp; "
                            "pmap keeps a whole replica on every device.")
        # pmap takes and returns host-local arrays: a leading axis over this process's devices only
        self._local = NamedSharding(Mesh(np.array(self.local_devices), (AXIS,)), P(AXIS))
        inner = make_train_step(graphdef, tx, dropout, reduce=_pmean, skip_nonfinite=skip_nonfinite,
                                loss_chunk=loss_chunk, remat=remat)

        def train_step(state, x, y, key):
            self.traces += 1
            # every replica draws its own dropout masks
            return inner(state, x, y, jax.random.fold_in(key, jax.lax.axis_index(AXIS)))

        self._train = jax.pmap(train_step, AXIS, in_axes=(0, 0, 0, None), donate_argnums=(0,), devices=devices)
        self._eval = jax.pmap(make_eval_step(graphdef, reduce=_pmean, loss_chunk=loss_chunk), AXIS, devices=devices)

    def shardings(self, tree):
        """The layout of one replica: whole on every device."""
        return jax.tree.map(lambda _: NamedSharding(self.mesh, P()), tree)

    def placement(self, tree):
        """Where a state is created or restored before put_state: whole, on this process's first device."""
        return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(self.local_devices[0]), tree)

    def put_state(self, state):
        """One copy of every leaf per local device, stacked on a leading device axis."""
        def replicate(x):
            x = jnp.asarray(x)
            shards = [jax.device_put(x[None], d) for d in self.local_devices]
            return jax.make_array_from_single_device_arrays((len(shards), *x.shape), self._local, shards)

        return jax.tree.map(replicate, state)

    def get_state(self, state):
        """One replica, to save: on one device in one process. With several processes, a global array
        replicated over every device, which every process hands to orbax and process 0 writes.

        The replica is device 0's own buffer, sliced there: `x[0]` on the stacked array is a computation
        over every device, with collectives, and on simulated CPU devices its launch deadlocked now and
        then (some devices waiting in the all-reduce for others that never started)."""
        if jax.process_count() == 1:
            return jax.tree.map(lambda x: x.addressable_shards[0].data[0], state)
        replicated = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda x: jax.make_array_from_single_device_arrays(
            x.shape[1:], replicated, [s.data[0] for s in x.addressable_shards]), state)

    def host_params(self, state):
        """A full copy of the parameters in host memory (every process has one already): device 0's
        replica read as it is, with no computation dispatched (see get_state)."""
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], state["params"])

    def _split(self, x: np.ndarray, axis: int):
        """(…, b, …) → (n, …, b/n, …): device-major, so local device i gets rows [i·b/n, (i+1)·b/n)."""
        n, shape = len(self.local_devices), x.shape
        x = x.reshape(*shape[:axis], n, shape[axis] // n, *shape[axis + 1:])
        return jax.device_put(np.moveaxis(x, axis, 0), self._local)

    def train_step(self, state, x_ABT, y_ABT, key):
        return self._train(state, self._split(x_ABT, 1), self._split(y_ABT, 1), key)

    def eval_loss(self, state, x_BT, y_BT):
        return self._eval(state["params"], self._split(x_BT, 0), self._split(y_BT, 0))[0]

    @staticmethod
    def first(metrics):
        """Per-device metrics (already averaged) → one value each."""
        return jax.tree.map(lambda m: m[0], metrics)

    def lower(self, state, x_ABT):
        """The step lowered for abstract inputs (global shapes, no device axis), for a memory report."""
        A, B, T = x_ABT.shape
        x = jax.ShapeDtypeStruct((self.n, A, B // self.n, T), x_ABT.dtype)
        state = jax.tree.map(lambda s: jax.ShapeDtypeStruct((self.n, *s.shape), s.dtype), state)
        return self._train.lower(state, x, x, self._key_like())


def _pmean(tree):
    return jax.lax.pmean(tree, AXIS)


class Fsdp(Strategy):
    """State sharded over the devices leaf by leaf, batch sharded by rows, one jit-compiled step."""

    def __init__(self, graphdef, tx: optax.GradientTransformation, dropout: float, devices: list,
                 skip_nonfinite: bool = False, loss_chunk: int = LOSS_CHUNK, remat: str = "none", mesh: str = ""):
        super().__init__(devices)
        self.data, self.model = parse_mesh(mesh, self.n, jax.process_count())
        self.mesh = Mesh(np.array(devices).reshape(self.data, self.model), (AXIS, MODEL))
        self._step = make_train_step(graphdef, tx, dropout, skip_nonfinite=skip_nonfinite, loss_chunk=loss_chunk,
                                     remat=remat)
        self._eval_step = make_eval_step(graphdef, loss_chunk=loss_chunk)
        self._replicated = NamedSharding(self.mesh, P())
        self._rows = {2: NamedSharding(self.mesh, P(AXIS)), 3: NamedSharding(self.mesh, P(None, AXIS))}
        self._train = self._eval = self._key = None

    def spec(self, shape: tuple, path: tuple = ()) -> P:
        """The tensor-parallel dimension of a block's matrix (and bias) over `model`; then the largest other
        dimension that `data` divides over `data`; a leaf with none is replicated."""
        axes = [None] * len(shape)
        split = self._model_dim(path, shape) if self.model > 1 else None
        if split is not None:
            if shape[split] % self.model:
                name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
                raise UserError(f"--train.mesh: the model axis ({self.model} devices) must divide the heads' and the "
                                f"feed-forward layer's width, and {name} has {shape[split]} there; choose a model axis "
                                "that divides n_head x head size, the key/value width and 4 x n_embd.")
            axes[split] = MODEL
        dims = sorted((i for i, size in enumerate(shape) if size % self.data == 0 and i != split and self.data > 1),
                      key=lambda i: -shape[i])
        if dims:
            axes[dims[0]] = AXIS
        return P(*axes)

    @staticmethod
    def _model_dim(path: tuple, shape: tuple) -> int | None:
        """Which dimension of this leaf the model axis splits: the output of c_attn and of the feed-forward
        c_fc (kernels and biases), the input of both c_proj; None for everything else. A leaf of the
        optimizer state has its parameter's path at its end; a stacked block's leaf a leading layer axis."""
        keys = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        if len(keys) < 3 or keys[-1] not in ("kernel", "bias") or keys[-3] not in ("attn", "mlp"):
            return None
        layer, leaf = keys[-2], keys[-1]
        if layer in ("c_attn", "c_fc"):
            return len(shape) - 1
        if layer == "c_proj" and leaf == "kernel":
            return len(shape) - 2
        return None

    def shardings(self, tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: NamedSharding(self.mesh, self.spec(np.shape(x), path)), tree)

    def placement(self, tree):
        """Where a state is created or restored: straight into its shards, so that no process ever holds
        the whole of it (initialisation compiled with these output shardings, orbax reading into them)."""
        return self.shardings(tree)

    def _compile(self, state) -> None:
        """Wrap the step once the state's shapes, and so its shardings, are known."""
        if self._train is not None:
            return
        sh, rows = self.shardings(state), self._rows[3]

        def train_step(state, x, y, key):
            self.traces += 1
            return self._step(state, x, y, key)

        self._train = jax.jit(train_step, in_shardings=(sh, rows, rows, self._replicated),
                              out_shardings=(sh, self._replicated), donate_argnums=(0,))
        self._eval = jax.jit(self._eval_step, in_shardings=(sh["params"], self._rows[2], self._rows[2]),
                             out_shardings=self._replicated)

    def put_state(self, state):
        """Each device gets its slice of every leaf; leaves already so sharded (created or restored in place)
        stay as they are, others are sliced from a whole copy in this process."""
        self._compile(state)

        def put(x, sharding):
            if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        return jax.tree.map(put, state, self.shardings(state))

    def get_state(self, state):
        """The sharded state as it is: orbax writes each shard from the process that holds it."""
        return state

    def host_params(self, state):
        """A full copy of the parameters in host memory: a collective, every process must call it."""
        return multihost_utils.process_allgather(state["params"], tiled=True)

    def _global(self, x: np.ndarray, axis: int):
        """This process's rows → the global batch, sharded by rows over every device."""
        shape = list(x.shape)
        shape[axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(self._rows[x.ndim], x, tuple(shape))

    def _replicate_key(self, key):
        """The same key on every device of every process (device_put cannot reach other processes' devices)."""
        data = np.asarray(jax.random.key_data(key))
        if self._key is None or not np.array_equal(self._key[0], data):
            on_all = jax.make_array_from_callback(data.shape, self._replicated, lambda index: data[index])
            self._key = data, jax.random.wrap_key_data(on_all, impl=jax.random.key_impl(key))
        return self._key[1]

    def train_step(self, state, x_ABT, y_ABT, key):
        return self._train(state, self._global(x_ABT, 1), self._global(y_ABT, 1), self._replicate_key(key))

    def eval_loss(self, state, x_BT, y_BT):
        return self._eval(state["params"], self._global(x_BT, 0), self._global(y_BT, 0)).addressable_data(0)

    @staticmethod
    def first(metrics):
        """Metrics are replicated scalars: this process's copy."""
        return jax.tree.map(lambda m: m.addressable_data(0), metrics)

    def lower(self, state, x_ABT):
        """The step lowered for abstract inputs (global shapes), for a memory report."""
        self._compile(state)
        return self._train.lower(state, x_ABT, x_ABT, self._key_like())


STRATEGIES = {"pmap": Pmap, "fsdp": Fsdp}
