"""Gradients that used to be applied silently wrong: errors, or skips.

docs/semantics.md, "Before step 1" and steps 3 and 5. Each case runs on the
fused kernel (the default on CPU, eagerly and in a `tf.function`), on the XLA
step (`fused=False`, eagerly and in a `tf.function`), inside the user's own
`tf.function(jit_compile=True)` and on the 4 replicas of `mirrored_strategy`,
and checks that a refused call wrote nothing: every variable, slot and
counter keeps its value, bit for bit, on every replica.

- The same variable twice in one call is a ValueError naming it.
- A `tf.IndexedSlices` gradient with a negative or out-of-range index is an
  error. Inside an XLA function nothing can raise at run time (XLA drops
  assertions), so there the call is skipped: it changes nothing but
  `skipped_steps` (with `skip_nonfinite_gradients`).
- A gradient whose shape differs from its variable's, in a function traced
  for unknown shapes, is an error (the kernel's message names both shapes);
  inside XLA the shapes are checked when the function compiles.
- `skip_nonfinite_gradients` skips finite gradients whose squares overflow
  (the norm `global_clipnorm` needs, `v`'s `g * g`).
- A learning-rate schedule that fails inside the step changes nothing.
- `global_clipnorm` over float32 and float64 variables clips by their joint
  norm.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_adamw import AdamW
from tf_adamw import kernels

# mode -> (optimizer arguments, tf.function arguments or None for eager).
MODES = {
    "fused_eager": ({}, None),
    "fused_function": ({}, {}),
    "xla_eager": ({"fused": False}, None),
    "xla_function": ({"fused": False}, {}),
    "user_jit": ({}, {"jit_compile": True}),
}
# Every optional stage that writes state: a refused call must not reach
# any of them.
STAGES = dict(use_ema=True, ema_momentum=0.5, gradient_accumulation_steps=2,
              skip_nonfinite_gradients=True, amsgrad=True)
CONFIGS = {"default": {}, "stages": STAGES}
ROWS = 4


def _variables():
    """A [ROWS, 3] variable (an embedding) and a [3] one."""
    return [tf.Variable(np.arange(3 * ROWS, dtype=np.float32).reshape(
        ROWS, 3) / 7, name="table"), tf.Variable([0.5, -1.0, 2.0],
                                                 name="bias")]


def _optimizer(mode, config, **kwargs):
    options, _ = MODES[mode]
    return AdamW(**{"learning_rate": 0.1, "weight_decay": 0.1,
                    **CONFIGS[config], **options, **kwargs})


def _in_mode(mode, fn, input_signature=None):
    _, function_args = MODES[mode]
    if function_args is None:
        return fn
    return tf.function(fn, input_signature=input_signature,
                       autograph=False, **function_args)


def _snapshot(optimizer, variables, strategy=None):
    """Every value the step could write, per replica copy, as NumPy."""
    def copies(v):
        if strategy is None:
            return [v.numpy()]
        return [c.numpy() for c in strategy.experimental_local_results(v)]
    return {f"{v.name}#{k}": copies(v)
            for k, v in enumerate(list(variables) + optimizer.variables)}


def _assert_unchanged(before, after, ignore=()):
    assert before.keys() == after.keys()
    changed = [name for name in before if name.split("#")[0] not in ignore
               and not all(np.array_equal(a, b, equal_nan=True) for a, b in
                           zip(before[name], after[name]))]
    assert not changed, f"a refused call wrote {changed}"


def _dense_grads(scale=1.0):
    return [tf.constant(np.full((ROWS, 3), 0.25 * scale, np.float32)),
            tf.constant(np.float32([0.5, -0.5, 0.25]) * scale)]


def _sparse(indices):
    return tf.IndexedSlices(
        tf.ones([len(indices), 3]), tf.constant(indices, tf.int64),
        dense_shape=tf.constant([ROWS, 3], tf.int64))


def _prime(optimizer, variables, calls=2):
    """Valid calls first, so that slots and counters are not all zero."""
    for _ in range(calls):
        optimizer.apply_gradients(zip(_dense_grads(), variables))


def _skipped(optimizer):
    return int(optimizer.skipped_steps.numpy())


# ---------------------------------------------------------------------------
# 4. The same variable twice.


@pytest.mark.parametrize("mode", MODES)
def test_the_same_variable_twice_is_an_error(mode):
    variables = _variables()
    optimizer = _optimizer(mode, "default")
    _prime(optimizer, variables)
    before = _snapshot(optimizer, variables)
    table = variables[0]

    def step(first, second):
        optimizer.apply_gradients([(first, table), (second, table)])

    with pytest.raises(ValueError, match="'table:0' appears twice"):
        _in_mode(mode, step)(*_dense_grads()[:1] * 2)
    _assert_unchanged(before, _snapshot(optimizer, variables))


def test_the_same_variable_twice_among_others_is_an_error():
    """Not the built list in order: the duplicate is found among others."""
    table, bias = _variables()
    optimizer = _optimizer("fused_eager", "default")
    optimizer.build([table, bias])
    g_table, g_bias = _dense_grads()
    with pytest.raises(ValueError, match="'bias:0' appears twice"):
        optimizer.apply_gradients(
            [(g_bias, bias), (g_table, table), (g_bias, bias)])
    assert int(optimizer.iterations.numpy()) == 0


def test_the_same_variable_twice_under_a_strategy(mirrored_strategy):
    with mirrored_strategy.scope():
        variables = _variables()
        optimizer = _optimizer("fused_eager", "default")
        optimizer.build(variables)

    @tf.function
    def step(g):
        def replica(g):
            g = g * 1.0  # made on the replica's device
            optimizer.apply_gradients([(g, variables[1]), (g, variables[1])])
        mirrored_strategy.run(replica, args=(g,))

    with pytest.raises(ValueError, match="'bias:0' appears twice"):
        step(_dense_grads()[1])


# ---------------------------------------------------------------------------
# 5. Sparse gradients with indices outside the variable's rows.

BAD_INDICES = {"negative": [0, -1, 2], "too_large": [1, ROWS]}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("indices", BAD_INDICES)
@pytest.mark.parametrize("mode", MODES)
def test_a_bad_sparse_index_is_refused(mode, indices, config):
    """An error where TF can raise; inside the user's XLA function, where
    it cannot, the call is skipped (and counted with the guard on)."""
    variables = _variables()
    optimizer = _optimizer(mode, config)
    _prime(optimizer, variables)
    before = _snapshot(optimizer, variables)
    iterations = int(optimizer.iterations.numpy())

    def step(sparse, dense):
        optimizer.apply_gradients(zip([sparse, dense], variables))

    call = _in_mode(mode, step)
    args = (_sparse(BAD_INDICES[indices]), _dense_grads()[1])
    if mode == "user_jit":
        call(*args)
        after = _snapshot(optimizer, variables)
        if config == "stages":
            assert _skipped(optimizer) == 1
        _assert_unchanged(before, after, ignore={"adamw/skipped_steps:0"})
    else:
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"`table:0`.*index outside \[0, 4\)"):
            call(*args)
        _assert_unchanged(before, _snapshot(optimizer, variables))
    # Valid indices still train, in the same function.
    for _ in range(2):
        call(_sparse([3, 0, 3]), _dense_grads()[1])
    assert int(optimizer.iterations.numpy()) == iterations + (
        1 if config == "stages" else 2)


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("everywhere", [False, True])
@pytest.mark.parametrize("eager", [False, True])
def test_a_bad_sparse_index_on_replicas_is_an_error(
        mirrored_strategy, fused, everywhere, eager):
    """Replica 0's (or every replica's) sparse gradient has index -1: the
    call fails before the all-reduce, and no replica writes anything."""
    with mirrored_strategy.scope():
        variables = _variables()
        optimizer = AdamW(fused=fused, **STAGES)
        optimizer.build(variables)
    assert optimizer.uses_fused_kernel == (fused is None)

    def step(bad):
        def replica(bad):
            replica_id = tf.distribute.get_replica_context(
            ).replica_id_in_sync_group
            target = tf.logical_or(everywhere, replica_id == 0)
            index = tf.where(tf.logical_and(bad, target),
                             tf.constant(-1, tf.int64),
                             tf.constant(1, tf.int64))
            sparse = tf.IndexedSlices(tf.ones([2, 3]),
                                      tf.stack([tf.constant(0, tf.int64),
                                                index]),
                                      tf.constant([ROWS, 3], tf.int64))
            optimizer.apply_gradients(zip([sparse, tf.ones([3])],
                                          variables))
        mirrored_strategy.run(replica, args=(bad,))

    if not eager:
        step = tf.function(step)
    for _ in range(2):
        step(tf.constant(False))
    before = _snapshot(optimizer, variables, mirrored_strategy)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="index outside"):
        step(tf.constant(True))
    _assert_unchanged(before, _snapshot(optimizer, variables,
                                        mirrored_strategy))
    for _ in range(2):  # the strategy still works
        step(tf.constant(False))
    assert int(optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize("kind", ["mirrored", "tpu_like"])
def test_a_bad_sparse_index_on_one_replica_is_skipped_without_assertions(
        monkeypatch, mirrored_strategy, tpu_like_strategy, kind):
    """Inside XLA on a TPU replica assertions compile to nothing, and a
    sparse gradient is made dense (dropping the bad index) before the
    all-reduce, out of the step's sight. Emulated here by removing the
    assertion: the replicas' count of bad gradients, summed with the
    gradients, makes every replica skip the call (counted once)."""
    from tf_adamw import state as state_lib  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(state_lib, "checked_slices",
                        lambda grad, shape, name: grad)
    strategy = {"mirrored": mirrored_strategy,
                "tpu_like": tpu_like_strategy}[kind]
    with strategy.scope():
        variables = _variables()
        optimizer = AdamW(fused=False, **dict(
            STAGES, gradient_accumulation_steps=None))
        optimizer.build(variables)

    @tf.function
    def step(bad):
        def replica(bad):
            replica_id = tf.distribute.get_replica_context(
            ).replica_id_in_sync_group
            # -1: dropped silently by `densify` on every device (XLA also
            # drops ROWS; the CPU kernel raises for it).
            index = tf.where(tf.logical_and(bad, tf.equal(replica_id, 0)),
                             tf.constant(-1, tf.int64),
                             tf.constant(1, tf.int64))
            sparse = tf.IndexedSlices(
                tf.ones([2, 3]), tf.stack([tf.constant(0, tf.int64), index]),
                tf.constant([ROWS, 3], tf.int64))
            optimizer.apply_gradients(zip([sparse, tf.ones([3])],
                                          variables))
        strategy.run(replica, args=(bad,))

    step(tf.constant(False))
    before = _snapshot(optimizer, variables, strategy)
    step(tf.constant(True))
    _assert_unchanged(before, _snapshot(optimizer, variables, strategy),
                      ignore={"adamw/skipped_steps:0"})
    assert _skipped(optimizer) == 1
    step(tf.constant(False))
    assert int(optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize("function", [False, True])
def test_bad_per_replica_sparse_gradients_applied_across_replicas(
        mirrored_strategy, function):
    """Per-replica IndexedSlices returned by `strategy.run` and applied in
    the cross-replica context: each replica's component is checked."""
    with mirrored_strategy.scope():
        variables = _variables()
        optimizer = AdamW(use_ema=True)
        optimizer.build(variables)

    def step(index):
        def replica(index):
            return [tf.IndexedSlices(tf.ones([2, 3]),
                                     tf.stack([tf.constant(1, tf.int64),
                                               index]),
                                     tf.constant([ROWS, 3], tf.int64)),
                    tf.ones([3])]
        grads = mirrored_strategy.run(replica, args=(index,))
        optimizer.apply_gradients(zip(grads, variables))

    if function:
        step = tf.function(step)
    step(tf.constant(0, tf.int64))
    before = _snapshot(optimizer, variables, mirrored_strategy)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="index outside"):
        step(tf.constant(-1, tf.int64))
    _assert_unchanged(before, _snapshot(optimizer, variables,
                                        mirrored_strategy))


