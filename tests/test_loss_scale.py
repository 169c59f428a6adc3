"""Dynamic loss scaling (`loss_scale="dynamic"`) against a NumPy model of
Keras `LossScaleOptimizer`'s state machine, and against Keras itself.

The rule (docs/semantics.md, step 3): the scale starts at `initial_scale`;
a call whose summed gradients are not finite is skipped and halves it; a
finite call counts, and the `dynamic_growth_steps`-th in a row doubles it.
Each path is checked: eager, the fused kernel in the user's `tf.function`,
the user's `tf.function(jit_compile=True)`, the optimizer's own XLA step
(`fused=False`), and 4 replicas with and without merge calls (one replica
poisoned: all agree).
"""

import numpy as np
import pytest
import tensorflow as tf

import tf_adamw
from tests.numpy_reference import NumpyAdamW

GROWTH = 3
INITIAL = 2.0 ** 4
CONFIG = dict(learning_rate=0.05, weight_decay=0.01, amsgrad=True,
              global_clipnorm=1.0, use_ema=True, ema_momentum=0.8,
              ema_overwrite_frequency=4)
# Calls whose gradient (on replica 0) is poisoned after scaling.
POISONED = {2: np.inf, 6: np.nan, 7: -np.inf}
CALLS = 12
SHAPES = [(3, 2), (4,)]


class NumpyLossScale:
    """Keras LossScaleOptimizer's rule around the NumPy AdamW reference."""

    def __init__(self, reference, initial, growth_steps):
        self.reference = reference
        self.scale, self.counter = initial, 0
        self.growth_steps = growth_steps

    def apply(self, scaled_grads):
        if not all(np.all(np.isfinite(g)) for g in scaled_grads):
            self.scale, self.counter = self.scale / 2, 0
            return False
        self.reference.loss_scale_factor = self.scale
        applied = self.reference.apply(scaled_grads)
        if self.counter == self.growth_steps - 1:
            self.scale, self.counter = self.scale * 2, 0
        else:
            self.counter += 1
        return applied


def _unscaled(call):
    rng = np.random.default_rng(call)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def _expected(calls, accumulation=None):
    init = [np.ones(s, np.float32) for s in SHAPES]
    reference = NumpyLossScale(
        NumpyAdamW(init, gradient_accumulation_steps=accumulation, **CONFIG),
        INITIAL, GROWTH)
    scales = []
    for call in calls:
        grads = [g * np.float32(reference.scale) for g in _unscaled(call)]
        if call in POISONED:
            grads[0] = grads[0].copy()
            grads[0][0, 0] = POISONED[call]
        reference.apply(grads)
        scales.append(reference.scale)
    return reference, scales


def _optimizer(strategy, path, accumulation=None, **extra):
    with strategy.scope():
        variables = [tf.Variable(np.ones(s, np.float32)) for s in SHAPES]
        optimizer = tf_adamw.AdamW(
            loss_scale="dynamic", initial_scale=INITIAL,
            dynamic_growth_steps=GROWTH, fused=path != "ops",
            gradient_accumulation_steps=accumulation, **CONFIG, **extra)
        optimizer.build(variables)
    return variables, optimizer


def _run(strategy, path, calls, accumulation=None, **extra):
    """Applies `calls`, the gradients scaled by `scale_loss`'s factor as a
    loss would be, split over the replicas (replica 0 poisoned)."""
    variables, optimizer = _optimizer(strategy, path, accumulation, **extra)

    def replica_fn(grads, bad):
        ctx = tf.distribute.get_replica_context()
        n = tf.cast(ctx.num_replicas_in_sync, tf.float32)
        # What a loss scaled by `scale_loss` gives: gradient * scale.
        shares = [optimizer.scale_loss(g / n) for g in grads]
        poison = tf.scatter_nd([[0, 0]], [bad], SHAPES[0])
        first = tf.equal(ctx.replica_id_in_sync_group, 0)
        shares[0] = tf.where(first, shares[0] + poison, shares[0])
        optimizer.apply_gradients(zip(shares, variables))

    def step(grads, bad):
        strategy.run(replica_fn, args=(grads, bad))

    if path != "eager":
        step = tf.function(step, jit_compile=path == "jit")
    scales = []
    for call in calls:
        step([tf.constant(g) for g in _unscaled(call)],
             tf.constant(POISONED.get(call, 0.0), tf.float32))
        scales.append(_agreed(strategy, optimizer.dynamic_scale))
    return variables, optimizer, scales


