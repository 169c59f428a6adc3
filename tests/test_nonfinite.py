"""`skip_nonfinite_gradients=True`: a NaN/Inf step changes nothing but a count.

On one device and on 4 logical CPUs (with and without merge calls), with
accumulation and EMA: a run with poisoned calls equals, bit for bit, a run in
which those calls never happened, and every replica takes the same decision
even when only one replica's gradient is poisoned.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_adamw

CONFIG = dict(learning_rate=0.05, weight_decay=0.01, amsgrad=True,
              use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=3,
              gradient_accumulation_steps=2, global_clipnorm=1.0,
              skip_nonfinite_gradients=True)
CALLS = 10
POISONED = {2: np.nan, 5: np.inf, 6: -np.inf}


def _gradient(call):
    rng = np.random.default_rng(call)
    g = rng.normal(size=(3, 2)).astype(np.float32)
    return g / 4  # each of 4 replicas (or the one device) adds a quarter


def _state(strategy, variable, optimizer):
    out = {"var": variable, "iterations": optimizer.iterations,
           "skipped": optimizer.skipped_steps}
    out.update(optimizer.slots_for(variable))
    result = {}
    for name, v in out.items():
        copies = [c.numpy() for c in strategy.experimental_local_results(v)]
        for c in copies[1:]:
            np.testing.assert_array_equal(c, copies[0], err_msg=name)
        result[name] = copies[0]
    return result


def _run(strategy, calls, poison, **changes):
    """Applies `calls`; a poisoned call gets NaN/Inf on replica 0 only."""
    with strategy.scope():
        variable = tf.Variable(np.ones((3, 2), np.float32))
        optimizer = tf_adamw.AdamW(**dict(CONFIG, **changes))
        optimizer.build([variable])

    @tf.function
    def step(g, bad):
        def replica_fn(g, bad):
            ctx = tf.distribute.get_replica_context()
            n = ctx.num_replicas_in_sync
            # Every replica's share is g * 4 / n; replica 0 carries the
            # poison.
            share = g * 4.0 / tf.cast(n, tf.float32)
            is_first = tf.equal(ctx.replica_id_in_sync_group, 0)
            share = tf.where(is_first, share + bad, share)
            optimizer.apply_gradients([(share, variable)])
        strategy.run(replica_fn, args=(g, bad))

    for call in calls:
        bad = POISONED.get(call, 0.0) if poison else 0.0
        step(tf.constant(_gradient(call)), tf.constant(bad, tf.float32))
    return _state(strategy, variable, optimizer)


def _strategies(mirrored, tpu_like):
    return {"one_device": tf.distribute.get_strategy(),
            "mirrored": mirrored, "tpu_like": tpu_like}


# Without accumulation the fused kernel is told whether to apply (no
# conditional around it); with it, the step is a conditional.
@pytest.mark.parametrize("accumulation", [2, None])
@pytest.mark.parametrize("kind", ["one_device", "mirrored", "tpu_like"])
def test_poisoned_calls_are_skipped_exactly(kind, accumulation,
                                            mirrored_strategy,
                                            tpu_like_strategy):
    strategy = _strategies(mirrored_strategy, tpu_like_strategy)[kind]
    poisoned = _run(strategy, range(CALLS), poison=True,
                    gradient_accumulation_steps=accumulation)
    clean = _run(strategy, [c for c in range(CALLS) if c not in POISONED],
                 poison=False, gradient_accumulation_steps=accumulation)
    assert poisoned["skipped"] == len(POISONED)
    assert clean["skipped"] == 0
    for name in ("var", "momentum", "velocity", "velocity_hat", "average",
                 "iterations") + (("accumulator",) if accumulation else ()):
        np.testing.assert_array_equal(poisoned[name], clean[name],
                                      err_msg=name)
    assert np.all(np.isfinite(poisoned["var"]))


def test_a_skipped_call_touches_nothing():
    variable = tf.Variable(np.ones((3, 2), np.float32))
    optimizer = tf_adamw.AdamW(**CONFIG)
    optimizer.apply_gradients([(tf.constant(_gradient(0)), variable)])
    before = [v.numpy() for v in optimizer.variables] + [variable.numpy()]
    bad = np.full((3, 2), 0.5, np.float32)
    bad[1, 1] = np.nan
    optimizer.apply_gradients([(tf.constant(bad), variable)])
    after = [v.numpy() for v in optimizer.variables] + [variable.numpy()]
    changed = [v.name for v, b, a in zip(
        optimizer.variables + [variable], before, after)
        if not np.array_equal(b, a)]
    assert changed == [optimizer.skipped_steps.name]


def test_default_keeps_keras_behaviour():
    variable = tf.Variable(np.ones((2,), np.float32))
    optimizer = tf_adamw.AdamW(learning_rate=0.1)
    optimizer.apply_gradients([(tf.constant([np.nan, 1.0]), variable)])
    assert np.isnan(variable.numpy()[0])
    assert optimizer.iterations.numpy() == 1
    with pytest.raises(AttributeError, match="skip_nonfinite_gradients"):
        optimizer.skipped_steps  # pylint: disable=pointless-statement


def test_skip_nonfinite_gradients_must_be_bool():
    with pytest.raises(TypeError, match="skip_nonfinite_gradients"):
        tf_adamw.AdamW(skip_nonfinite_gradients="yes")


def _op_types(function):
    """The op types of a concrete function and of the functions it calls."""
    graph = function.graph
    types = [op.type for op in graph.get_operations()]
    for inner in graph._functions.values():  # the branches of conditionals
        types += [op.type for op in inner.graph.get_operations()]
    return types


@pytest.mark.parametrize("accumulation", [None, 2])
def test_the_guard_is_no_conditional_around_the_tf_op_update(accumulation):
    """Issue #13: the guard's verdict selects each write's old value
    instead of branching around the update (XLA compiles a conditional's
    branches apart and copies their operands), and so does accumulation's
    choice between adding and applying."""
    variables = [tf.Variable(tf.zeros([3, 2])) for _ in range(5)]
    optimizer = tf_adamw.AdamW(
        use_ema=True, global_clipnorm=1.0, skip_nonfinite_gradients=True,
        gradient_accumulation_steps=accumulation, fused=False,
        jit_compile=False)
    optimizer.build(variables)
    step = tf.function(lambda grads: optimizer.apply(grads, variables))
    types = _op_types(step.get_concrete_function(
        [tf.TensorSpec([3, 2], tf.float32)] * 5))
    conditionals = [t for t in types if t in (
        "If", "StatelessIf", "Case", "StatelessCase")]
    assert conditionals == [], conditionals
