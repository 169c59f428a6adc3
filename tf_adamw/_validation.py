"""Argument checks shared by the optimizer: each error names the argument."""

import math
import numbers

import numpy as np
import tensorflow as tf


def is_number(value):
    """True for real Python/NumPy numbers, False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(
        value, (bool, np.bool_)
    )


def eager_scalar(value):
    """The Python float held by an eager scalar float tensor, else None."""
    if isinstance(value, tf.Tensor) and not isinstance(value, tf.Variable):
        if not hasattr(value, "numpy"):
            return None  # symbolic
        if value.shape.rank != 0 or not value.dtype.is_floating:
            return None
        return float(value.numpy())
    if isinstance(value, np.ndarray) and value.shape == () and np.issubdtype(
        value.dtype, np.floating
    ):
        return float(value)
    return None


def number(name, value, *, low=None, high=None, low_open=False,
           high_open=False):
    """Validates a finite real number in a range and returns it as float."""
    if not is_number(value):
        raise TypeError(
            f"Argument `{name}` must be a number. Received: {name}={value!r} "
            f"of type {type(value).__name__}."
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"Argument `{name}` must be finite. Received: {name}={value}"
        )
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (
        value >= high if high_open else value > high
    )
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        interval = (
            f"{lo}{'-inf' if low is None else low}, "
            f"{'inf' if high is None else high}{hi}"
        )
        raise ValueError(
            f"Argument `{name}` must be in {interval}. "
            f"Received: {name}={value}"
        )
    return value


def optional_number(name, value, **kwargs):
    """Like `number` but lets None through."""
    if value is None:
        return None
    return number(name, value, **kwargs)


def boolean(name, value):
    """Validates a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"Argument `{name}` must be a bool. Received: {name}={value!r} "
            f"of type {type(value).__name__}."
        )
    return bool(value)


def optional_int(name, value, minimum, what):
    """Validates an int >= minimum, or None."""
    if value is None:
        return None
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        raise ValueError(
            f"`{name}` must be an integer >= {minimum} or None ({what}). "
            f"Received: {name}={value!r}"
        )
    return int(value)
