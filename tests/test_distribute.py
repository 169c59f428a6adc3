"""N replicas on a split batch == one device on the whole batch.

Every feature runs on one device and on 4 logical CPUs, both with merge calls
(MirroredStrategy) and without (the TPUStrategy path), inside `tf.function`,
with the per-replica update compiled by XLA (and once without XLA). After
every step each variable and slot equals the single-device run and all
replica copies are identical.
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_adamw
import tf_adamw.slots
from conftest import NUM_REPLICAS

GLOBAL_BATCH = 16
NUM_STEPS = 6
FEATURES = 5
VOCAB = 7


def _data(step, dyadic):
    rng = np.random.default_rng(1000 + step)
    if dyadic:
        # Multiples of 1/16 in [-1, 1]: per-replica gradient sums are exact
        # in bfloat16, so 16-bit runs can be compared exactly too.
        x = rng.integers(-16, 17, size=(GLOBAL_BATCH, FEATURES)) / 16.0
    else:
        x = rng.normal(size=(GLOBAL_BATCH, FEATURES))
    y = rng.normal(size=(GLOBAL_BATCH, 3))
    ids = rng.integers(0, VOCAB, size=(GLOBAL_BATCH,))
    return (x.astype(np.float32), y.astype(np.float32),
            ids.astype(np.int32))


def _make_variables(kernel_dtype):
    rng = np.random.default_rng(7)
    kernel = tf.Variable(
        rng.normal(size=(FEATURES, 3)).astype(np.float32), name="kernel",
        dtype=tf.float32)
    if kernel_dtype != tf.float32:
        kernel = tf.Variable(tf.cast(kernel, kernel_dtype), name="kernel")
    bias = tf.Variable(np.zeros(3, np.float32), name="bias")
    embedding = tf.Variable(
        rng.normal(size=(VOCAB, 3)).astype(np.float32), name="embedding")
    return [kernel, bias, embedding]


def _loss(variables, x, y, ids, dyadic):
    kernel, bias, embedding = variables
    kernel = tf.cast(kernel, tf.float32)
    if dyadic:
        # Linear in the variables: gradients are sums of dyadic numbers.
        pred = tf.matmul(x, kernel) + bias + tf.gather(embedding, ids)
        return tf.reduce_sum(pred * y[:, :1] * 0 + pred) / GLOBAL_BATCH
    pred = tf.matmul(x, kernel) + bias + tf.gather(embedding, ids)
    return tf.reduce_sum(tf.square(pred - y)) / GLOBAL_BATCH


CASES = {
    "clipnorm": dict(clipnorm=0.05),
    "global_clipnorm": dict(global_clipnorm=0.1),
    "clipvalue": dict(clipvalue=0.02),
    "amsgrad": dict(amsgrad=True),
    "ema_overwrite": dict(use_ema=True, ema_momentum=0.5,
                          ema_overwrite_frequency=2),
    "accumulation_schedule_ema": dict(
        gradient_accumulation_steps=2, use_ema=True, ema_momentum=0.7,
        learning_rate="schedule"),
    "loss_scale": dict(loss_scale_factor=128.0),
    "bf16": dict(kernel_dtype="bfloat16", learning_rate=0.05),
}


def _optimizer(case, jit_compile, fused, slot_layout="separate"):
    kwargs = dict(CASES[case])
    kwargs.pop("kernel_dtype", None)
    if kwargs.get("learning_rate") == "schedule":
        import keras  # pylint: disable=g-import-not-at-top
        kwargs["learning_rate"] = keras.optimizers.schedules.ExponentialDecay(
            0.01, decay_steps=1, decay_rate=0.5)
    kwargs.setdefault("learning_rate", 0.01)
    return tf_adamw.AdamW(weight_decay=0.1, jit_compile=jit_compile,
                          fused=fused, slot_layout=slot_layout, **kwargs)


def _state(optimizer, variables):
    """Every variable and slot, as lists of per-replica numpy copies."""
    out = {}
    for v in variables:
        name = v.name.split(":")[0]
        out[name] = v
        for slot, var in optimizer.slots_for(v).items():
            out[f"{name}/{slot}"] = var
    out["iterations"] = optimizer.iterations
    return out


def _copies(strategy, variable):
    if strategy is None:
        return [variable.numpy()]
    if isinstance(variable, tf_adamw.slots.SlotView):
        return [c.numpy() for c in variable.copies()]
    return [c.numpy() for c in strategy.experimental_local_results(variable)]


def _run(case, strategy, jit_compile=True, fused=None,
         slot_layout="separate"):
    """Trains NUM_STEPS; returns the state after every step.

    `fused=None` runs the fused CPU kernel (the default here), `fused=False`
    the XLA step (with `jit_compile`) that TPUs and GPUs run.
    """
    dtype = tf.as_dtype(CASES[case].get("kernel_dtype", "float32"))
    dyadic = dtype != tf.float32
    scope = strategy.scope() if strategy else tf.distribute.get_strategy(
    ).scope()
    with scope:
        variables = _make_variables(dtype)
        optimizer = _optimizer(case, jit_compile, fused, slot_layout)
        optimizer.build(variables)
    assert optimizer.uses_fused_kernel == (fused is None)

    def replica_step(x, y, ids):
        with tf.GradientTape() as tape:
            loss = _loss(variables, x, y, ids, dyadic)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))

    if strategy is None:
        step = tf.function(replica_step)
    else:
        @tf.function
        def step(x, y, ids):
            strategy.run(replica_step, args=(x, y, ids))

    history = []
    for i in range(NUM_STEPS):
        x, y, ids = _data(i, dyadic)
        if strategy is None:
            step(x, y, ids)
        else:
            per = GLOBAL_BATCH // NUM_REPLICAS

            def shard(ctx, arr):
                r = ctx.replica_id_in_sync_group
                return tf.constant(arr[r * per:(r + 1) * per])

            dist = [
                strategy.experimental_distribute_values_from_function(
                    lambda ctx, a=a: shard(ctx, a))
                for a in (x, y, ids)
            ]
            step(*dist)
        history.append({
            k: _copies(strategy, v)
            for k, v in _state(optimizer, variables).items()
        })
    return history


_SINGLE_DEVICE = {}


def _single_device(case):
    """The one-device run of `case` (fused kernel), computed once."""
    if case not in _SINGLE_DEVICE:
        _SINGLE_DEVICE[case] = _run(case, None)
    return _SINGLE_DEVICE[case]


def _assert_matches(history, reference, case):
    for step, (got, want) in enumerate(zip(history, reference)):
        for name, copies in got.items():
            for replica, copy in enumerate(copies[1:], start=1):
                np.testing.assert_array_equal(
                    copy, copies[0],
                    err_msg=f"{case}: step {step}: {name} differs between "
                            f"replica 0 and replica {replica}")
            np.testing.assert_allclose(
                np.asarray(copies[0], np.float64),
                np.asarray(want[name][0], np.float64),
                rtol=1e-6, atol=1e-7,
                err_msg=f"{case}: step {step}: {name} differs from one "
                        "device")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_mirrored_equals_one_device(case, mirrored_strategy):
    _assert_matches(_run(case, mirrored_strategy), _single_device(case), case)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_tpu_like_no_merge_call_equals_one_device(case, tpu_like_strategy):
    """The XLA step, as TPUs run it (no merge call, no custom kernel)."""
    _assert_matches(_run(case, tpu_like_strategy, fused=False),
                    _single_device(case), case)


_PACKED_ONE_DEVICE = {}


@pytest.mark.parametrize("strategy,fused", [("mirrored", None),
                                            ("mirrored", False),
                                            ("tpu_like", False)])
@pytest.mark.parametrize("case", ["global_clipnorm", "ema_overwrite",
                                  "accumulation_schedule_ema"])
def test_packed_slots_equal_one_device(case, strategy, fused, request):
    """`slot_layout="packed"` (the fused kernel, or the XLA step): its
    views' replica copies, against the packed optimizer on one device."""
    if case not in _PACKED_ONE_DEVICE:
        _PACKED_ONE_DEVICE[case] = _run(case, None, slot_layout="packed")
    strategy = request.getfixturevalue(f"{strategy}_strategy")
    _assert_matches(_run(case, strategy, fused=fused, slot_layout="packed"),
                    _PACKED_ONE_DEVICE[case], case)


