"""Devices and `tf.distribute` strategies, from the config's `runtime:`.

Order matters in TensorFlow: logical CPUs and TF_CONFIG must be in place
before the runtime initialises its devices. `setup_devices` runs first, before
anything creates a tensor; when TensorFlow is already initialised (e.g. inside
a test process that made its own logical CPUs) the devices that exist are
reused if there are enough of them.
"""

import json
import os

import tensorflow as tf

from tf_adamw.train import config as config_lib


class TPUNotFoundError(RuntimeError):
    """No TPU could be reached with the configured name."""


class DeviceSetupError(RuntimeError):
    """The requested devices cannot be created in this process."""


def _set_tf_config(runtime):
    """Builds TF_CONFIG from runtime.worker_hosts / runtime.task_index."""
    hosts = [h.strip() for h in runtime.worker_hosts.split(",") if h.strip()]
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": hosts},
        "task": {"type": "worker", "index": runtime.task_index},
    })


def setup_devices(runtime):
    """Makes the logical CPUs / TF_CONFIG the runtime asks for.

    Must run before TensorFlow initialises its devices. Returns the CPU device
    names to mirror over (for `mirrored` on CPUs), else None.

    Raises:
        DeviceSetupError: TensorFlow is already initialised with fewer
            logical CPUs than `runtime.num_cpus`.
    """
    if runtime.distribution_strategy == "multi_worker_mirrored":
        if runtime.worker_hosts:
            _set_tf_config(runtime)
        elif not os.environ.get("TF_CONFIG"):
            raise DeviceSetupError(
                "runtime.distribution_strategy is multi_worker_mirrored but "
                "neither runtime.worker_hosts nor the TF_CONFIG environment "
                "variable describes the cluster.")
    n = runtime.num_cpus
    if n <= 1:
        return None
    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu)
    if existing is None or len(existing) < n:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        except RuntimeError:
            pass  # already initialised: check what exists below
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < n:
        raise DeviceSetupError(
            f"runtime.num_cpus={n} logical CPUs were requested, but "
            f"TensorFlow was already initialised with {len(logical)} in this "
            "process. Run the trainer in a fresh process (python -m "
            "tf_adamw.train ...), or create the logical CPUs before "
            "TensorFlow starts.")
    return [d.name for d in logical[:n]]


def _tpu_strategy(runtime):
    name = runtime.tpu or os.environ.get("TPU_NAME", "")
    if not name:
        raise TPUNotFoundError(
            "No TPU was found: runtime.tpu is empty and TPU_NAME is not set. "
            "Use runtime.tpu=local on a TPU VM, or --tpu=<TPU name>.")
    where = f"TPU {name!r}" + (f" in zone {runtime.tpu_zone}"
                               if runtime.tpu_zone else "")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=name, zone=runtime.tpu_zone or None,
            project=runtime.gcp_project or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except Exception as e:  # pylint: disable=broad-except
        # The resolver, the connection and the TPU system initialisation fail
        # in many ways without a TPU (ValueError, URLError, NotFoundError,
        # UnimplementedError, ...): one clear error, with the cause chained.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TPUNotFoundError(
            f"No TPU was found: could not connect to {where} "
            f"({type(e).__name__}: {first[:300]}). Run on a Cloud TPU VM "
            "(runtime.tpu=local) or pass the name of a reachable TPU with "
            "--tpu.") from e


def create_strategy(runtime, cpu_devices=None):
    """The `tf.distribute.Strategy` for `runtime.distribution_strategy`."""
    kind = runtime.distribution_strategy
    if kind == "one_device":
        return tf.distribute.get_strategy()  # the default strategy
    if kind == "mirrored":
        # Strategies over the same devices in one process share collective
        # group/instance keys unless the key base moves, and then match each
        # other's all-reduces ("Shape mismatch in the collective instance").
        # TF's own tests move it the same way; a trainer run inside a process
        # that already made a MirroredStrategy (a notebook, a test) needs it.
        tf.distribute.MirroredStrategy._collective_key_base += 100000  # pylint: disable=protected-access
        if cpu_devices:
            return tf.distribute.MirroredStrategy(cpu_devices)
        return tf.distribute.MirroredStrategy()
    if kind == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "tpu":
        return _tpu_strategy(runtime)
    raise config_lib.ConfigError(
        f"unknown runtime.distribution_strategy {kind!r}")


def is_chief(strategy):
    """True on the worker that writes summaries, checkpoints and exports."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (
        task_type == "worker" and task_id == 0 and
        "chief" not in resolver.cluster_spec().as_dict())


def task_id(strategy):
    """This worker's index (0 outside multi-worker)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 0
    return int(strategy.cluster_resolver.task_id or 0)


def worker_identity(runtime):
    """(chief, task id) of this process, before the strategy exists.

    Read from TF_CONFIG (which `setup_devices` sets from
    runtime.worker_hosts) the way `is_chief` reads the cluster resolver:
    the chief is task "chief", else worker 0 of a cluster without one.
    Outside multi-worker: (True, 0).
    """
    if runtime.distribution_strategy != "multi_worker_mirrored":
        return True, 0
    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except ValueError:
        return True, 0  # the strategy will say what is wrong with it
    task = tf_config.get("task", {})
    kind, index = task.get("type"), int(task.get("index", 0) or 0)
    has_chief = "chief" in tf_config.get("cluster", {})
    chief = kind in (None, "chief") or (
        kind == "worker" and index == 0 and not has_chief)
    return chief, index


def strategy_name(strategy):
    """The strategy as users know it (its public name, or the device)."""
    # Public names: the classes' own names differ (MultiWorkerMirroredStrategy
    # is a CollectiveAllReduceStrategy).
    for public, name in (
            (tf.distribute.MultiWorkerMirroredStrategy,
             "MultiWorkerMirroredStrategy"),
            (tf.distribute.MirroredStrategy, "MirroredStrategy"),
            (tf.distribute.TPUStrategy, "TPUStrategy"),
            (tf.distribute.OneDeviceStrategy, "OneDeviceStrategy")):
        if isinstance(strategy, public):
            return name
    # The default strategy: TensorFlow's default device.
    device = "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"
    return f"one device ({device})"


def any_worker_function(strategy):
    """`any_worker(flags)`: for each of this worker's bools, whether it is
    True on any worker of the job.

    Outside multi-worker this process is the whole job: the flags as they
    are. In a multi-worker job it is a collective (a sum all-reduce, in a
    tf.function: the eager form is slow and warns): every worker must call
    it, as often and in the same order as its other collectives, or all of
    them wait.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return tuple

    @tf.function(autograph=False)
    def total(x):
        # As the training loop sums its loss: per replica, then reduced.
        per_replica = strategy.run(tf.identity, args=(x,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica,
                               axis=None)

    def any_worker(flags):
        counts = total(tf.constant([float(bool(f)) for f in flags]))
        return tuple(bool(c > 0) for c in counts.numpy())

    return any_worker


def wait_for_all_workers(any_worker):
    """Returns when every worker of a multi-worker job has called it.

    Called before a worker exits. Without it a worker that finishes first
    exits while the chief still writes the exports; the coordination
    service (on the chief) then misses its heartbeats and, ~10 s later,
    logs "The following tasks are unhealthy (stopped sending heartbeats)
    ... The tasks have crashed" about a clean exit. After this barrier (an
    all-reduce) the workers leave together.

    Args:
        any_worker: the job's `any_worker_function(strategy)`.
    """
    any_worker((False,))
