"""`tf_adamw.keras.AdamW` in Keras 3's `compile()` / `fit()`.

Each case runs on one device and, where it applies, under the 4-replica
`MirroredStrategy` of conftest (global batch 16 = 4 x 4, so every replica
gets an equal share and Keras's per-replica loss scaling is exact):

a. `fit()` equals `keras.optimizers.AdamW`'s on one device (with
   `global_clipnorm`, EMA, a kernel constraint), with and without XLA, and
   finalises the EMA weights after the last epoch.
b. Under MirroredStrategy it gives the one-device result with
   `global_clipnorm` active (Keras's own AdamW does not: it clips each
   replica's gradient before the sum); an optimizer made outside the
   strategy's scope is refused with a clear error.
c. `model.save` + `load_model` (and `save_weights` + `load_weights` into an
   unbuilt optimizer) continue exactly as if training had not stopped;
   `tf.train.Checkpoint` holds the core's state.
d. `LearningRateScheduler`, `ReduceLROnPlateau` and `TensorBoard` read and
   set `learning_rate` / `iterations` (TensorBoard's case needs the
   `tensorboard` package and is skipped without it).
e. `LossScaleOptimizer` (explicit, and automatic under `mixed_float16`).
f. `keras.optimizers.get` / `serialize` / `deserialize`; Keras AdamW's
   config keys; arguments checked at construction; weight-decay exclusions
   passed to the core.
g. tf_keras: `compile()` is refused with a message naming
   `tf_adamw.AdamW`; a custom loop over tf_keras variables works.
"""

import contextlib
import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_adamw

BATCH = 16  # global: 4 replicas x 4 examples
SAMPLES = 64  # 4 steps per epoch
EPOCHS = 3
CONFIG = dict(learning_rate=0.01, weight_decay=0.01, global_clipnorm=0.05,
              use_ema=True, ema_momentum=0.9)
MAX_NORM = 0.5
DEVICES = ["one_device", "mirrored"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(SAMPLES, 8)).astype("float32"),
            rng.normal(size=(SAMPLES, 1)).astype("float32"))


@pytest.fixture(scope="module")
def initial_weights():
    keras.utils.set_random_seed(1)
    return make_model().get_weights()


@pytest.fixture(params=DEVICES)
def strategy(request, mirrored_strategy):
    """None (one device) or the shared 4-replica MirroredStrategy."""
    return mirrored_strategy if request.param == "mirrored" else None


def scope(strategy):
    return strategy.scope() if strategy else contextlib.nullcontext()


def make_model(weights=None):
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", kernel_constraint=(
            keras.constraints.MaxNorm(MAX_NORM))),
        keras.layers.Dense(1),
    ])
    if weights is not None:
        model.set_weights(weights)
    return model


def compiled(strategy, weights, optimizer=None, **compile_kwargs):
    """A model with `weights`, compiled under `strategy` (None: none)."""
    with scope(strategy):
        model = make_model(weights)
        if optimizer is None:
            optimizer = tf_adamw.keras.AdamW(**CONFIG)
        elif callable(optimizer):
            optimizer = optimizer()
        model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    return model


def fit(model, data, epochs=EPOCHS, **kwargs):
    x, y = data
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False,
                     verbose=0, **kwargs)


def assert_weights(got, want, atol=1e-6, rtol=1e-5, exact=False):
    got, want = list(got), list(want)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        if exact:
            np.testing.assert_array_equal(g, w, err_msg=f"weight {i}")
        else:
            np.testing.assert_allclose(g, w, atol=atol, rtol=rtol,
                                       err_msg=f"weight {i}")


@pytest.fixture(scope="module")
def reference(data, initial_weights):
    """Ours on one device after EPOCHS epochs: the weights every case
    compares with."""
    model = compiled(None, initial_weights)
    fit(model, data)
    return model


# ---------------------------------------------------------------------------
# a. Parity with keras.optimizers.AdamW on one device; EMA finalised.

def test_fit_matches_keras_adamw_on_one_device(reference, data,
                                               initial_weights):
    keras_model = compiled(None, initial_weights,
                           keras.optimizers.AdamW(**CONFIG))
    fit(keras_model, data)
    assert_weights(reference.get_weights(), keras_model.get_weights())
    optimizer = reference.optimizer
    assert isinstance(optimizer, keras.optimizers.Optimizer)
    assert optimizer.uses_fused_kernel
    assert int(optimizer.iterations.numpy()) == EPOCHS * SAMPLES // BATCH
    # fit() wrote the averages into the weights after the last epoch.
    # (As in Keras, the averages follow the weights before the constraint.)
    assert_weights(reference.trainable_variables,
                   optimizer.core.moving_averages(), exact=True)


