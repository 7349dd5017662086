"""Parallel strategies: how the one training step is spread over devices.

`pmap` (the default): parameters and optimizer state replicated on every device, each device
takes an equal slice of the global batch, and gradients and loss are averaged with
`lax.pmean`. One device runs the same code with a device axis of one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax.errors import UserError
from gptjax.step import make_eval_step, make_train_step

AXIS = "data"


def select_devices(count: int = 0) -> list:
    devices = jax.local_devices()
    if count <= 0:
        return devices
    if count > len(devices):
        raise UserError(f"--train.devices={count} asks for more devices than the {len(devices)} this process sees.")
    return devices[:count]


def check_divisible(batch_size: int, n_devices: int, what: str = "--train.batch_size") -> None:
    if batch_size % n_devices:
        lower = batch_size // n_devices * n_devices
        upper = lower + n_devices
        options = " or ".join(str(v) for v in (lower, upper) if v > 0)
        raise UserError(
            f"{what}={batch_size} does not split evenly over {n_devices} devices; use {options} "
            f"(a multiple of {n_devices}), or --train.devices to use fewer devices."
        )


def _pmean(tree):
    return jax.lax.pmean(tree, AXIS)


class Pmap:
    """Replicated state, batch split over the leading device axis."""

    def __init__(self, graphdef, tx: optax.GradientTransformation, dropout: float, devices: list):
        self.devices = devices
        self.n = len(devices)
        self._sharding = NamedSharding(Mesh(np.array(devices), (AXIS,)), P(AXIS))
        inner = make_train_step(graphdef, tx, dropout, reduce=_pmean)

        self.traces = 0  # how often the step was traced, i.e. compiled; once per run is right

        def train_step(state, x, y, key):
            self.traces += 1
            # every replica draws its own dropout masks
            return inner(state, x, y, jax.random.fold_in(key, jax.lax.axis_index(AXIS)))

        self._train = jax.pmap(train_step, AXIS, in_axes=(0, 0, 0, None), donate_argnums=(0,), devices=devices)
        self._eval = jax.pmap(make_eval_step(graphdef, reduce=_pmean), AXIS, devices=devices)

    def put_state(self, state):
        """One copy of every leaf per device, stacked on a leading device axis."""
        def replicate(x):
            x = jnp.asarray(x)
            shards = [jax.device_put(x[None], d) for d in self.devices]
            return jax.make_array_from_single_device_arrays((self.n, *x.shape), self._sharding, shards)

        return jax.tree.map(replicate, state)

    def get_state(self, state):
        """The state as one copy on the host's default device (replicas are identical)."""
        return jax.tree.map(lambda x: x[0], state)

    def _split(self, x: np.ndarray, axis: int) -> np.ndarray:
        """(…, b, …) → (n, …, b/n, …): device-major, so device i gets rows [i·b/n, (i+1)·b/n)."""
        shape = x.shape
        x = x.reshape(*shape[:axis], self.n, shape[axis] // self.n, *shape[axis + 1:])
        return jax.device_put(np.moveaxis(x, axis, 0), self._sharding)

    def train_step(self, state, x_ABT, y_ABT, key):
        return self._train(state, self._split(x_ABT, 1), self._split(y_ABT, 1), key)

    def eval_loss(self, state, x_BT, y_BT):
        return self._eval(state["params"], self._split(x_BT, 0), self._split(y_BT, 0))[0]

    @staticmethod
    def first(metrics):
        """Per-device metrics (already averaged) → one value each."""
        return jax.tree.map(lambda m: m[0], metrics)
