"""The hyperparameters: learning rate, weight decay, betas, epsilon.

Each may be a number (kept in a float32 variable the optimizer owns, so that
changing it never retraces the step), a `tf.Variable` of the user's, a
zero-argument callable, or, for the learning rate, a `LearningRateSchedule`
(docs/semantics.md, "Counters and hyperparameters"). `AdamW` keeps the value
of each under its tracked attribute (`_learning_rate`, ...: checkpoint keys);
these functions make, read and serialise them.
"""

import numpy as np
import tensorflow as tf

from tf_adamw import distribute
from tf_adamw import options as options_lib
from tf_adamw import schedules

NAMES = ("learning_rate", "weight_decay", "beta_1", "beta_2", "epsilon")
# Read by the caller on every call when not the optimizer's own variables
# (`external`), under the short names the step uses.
_READ_BY_CALLER = (("lr", "learning_rate"), ("beta_1", "beta_1"),
                   ("beta_2", "beta_2"), ("epsilon", "epsilon"))


def eager_scalar(value):
    """The Python float held by an eager scalar float tensor, else None."""
    if isinstance(value, tf.Tensor) and not isinstance(value, tf.Variable):
        if not hasattr(value, "numpy"):
            return None  # symbolic
        if value.shape.rank != 0 or not value.dtype.is_floating:
            return None
        return float(value.numpy())
    if isinstance(value, np.ndarray) and value.shape == () and (
            np.issubdtype(value.dtype, np.floating)):
        return float(value)
    return None


def is_read_each_step(value):
    """True for values read anew on every step: variables and callables
    (schedules are callables too)."""
    return isinstance(value, tf.Variable) or (
        callable(value) and not isinstance(value, tf.Tensor))


def checked_float(name, value):
    """`value` (a number or eager scalar tensor) as a checked float."""
    scalar = eager_scalar(value)
    return options_lib.check_hyperparameter(
        name, value if scalar is None else scalar)


def create(prefix, name, value):
    """A float32 variable for a number; a schedule/callable/variable as is.

    Returns:
        `(value_or_variable, given)`: `given` is the checked Python float
        when a variable was created, else None.

    Raises:
        TypeError, ValueError: naming `name` and the value.
    """
    if name == "weight_decay":
        # Keras takes only a number here (no schedule or callable).
        return _variable(prefix, name, options_lib.number(
            name, value, low=0.0))
    if is_read_each_step(value):
        return value, None
    if eager_scalar(value) is None and not options_lib.is_number(value):
        kinds = ("a float, a LearningRateSchedule or a callable"
                 if name == "learning_rate"
                 else "a float, a scalar float tensor or a callable")
        raise TypeError(
            f"Argument `{name}` must be {kinds}. Received: "
            f"{name}={value!r} of type {type(value).__name__}.")
    return _variable(prefix, name, checked_float(name, value))


def _variable(prefix, name, given):
    variable = tf.Variable(given, dtype=tf.float32, trainable=False,
                           name=f"{prefix}/{name}",
                           aggregation=tf.VariableAggregation.NONE)
    return variable, given


def learning_rate_at(learning_rate, iterations):
    """The learning rate to use at `iterations` (a schedule is evaluated)."""
    if schedules.is_schedule(learning_rate):
        return learning_rate(iterations)
    if isinstance(learning_rate, tf.Variable):
        return learning_rate
    return learning_rate()


def external(values, own):
    """Callables and user variables given as hyperparameters, read now.

    They are read in the caller's context on every call and passed into the
    compiled step as tensors: a callable that returns a Python float would
    otherwise be frozen into the trace. (Inside the caller's own
    `tf.function` they are read when that function is traced, as with
    Keras.) Schedules are evaluated inside the step, at `iterations`.

    Args:
        values: `{name: value}` for every name in `NAMES`.
        own: the variables the optimizer created for numbers.
    """
    out = {}
    for short, name in _READ_BY_CALLER:
        value = values[name]
        if schedules.is_schedule(value) or any(value is v for v in own):
            continue
        if callable(value) and not isinstance(value, tf.Variable):
            value = value()
        out[short] = tf.cast(tf.convert_to_tensor(value), tf.float32)
    return out


def for_step(values, external_values, iterations):
    """This replica's hyperparameter tensors for the step at `iterations`,
    as `update.step_scalars` takes them."""
    local = distribute.local
    hyper = {}
    for short, name in (("lr", "learning_rate"),
                        ("weight_decay", "weight_decay"),
                        ("beta_1", "beta_1"), ("beta_2", "beta_2"),
                        ("epsilon", "epsilon")):
        if short in external_values:
            hyper[short] = external_values[short]
        elif name == "learning_rate":
            hyper[short] = tf.convert_to_tensor(
                local(learning_rate_at(values[name], iterations)))
        else:
            hyper[short] = tf.convert_to_tensor(local(values[name]))
    return hyper


def config_value(name, value, given):
    """`value` as `get_config` reports it.

    Args:
        name: the hyperparameter.
        value: what the optimizer holds for it.
        given: the Python float the user gave (None if not a number).

    Raises:
        ValueError: a plain Python callable, which cannot be serialised
            without executing code on load.
    """
    if schedules.is_schedule(value):
        return schedules.serialize(value)
    if isinstance(value, tf.Variable):
        current = float(value.numpy())
        # Report the float the user gave, not its float32 rounding, unless
        # the variable has been assigned a different value since.
        if given is not None and value.dtype == tf.float32 and (
                float(tf.constant(given, tf.float32).numpy()) == current):
            return given
        return current
    raise ValueError(
        f"Argument `{name}` is a plain Python callable ({value!r}), which "
        "cannot be serialised: a config never carries code. Use a number "
        "or, for the learning rate, a LearningRateSchedule.")


class CheckpointGuard(tf.__internal__.tracking.Trackable):
    """Stands for a hyperparameter variable in checkpoints.

    Hyperparameters are configuration, not state: restoring a checkpoint
    must not silently replace the learning rate an optimizer was built with
    (fine-tuning from a pretraining checkpoint would train at the
    pretraining rate). In checkpoints the optimizer's own hyperparameter
    variables are represented by guards, under the same keys, so the format
    is unchanged and old checkpoints restore. A guard saves the variable's
    value as the variable itself would, and on restore hands the saved value
    to `on_restore` instead of assigning it. SavedModels keep the variables
    themselves: a loaded training SavedModel continues exactly.

    Args:
        name: the hyperparameter.
        variable: its variable.
        on_restore: `on_restore(name, variable, saved_value)`, returning a
            restore op (graph mode) or None.
    """

    def __init__(self, name, variable, on_restore):
        self._name = name
        self._variable = variable
        self._on_restore = on_restore

    def _serialize_to_tensors(self):
        # As the variable saves itself (a mirrored variable: one copy, all
        # copies being equal).
        return distribute.local(self._variable)._serialize_to_tensors()  # pylint: disable=protected-access

    def _restore_from_tensors(self, restored_tensors):
        (value,) = restored_tensors.values()
        return self._on_restore(self._name, self._variable, value)


def differs(saved, current):
    """True when a saved hyperparameter differs from the current value (both
    compared as float32, the dtype the variable holds)."""
    return bool(np.float32(saved) != np.float32(current))


def as_float32_text(value):
    """The shortest text of `value` as the float32 a variable holds
    (`0.02`, not `0.019999999552965164`)."""
    return str(np.float32(value))