@pytest.mark.parametrize("case", ["global_clipnorm",
                                  "accumulation_schedule_ema"])
def test_without_xla_equals_one_device(case, mirrored_strategy):
    _assert_matches(
        _run(case, mirrored_strategy, jit_compile=False, fused=False),
        _single_device(case), case)


def test_sparse_gradients_are_exercised():
    # The embedding's gradient is IndexedSlices: the cases above cover the
    # sparse path only if that stays true.
    variables = _make_variables(tf.float32)
    x, y, ids = _data(0, False)
    with tf.GradientTape() as tape:
        loss = _loss(variables, x, y, ids, False)
    assert isinstance(tape.gradient(loss, variables)[2], tf.IndexedSlices)


def test_global_clipnorm_sees_the_global_batch_norm(mirrored_strategy):
    """Sum first, then clip: per-replica clipping would differ from this."""
    with mirrored_strategy.scope():
        v = tf.Variable([0.0, 0.0])
        opt = tf_adamw.AdamW(learning_rate=1.0, weight_decay=0.0,
                             global_clipnorm=1.0, beta_1=0.0, beta_2=0.0,
                             epsilon=1e-12)
        opt.build([v])

    @tf.function
    def step():
        def replica_fn():
            r = tf.cast(
                tf.distribute.get_replica_context().replica_id_in_sync_group,
                tf.float32)
            # Replica gradients (r, 0): each has norm <= 3, their sum (6, 0).
            opt.apply_gradients([(tf.stack([r, 0.0]), v)])
        mirrored_strategy.run(replica_fn)

    step()
    # beta_2 = 0: v_hat = g^2 -> update = lr * g / |g| = sign; the value
    # clipped is the summed gradient (6, 0) -> (1, 0) -> step -1 along x.
    np.testing.assert_allclose(v.numpy(), [-1.0, 0.0])
    assert opt.iterations.numpy() == 1