def test_fit_under_xla_matches_the_fused_step(reference, data,
                                              initial_weights):
    model = compiled(None, initial_weights, jit_compile=True)
    fit(model, data)
    assert model.jit_compile
    # XLA contracts multiply-adds: about an ulp per step from the kernel.
    assert_weights(model.get_weights(), reference.get_weights(), atol=2e-6)


# ---------------------------------------------------------------------------
# b. MirroredStrategy: the one-device result, clip after the sum.

def test_mirrored_fit_equals_one_device(mirrored_strategy, reference, data,
                                        initial_weights):
    model = compiled(mirrored_strategy, initial_weights)
    fit(model, data)
    assert_weights(model.get_weights(), reference.get_weights())
    optimizer = model.optimizer
    assert optimizer.core.distribution_strategy is mirrored_strategy
    for variable, average in zip(model.trainable_variables,
                                 optimizer.core.moving_averages()):
        copies = variable.value.values
        assert len(copies) == 4
        for copy in copies:  # finalised on every replica's copy
            np.testing.assert_array_equal(copy.numpy(), average.numpy())
    for variable in optimizer.variables:  # replicas stayed identical
        first, *others = variable.values
        for copy in others:
            np.testing.assert_array_equal(copy.numpy(), first.numpy())


def test_optimizer_made_outside_the_scope_is_refused(mirrored_strategy,
                                                     data, initial_weights):
    optimizer = tf_adamw.keras.AdamW()
    model = compiled(mirrored_strategy, initial_weights, optimizer)
    with pytest.raises(ValueError, match=r"inside the `strategy.scope\(\)`"):
        fit(model, data, epochs=1)


def test_keras_adamw_clips_before_the_sum(mirrored_strategy, reference, data,
                                          initial_weights):
    """Why (b) matters: Keras's own AdamW under the same strategy clips each
    replica's gradient, so it leaves the one-device result."""
    model = compiled(mirrored_strategy, initial_weights,
                     lambda: keras.optimizers.AdamW(**CONFIG))
    fit(model, data)
    diff = max(np.abs(a - b).max() for a, b in zip(
        model.get_weights(), reference.get_weights()))
    assert diff > 1e-3


# ---------------------------------------------------------------------------
# c. Saving and loading.

def test_save_load_continues_as_if_never_stopped(strategy, data,
                                                 initial_weights, tmp_path):
    models = []
    for reload in (False, True):
        model = compiled(strategy, initial_weights)
        fit(model, data, epochs=2)
        model.optimizer.learning_rate = 0.005  # state a callback could set
        if reload:
            path = str(tmp_path / "m.keras")
            model.save(path)
            with scope(strategy):
                model = keras.models.load_model(path)
            optimizer = model.optimizer
            assert isinstance(optimizer, tf_adamw.keras.AdamW)
            assert int(optimizer.iterations.numpy()) == 8
            assert float(optimizer.learning_rate.numpy()) == np.float32(0.005)
        fit(model, data, epochs=4, initial_epoch=2)
        models.append(model)
    stopped, reloaded = models
    assert_weights(reloaded.get_weights(), stopped.get_weights(), exact=True)
    assert len(reloaded.optimizer.variables) == 2 + 3 * 4
    assert_weights([v.numpy() for v in reloaded.optimizer.variables],
                   [v.numpy() for v in stopped.optimizer.variables],
                   exact=True)


def test_load_weights_into_unbuilt_optimizer(data, initial_weights,
                                             tmp_path):
    trained = compiled(None, initial_weights)
    fit(trained, data, epochs=1)
    path = str(tmp_path / "m.weights.h5")
    trained.save_weights(path)
    fresh = compiled(None, initial_weights)
    assert not fresh.optimizer.built
    fresh.load_weights(path)
    assert not fresh.optimizer.built
    assert int(fresh.optimizer.iterations.numpy()) == 4  # known before build
    for model in (trained, fresh):
        fit(model, data, epochs=2, initial_epoch=1)
    assert_weights(fresh.get_weights(), trained.get_weights(), exact=True)
    assert_weights([v.numpy() for v in fresh.optimizer.variables],
                   [v.numpy() for v in trained.optimizer.variables],
                   exact=True)


def test_state_of_another_layout_is_skipped_with_a_warning(reference):
    optimizer = tf_adamw.keras.AdamW(**CONFIG)
    optimizer.build(reference.trainable_variables)
    store = {"0": np.int64(5), "1": np.float32(0.1)}
    with pytest.warns(UserWarning, match="Skipping variable loading"):
        optimizer.load_own_variables(store)
    assert int(optimizer.iterations.numpy()) == 0


