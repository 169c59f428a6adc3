"""The optimizer's options: validated once, frozen, and serialised.

`Options` holds every constructor argument that is fixed for the life of an
optimizer (clipping, EMA, accumulation, AMSGrad, which step may run). The
hyperparameters that may be schedules, callables or variables (learning
rate, betas, epsilon) are checked here as numbers (`check_hyperparameter`)
and kept as state by `tf_adamw.state`.

This module imports neither TensorFlow nor Keras, so the trainer can
validate its configuration with the same rules before it starts TensorFlow.
Every error names the argument and the value received.
"""

import dataclasses
import math
import numbers
import re
import typing
import warnings

import numpy as np

# The range each numeric hyperparameter must lie in, as `number()` keywords.
HYPERPARAMETER_RANGES = {
    "learning_rate": {"low": 0.0},
    "weight_decay": {"low": 0.0},
    "beta_1": {"low": 0.0, "high": 1.0, "high_open": True},
    "beta_2": {"low": 0.0, "high": 1.0, "high_open": True},
    "epsilon": {"low": 0.0},
}


def is_number(value):
    """True for real Python/NumPy numbers, False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(
        value, (bool, np.bool_))


def number(name, value, *, low=None, high=None, low_open=False,
           high_open=False):
    """Validates a finite real number in a range and returns it as float.

    Raises:
        TypeError: `value` is not a real number.
        ValueError: it is not finite or outside the range.
    """
    if not is_number(value):
        raise TypeError(
            f"Argument `{name}` must be a number. Received: {name}={value!r} "
            f"of type {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"Argument `{name}` must be finite. Received: {name}={value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (
        value >= high if high_open else value > high)
    if too_low or too_high:
        interval = (f"{'(' if low_open else '['}"
                    f"{'-inf' if low is None else low}, "
                    f"{'inf' if high is None else high}"
                    f"{')' if high_open else ']'}")
        raise ValueError(
            f"Argument `{name}` must be in {interval}. "
            f"Received: {name}={value}")
    return value


def optional_number(name, value, **kwargs):
    """Like `number` but lets None through."""
    return None if value is None else number(name, value, **kwargs)


def boolean(name, value):
    """Validates a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"Argument `{name}` must be a bool. Received: {name}={value!r} "
            f"of type {type(value).__name__}.")
    return bool(value)


def optional_int(name, value, minimum, what):
    """Validates an int >= minimum, or None; returns a Python int.

    A float with an integral value (`4.0`) counts as that int: R and other
    callers through reticulate have only doubles (`4` in R is `4.0`).
    """
    if value is None:
        return None
    integral = not isinstance(value, (bool, np.bool_)) and (
        isinstance(value, numbers.Integral)
        or (isinstance(value, numbers.Real)
            and float(value).is_integer()))
    if not integral or value < minimum:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum} or None ({what}; "
            f"a float must have an integral value, e.g. 4.0). "
            f"Received: {name}={value!r}")
    return int(value)


def check_hyperparameter(name, value):
    """Validates a numeric hyperparameter against its range; returns float."""
    return number(name, value, **HYPERPARAMETER_RANGES[name])


def optional_boolean(name, value):
    """Validates a bool, or None."""
    return None if value is None else boolean(name, value)


# The rule of each argument that stands on its own: `rule(name, value)`
# returns the checked value or raises naming the argument.
_RULES = {
    "amsgrad": boolean,
    "use_ema": boolean,
    "jit_compile": boolean,
    "skip_nonfinite_gradients": boolean,
    "fused": optional_boolean,
    "slot_layout": lambda name, value: _slot_layout(value),
    "loss_scale": lambda name, value: _loss_scale(value),
    "initial_scale": lambda name, value: number(
        name, value, low=0.0, low_open=True),
    "dynamic_growth_steps": lambda name, value: _growth_steps(value),
    "clipnorm": optional_number,
    "clipvalue": optional_number,
    "global_clipnorm": optional_number,
    "loss_scale_factor": lambda name, value: optional_number(
        name, value, low=0.0, low_open=True),
    "ema_overwrite_frequency": lambda name, value: optional_int(
        name, value, 1, "applied updates between overwrites"),
    "gradient_accumulation_steps": lambda name, value: optional_int(
        name, value, 2, "calls per applied update"),
}
_RULES.update({name: check_hyperparameter for name in HYPERPARAMETER_RANGES})


