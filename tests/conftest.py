"""Test set-up shared by the whole suite.

TensorFlow must see 4 logical CPUs before it initialises, so this runs at
import time, before any test module touches a device. Strategies are created
once per session: creating one is slow, and tests share them.
"""

import os
import socket
import subprocess
import time

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


def run_together(commands, envs, cwd=None, timeout=90):
    """Runs `commands` at once, as a cluster manager would: once one fails,
    the others are killed (they would wait for it).

    Returns:
        `[(returncode, output)]`, stdout and stderr together; the output of
        a process the test killed says so.
    """
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for cmd, env in zip(commands, envs)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(
                c not in (None, 0) for c in codes):
            break
        time.sleep(0.1)
    results = []
    for p in procs:
        killed = p.poll() is None
        if killed:
            p.kill()
        output, _ = p.communicate()
        if killed:
            output += (f"\n[killed by the test: still running after "
                       f"{timeout} s, or another process failed]")
        results.append((p.returncode, output))
    return results


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