def test_tf_checkpoint_holds_the_core(reference, tmp_path):
    path = tf.train.Checkpoint(optimizer=reference.optimizer).write(
        str(tmp_path / "ckpt"))
    optimizer = tf_adamw.keras.AdamW(**CONFIG)
    tf.train.Checkpoint(optimizer=optimizer).restore(path)
    optimizer.build(reference.trainable_variables)  # deferred restore
    assert_weights([v.numpy() for v in optimizer.variables],
                   [v.numpy() for v in reference.optimizer.variables],
                   exact=True)


# ---------------------------------------------------------------------------
# d. Callbacks that read and set learning_rate / iterations.

def test_callbacks_set_and_read_learning_rate(strategy, data,
                                              initial_weights, tmp_path):
    model = compiled(strategy, initial_weights)
    weights_at_end = []
    callbacks = [
        # Halves the rate at the end of every epoch without improvement
        # (a huge min_delta: every epoch after the first).
        keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5,
                                          patience=0, min_delta=1e9),
        # Keeps the rate, then sets 0 for the last epoch.
        keras.callbacks.LearningRateScheduler(
            lambda epoch, lr: lr if epoch < 2 else 0.0),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: (
            weights_at_end.append(model.get_weights()))),
    ]
    history = fit(model, data, callbacks=callbacks)
    np.testing.assert_allclose(history.history["learning_rate"],
                               [0.01, 0.005, 0.0], rtol=1e-6)
    # The traced step reads the variable the callbacks set: with rate 0,
    # neither decay nor Adam moves the weights in the last epoch (the
    # constrained kernel aside: MaxNorm's epsilon shrinks it a little on
    # every projection).
    assert_weights(weights_at_end[2][1:], weights_at_end[1][1:], exact=True)
    for weights in weights_at_end:  # the kernel constraint ran after steps
        assert np.linalg.norm(weights[0], axis=0).max() <= MAX_NORM + 1e-6
    assert int(model.optimizer.iterations.numpy()) == 12
    learning_rate = model.optimizer.learning_rate
    for copy in getattr(learning_rate, "values", [learning_rate]):
        assert float(copy.numpy()) == 0.0


def scalars(log_dir):
    """`{tag: [(step, value), ...]}` of the summaries in `log_dir`."""
    out = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if array.dtype.kind == "f" and array.size == 1:  # a scalar
                    out.setdefault(value.tag, []).append(
                        (event.step, float(array)))
    return out


def test_tensorboard_logs_learning_rate_and_iterations(strategy, data,
                                                       initial_weights,
                                                       tmp_path):
    # TensorBoard's callback needs the `tensorboard` package.
    pytest.importorskip("tensorboard.summary.v2")
    model = compiled(strategy, initial_weights)
    fit(model, data, epochs=2, validation_data=data, callbacks=[
        keras.callbacks.TensorBoard(log_dir=str(tmp_path),
                                    write_steps_per_second=True)])
    train, validation = scalars(tmp_path / "train"), scalars(
        tmp_path / "validation")
    np.testing.assert_allclose(train["epoch_learning_rate"],
                               [(0, 0.01), (1, 0.01)], rtol=1e-6)
    assert all(v > 0 for _, v in train["epoch_steps_per_second"])
    # Evaluations are logged at `optimizer.iterations`: 4 steps per epoch.
    assert [step for step, _ in
            validation["evaluation_loss_vs_iterations"]] == [4, 8]


# ---------------------------------------------------------------------------
# e. Loss scaling.

def test_loss_scale_optimizer(strategy, reference, data, initial_weights,
                              tmp_path):
    model = compiled(strategy, initial_weights,
                     lambda: keras.optimizers.LossScaleOptimizer(
                         tf_adamw.keras.AdamW(**CONFIG)))
    fit(model, data)
    # Power-of-two scaling is exact: the unwrapped one-device result.
    assert_weights(model.get_weights(), reference.get_weights())
    inner = model.optimizer.inner_optimizer
    assert int(model.optimizer.iterations.numpy()) == 12
    assert inner.core.loss_scale_factor is None
    with pytest.raises(ValueError, match="is fixed once"):
        inner.loss_scale_factor = 2.0
    # The wrapper saves our state with its own.
    path = str(tmp_path / "lso.keras")
    model.save(path)
    with scope(strategy):
        loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer.inner_optimizer, tf_adamw.keras.AdamW)
    assert_weights([v.numpy() for v in loaded.optimizer.variables],
                   [v.numpy() for v in model.optimizer.variables],
                   exact=True)


