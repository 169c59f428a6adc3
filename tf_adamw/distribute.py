"""`tf.distribute` plumbing: where the step runs and on which gradients.

The rule that makes N replicas equal one device: gradients are summed across
replicas first, and then every replica runs the *same* pipeline (unscale,
accumulate, clip, decay, Adam, EMA) on the same summed gradients against its
own copies of the variables. No collective runs inside the compiled step, so
it can be compiled by XLA per replica and never sits inside a `tf.cond`.
"""

import tensorflow as tf


def local(variable):
    """The copy of `variable` that belongs to the current replica or device.

    Inside `strategy.extended.update` (merge-call path) and in a replica
    context without merge calls (the TPU path) this is the component on the
    current device; for a plain variable it is the variable itself. Writing
    to the local copy never triggers an aggregation, whatever the variable's
    `aggregation` is: every replica writes the same value to its own copy.
    """
    if isinstance(variable, tf.distribute.DistributedValues):
        return variable._get_on_device_or_primary()  # pylint: disable=protected-access
    return variable


def copies(variable):
    """Every per-replica copy of `variable` (a plain variable: itself)."""
    if isinstance(variable, tf.distribute.DistributedValues):
        return variable.values
    return (variable,)


def check_supported(strategy):
    """Refuses strategies whose variables are not mirrored per replica.

    Raises:
        ValueError: for `ParameterServerStrategy` (variables live on
            parameter servers, there is no all-reduce, and per-replica
            accumulators would be one racy variable) and
            `CentralStorageStrategy`.
    """
    name = type(strategy).__name__
    if "ParameterServer" in name or "CentralStorage" in name:
        raise ValueError(
            f"tf_adamw.AdamW does not support {name}: it has no all-reduce "
            "and keeps one copy of each variable, so the exact "
            "sum-then-clip step (and per-replica accumulators and EMA) cannot "
            "be guaranteed. Use MirroredStrategy, MultiWorkerMirroredStrategy "
            "or TPUStrategy."
        )


def all_reduce_sum(replica_context, grads):
    """Sums dense gradients across replicas in one batched all-reduce.

    Args:
        replica_context: the current `tf.distribute.ReplicaContext`.
        grads: list of dense tensors.

    Returns:
        The summed tensors, identical on every replica.
    """
    if not grads:
        return grads
    return replica_context.all_reduce(tf.distribute.ReduceOp.SUM, grads)


def is_distributed(value):
    """True for per-replica values (e.g. gradients returned by `run`)."""
    return isinstance(value, tf.distribute.DistributedValues)
