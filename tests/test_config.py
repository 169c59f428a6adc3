"""`get_config`/`from_config`, schedules, the `learning_rate` property and
the optimizer's variables.

The reference is Keras 3's `keras.optimizers.AdamW` (its config keys and
schedule serialisation) and `tests/numpy_reference.py` (docs/semantics.md,
"The step", in float64). Tests that apply steps compile one XLA step each
(~0.5 s).
"""

import json
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from conftest import step_traces
from numpy_reference import NumpyAdamW
from tf_adamw import AdamW

# Keys our config may have beyond Keras's AdamW config (docs/semantics.md,
# "Configuration": `jit_compile`, `fused` and `skip_nonfinite_gradients`
# are ours). Anything else is a difference from Keras.
ALLOWED_EXTRA_KEYS = {"jit_compile", "skip_nonfinite_gradients", "fused"}

K3 = keras.optimizers.schedules
TK = tf_keras.optimizers.schedules


def _schedule_factories(ns):
    """The same six schedules, built from Keras 3's or tf_keras's `ns`."""
    return {
        "ExponentialDecay": lambda: ns.ExponentialDecay(
            0.1, decay_steps=2, decay_rate=0.5, staircase=True),
        "CosineDecay+warmup": lambda: ns.CosineDecay(
            0.01, decay_steps=6, alpha=0.1, warmup_target=0.1,
            warmup_steps=3),
        "PiecewiseConstantDecay": lambda: ns.PiecewiseConstantDecay(
            [1, 3], [0.1, 0.05, 0.01]),
        "PolynomialDecay": lambda: ns.PolynomialDecay(
            0.1, decay_steps=4, end_learning_rate=0.01, power=2.0,
            cycle=True),
        "InverseTimeDecay": lambda: ns.InverseTimeDecay(
            0.1, decay_steps=2, decay_rate=0.5),
        "CosineDecayRestarts": lambda: ns.CosineDecayRestarts(
            0.1, first_decay_steps=2, t_mul=2.0, m_mul=0.5, alpha=0.01),
    }


KERAS3_SCHEDULES = _schedule_factories(K3)
TF_KERAS_SCHEDULES = _schedule_factories(TK)

ALL_SCHEDULES = (
    [pytest.param(f, id=f"keras3-{n}") for n, f in KERAS3_SCHEDULES.items()]
    + [pytest.param(f, id=f"tf_keras-{n}")
       for n, f in TF_KERAS_SCHEDULES.items()])

NUM_STEPS = 6
INITIAL = np.array([0.5, -1.5, 2.0], np.float32)
GRADS = np.random.default_rng(7).normal(size=(NUM_STEPS, 3)).astype(
    np.float32)


def _float32(x):
    return float(np.float32(x))


def _schedule_of(opt):
    """The schedule object an optimizer holds (no public accessor)."""
    return opt._learning_rate  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# get_config keys and values.


def test_config_keys_are_keras_keys():
    ours = set(AdamW().get_config())
    theirs = set(keras.optimizers.AdamW().get_config())
    assert theirs <= ours, f"missing Keras keys: {theirs - ours}"
    assert ours - theirs <= ALLOWED_EXTRA_KEYS, (
        f"unexpected extra keys: {ours - theirs - ALLOWED_EXTRA_KEYS}")


def test_default_config_matches_keras():
    ours = AdamW().get_config()
    theirs = keras.optimizers.AdamW().get_config()
    assert ours["name"] == "adamw"
    assert ours["learning_rate"] == 0.001
    assert ours["jit_compile"] is True
    for key in set(theirs) - {"name", "learning_rate"}:
        assert ours[key] == theirs[key], key
    # Keras reports its float32 variable's value.
    assert _float32(ours["learning_rate"]) == _float32(theirs["learning_rate"])


