"""Argument validation and misuse errors of `tf_adamw.AdamW`.

Every invalid constructor argument is rejected at construction (no variables
needed) with a `TypeError` (wrong type) or `ValueError` (bad value) whose
message names the argument and the value received (docs/semantics.md,
"Constructor arguments").
Misuse of the step API gets a clear error naming the variable involved.

Only `test_none_gradient_is_skipped_with_warning` compiles a step; every other
test fails before any tracing, so the file runs in a few seconds.
"""

import math
import os
import re
import tempfile
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_adamw
from tf_adamw import AdamW


def _names(argument, received=None):
    """A `match` pattern: the argument in backticks (or bare) and the value.

    `received` is the text `name=value` Keras-style messages carry, e.g.
    `beta_1=1.0`; it is matched literally.
    """
    pattern = re.escape(argument)
    if received is not None:
        pattern = f"(?s){pattern}.*{re.escape(received)}"
    return pattern


# ---------------------------------------------------------------------------
# Wrong types: TypeError naming the argument and the value.

WRONG_TYPES = [
    ("learning_rate", "0.1", "learning_rate='0.1'"),
    ("learning_rate", True, "learning_rate=True"),
    ("learning_rate", None, "learning_rate=None"),
    ("weight_decay", "x", "weight_decay='x'"),
    ("weight_decay", True, "weight_decay=True"),
    ("beta_1", "0.9", "beta_1='0.9'"),
    ("beta_2", [0.9], "beta_2=[0.9]"),
    ("epsilon", "1e-7", "epsilon='1e-7'"),
    ("amsgrad", "yes", "amsgrad='yes'"),
    ("amsgrad", 1, "amsgrad=1"),
    ("use_ema", 1, "use_ema=1"),
    ("use_ema", "True", "use_ema='True'"),
    ("clipnorm", "1", "clipnorm='1'"),
    ("clipvalue", "1", "clipvalue='1'"),
    ("global_clipnorm", "1", "global_clipnorm='1'"),
    ("loss_scale_factor", "128", "loss_scale_factor='128'"),
]


@pytest.mark.parametrize(
    "argument,value,received", WRONG_TYPES,
    ids=[f"{a}={v!r}" for a, v, _ in WRONG_TYPES])
def test_wrong_type_is_type_error(argument, value, received):
    with pytest.raises(TypeError, match=_names(f"`{argument}`", received)):
        AdamW(**{argument: value})


def test_beta_1_non_scalar_tensor_is_type_error():
    with pytest.raises(TypeError, match=_names("`beta_1`")):
        AdamW(beta_1=tf.constant([0.9, 0.9]))


def test_ema_momentum_wrong_type_with_ema():
    with pytest.raises(TypeError, match=_names("`ema_momentum`",
                                                "ema_momentum='0.9'")):
        AdamW(use_ema=True, ema_momentum="0.9")


def test_jit_compile_must_be_bool():
    with pytest.raises(TypeError, match=_names("`jit_compile`",
                                                "jit_compile='no'")):
        AdamW(jit_compile="no")


def test_name_must_be_non_empty_string():
    with pytest.raises(TypeError, match=_names("`name`", "name=3")):
        AdamW(name=3)
    with pytest.raises(TypeError, match=_names("`name`", "name=''")):
        AdamW(name="")


# ---------------------------------------------------------------------------
# weight_decay=None: Keras's exact message.


def test_weight_decay_none_is_value_error_with_keras_message():
    with pytest.raises(ValueError) as info:
        AdamW(weight_decay=None)
    assert str(info.value) == (
        "Argument `weight_decay` must be a float. Received: weight_decay=None")


# ---------------------------------------------------------------------------
# Bad values: ValueError naming the argument and the value.

