"""`tf_adamw.AdamW` with the libraries users drive it from.

- Keras 3 models (`keras.Variable`s wrapping `tf.Variable`s) in a
  `tf.GradientTape` loop inside `tf.function`, with and without
  `exclude_from_weight_decay`.
- `tfp.math.minimize`, which calls `optimizer.apply_gradients(zip(grads,
  vars))` inside its own `tf.function(autograph=False)` step and a
  `tf.while_loop`, and with `jit_compile=True` runs the whole loop under XLA.
- A training step entirely inside `tf.function(jit_compile=True)` (forward,
  tape, optimizer) matching the same step without XLA.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_probability as tfp  # noqa: E402

import tf_adamw  # noqa: E402


def regression_data(n=256, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((d, 1)).astype(np.float32)
    y = x @ w + np.sin(x[:, :1]) + 0.05 * rng.standard_normal((n, 1)).astype(
        np.float32)
    return tf.constant(x), tf.constant(y)


def make_model(seed=0, d=4):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((d,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1),
    ])


def mse(model, x, y):
    return tf.reduce_mean(tf.square(model(x) - y))


# ----------------------------------------------------------------------------
# (a) Keras 3 model in a GradientTape loop.


@pytest.mark.parametrize("exclude_bias", [False, True],
                         ids=["decay_all", "exclude_bias"])
def test_keras_model_trains_in_a_tape_loop(exclude_bias):
    x, y = regression_data()
    model = make_model()
    opt = tf_adamw.AdamW(learning_rate=0.02, weight_decay=0.004)
    if exclude_bias:
        opt.exclude_from_weight_decay(var_names=["bias"])
    variables = model.trainable_variables
    assert all(isinstance(v, keras.Variable) for v in variables)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = mse(model, x, y)
        grads = tape.gradient(loss, variables)
        opt.apply_gradients(zip(grads, variables))
        return loss

    initial = float(mse(model, x, y))
    train_step()  # builds the optimizer while tracing
    traces = train_step.experimental_get_tracing_count()
    for _ in range(99):
        train_step()
    final = float(mse(model, x, y))
    assert final < 0.3 * initial, (initial, final)
    assert int(opt.iterations.numpy()) == 100
    assert train_step.experimental_get_tracing_count() == traces  # no retrace


def test_exclude_from_weight_decay_by_name_on_keras_variables():
    """Zero gradients: Adam moves nothing, so only weight decay acts. The
    kernels shrink by (1 - lr * wd) per step; the biases do not move."""
    model = make_model()
    for layer in model.layers:
        layer.bias.assign(tf.fill(layer.bias.shape, 0.5))
    variables = model.trainable_variables
    before = {v.path: v.numpy() for v in variables}
    lr, wd, steps = 1e-3, 10.0, 3
    opt = tf_adamw.AdamW(learning_rate=lr, weight_decay=wd)
    opt.exclude_from_weight_decay(var_names=["bias"])

    @tf.function
    def step():
        opt.apply_gradients([(tf.zeros_like(v), v) for v in variables])

    for _ in range(steps):
        step()
    kinds = sorted(v.path.rsplit("/", 1)[-1] for v in variables)
    assert kinds == ["bias", "bias", "kernel", "kernel"]
    for v in variables:
        if v.path.endswith("bias"):
            np.testing.assert_array_equal(v.numpy(), before[v.path],
                                          err_msg=v.path)
        else:
            np.testing.assert_allclose(
                v.numpy(), before[v.path] * (1 - lr * wd) ** steps,
                rtol=1e-5, err_msg=v.path)
            assert np.all(np.abs(v.numpy()) < np.abs(before[v.path]) + 1e-12)
            assert not np.array_equal(v.numpy(), before[v.path])


# ----------------------------------------------------------------------------
# (b) tfp.math.minimize.

TARGET = np.array([1.5, -2.0, 0.25], np.float32)


@pytest.mark.parametrize("jit_compile", [False, True],
                         ids=["graph", "xla_loop"])
def test_tfp_minimize_converges(jit_compile):
    x = tf.Variable(tf.zeros(3), name="x")
    opt = tf_adamw.AdamW(learning_rate=0.1, weight_decay=0.0)

    def loss_fn():
        return tf.reduce_sum(tf.square(x - TARGET))

    num_steps = 300
    losses = tfp.math.minimize(loss_fn, num_steps=num_steps,
                               trainable_variables=[x], optimizer=opt,
                               jit_compile=jit_compile)
    losses = losses.numpy()
    assert losses.shape == (num_steps,)
    assert losses[-1] < 1e-3 * losses[0]
    np.testing.assert_allclose(x.numpy(), TARGET, atol=1e-2)
    assert int(opt.iterations.numpy()) == num_steps


# ----------------------------------------------------------------------------
# (c) The whole training step under XLA.

CONFIGS = {
    "plain": dict(learning_rate=0.01),
    "full": dict(
        learning_rate=keras.optimizers.schedules.CosineDecay(
            0.02, decay_steps=10, alpha=0.1),
        weight_decay=0.05, amsgrad=True, global_clipnorm=1.0, use_ema=True,
        ema_momentum=0.8, ema_overwrite_frequency=2,
        gradient_accumulation_steps=2),
}


def _run(config_name, whole_step_jit, steps, x, y):
    model = make_model(seed=3)
    opt = tf_adamw.AdamW(**CONFIGS[config_name],
                         jit_compile=whole_step_jit)
    if config_name == "full":
        opt.exclude_from_weight_decay(var_names=["bias"])
    variables = model.trainable_variables

    @tf.function(jit_compile=whole_step_jit)
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = mse(model, xb, yb)
        grads = tape.gradient(loss, variables)
        opt.apply_gradients(zip(grads, variables))
        return loss

    losses = []
    for i in range(steps):
        sl = slice(32 * (i % 4), 32 * (i % 4 + 1))
        losses.append(float(train_step(x[sl], y[sl])))
        if i == 0:
            traces = train_step.experimental_get_tracing_count()
    # No retrace after the first call (which builds the optimizer):
    # hyperparameters and the schedule are not baked into the trace.
    assert train_step.experimental_get_tracing_count() == traces
    slots = [s.numpy() for v in variables
             for s in opt.slots_for(v).values()]
    return ([v.numpy() for v in variables], slots,
            int(opt.iterations.numpy()), losses)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_whole_step_under_xla_matches_graph_mode(config_name):
    x, y = regression_data(n=128)
    steps = 8
    ref = _run(config_name, False, steps, x, y)
    xla = _run(config_name, True, steps, x, y)
    want_iterations = steps // 2 if config_name == "full" else steps
    assert ref[2] == xla[2] == want_iterations
    for got, want in zip(xla[0] + xla[1], ref[0] + ref[1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xla[3], ref[3], rtol=1e-5)
    # The steps did move the weights (the comparison is not vacuous).
    start = make_model(seed=3).trainable_variables
    assert all(not np.allclose(v.numpy(), w, atol=1e-4)
               for v, w in zip(start, xla[0]) if v.path.endswith("kernel"))