def test_a_step_traced_outside_xla_still_skips_inside_xla():
    """`tf.function` reuses a trace of our XLA step made for a call from
    outside XLA (where the assertion raises before the step) when the same
    step is called inside the user's XLA function: the reused trace must
    still skip the call."""
    variables = _variables()
    optimizer = _optimizer("xla_eager", "default")

    def step(indices):
        sparse = tf.IndexedSlices(tf.ones([2, 3]), indices,
                                  tf.constant([ROWS, 3], tf.int64))
        optimizer.apply_gradients(zip([sparse, tf.ones([3])], variables))

    step(tf.constant([1, 2], tf.int64))
    before = _snapshot(optimizer, variables)
    _in_mode("user_jit", step)(tf.constant([1, -1], tf.int64))
    _assert_unchanged(before, _snapshot(optimizer, variables))
    # One trace, made for the eager call, reused inside XLA.
    # pylint: disable-next=protected-access
    xla_step = optimizer._engine.runner.functions["xla"]
    # pylint: disable-next=protected-access
    assert len(xla_step._list_all_concrete_functions()) == 1


# ---------------------------------------------------------------------------
# 6. Shapes inside functions traced for unknown shapes.

UNKNOWN = [tf.TensorSpec([None, None], tf.float32),
           tf.TensorSpec([None], tf.float32)]
