"""`tf.distribute` plumbing: where the step runs and on which gradients.

The rule that makes N replicas equal one device: gradients are summed across
replicas first, and then every replica runs the *same* pipeline (unscale,
accumulate, clip, decay, Adam, EMA) on the same summed gradients against its
own copies of the variables. No collective runs inside the compiled step, so
it can be compiled by XLA per replica and never sits inside a `tf.cond`
(docs/semantics.md, "Distribution").
"""

import tensorflow as tf

from tf_adamw import update


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


def require_cross_replica(what, because):
    """Refuses a call made inside `strategy.run` (a replica context).

    Raises:
        ValueError: naming `what` must be called from, and why.
    """
    if tf.distribute.has_strategy() and (
            not tf.distribute.in_cross_replica_context()):
        raise ValueError(
            f"Call `{what}` outside `strategy.run` (in a cross-replica "
            f"context): {because}")


def check_same_strategy(built, current):
    """Refuses a step under another strategy than the one of `build()`."""
    if current is not built:
        raise ValueError(
            "This optimizer was built under a different tf.distribute "
            f"strategy ({type(built).__name__}) than the current one "
            f"({type(current).__name__}). Create and `build()` the "
            "optimizer under `strategy.scope()` of the strategy that runs "
            "the step.")


def on_every_replica(strategy, grads, step, extra, *, anchor, targets,
                     compute_dtypes, aggregate):
    """Runs `step(grads, extra)` on every replica, on the summed gradients.

    In a replica context the gradients are summed across replicas (unless
    `aggregate` is False: the caller already did), then every replica runs
    the step on its own copies. In a cross-replica context per-replica
    gradients are summed and plain tensors are taken as the global
    gradients; the step runs once per replica.

    Args:
        strategy: the current strategy (the optimizer's).
        grads: list aligned with `targets`, None where absent.
        step: `step(full_grads, extra)`, run once per replica.
        extra: passed to `step` through the strategy (tensors of the
            caller's replica stay on its device).
        anchor: a mirrored variable to colocate the update with.
        targets: the model variables (reduction destinations and shapes).
        compute_dtypes: per variable, the dtype to reduce in.
        aggregate: sum replica-context gradients across replicas.
    """
    indices = [i for i, g in enumerate(grads) if g is not None]
    bad = _bad_sparse_gradients(grads, targets)
    present = [_to_reduce(grads[i], targets[i], compute_dtypes[i])
               for i in indices]

    def run_on_this_replica(_, present_grads, extra):
        full = [None] * len(grads)
        for i, g in zip(indices, present_grads):
            full[i] = g
        return step(full, extra)

    if tf.distribute.in_cross_replica_context():
        if any(is_distributed(g) for g in present):
            present = strategy.extended.batch_reduce_to(
                tf.distribute.ReduceOp.SUM,
                [(g, targets[i]) for i, g in zip(indices, present)])
        strategy.extended.update(anchor, run_on_this_replica,
                                 args=(present, extra))
        return
    if aggregate:
        # The count of bad sparse gradients rides in the same all-reduce.
        present = all_reduce_sum(tf.distribute.get_replica_context(),
                                 present + ([] if bad is None else [bad]))
        if bad is not None:
            bad = present.pop()
    if bad is not None:
        extra = dict(extra, **{SPARSE_INDICES_VALID: tf.equal(bad, 0.0)})

    def update_every_replica(strategy, present_grads, extra):
        return strategy.extended.update(
            anchor, run_on_this_replica, args=(present_grads, extra),
            group=False)

    tf.__internal__.distribute.interim.maybe_merge_call(
        update_every_replica, strategy, present, extra)


def _to_reduce(grad, target, compute_dtype):
    """`grad` as it is all-reduced: dense, in the compute dtype (so the
    reduction and the copies between devices are in it); per-replica
    values as they are."""
    if is_distributed(grad):
        return grad
    return tf.cast(update.densify(grad, target.shape), compute_dtype)


# The key of `extra` under which `on_every_replica` hands the step whether
# every replica's sparse gradients had their indices in range.
SPARSE_INDICES_VALID = "sparse_indices_valid"


def _bad_sparse_gradients(grads, targets):
    """In a graph, a float32 scalar: how many of this replica's sparse
    gradients have an index outside their variable's rows (None eagerly or
    without sparse gradients).

    `densify` drops such indices, so the step, which only sees the summed
    dense gradients, could not tell. Outside XLA the assertion of
    `state.checked_slices` has already failed the call; inside XLA (a TPU
    replica) assertions compile to nothing, and the step skips the call
    on this count instead (`pipeline.run`'s `valid`), on every replica
    alike since the count is summed with the gradients.
    """
    if tf.executing_eagerly():
        return None
    checks = [update.indices_in_range(g.indices, targets[i].shape[0])
              for i, g in enumerate(grads)
              if isinstance(g, tf.IndexedSlices)]
    if not checks:
        return None
    return tf.reduce_sum(tf.cast(tf.logical_not(tf.stack(checks)),
                                 tf.float32))


def strategy_for_build(init_strategy):
    """The current strategy, checked for `build()`.

    Args:
        init_strategy: the strategy current when the optimizer was created.

    Raises:
        ValueError: an unsupported strategy, another strategy than
            `init_strategy`, or a replica context.
    """
    strategy = tf.distribute.get_strategy()
    check_supported(strategy)
    if strategy is not init_strategy:
        raise ValueError(
            f"This optimizer was created under {type(init_strategy).__name__}"
            f" but is built under {type(strategy).__name__}. Create the "
            "optimizer and call `optimizer.build(model.trainable_variables)` "
            "inside the same `strategy.scope()`.")
    require_cross_replica(
        "optimizer.build(model.trainable_variables)",
        "the optimizer cannot create its slots inside `strategy.run` "
        "(replica context). Call it under `strategy.scope()` before running "
        "the training step.")
    return strategy