def test_cross_replica_apply_with_global_gradients(mirrored_strategy):
    """apply_gradients outside `run`, with plain tensors: applied once."""
    with mirrored_strategy.scope():
        v = tf.Variable([1.0, 2.0])
        opt = tf_adamw.AdamW(learning_rate=0.1)
        opt.build([v])
    reference_v = tf.Variable([1.0, 2.0])
    reference = tf_adamw.AdamW(learning_rate=0.1)
    for _ in range(3):
        with mirrored_strategy.scope():
            opt.apply_gradients([(tf.constant([0.5, -1.0]), v)])
        reference.apply_gradients([(tf.constant([0.5, -1.0]), reference_v)])
    for copy in mirrored_strategy.experimental_local_results(v):
        np.testing.assert_array_equal(copy.numpy(), reference_v.numpy())
    assert opt.iterations.numpy() == 3


def test_cross_replica_apply_sums_per_replica_gradients(mirrored_strategy):
    with mirrored_strategy.scope():
        v = tf.Variable([1.0, 2.0])
        opt = tf_adamw.AdamW(learning_rate=0.1, global_clipnorm=1.0)
        opt.build([v])

    @tf.function
    def grads():
        def replica_fn():
            r = tf.cast(
                tf.distribute.get_replica_context().replica_id_in_sync_group,
                tf.float32)
            return tf.stack([r, 1.0])
        return mirrored_strategy.run(replica_fn)

    with mirrored_strategy.scope():
        opt.apply_gradients([(grads(), v)])
    reference_v = tf.Variable([1.0, 2.0])
    tf_adamw.AdamW(learning_rate=0.1, global_clipnorm=1.0).apply_gradients(
        [(tf.constant([6.0, 4.0]), reference_v)])
    for copy in mirrored_strategy.experimental_local_results(v):
        np.testing.assert_allclose(copy.numpy(), reference_v.numpy(),
                                   rtol=1e-6)