BAD_SHAPES = {"transposed": (3, ROWS), "broadcast": (1, 3)}


@pytest.mark.parametrize("shape", BAD_SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_a_wrong_shape_in_a_function_of_unknown_shapes_is_an_error(
        mode, shape):
    """[3, 4] for a [4, 3] variable (the kernel checked only element
    counts), [1, 3] for [4, 3] (XLA broadcast it)."""
    variables = _variables()
    optimizer = _optimizer(mode, "stages")
    _prime(optimizer, variables)
    before = _snapshot(optimizer, variables)

    def step(table_grad, bias_grad):
        optimizer.apply_gradients(zip([table_grad, bias_grad], variables))

    call = _in_mode(mode, step, input_signature=(
        None if MODES[mode][1] is None else UNKNOWN))
    bad = tf.ones(BAD_SHAPES[shape])
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                       match=r"(?i)shape"):
        call(bad, _dense_grads()[1])
    _assert_unchanged(before, _snapshot(optimizer, variables))
    call(*_dense_grads())  # the right shapes still train


def test_the_kernel_names_both_shapes():
    """Called directly: equal element counts, different shapes."""
    slots = [tf.Variable(tf.zeros([2, 3])) for _ in range(2)]
    table = kernels.slot_table(slots[:1], slots[1:], [])
    variable = tf.Variable(tf.ones([2, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(
            "gradient 0 has shape [3,2]; its variable has shape [2,3]")):
        kernels.fused_apply([variable], table, [0], [tf.ones([3, 2])],
                            alpha=0.1, one_minus_beta_1=0.1,
                            one_minus_beta_2=0.001, epsilon=1e-7, decay=0.0,
                            use_decay=[True])
    np.testing.assert_array_equal(variable.numpy(), np.ones([2, 3]))
    for slot in slots:
        np.testing.assert_array_equal(slot.numpy(), np.zeros([2, 3]))


@pytest.mark.parametrize("fused", [None, False])
def test_a_wrong_shape_on_replicas_is_an_error(mirrored_strategy, fused):
    with mirrored_strategy.scope():
        variables = _variables()
        optimizer = AdamW(fused=fused, **STAGES)
        optimizer.build(variables)

    @tf.function(input_signature=UNKNOWN)
    def step(table_grad, bias_grad):
        def replica(table_grad, bias_grad):
            # Made on the replica's device; the shapes stay unknown.
            optimizer.apply_gradients(zip([table_grad * 1.0, bias_grad * 1.0],
                                          variables))
        mirrored_strategy.run(replica, args=(table_grad, bias_grad))

    for _ in range(2):
        step(*_dense_grads())
    before = _snapshot(optimizer, variables, mirrored_strategy)
    for shape in BAD_SHAPES.values():
        with pytest.raises(tf.errors.InvalidArgumentError, match="shape"):
            step(tf.ones(shape), _dense_grads()[1])
        _assert_unchanged(before, _snapshot(optimizer, variables,
                                            mirrored_strategy))


# ---------------------------------------------------------------------------
# 7. Finite gradients whose squares overflow, with the guard on.

GUARDED = {"none": {}, "global_clipnorm": {"global_clipnorm": 1.0},
           "clipnorm": {"clipnorm": 1.0}}


@pytest.mark.parametrize("clip", GUARDED)
@pytest.mark.parametrize("mode", MODES)
def test_overflowing_gradients_are_skipped(mode, clip):
    """1e20 is finite, but its square is not (float32): the global norm is
    inf (every variable would become NaN) and `v` would become inf."""
    variables = _variables()
    optimizer = _optimizer(mode, "default", skip_nonfinite_gradients=True,
                           **GUARDED[clip])
    call = _in_mode(mode, lambda grads: optimizer.apply_gradients(
        zip(grads, variables)))
    call(_dense_grads())
    before = _snapshot(optimizer, variables)
    huge = _dense_grads()
    huge[1] = tf.constant([1e20, 0.0, 0.0])
    call(huge)
    assert _skipped(optimizer) == 1
    _assert_unchanged(before, _snapshot(optimizer, variables),
                      ignore={"adamw/skipped_steps:0"})
    call(_dense_grads(scale=1e9))  # large, but its squares are finite
    assert _skipped(optimizer) == 1
    assert int(optimizer.iterations.numpy()) == 2
    for v in variables:
        assert np.all(np.isfinite(v.numpy()))


def test_overflowing_gradients_are_skipped_on_replicas(mirrored_strategy):
    """Every replica's 1e19 squares finitely (1e38); their sum, 4e19,
    does not."""
    with mirrored_strategy.scope():
        variables = _variables()
        optimizer = AdamW(global_clipnorm=1.0, skip_nonfinite_gradients=True,
                          use_ema=True)
        optimizer.build(variables)

    @tf.function
    def step(scale):
        def replica(scale):
            optimizer.apply_gradients(zip(
                [tf.fill([ROWS, 3], scale), tf.fill([3], scale)], variables))
        mirrored_strategy.run(replica, args=(scale,))

    step(tf.constant(0.25))
    before = _snapshot(optimizer, variables, mirrored_strategy)
    step(tf.constant(1e19))  # 4e19 summed; 1.6e39 squared
    assert _skipped(optimizer) == 1
    _assert_unchanged(before, _snapshot(optimizer, variables,
                                        mirrored_strategy),
                      ignore={"adamw/skipped_steps:0"})


# ---------------------------------------------------------------------------
# 9. A schedule that fails inside the step.


class FailingSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """0.01 while `ok` holds True; then its assertion fails."""

    def __init__(self, ok):
        self.ok = ok

    def __call__(self, step):
        tf.debugging.assert_equal(self.ok, True, message="schedule failed")
        return tf.constant(0.01) * tf.cast(step + 1, tf.float32)

    def get_config(self):
        return {}


# XLA drops assertions: there the schedule cannot fail at run time.
SCHEDULE_MODES = {
    "fused_eager": ({}, None),
    "fused_function": ({}, {}),
    "uncompiled_eager": ({"fused": False, "jit_compile": False}, None),
    "uncompiled_function": ({"fused": False, "jit_compile": False}, {}),
}


@pytest.mark.parametrize("config,calls", [
    ("default", 2), ("stages", 4), ("stages", 3)],
    ids=["default", "applying_call", "micro_step"])
@pytest.mark.parametrize("mode", SCHEDULE_MODES)
def test_a_failing_schedule_changes_nothing(mode, config, calls):
    """`calls` valid calls, then one whose schedule fails: with
    accumulation over 2 calls, an applying call or a micro-step (the
    step's scalars are evaluated on every call, before any write)."""
    options, function_args = SCHEDULE_MODES[mode]
    variables = _variables()
    ok = tf.Variable(True)
    optimizer = AdamW(learning_rate=FailingSchedule(ok),
                      **{**CONFIGS[config], **options})

    def step(grads):
        optimizer.apply_gradients(zip(grads, variables))

    call = step if function_args is None else tf.function(step)
    for _ in range(calls):
        call(_dense_grads())
    before = _snapshot(optimizer, variables)
    ok.assign(False)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="schedule failed"):
        call(_dense_grads())
    _assert_unchanged(before, _snapshot(optimizer, variables))


def test_a_failing_schedule_on_replicas_changes_nothing(mirrored_strategy):
    ok = tf.Variable(True)
    with mirrored_strategy.scope():
        variables = _variables()
        optimizer = AdamW(learning_rate=FailingSchedule(ok), use_ema=True)
        optimizer.build(variables)

    @tf.function
    def step():
        def replica():
            optimizer.apply_gradients(zip(_dense_grads(), variables))
        mirrored_strategy.run(replica)

    step()
    before = _snapshot(optimizer, variables, mirrored_strategy)
    ok.assign(False)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="schedule failed"):
        step()
    _assert_unchanged(before, _snapshot(optimizer, variables,
                                        mirrored_strategy))


# ---------------------------------------------------------------------------
# The global norm of mixed dtypes, through the optimizer.


@pytest.mark.parametrize("mode", MODES)
def test_global_clipnorm_over_float32_and_float64_variables(mode):
    """Clipped by the joint norm 13 of [3, 4] and [12]."""
    variables = [tf.Variable([1.0, 1.0]),
                 tf.Variable([1.0], dtype=tf.float64)]
    optimizer = _optimizer(mode, "default", global_clipnorm=1.0,
                           weight_decay=0.0)
    call = _in_mode(mode, lambda a, b: optimizer.apply_gradients(
        zip([a, b], variables)))
    call(tf.constant([3.0, 4.0]), tf.constant([12.0], tf.float64))
    momentum = [optimizer.slots_for(v)["momentum"].numpy() for v in variables]
    np.testing.assert_allclose(momentum[0], [0.1 * 3 / 13, 0.1 * 4 / 13],
                               rtol=1e-6)
    np.testing.assert_allclose(momentum[1], [0.1 * 12 / 13], rtol=1e-6)