CONSTRUCTOR_ARGS = [
    dict(learning_rate=0.01, weight_decay=0.1, beta_1=0.85, beta_2=0.995,
         epsilon=1e-6, amsgrad=True, clipnorm=0.3, use_ema=True,
         ema_momentum=0.95, ema_overwrite_frequency=7, name="my_adamw",
         loss_scale_factor=3.0, gradient_accumulation_steps=4,
         jit_compile=False),
    dict(learning_rate=0.1, weight_decay=0.0, clipvalue=0.7),
    dict(learning_rate=0.3, global_clipnorm=1.1, beta_1=0.0,
         epsilon=0.0),
]


@pytest.mark.parametrize("kwargs", CONSTRUCTOR_ARGS)
def test_config_values_are_the_constructor_values(kwargs):
    config = AdamW(**kwargs).get_config()
    for key, value in kwargs.items():
        # Exactly the float given (not its float32 rounding), same type.
        assert config[key] == value and type(config[key]) is type(value), (
            key, config[key], value)


def test_config_is_json_serialisable():
    opt = AdamW(learning_rate=K3.CosineDecay(0.1, 10, warmup_target=0.2,
                                             warmup_steps=2))
    config = opt.get_config()
    assert json.loads(json.dumps(config)) == config


@pytest.mark.parametrize("kwargs", CONSTRUCTOR_ARGS)
def test_from_config_round_trip(kwargs):
    config = AdamW(**kwargs).get_config()
    frozen = json.dumps(config, sort_keys=True)
    rebuilt = AdamW.from_config(config)
    assert isinstance(rebuilt, AdamW)
    assert rebuilt.get_config() == config
    # The caller's dict is not modified.
    assert json.dumps(config, sort_keys=True) == frozen


def test_keras_config_loads():
    k_opt = keras.optimizers.AdamW(
        learning_rate=0.01, weight_decay=0.1, beta_1=0.8, beta_2=0.99,
        epsilon=1e-5, amsgrad=True, global_clipnorm=2.0, use_ema=True,
        ema_momentum=0.9, ema_overwrite_frequency=3, loss_scale_factor=128.0,
        gradient_accumulation_steps=4, name="from_keras")
    keras_config = k_opt.get_config()
    opt = AdamW.from_config(keras_config)
    ours = opt.get_config()
    for key, value in keras_config.items():
        assert ours[key] == value, key
    assert ours["jit_compile"] is True


def test_keras_config_with_schedule_loads():
    schedule = K3.ExponentialDecay(0.1, 3, 0.5)
    keras_config = keras.optimizers.AdamW(learning_rate=schedule).get_config()
    opt = AdamW.from_config(keras_config)
    assert type(_schedule_of(opt)) is K3.ExponentialDecay
    assert opt.get_config()["learning_rate"] == keras_config["learning_rate"]


# ---------------------------------------------------------------------------
# Schedules through get_config/from_config.


@pytest.mark.parametrize("make", ALL_SCHEDULES)
def test_schedule_round_trip(make):
    schedule = make()
    config = AdamW(learning_rate=schedule).get_config()
    json.dumps(config)
    rebuilt = _schedule_of(AdamW.from_config(config))
    assert type(rebuilt) is type(schedule)
    assert rebuilt.get_config() == schedule.get_config()
    for step in (0, 1, 3, 7):
        assert float(rebuilt(step)) == float(schedule(step))


@pytest.mark.parametrize("name", list(KERAS3_SCHEDULES))
def test_keras3_schedule_serialises_as_keras(name):
    schedule = KERAS3_SCHEDULES[name]()
    ours = AdamW(learning_rate=schedule).get_config()["learning_rate"]
    theirs = keras.optimizers.AdamW(
        learning_rate=schedule).get_config()["learning_rate"]
    assert ours == theirs