BAD_VALUES = [
    (dict(learning_rate=-0.1), "learning_rate", "learning_rate=-0.1"),
    (dict(learning_rate=math.nan), "learning_rate", "learning_rate=nan"),
    (dict(learning_rate=math.inf), "learning_rate", "learning_rate=inf"),
    (dict(learning_rate=-math.inf), "learning_rate", "learning_rate=-inf"),
    (dict(learning_rate=tf.constant(math.nan)), "learning_rate",
     "learning_rate=nan"),
    (dict(weight_decay=-0.1), "weight_decay", "weight_decay=-0.1"),
    (dict(weight_decay=math.nan), "weight_decay", "weight_decay=nan"),
    (dict(beta_1=-0.1), "beta_1", "beta_1=-0.1"),
    (dict(beta_1=1.5), "beta_1", "beta_1=1.5"),
    (dict(beta_1=1.0), "beta_1", "beta_1=1.0"),
    (dict(beta_1=tf.constant(1.5)), "beta_1", "beta_1=1.5"),
    (dict(beta_2=-0.1), "beta_2", "beta_2=-0.1"),
    (dict(beta_2=1.0), "beta_2", "beta_2=1.0"),
    (dict(beta_2=math.nan), "beta_2", "beta_2=nan"),
    (dict(epsilon=-1), "epsilon", "epsilon=-1"),
    (dict(epsilon=math.inf), "epsilon", "epsilon=inf"),
    (dict(use_ema=True, ema_momentum=1.5), "ema_momentum",
     "ema_momentum=1.5"),
    (dict(use_ema=True, ema_momentum=-0.1), "ema_momentum",
     "ema_momentum=-0.1"),
    (dict(use_ema=True, ema_momentum=math.nan), "ema_momentum",
     "ema_momentum=nan"),
    (dict(loss_scale_factor=0), "loss_scale_factor", "loss_scale_factor=0"),
    (dict(loss_scale_factor=-1), "loss_scale_factor", "loss_scale_factor=-1"),
    (dict(loss_scale_factor=math.nan), "loss_scale_factor",
     "loss_scale_factor=nan"),
    (dict(loss_scale_factor=math.inf), "loss_scale_factor",
     "loss_scale_factor=inf"),
    (dict(clipnorm=math.nan), "clipnorm", "clipnorm=nan"),
]


@pytest.mark.parametrize(
    "kwargs,argument,received", BAD_VALUES,
    ids=[repr(k) for k, _, _ in BAD_VALUES])
def test_bad_value_is_value_error(kwargs, argument, received):
    with pytest.raises(ValueError, match=_names(f"`{argument}`", received)):
        AdamW(**kwargs)


INT_ARGS = [
    ("ema_overwrite_frequency", 0),
    ("ema_overwrite_frequency", -3),
    ("ema_overwrite_frequency", 2.5),
    ("ema_overwrite_frequency", True),
    ("ema_overwrite_frequency", "5"),
    ("gradient_accumulation_steps", 1),
    ("gradient_accumulation_steps", 0),
    ("gradient_accumulation_steps", 2.5),
    ("gradient_accumulation_steps", 4.5),
    ("gradient_accumulation_steps", True),
    ("gradient_accumulation_steps", "4"),
]


@pytest.mark.parametrize("use_ema", [True, False])
@pytest.mark.parametrize("argument,value", INT_ARGS,
                         ids=[f"{a}={v!r}" for a, v in INT_ARGS])
def test_integer_arguments(argument, value, use_ema):
    # docs/semantics.md, "Constructor arguments": ema_overwrite_frequency
    # is an int >= 1 or None,
    # gradient_accumulation_steps an int >= 2 or None (2.5 is an error),
    # whether or not EMA is on.
    with pytest.raises(ValueError,
                       match=_names(f"`{argument}`", f"{argument}={value!r}")):
        AdamW(use_ema=use_ema, **{argument: value})


def test_valid_integer_arguments_are_accepted():
    opt = AdamW(use_ema=True, ema_overwrite_frequency=1,
                gradient_accumulation_steps=np.int64(2))
    assert opt.ema_overwrite_frequency == 1
    assert opt.gradient_accumulation_steps == 2
    assert type(opt.gradient_accumulation_steps) is int