def check_argument(name, value, *, use_ema=False):
    """Checks one constructor argument given as a plain Python value.

    The trainer checks its optimizer section with this, one key at a time,
    so that an error names the config key. Hyperparameters are checked as
    numbers (schedules and callables are `AdamW`'s business).

    Args:
        name: an `AdamW` argument name.
        value: its value.
        use_ema: the `use_ema` argument (`ema_momentum` depends on it).

    Returns:
        The checked value.

    Raises:
        TypeError, ValueError: naming the argument and the value; a
            ValueError for a name that is no such argument.
    """
    if name == "ema_momentum":
        return _ema_momentum(value, use_ema)
    if name not in _RULES:
        raise ValueError(
            f"`{name}` is not an AdamW argument with a rule of its own; "
            f"known: {', '.join(sorted([*_RULES, 'ema_momentum']))}. "
            f"Received: {name}={value!r}")
    return _RULES[name](name, value)


def check_patterns(var_names):
    """Validates `exclude_from_weight_decay`'s `var_names`; returns the
    compiled alternation of the patterns, or None for no patterns."""
    if isinstance(var_names, str) or any(
            not isinstance(n, str) for n in var_names or []):
        raise TypeError(
            "Argument `var_names` must be a list of strings. Received: "
            f"var_names={var_names!r}")
    if not var_names:
        return None
    try:
        return re.compile("|".join(sorted(set(var_names))))
    except re.error as e:
        raise ValueError(
            "Argument `var_names` must hold valid regular expressions. "
            f"Received: var_names={var_names!r} ({e})") from e


# The dynamic loss scale's defaults (Keras LossScaleOptimizer's).
INITIAL_SCALE = 2.0 ** 15
DYNAMIC_GROWTH_STEPS = 2000


@dataclasses.dataclass(frozen=True)
class Options:
    """The fixed options of one `AdamW`, validated (see `validate`)."""
    name: str = "adamw"
    amsgrad: bool = False
    clipnorm: typing.Optional[float] = None
    clipvalue: typing.Optional[float] = None
    global_clipnorm: typing.Optional[float] = None
    use_ema: bool = False
    ema_momentum: float = 0.99
    ema_overwrite_frequency: typing.Optional[int] = None
    loss_scale_factor: typing.Optional[float] = None
    gradient_accumulation_steps: typing.Optional[int] = None
    jit_compile: bool = True
    skip_nonfinite_gradients: bool = False
    fused: typing.Optional[bool] = None
    # How each variable's slots are stored (`SLOT_LAYOUTS`).
    slot_layout: str = "separate"
    # Dynamic loss scaling (`loss_scale="dynamic"`): Keras
    # LossScaleOptimizer's rule and defaults.
    loss_scale: typing.Optional[str] = None
    initial_scale: float = INITIAL_SCALE
    dynamic_growth_steps: int = DYNAMIC_GROWTH_STEPS

    @property
    def dynamic_loss_scale(self):
        return self.loss_scale == "dynamic"

    def clip_rule(self):
        """`(kind, value)` of the clipping in use, or None.

        Keras applies a clip argument only when it is > 0; at most one is
        set (`validate`).
        """
        for kind in ("clipnorm", "global_clipnorm", "clipvalue"):
            value = getattr(self, kind)
            if value is not None and value > 0:
                return kind, value
        return None

    def to_config(self):
        """The options as Keras config keys (hyperparameters not included)."""
        config = dataclasses.asdict(self)
        config.pop("name")
        if self.slot_layout == "separate":
            config.pop("slot_layout")  # the default: configs unchanged
        if not self.dynamic_loss_scale:
            # Keys of an option not in use are left out, so that configs
            # of optimizers without it are unchanged.
            for key in _LOSS_SCALE_KEYS:
                config.pop(key)
        return config


