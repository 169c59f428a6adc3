"""Test set-up shared by the whole suite.

TensorFlow must see 4 logical CPUs before it initialises, so this runs at
import time, before any test module touches a device. Strategies are created
once per session: creating one is slow, and tests share them.
"""

import os
import socket

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_REPLICAS = 4

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_REPLICAS
)

CPU_DEVICES = [f"/cpu:{i}" for i in range(NUM_REPLICAS)]


def free_ports(n):
    """`n` distinct free TCP ports on 127.0.0.1, for worker processes."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def make_mirrored_strategy(merge_call=True):
    """A MirroredStrategy over the 4 logical CPUs with its own collective keys.

    Strategies over the same devices otherwise share collective group and
    instance keys, and collectives of one get matched with another's
    ("Shape mismatch in the collective instance"); TF's own tests bump the
    key base the same way (strategy_combinations.py).
    """
    tf.distribute.MirroredStrategy._collective_key_base += 100000  # pylint: disable=protected-access
    strategy = tf.distribute.MirroredStrategy(CPU_DEVICES)
    if not merge_call:
        strategy.extended._use_merge_call = lambda: False  # pylint: disable=protected-access
    return strategy


@pytest.fixture(scope="session")
def mirrored_strategy():
    """MirroredStrategy over 4 logical CPUs (merge calls enabled)."""
    return make_mirrored_strategy()


@pytest.fixture(scope="session")
def tpu_like_strategy():
    """MirroredStrategy with merge calls disabled: the TPUStrategy path.

    TF's own tests emulate TPUStrategy's no-merge-call replica context this
    way.
    """
    return make_mirrored_strategy(merge_call=False)


def step_traces(optimizer):
    """How many times the optimizer's step functions have been traced.

    Counts every kind (`AdamW.tracing_count`): an eager fused step traces
    only its small scalars function; a fused step inside a `tf.function` is
    traced into that function's graph and counts 0.
    """
    return optimizer.tracing_count()