def test_ema_momentum_only_checked_with_ema():
    # Keras checks `ema_momentum`'s range only when `use_ema` is set.
    AdamW(use_ema=False, ema_momentum=1.5)
    AdamW(use_ema=True, ema_momentum=0.0)
    AdamW(use_ema=True, ema_momentum=1.0)


def test_boundary_values_are_accepted():
    AdamW(learning_rate=0.0, weight_decay=0.0, beta_1=0.0, beta_2=0.0,
          epsilon=0.0)
    AdamW(learning_rate=1, beta_1=np.float32(0.5),
          beta_2=tf.constant(0.99), loss_scale_factor=1e-3)


# ---------------------------------------------------------------------------
# Clip options: at most one.

CLIP_SETS = [
    dict(clipnorm=1.0, clipvalue=0.5),
    dict(clipnorm=1.0, global_clipnorm=2.0),
    dict(clipvalue=0.5, global_clipnorm=2.0),
    dict(clipnorm=1.0, clipvalue=0.5, global_clipnorm=2.0),
]


@pytest.mark.parametrize("kwargs", CLIP_SETS,
                         ids=["+".join(sorted(k)) for k in CLIP_SETS])
def test_more_than_one_clip_option(kwargs):
    with pytest.raises(ValueError, match="Only one of") as info:
        AdamW(**kwargs)
    message = str(info.value)
    for argument, value in kwargs.items():
        assert f"{argument}={value}" in message, message


def test_one_clip_option_is_accepted():
    for argument in ("clipnorm", "clipvalue", "global_clipnorm"):
        opt = AdamW(**{argument: 0.5})
        assert getattr(opt, argument) == 0.5


# ---------------------------------------------------------------------------
# **kwargs.


def test_unknown_kwarg_is_listed():
    with pytest.raises(ValueError, match=r"not recognized.*'foo'"):
        AdamW(foo=1)
    with pytest.raises(ValueError) as info:
        AdamW(lr=0.1, momentum=0.9)
    assert "'lr'" in str(info.value) and "'momentum'" in str(info.value)


def test_decay_is_accepted_with_a_warning():
    with pytest.warns(UserWarning, match="`decay`"):
        opt = AdamW(decay=0.1)
    assert "decay" not in opt.get_config()


def test_decay_none_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdamW(decay=None)


# ---------------------------------------------------------------------------
# Validation happens at construction.


def test_validation_happens_at_construction():
    # No variable, build or step is involved: the constructor raises, and a
    # valid construction leaves the optimizer unbuilt.
    with pytest.raises(ValueError, match="beta_2"):
        AdamW(beta_2=2.0)
    opt = AdamW()
    assert not opt.built
    assert int(opt.iterations.numpy()) == 0


# ---------------------------------------------------------------------------
# Misuse of the step API.


def _float_var(name, value=(1.0, 2.0)):
    return tf.Variable(np.array(value, np.float32), name=name)


def test_integer_variable_is_rejected():
    ints = tf.Variable([1, 2], name="int_counter")
    with pytest.raises(ValueError, match="int_counter"):
        AdamW().apply_gradients([(tf.constant([1.0, 1.0]), ints)])
    with pytest.raises(ValueError, match="int_counter"):
        AdamW().build([_float_var("ok"), ints])


def test_integer_gradient_is_rejected():
    v = _float_var("float_weights")
    with pytest.raises(ValueError, match="float_weights"):
        AdamW().apply_gradients([(tf.constant([1, 1]), v)])


def test_shape_mismatch_names_the_variable():
    v = _float_var("kernel_2")
    with pytest.raises(ValueError, match=r"kernel_2"):
        AdamW().apply_gradients([(tf.ones([3]), v)])
    sparse = tf.IndexedSlices(tf.ones([1, 3]), tf.constant([0]),
                              tf.constant([4, 2]))
    table = tf.Variable(tf.zeros([4, 2]), name="table_4x2")
    with pytest.raises(ValueError, match=r"table_4x2"):
        AdamW().apply_gradients([(sparse, table)])