def validate(*, name="adamw", amsgrad=False, clipnorm=None, clipvalue=None,
             global_clipnorm=None, use_ema=False, ema_momentum=0.99,
             ema_overwrite_frequency=None, loss_scale_factor=None,
             gradient_accumulation_steps=None, jit_compile=True,
             skip_nonfinite_gradients=False, fused=None,
             slot_layout="separate", loss_scale=None,
             initial_scale=INITIAL_SCALE,
             dynamic_growth_steps=DYNAMIC_GROWTH_STEPS):
    """Checks the fixed constructor arguments and returns `Options`.

    Raises:
        TypeError, ValueError: naming the argument and the value.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(
            "Argument `name` must be a non-empty string. Received: "
            f"name={name!r}")
    clip_args = (clipnorm, clipvalue, global_clipnorm)
    if sum(a is not None for a in clip_args) > 1:
        raise ValueError(
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can "
            f"be set. Received: clipnorm={clipnorm}, "
            f"clipvalue={clipvalue}, global_clipnorm={global_clipnorm}")
    given = {"amsgrad": amsgrad, "clipnorm": clipnorm,
             "clipvalue": clipvalue, "global_clipnorm": global_clipnorm,
             "use_ema": use_ema, "ema_momentum": ema_momentum,
             "ema_overwrite_frequency": ema_overwrite_frequency,
             "loss_scale_factor": loss_scale_factor,
             "gradient_accumulation_steps": gradient_accumulation_steps,
             "jit_compile": jit_compile,
             "skip_nonfinite_gradients": skip_nonfinite_gradients,
             "fused": fused, "slot_layout": slot_layout,
             "loss_scale": loss_scale,
             "initial_scale": initial_scale,
             "dynamic_growth_steps": dynamic_growth_steps}
    use_ema = boolean("use_ema", use_ema)
    checked = {key: check_argument(key, value, use_ema=use_ema)
               for key, value in given.items()}
    _check_loss_scale_combination(**{key: checked[key] for key in (
        "loss_scale", "loss_scale_factor", "initial_scale",
        "dynamic_growth_steps")})
    return Options(name=name, **checked)


def extra_keywords(kwargs, *, weight_decay):
    """The keyword arguments `AdamW` takes beyond Keras's signature.

    `decay` is accepted with a warning and ignored (Keras compatibility);
    `jit_compile`, `skip_nonfinite_gradients`, `fused`, `slot_layout`
    and the dynamic
    loss scale's `loss_scale`, `initial_scale` and `dynamic_growth_steps`
    are returned for `validate`. Also refuses `weight_decay=None` as Keras does.

    Raises:
        ValueError: any other key, or `weight_decay` is None.
    """
    kwargs = dict(kwargs)
    if kwargs.pop("decay", None) is not None:
        warnings.warn(
            "Argument `decay` is no longer supported and will be ignored.")
    ours = {k: kwargs.pop(k) for k in
            ("jit_compile", "skip_nonfinite_gradients", "fused",
             "slot_layout") + _LOSS_SCALE_KEYS if k in kwargs}
    if kwargs:
        raise ValueError(f"Argument(s) not recognized: {kwargs}")
    if weight_decay is None:
        raise ValueError(
            "Argument `weight_decay` must be a float. Received: "
            "weight_decay=None")
    return ours


# `slot_layout`: "separate" keeps one variable per slot; "packed" keeps all
# of a variable's slots as the rows of one variable, which halves what an
# XLA step passes and writes per variable (docs/semantics.md, "Slot
# layouts").
SLOT_LAYOUTS = ("separate", "packed")


def _slot_layout(value):
    if not isinstance(value, str) or value not in SLOT_LAYOUTS:
        raise ValueError(
            f"Argument `slot_layout` must be one of {list(SLOT_LAYOUTS)}. "
            f"Received: slot_layout={value!r}")
    return value


def _ema_momentum(value, use_ema):
    # Keras checks the range only when the EMA is in use; any number is
    # accepted (and reported back by get_config) otherwise.
    if use_ema:
        return number("ema_momentum", value, low=0.0, high=1.0)
    if not is_number(value):
        raise TypeError(
            "Argument `ema_momentum` must be a number. Received: "
            f"ema_momentum={value!r}")
    return float(value)


_LOSS_SCALE_KEYS = ("loss_scale", "initial_scale", "dynamic_growth_steps")


def _loss_scale(value):
    if value is not None and value != "dynamic":
        raise ValueError(
            "Argument `loss_scale` must be None or \"dynamic\" (a fixed "
            "factor is `loss_scale_factor`). Received: "
            f"loss_scale={value!r}")
    return value


def _check_loss_scale_combination(loss_scale, loss_scale_factor,
                                  initial_scale, dynamic_growth_steps):
    if loss_scale is None and (initial_scale != INITIAL_SCALE or
                               dynamic_growth_steps != DYNAMIC_GROWTH_STEPS):
        raise ValueError(
            "Arguments `initial_scale` and `dynamic_growth_steps` need "
            "`loss_scale=\"dynamic\"`. Received: "
            f"initial_scale={initial_scale!r}, "
            f"dynamic_growth_steps={dynamic_growth_steps!r}, "
            f"loss_scale={loss_scale!r}")
    if loss_scale is not None and loss_scale_factor is not None:
        raise ValueError(
            "Only one of `loss_scale_factor` (a fixed factor) and "
            "`loss_scale=\"dynamic\"` can be set. Received: "
            f"loss_scale_factor={loss_scale_factor!r}, "
            f"loss_scale={loss_scale!r}")


def _growth_steps(value):
    try:
        if value is not None:
            return optional_int("dynamic_growth_steps", value, 1, "")
    except ValueError:
        pass
    raise ValueError(
        "`dynamic_growth_steps` must be an integer >= 1 (finite calls "
        "before the loss scale doubles). Received: "
        f"dynamic_growth_steps={value!r}")
