"""Arguments and configuration of `tf_adamw.keras.AdamW`.

The checks made at construction (the core, made at `build()`, checks again),
the values `get_config()` reports, and schedules read back from a config.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_adamw import hyperparameters
from tf_adamw import options as options_lib
from tf_adamw import schedules


def check_hyperparameter(name, value):
    """Checks a hyperparameter argument now rather than at `build()`.

    Returns:
        A number or eager scalar tensor as a checked float; a schedule or
        callable (read on every step) as is; for betas and epsilon, a
        `tf.Variable` as is.

    Raises:
        TypeError, ValueError: naming the argument and the value.
    """
    if options_lib.is_number(value) or (
            hyperparameters.eager_scalar(value) is not None):
        return hyperparameters.checked_float(name, value)
    if callable(value) and not isinstance(value, (tf.Tensor, tf.Variable)):
        return value
    if name != "learning_rate" and isinstance(value, tf.Variable):
        return value
    kinds = ("a float, a LearningRateSchedule or a callable"
             if name == "learning_rate" else
             "a float, a scalar float tensor or a callable")
    raise TypeError(f"Argument `{name}` must be {kinds}. Received: "
                    f"{name}={value!r} of type {type(value).__name__}.")


def number_of(variable, given):
    """A number variable's value, reported as the float the user gave while
    the variable still holds its float32 rounding (else the value held)."""
    current = float(variable.numpy())
    if given is not None and np.float32(given) == np.float32(current):
        return given
    return current


def config_value(name, value, given=None):
    """A hyperparameter as `get_config()` reports it before `build()`.

    Args:
        name: the hyperparameter.
        value: what the optimizer holds (a number, Keras's learning-rate
            variable, a schedule, a tensor or a callable).
        given: the float given for Keras's learning-rate variable.

    Raises:
        ValueError: a plain callable (a config never carries code).
    """
    if isinstance(value, keras.Variable):
        return number_of(value, given)
    if options_lib.is_number(value):
        return float(value)
    scalar = hyperparameters.eager_scalar(value)
    if scalar is not None:
        return scalar
    if schedules.is_schedule(value):
        return schedules.serialize(value)
    return hyperparameters.config_value(name, value, None)


def deserialize_schedule(config, custom_objects=None):
    """`tf_adamw.schedules.deserialize`, also finding schedule classes
    registered with `keras.saving.register_keras_serializable`. Runs no
    code named by the config."""
    custom_objects = dict(custom_objects or {})
    registered = config.get("registered_name")
    if registered and registered not in custom_objects:
        found = keras.saving.get_registered_object(registered, custom_objects)
        if found is not None:
            custom_objects[registered] = found
    return schedules.deserialize(config, custom_objects)