def test_unknown_variable_names_the_variable():
    opt = AdamW()
    opt.build([_float_var("known")])
    with pytest.raises(ValueError, match="stranger"):
        opt.apply_gradients([(tf.ones([1]), _float_var("stranger", [0.0]))])


def test_all_none_gradients():
    v = _float_var("lonely")
    with pytest.raises(ValueError, match=r"(?s)No gradients.*lonely"):
        AdamW().apply_gradients([(None, v)])


def test_grads_and_variables_count_mismatch():
    a, b = _float_var("a"), _float_var("b")
    with pytest.raises(ValueError, match=r"1 gradients for 2 variables"):
        AdamW().apply([tf.ones([2])], [a, b])


def test_apply_without_variables_on_unbuilt_optimizer():
    with pytest.raises(ValueError, match=r"trainable_variables"):
        AdamW().apply([tf.ones([2])])


def test_apply_without_variables_count_mismatch_on_built_optimizer():
    opt = AdamW()
    opt.build([_float_var("a"), _float_var("b")])
    with pytest.raises(ValueError, match=r"1 gradients for 2 variables"):
        opt.apply([tf.ones([2])])


def test_build_twice_with_a_different_list():
    a, b = _float_var("a"), _float_var("b")
    opt = AdamW()
    opt.build([a])
    opt.build([a])  # the same list again is fine
    with pytest.raises(ValueError, match="already built"):
        opt.build([a, b])
    with pytest.raises(ValueError, match="already built"):
        opt.build([b])


def test_build_rejects_duplicates_and_empty_lists():
    a = _float_var("twice")
    with pytest.raises(ValueError, match="twice"):
        AdamW().build([a, a])
    with pytest.raises(ValueError, match="var_list"):
        AdamW().build([])


def test_exclude_from_weight_decay_after_build():
    a = _float_var("a")
    opt = AdamW()
    opt.build([a])
    with pytest.raises(ValueError, match=r"exclude_from_weight_decay.*built"):
        opt.exclude_from_weight_decay(var_names=["bias"])
    with pytest.raises(ValueError, match=r"exclude_from_weight_decay.*built"):
        opt.exclude_from_weight_decay(var_list=[a])


def test_exclude_with_invalid_regex():
    with pytest.raises(ValueError, match=_names("`var_names`", "'(bias'")):
        AdamW().exclude_from_weight_decay(var_names=["(bias"])


def test_exclude_with_a_bare_string():
    # A bare string would be iterated character by character.
    with pytest.raises(TypeError, match=_names("`var_names`", "'bias'")):
        AdamW().exclude_from_weight_decay(var_names="bias")


def test_setting_a_number_on_a_schedule_learning_rate():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)
    opt = AdamW(learning_rate=schedule)
    with pytest.raises(TypeError, match=_names("learning_rate=0.5")):
        opt.learning_rate = 0.5
    opt_callable = AdamW(learning_rate=lambda: 0.1)
    with pytest.raises(TypeError, match=_names("learning_rate=0.5")):
        opt_callable.learning_rate = 0.5


@pytest.mark.parametrize("value,error,received", [
    (-0.1, ValueError, "weight_decay=-0.1"),
    (math.nan, ValueError, "weight_decay=nan"),
    (None, TypeError, "weight_decay=None"),
    ("0.1", TypeError, "weight_decay='0.1'"),
])
def test_setting_an_invalid_weight_decay(value, error, received):
    opt = AdamW(weight_decay=0.01)
    with pytest.raises(error, match=_names("`weight_decay`", received)):
        opt.weight_decay = value
    assert float(opt.weight_decay.numpy()) == pytest.approx(0.01)