def test_mixed_float16_wraps_it_automatically(strategy, data,
                                              initial_weights):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = compiled(strategy, initial_weights)
        history = fit(model, data, epochs=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(optimizer.inner_optimizer, tf_adamw.keras.AdamW)
    assert model.layers[0].compute_dtype == "float16"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    # Steps with overflowing float16 gradients are skipped (the scale
    # halves); the others are applied by our step.
    steps = int(optimizer.iterations.numpy())
    assert 0 < steps <= 8
    assert np.isfinite(history.history["loss"]).all()
    assert not np.allclose(model.get_weights()[0], initial_weights[0])


# ---------------------------------------------------------------------------
# f. Serialisation.

@keras.saving.register_keras_serializable(package="test_keras_fit")
class HalvingSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A user's schedule, found through Keras's registration."""

    def __init__(self, rate):
        self.rate = rate

    def __call__(self, step):
        return self.rate * 0.5 ** tf.cast(step, tf.float32)

    def get_config(self):
        return {"rate": self.rate}


@pytest.mark.parametrize("learning_rate", [
    0.003,
    keras.optimizers.schedules.CosineDecay(0.0, 100, warmup_target=1e-3,
                                           warmup_steps=10),
    HalvingSchedule(0.01),
], ids=["number", "builtin_schedule", "registered_schedule"])
def test_serialize_deserialize_get(learning_rate):
    optimizer = tf_adamw.keras.AdamW(
        learning_rate=learning_rate, weight_decay=0.02, amsgrad=True,
        clipvalue=0.5, use_ema=True, gradient_accumulation_steps=2,
        fused=False)
    config = optimizer.get_config()
    assert set(keras.optimizers.AdamW().get_config()) <= set(config)
    serialized = json.loads(json.dumps(keras.optimizers.serialize(optimizer)))
    assert serialized["registered_name"] == "tf_adamw>AdamW"
    for restored in (keras.optimizers.deserialize(serialized),
                     keras.optimizers.get(serialized)):
        assert type(restored) is tf_adamw.keras.AdamW
        assert restored.get_config() == config
    assert keras.optimizers.get(optimizer) is optimizer
    assert type(keras.optimizers.get("tf_adamw>AdamW")) is tf_adamw.keras.AdamW


def test_config_follows_the_built_optimizer(reference):
    optimizer = tf_adamw.keras.AdamW(**CONFIG)
    optimizer.build(reference.trainable_variables)
    optimizer.learning_rate = 0.25
    optimizer.weight_decay = 0.125
    config = optimizer.get_config()
    assert (config["learning_rate"], config["weight_decay"]) == (0.25, 0.125)
    assert float(optimizer.core.weight_decay.numpy()) == 0.125


@pytest.mark.parametrize("kwargs, error", [
    (dict(beta_1=1.5), ValueError),
    (dict(weight_decay=None), ValueError),
    (dict(clipnorm=1.0, global_clipnorm=1.0), ValueError),
    (dict(gradient_accumulation_steps=1), ValueError),
    (dict(learning_rate="fast"), TypeError),
    (dict(unknown=1), ValueError),
])
def test_arguments_are_checked_at_construction(kwargs, error):
    with pytest.raises(error):
        tf_adamw.keras.AdamW(**kwargs)


def test_exclude_from_weight_decay_reaches_the_core():
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    kernel, bias = layer.kernel, layer.bias
    bias.assign(tf.ones_like(bias))
    before = [kernel.numpy(), bias.numpy()]
    optimizer = tf_adamw.keras.AdamW(learning_rate=0.1, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    # Zero gradients: Adam moves nothing, only the decay acts.
    optimizer.apply([tf.zeros_like(kernel), tf.zeros_like(bias)],
                    [kernel, bias])
    np.testing.assert_allclose(kernel.numpy(), before[0] * (1 - 0.05),
                               rtol=1e-6)
    np.testing.assert_array_equal(bias.numpy(), before[1])
    with pytest.raises(ValueError, match="before the optimizer is built"):
        optimizer.exclude_from_weight_decay(var_names=["kernel"])


# ---------------------------------------------------------------------------
# g. tf_keras.

def test_tf_keras_compile_is_refused_with_what_to_use():
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential([tf_keras.layers.Dense(1, input_shape=(2,))])
    with pytest.raises(ValueError, match=r"use tf_adamw\.AdamW in a custom"):
        model.compile(optimizer=tf_adamw.keras.AdamW(), loss="mse")


def test_tf_keras_variables_in_a_custom_loop():
    tf_keras = pytest.importorskip("tf_keras")
    layer = tf_keras.layers.Dense(1)
    layer.build((None, 2))
    before = [v.numpy() for v in layer.trainable_variables]
    optimizer = tf_adamw.keras.AdamW(learning_rate=0.1)
    grads = [tf.ones_like(v) for v in layer.trainable_variables]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.apply_gradients(zip(grads, layer.trainable_variables))
    assert int(optimizer.iterations.numpy()) == 1
    for variable, old in zip(layer.trainable_variables, before):
        assert (variable.numpy() < old).all()