@pytest.mark.parametrize("make", ALL_SCHEDULES)
def test_schedule_evaluated_at_iterations_and_training_matches(make):
    schedule = make()
    var = tf.Variable(INITIAL)
    opt = AdamW(learning_rate=schedule, weight_decay=0.1)
    reference = NumpyAdamW([INITIAL], learning_rate=lambda it: float(
        schedule(it)), weight_decay=0.1)
    assert float(opt.learning_rate) == float(schedule(0))
    seen = []
    for step in range(NUM_STEPS):
        opt.apply_gradients([(tf.constant(GRADS[step]), var)])
        reference.apply([GRADS[step]])
        n = int(opt.iterations.numpy())
        assert n == step + 1
        seen.append(float(opt.learning_rate))
        assert seen[-1] == float(schedule(n)), (step, seen[-1])
    assert len(set(seen)) > 1, "the schedule should move in this test"
    np.testing.assert_allclose(var.numpy(), reference.variables[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["CosineDecay+warmup", "CosineDecayRestarts"])
def test_schedule_training_matches_keras(name):
    var = tf.Variable(INITIAL)
    opt = AdamW(learning_rate=KERAS3_SCHEDULES[name](), weight_decay=0.1)
    k_var = keras.Variable(INITIAL)
    k_opt = keras.optimizers.AdamW(learning_rate=KERAS3_SCHEDULES[name](),
                                   weight_decay=0.1)
    for step in range(NUM_STEPS):
        opt.apply_gradients([(tf.constant(GRADS[step]), var)])
        k_opt.apply_gradients([(tf.constant(GRADS[step]), k_var)])
    np.testing.assert_allclose(var.numpy(), k_var.numpy(), rtol=1e-5,
                               atol=1e-7)
    assert float(opt.learning_rate) == pytest.approx(
        float(k_opt.learning_rate), rel=1e-6)


def test_schedule_counts_applied_updates_with_accumulation():
    schedule = K3.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    var = tf.Variable(INITIAL)
    opt = AdamW(learning_rate=schedule, gradient_accumulation_steps=2)
    for _ in range(4):  # 4 calls = 2 applied updates
        opt.apply_gradients([(tf.constant(GRADS[0]), var)])
    assert int(opt.iterations.numpy()) == 2
    assert float(opt.learning_rate) == float(schedule(2))


# ---------------------------------------------------------------------------
# Untrusted configs: nothing is imported or executed.


@pytest.mark.parametrize("learning_rate", [
    {"class_name": "NoSuchSchedule", "config": {}},
    {"module": "keras.optimizers.schedules", "class_name": "NoSuchSchedule",
     "config": {}, "registered_name": None},
    {"class_name": "__lambda__",
     "config": {"code": "print('executed')", "defaults": None,
                "closure": None}},
    {"module": "builtins", "class_name": "__lambda__",
     "config": {"code": "print('executed')"}, "registered_name": "__lambda__"},
    {"module": "os", "class_name": "system",
     "config": {"command": "touch {marker}"}},
    {"module": "antigravity", "class_name": "geohash", "config": {}},
    {"module": "keras.optimizers.schedules", "class_name": "serialize",
     "config": {}},
    {"module": "keras.optimizers.schedules", "class_name": "deserialize",
     "config": {"config": {}}},
    {"module": "tf_keras.optimizers.schedules", "class_name": "Nope",
     "config": {}},
    {"config": {"initial_learning_rate": 0.1}},
], ids=["unknown", "unknown-module", "lambda", "lambda-builtins", "os-system",
        "import-antigravity", "function-serialize", "function-deserialize",
        "tf_keras-unknown", "no-class-name"])
def test_untrusted_learning_rate_config(learning_rate, tmp_path):
    marker = tmp_path / "executed"
    learning_rate = json.loads(
        json.dumps(learning_rate).replace("{marker}", str(marker)))
    config = AdamW().get_config()
    config["learning_rate"] = learning_rate
    modules_before = set(sys.modules)
    with pytest.raises(ValueError, match="learning_rate"):
        AdamW.from_config(config)
    assert set(sys.modules) - modules_before == set()
    assert not marker.exists()


def test_custom_schedule_via_custom_objects():
    class HalvingSchedule(K3.LearningRateSchedule):

        def __init__(self, base):
            self.base = base

        def __call__(self, step):
            return self.base * tf.pow(0.5, tf.cast(step, tf.float32))

        def get_config(self):
            return {"base": self.base}

    config = AdamW(learning_rate=HalvingSchedule(0.2)).get_config()
    with pytest.raises(ValueError, match="HalvingSchedule"):
        AdamW.from_config(config)
    opt = AdamW.from_config(
        config, custom_objects={"HalvingSchedule": HalvingSchedule})
    assert type(_schedule_of(opt)) is HalvingSchedule
    assert _schedule_of(opt).base == 0.2
    assert float(opt.learning_rate) == pytest.approx(0.2)
    assert opt.get_config() == config


@pytest.mark.parametrize("argument", ["learning_rate", "beta_1", "beta_2",
                                      "epsilon"])
def test_plain_callable_is_not_serialisable(argument):
    value = 1e-7 if argument == "epsilon" else 0.5
    opt = AdamW(**{argument: lambda: value})
    with pytest.raises(ValueError, match=f"`{argument}`"):
        opt.get_config()


# ---------------------------------------------------------------------------
# learning_rate / weight_decay getters and setters.


def test_learning_rate_setter_assigns_without_retrace():
    var = tf.Variable(INITIAL)
    opt = AdamW(learning_rate=0.01, weight_decay=0.1)
    reference = NumpyAdamW([INITIAL], learning_rate=0.01, weight_decay=0.1)
    lr_variable = opt.learning_rate
    opt.apply_gradients([(tf.constant(GRADS[0]), var)])
    reference.apply([GRADS[0]])

    opt.learning_rate = 0.05
    opt.weight_decay = 0.2
    reference.learning_rate, reference.weight_decay = 0.05, 0.2
    assert opt.learning_rate is lr_variable  # assigned, not replaced
    assert float(opt.learning_rate) == _float32(0.05)
    assert float(opt.weight_decay) == _float32(0.2)
    config = opt.get_config()
    assert config["learning_rate"] == 0.05
    assert config["weight_decay"] == 0.2

    opt.apply_gradients([(tf.constant(GRADS[1]), var)])
    reference.apply([GRADS[1]])
    np.testing.assert_allclose(var.numpy(), reference.variables[0],
                               rtol=1e-5, atol=1e-6)
    assert step_traces(opt) <= 1  # eager fused steps trace nothing


def test_learning_rate_setter_inside_user_tf_function():
    var = tf.Variable(INITIAL)
    opt = AdamW(learning_rate=0.01)
    reference = NumpyAdamW([INITIAL], learning_rate=0.01)

    @tf.function
    def train_step(grad):
        return opt.apply_gradients([(grad, var)])

    # Built first, as custom loops do (otherwise the first call traces twice
    # because it creates the slots).
    opt.build([var])
    train_step(tf.constant(GRADS[0]))
    reference.apply([GRADS[0]])
    opt.learning_rate = 0.2
    reference.learning_rate = 0.2
    train_step(tf.constant(GRADS[1]))
    reference.apply([GRADS[1]])
    assert train_step.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(var.numpy(), reference.variables[0],
                               rtol=1e-5, atol=1e-6)


def test_learning_rate_settable_when_created_in_a_name_scope():
    # The optimizer's own learning-rate variable stays settable wherever the
    # optimizer is created, e.g. inside a module's name scope.
    with tf.name_scope("outer"):
        opt = AdamW(learning_rate=0.01)
    opt.learning_rate = 0.02
    assert float(opt.learning_rate) == _float32(0.02)

    class Trainer(tf.Module):

        def __init__(self):
            super().__init__(name="trainer")
            with self.name_scope:
                self.opt = AdamW(learning_rate=0.01)

    trainer = Trainer()
    trainer.opt.learning_rate = 0.03
    assert float(trainer.opt.learning_rate) == _float32(0.03)


def test_learning_rate_getter_kinds():
    number = AdamW(learning_rate=0.25)
    assert isinstance(number.learning_rate, tf.Variable)
    assert float(number.learning_rate) == 0.25
    assert float(AdamW(learning_rate=lambda: 0.125).learning_rate) == 0.125
    schedule = K3.ExponentialDecay(0.1, 1, 0.5)
    assert float(AdamW(learning_rate=schedule).learning_rate) == float(
        schedule(0))


def test_setting_a_number_on_a_schedule_optimizer_is_type_error():
    opt = AdamW(learning_rate=K3.ExponentialDecay(0.1, 1, 0.5))
    with pytest.raises(TypeError, match="learning_rate"):
        opt.learning_rate = 0.01
    # Replacing the schedule by another schedule is allowed, as in Keras.
    other = K3.PiecewiseConstantDecay([1], [0.3, 0.1])
    opt.learning_rate = other
    assert float(opt.learning_rate) == pytest.approx(0.3)
    assert opt.get_config()["learning_rate"]["class_name"] == (
        "PiecewiseConstantDecay")


def test_setting_a_schedule_on_a_number_optimizer():
    opt = AdamW(learning_rate=0.01)
    schedule = K3.ExponentialDecay(0.1, 1, 0.5)
    opt.learning_rate = schedule
    assert float(opt.learning_rate) == float(schedule(0))
    assert opt.get_config()["learning_rate"] == K3.serialize(schedule)


# ---------------------------------------------------------------------------
# Variables and slots.


def _ids(variables):
    return {id(v) for v in variables}


def test_variables_before_and_after_build():
    opt = AdamW(learning_rate=0.01)
    before = opt.variables
    assert any(v is opt.iterations for v in before)
    assert any(v is opt.learning_rate for v in before)
    a = tf.Variable(tf.zeros([2, 3]), name="a")
    b = tf.Variable(tf.zeros([4]), name="b")
    opt.build([a, b])
    after = opt.variables
    assert after[0] is opt.iterations
    assert _ids(before) <= _ids(after)
    for model_var in (a, b):
        slots = opt.slots_for(model_var)
        assert _ids(slots.values()) <= _ids(after)
        for slot in slots.values():
            assert slot.shape == model_var.shape
            assert not slot.trainable
    # The model's variables are not the optimizer's.
    assert not _ids([a, b]) & _ids(after)
    assert len(after) == len(before) + 2 * 2
    assert len(_ids(after)) == len(after)


@pytest.mark.parametrize("kwargs,keys", [
    (dict(), {"momentum", "velocity"}),
    (dict(amsgrad=True), {"momentum", "velocity", "velocity_hat"}),
    (dict(use_ema=True), {"momentum", "velocity", "average"}),
    (dict(gradient_accumulation_steps=3),
     {"momentum", "velocity", "accumulator"}),
    (dict(amsgrad=True, use_ema=True, gradient_accumulation_steps=2),
     {"momentum", "velocity", "velocity_hat", "average", "accumulator"}),
])
def test_slots_for_keys(kwargs, keys):
    var = tf.Variable(tf.ones([3]), name="w")
    opt = AdamW(**kwargs)
    opt.build([var])
    slots = opt.slots_for(var)
    assert set(slots) == keys
    assert _ids(slots.values()) <= _ids(opt.variables)
    assert len(_ids(slots.values())) == len(keys)


def test_slots_for_unknown_variable():
    opt = AdamW()
    opt.build([tf.Variable([1.0], name="known")])
    with pytest.raises(ValueError, match="unknown_var"):
        opt.slots_for(tf.Variable([1.0], name="unknown_var"))


def test_variables_include_accumulation_counter():
    opt = AdamW(gradient_accumulation_steps=2)
    opt.build([tf.Variable([1.0])])
    names = [v.name for v in opt.variables]
    assert any("accumulation" in n for n in names), names


def test_config_after_steps_is_unchanged():
    # Training changes state, not configuration.
    var = tf.Variable(INITIAL)
    opt = AdamW(learning_rate=0.01, weight_decay=0.05)
    config = opt.get_config()
    opt.apply_gradients([(tf.constant(GRADS[0]), var)])
    assert opt.get_config() == config