def _agreed(strategy, variable):
    copies = [c.numpy() for c in strategy.experimental_local_results(variable)]
    for c in copies[1:]:
        np.testing.assert_array_equal(c, copies[0], err_msg=variable.name)
    return copies[0]


def _check(strategy, variables, optimizer, scales, reference, expected):
    np.testing.assert_array_equal(scales, expected)
    assert _agreed(strategy, optimizer.iterations) == (
        reference.reference.iterations)
    counter = [v for v in optimizer.variables
               if v.name.endswith("step_counter:0")][0]
    assert _agreed(strategy, counter) == reference.counter
    for i, variable in enumerate(variables):
        np.testing.assert_allclose(_agreed(strategy, variable),
                                   reference.reference.variables[i],
                                   rtol=2e-5, atol=1e-6)
        slots = optimizer.slots_for(variable)
        np.testing.assert_allclose(_agreed(strategy, slots["momentum"]),
                                   reference.reference.m[i], rtol=2e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(_agreed(strategy, slots["average"]),
                                   reference.reference.averages[i],
                                   rtol=2e-5, atol=1e-6)


PATHS = ["eager", "function", "jit", "ops"]


@pytest.mark.parametrize("path", PATHS)
def test_state_machine_on_one_device(path):
    strategy = tf.distribute.get_strategy()
    reference, expected = _expected(range(CALLS))
    assert expected != sorted(expected)  # it both grows and shrinks
    _check(strategy, *_run(strategy, path, range(CALLS)), reference,
           expected)


# Under MirroredStrategy the user's function cannot be one XLA program (it
# spans devices); "ops" is the optimizer's own XLA step on each replica.
@pytest.mark.parametrize("path", ["function", "ops"])
@pytest.mark.parametrize("kind", ["mirrored", "tpu_like"])
def test_state_machine_on_4_replicas(kind, path, mirrored_strategy,
                                     tpu_like_strategy):
    strategy = {"mirrored": mirrored_strategy,
                "tpu_like": tpu_like_strategy}[kind]
    reference, expected = _expected(range(CALLS))
    _check(strategy, *_run(strategy, path, range(CALLS)), reference,
           expected)


@pytest.mark.parametrize("path", ["eager", "jit"])
def test_accumulation_micro_steps_count(path):
    strategy = tf.distribute.get_strategy()
    reference, expected = _expected(range(CALLS), accumulation=2)
    _check(strategy, *_run(strategy, path, range(CALLS), accumulation=2),
           reference, expected)


def test_skipped_steps_counts_with_the_guard_option():
    strategy = tf.distribute.get_strategy()
    _, optimizer, _ = _run(strategy, "function", range(CALLS),
                           skip_nonfinite_gradients=True)
    assert optimizer.skipped_steps.numpy() == len(POISONED)


def test_matches_keras_loss_scale_optimizer():
    keras = pytest.importorskip("keras")
    calls = range(CALLS)
    ours_vars, ours, ours_scales = _run(tf.distribute.get_strategy(),
                                        "function", calls)
    kvars = [tf.Variable(np.ones(s, np.float32)) for s in SHAPES]
    inner = keras.optimizers.AdamW(**CONFIG)
    lso = keras.optimizers.LossScaleOptimizer(
        inner, initial_scale=INITIAL, dynamic_growth_steps=GROWTH)
    lso.build(kvars)
    keras_scales = []
    for call in calls:
        scale = np.float32(lso.dynamic_scale.numpy())
        grads = [g * scale for g in _unscaled(call)]
        if call in POISONED:
            grads[0][0, 0] = POISONED[call]
        lso.apply([tf.constant(g) for g in grads], kvars)
        keras_scales.append(float(lso.dynamic_scale.numpy()))
    np.testing.assert_array_equal(ours_scales, keras_scales)
    assert int(lso.iterations.numpy()) == int(ours.iterations.numpy())
    for k, o in zip(kvars, ours_vars):
        np.testing.assert_allclose(o.numpy(), k.numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_state_is_in_checkpoints_and_resume_is_exact(tmp_path):
    strategy = tf.distribute.get_strategy()
    whole_vars, whole, _ = _run(strategy, "function", range(CALLS))
    first_vars, first, _ = _run(strategy, "function", range(7))
    path = tf.train.Checkpoint(optimizer=first, variables=first_vars).save(
        str(tmp_path / "ckpt"))
    resumed_vars, resumed = _optimizer(strategy, "function")
    tf.train.Checkpoint(optimizer=resumed, variables=resumed_vars).restore(
        path).assert_consumed()
    assert resumed.dynamic_scale.numpy() == first.dynamic_scale.numpy()

    @tf.function
    def step(grads, bad):
        grads = [resumed.scale_loss(g) for g in grads]
        grads[0] = grads[0] + tf.scatter_nd([[0, 0]], [bad], SHAPES[0])
        resumed.apply_gradients(zip(grads, resumed_vars))

    for call in range(7, CALLS):
        step([tf.constant(g) for g in _unscaled(call)],
             tf.constant(POISONED.get(call, 0.0), tf.float32))
    for a, b in zip(whole.variables, resumed.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    for a, b in zip(whole_vars, resumed_vars):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_scale_loss():
    optimizer = tf_adamw.AdamW(loss_scale="dynamic")
    assert optimizer.scale_loss(1.5).numpy() == 1.5 * 2.0 ** 15
    half = optimizer.scale_loss(tf.constant(2.0, tf.float16))
    # 2**16 overflows float16: the product is float32, as Keras promotes.
    assert half.dtype == tf.float32 and half.numpy() == 2.0 ** 16
    assert optimizer.loss_scale == "dynamic"
    assert optimizer.initial_scale == 2.0 ** 15
    assert optimizer.dynamic_growth_steps == 2000
    with pytest.raises(AttributeError, match="loss_scale"):
        tf_adamw.AdamW().dynamic_scale  # pylint: disable=expression-not-assigned


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_scale="static"), "loss_scale"),
    (dict(loss_scale="dynamic", loss_scale_factor=2.0), "loss_scale_factor"),
    (dict(initial_scale=8.0), "initial_scale"),
    (dict(loss_scale="dynamic", initial_scale=0.0), "initial_scale"),
    (dict(loss_scale="dynamic", initial_scale=float("inf")), "initial_scale"),
    (dict(loss_scale="dynamic", dynamic_growth_steps=0),
     "dynamic_growth_steps"),
    (dict(loss_scale="dynamic", dynamic_growth_steps=2.5),
     "dynamic_growth_steps"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        tf_adamw.AdamW(**kwargs)


def test_config_round_trip():
    optimizer = tf_adamw.AdamW(loss_scale="dynamic", initial_scale=8.0,
                               dynamic_growth_steps=10)
    config = optimizer.get_config()
    assert (config["loss_scale"], config["initial_scale"],
            config["dynamic_growth_steps"]) == ("dynamic", 8.0, 10)
    copy = tf_adamw.AdamW.from_config(config)
    assert copy.get_config() == config
    assert "loss_scale" not in tf_adamw.AdamW().get_config()