def test_skip_gradients_aggregation(mirrored_strategy):
    """Callers who already reduced: gradients are used as given."""
    with mirrored_strategy.scope():
        v = tf.Variable([1.0])
        w = tf.Variable([1.0])
        # A large epsilon makes the step depend on the gradient's scale.
        opt = tf_adamw.AdamW(learning_rate=0.1, weight_decay=0.0,
                             epsilon=1.0)
        opt.build([v, w])
        reference_v = tf.Variable([1.0])
        reference_w = tf.Variable([1.0])
        reference = tf_adamw.AdamW(learning_rate=0.1, weight_decay=0.0,
                                   epsilon=1.0)
        reference.build([reference_v, reference_w])

    @tf.function
    def step():
        def replica_fn():
            g = tf.constant([2.0])
            opt.apply_gradients([(g, v)], skip_gradients_aggregation=True)
            opt.apply_gradients([(g, w)],
                                experimental_aggregate_gradients=False)
            reference.apply_gradients([(g / NUM_REPLICAS, reference_v)])
            reference.apply_gradients([(g / NUM_REPLICAS, reference_w)])
        mirrored_strategy.run(replica_fn)

    step()
    # Not summed: each replica's gradient 2 is used as is, which is what the
    # reference gets from summing g/N over N replicas.
    for mine, theirs in ((v, reference_v), (w, reference_w)):
        for a, b in zip(mirrored_strategy.experimental_local_results(mine),
                        mirrored_strategy.experimental_local_results(theirs)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_finalize_under_strategy_overwrites_every_copy(mirrored_strategy):
    with mirrored_strategy.scope():
        v = tf.Variable([1.0, -1.0])
        opt = tf_adamw.AdamW(learning_rate=0.1, use_ema=True,
                             ema_momentum=0.5)
        opt.build([v])

    @tf.function
    def step():
        mirrored_strategy.run(
            lambda: opt.apply_gradients([(tf.constant([1.0, 1.0]), v)]))

    for _ in range(3):
        step()
    average = opt.slots_for(v)["average"].numpy()
    opt.finalize_variable_values([v])
    for copy in mirrored_strategy.experimental_local_results(v):
        np.testing.assert_array_equal(copy.numpy(), average)


def test_build_outside_scope_is_an_error(mirrored_strategy):
    v = tf.Variable([1.0])
    opt = tf_adamw.AdamW()
    opt.build([v])

    @tf.function
    def step():
        mirrored_strategy.run(
            lambda: opt.apply_gradients([(tf.constant([1.0]), v)]))

    with pytest.raises(ValueError, match=r"strategy\.scope\(\)"):
        step()


def test_optimizer_created_outside_scope_built_inside_is_an_error(
        mirrored_strategy):
    opt = tf_adamw.AdamW()
    with mirrored_strategy.scope():
        v = tf.Variable([1.0])
        with pytest.raises(ValueError, match=r"strategy\.scope\(\)"):
            opt.build([v])


def test_lazy_build_inside_run_is_an_error(mirrored_strategy):
    with mirrored_strategy.scope():
        v = tf.Variable([1.0])
        opt = tf_adamw.AdamW()

    @tf.function
    def step():
        mirrored_strategy.run(
            lambda: opt.apply_gradients([(tf.constant([1.0]), v)]))

    with pytest.raises(ValueError, match=r"optimizer\.build"):
        step()


def test_one_device_strategy():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        v = tf.Variable([1.0, 2.0])
        opt = tf_adamw.AdamW(learning_rate=0.1, use_ema=True,
                             ema_overwrite_frequency=2)
        opt.build([v])

    @tf.function
    def step():
        strategy.run(
            lambda: opt.apply_gradients([(tf.constant([0.5, -1.0]), v)]))

    reference_v = tf.Variable([1.0, 2.0])
    reference = tf_adamw.AdamW(learning_rate=0.1, use_ema=True,
                               ema_overwrite_frequency=2)
    for _ in range(3):
        step()
        reference.apply_gradients([(tf.constant([0.5, -1.0]), reference_v)])
        np.testing.assert_array_equal(v.numpy(), reference_v.numpy())