@pytest.mark.parametrize("value,error,received", [
    (-0.1, ValueError, "learning_rate=-0.1"),
    (math.inf, ValueError, "learning_rate=inf"),
    ("0.1", TypeError, "learning_rate='0.1'"),
])
def test_setting_an_invalid_learning_rate(value, error, received):
    opt = AdamW(learning_rate=0.01)
    with pytest.raises(error, match=_names("`learning_rate`", received)):
        opt.learning_rate = value
    assert float(opt.learning_rate.numpy()) == pytest.approx(0.01)


@pytest.mark.parametrize("not_a_variable", [
    tf.constant([1.0]), np.array([1.0], np.float32), [1.0]],
    ids=["tensor", "ndarray", "list"])
def test_non_variable_is_rejected(not_a_variable):
    with pytest.raises(TypeError, match="Variable"):
        AdamW().apply_gradients([(tf.constant([1.0]), not_a_variable)])


def test_grads_and_vars_must_be_pairs():
    v = _float_var("v")
    with pytest.raises(TypeError, match="grads_and_vars"):
        AdamW().apply_gradients([v])


def test_finalize_on_unbuilt_ema_optimizer():
    with pytest.raises(ValueError, match="built"):
        AdamW(use_ema=True).finalize_variable_values([_float_var("v")])
    # Without EMA there is nothing to write: a no-op, as in Keras.
    AdamW().finalize_variable_values([_float_var("v")])


# ---------------------------------------------------------------------------
# Empty and partially-None gradient lists.


def test_apply_gradients_empty_is_a_no_op():
    opt = AdamW()
    result = opt.apply_gradients([])
    assert result is opt.iterations
    assert int(result.numpy()) == 0
    assert not opt.built
    assert opt.apply([], []) is opt.iterations


def test_none_gradient_is_skipped_with_warning():
    a = _float_var("with_grad", [1.0, -2.0])
    b = _float_var("without_grad", [3.0, 4.0])
    opt = AdamW(learning_rate=0.1, weight_decay=0.5)
    with pytest.warns(UserWarning, match="without_grad") as record:
        opt.apply_gradients([(tf.constant([0.5, 0.5]), a), (None, b)])
    messages = [str(w.message) for w in record if "without_grad" in
                str(w.message)]
    assert messages and not any("with_grad:" in m for m in messages), messages
    assert int(opt.iterations.numpy()) == 1
    # `a` moved (decay and Adam), `b` did not (no decay either), and `b`'s
    # slots are untouched.
    assert not np.allclose(a.numpy(), [1.0, -2.0])
    np.testing.assert_array_equal(b.numpy(), [3.0, 4.0])
    for name, slot in opt.slots_for(b).items():
        np.testing.assert_array_equal(slot.numpy(), [0.0, 0.0], err_msg=name)
    for name, slot in opt.slots_for(a).items():
        assert np.any(slot.numpy() != 0.0), name


def test_scale_loss_takes_a_python_number():
    """Keras's `scale_loss(1.0)` works with a plain float."""
    opt = tf_adamw.AdamW(loss_scale_factor=4.0)
    assert float(opt.scale_loss(1.0)) == 4.0
    assert float(opt.scale_loss(np.float32(0.5))) == 2.0
    assert tf_adamw.AdamW().scale_loss(1.0) == 1.0


def test_a_schedule_set_as_learning_rate_drops_the_old_variable():
    """As Keras: the learning-rate variable is no longer state once a
    schedule replaces it (not in `variables`, not in checkpoints)."""
    opt = tf_adamw.AdamW(learning_rate=0.01)
    old = opt.learning_rate
    opt.learning_rate = lambda: 0.5
    assert not any(v is old for v in opt.variables)
    keys = [k for k, _ in tf.train.list_variables(
        tf.train.Checkpoint(opt=opt).write(
            os.path.join(tempfile.mkdtemp(), "ckpt")))]
    assert not any("_learning_rate" in k for k in keys), keys
    v = tf.Variable([1.0])
    opt.apply_gradients([(tf.constant([1.0]), v)])
    assert float(opt.learning_rate) == 0.5
