"""`tf_adamw.options`: the fixed constructor arguments, checked once.

docs/semantics.md, "Constructor arguments": a wrong type is a `TypeError`, a
bad value a `ValueError`, and every message names the argument and shows the
value received. `validate` returns a frozen `Options`; `check_argument` is
the same rule one argument at a time (the trainer's config checks);
`check_patterns` compiles `exclude_from_weight_decay`'s names; and
`extra_keywords` handles the keywords beyond Keras's signature.

The module must load without TensorFlow (the trainer validates its config
before starting TensorFlow), so this file imports no TensorFlow either.
"""

import dataclasses
import inspect
import pathlib
import re
import subprocess
import sys
import typing
import warnings

import numpy as np
import pytest

from tf_adamw import options

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every argument `validate` takes, except `name` ...
ARGUMENTS = sorted(
    set(inspect.signature(options.validate).parameters) - {"name"})
# ... and the numeric hyperparameters: `check_argument` checks all of them.
HYPERPARAMETERS = ["beta_1", "beta_2", "epsilon", "learning_rate",
                   "weight_decay"]


class Row(typing.NamedTuple):
    """One line of the `check_argument` table."""
    name: str
    good: object  # accepted ...
    checked: object  # ... and returned as this
    bad: object  # refused ...
    error: type  # ... with this exception,
    fragment: str  # whose message contains this.
    use_ema: bool = False


INF, NAN = float("inf"), float("nan")

# Literal expectations, one or more rows per argument (docs/semantics.md,
# "Constructor arguments").
CHECK_ARGUMENT_TABLE = [
    # Hyperparameters given as numbers.
    Row("learning_rate", 1, 1.0, -0.1, ValueError,
        "Argument `learning_rate` must be in [0.0, inf]"),
    Row("learning_rate", np.float32(0.5), 0.5, "0.1", TypeError,
        "Argument `learning_rate` must be a number"),
    Row("learning_rate", 0.0, 0.0, NAN, ValueError,
        "Argument `learning_rate` must be finite"),
    Row("learning_rate", 3e-4, 3e-4, True, TypeError,
        "Argument `learning_rate` must be a number"),
    Row("weight_decay", 0.0, 0.0, -1, ValueError,
        "Argument `weight_decay` must be in [0.0, inf]"),
    Row("weight_decay", 0.004, 0.004, None, TypeError,
        "Argument `weight_decay` must be a number"),
    Row("beta_1", 0.0, 0.0, 1.0, ValueError,
        "Argument `beta_1` must be in [0.0, 1.0)"),
    Row("beta_1", 0.9, 0.9, [0.9], TypeError,
        "Argument `beta_1` must be a number"),
    Row("beta_2", 0.999, 0.999, -0.5, ValueError,
        "Argument `beta_2` must be in [0.0, 1.0)"),
    Row("epsilon", 0, 0.0, INF, ValueError,
        "Argument `epsilon` must be finite"),
    Row("epsilon", 1e-7, 1e-7, -1e-7, ValueError,
        "Argument `epsilon` must be in [0.0, inf]"),
    # Bools.
    Row("amsgrad", True, True, 1, TypeError,
        "Argument `amsgrad` must be a bool"),
    Row("amsgrad", np.bool_(False), False, "False", TypeError,
        "Argument `amsgrad` must be a bool"),
    Row("use_ema", False, False, None, TypeError,
        "Argument `use_ema` must be a bool"),
    Row("jit_compile", False, False, 0, TypeError,
        "Argument `jit_compile` must be a bool"),
    Row("skip_nonfinite_gradients", True, True, "yes", TypeError,
        "Argument `skip_nonfinite_gradients` must be a bool"),
    Row("fused", None, None, "auto", TypeError,
        "Argument `fused` must be a bool"),
    Row("fused", True, True, 1, TypeError,
        "Argument `fused` must be a bool"),
    # A choice of names.
    Row("slot_layout", "packed", "packed", "flat", ValueError,
        "Argument `slot_layout` must be one of ['separate', 'packed']"),
    Row("slot_layout", "separate", "separate", None, ValueError,
        "Argument `slot_layout` must be one of ['separate', 'packed']"),
    # Clip arguments: any finite number (<= 0 is accepted, not applied).
    Row("clipnorm", None, None, "1", TypeError,
        "Argument `clipnorm` must be a number"),
    Row("clipnorm", -1, -1.0, INF, ValueError,
        "Argument `clipnorm` must be finite"),
    Row("clipvalue", 0.5, 0.5, NAN, ValueError,
        "Argument `clipvalue` must be finite"),
    Row("global_clipnorm", 0, 0.0, False, TypeError,
        "Argument `global_clipnorm` must be a number"),
    # Positive numbers and counts.
    Row("loss_scale_factor", 128, 128.0, 0.0, ValueError,
        "Argument `loss_scale_factor` must be in (0.0, inf]"),
    Row("loss_scale_factor", None, None, "128", TypeError,
        "Argument `loss_scale_factor` must be a number"),
    Row("ema_overwrite_frequency", 1, 1, 0, ValueError,
        "`ema_overwrite_frequency` must be an integer >= 1 or None"),
    Row("ema_overwrite_frequency", None, None, True, ValueError,
        "`ema_overwrite_frequency` must be an integer >= 1 or None"),
    Row("gradient_accumulation_steps", 2, 2, 1, ValueError,
        "`gradient_accumulation_steps` must be an integer >= 2 or None"),
    Row("gradient_accumulation_steps", np.int64(4), 4, 4.5, ValueError,
        "`gradient_accumulation_steps` must be an integer >= 2 or None"),
    Row("gradient_accumulation_steps", None, None, "4", ValueError,
        "`gradient_accumulation_steps` must be an integer >= 2 or None"),
    # The dynamic loss scale.
    Row("loss_scale", "dynamic", "dynamic", "static", ValueError,
        "Argument `loss_scale` must be None or \"dynamic\""),
    Row("loss_scale", None, None, 2.0, ValueError,
        "Argument `loss_scale` must be None or \"dynamic\""),
    Row("initial_scale", 8, 8.0, 0, ValueError,
        "Argument `initial_scale` must be in (0.0, inf]"),
    Row("initial_scale", 2.0 ** 15, 32768.0, "big", TypeError,
        "Argument `initial_scale` must be a number"),
    Row("dynamic_growth_steps", 10, 10, 0, ValueError,
        "`dynamic_growth_steps` must be an integer >= 1 (finite calls"),
    Row("dynamic_growth_steps", 10.0, 10, None, ValueError,
        "`dynamic_growth_steps` must be an integer >= 1 (finite calls"),
    # ema_momentum: ranged only when the EMA is in use.
    Row("ema_momentum", 1.0, 1.0, 1.5, ValueError,
        "Argument `ema_momentum` must be in [0.0, 1.0]", use_ema=True),
    Row("ema_momentum", 1.5, 1.5, "0.9", TypeError,
        "Argument `ema_momentum` must be a number", use_ema=False),
    Row("ema_momentum", -3, -3.0, None, TypeError,
        "Argument `ema_momentum` must be a number", use_ema=False),
]


def _row_id(row):
    return f"{row.name}-{row.bad!r}-use_ema={row.use_ema}"


def test_table_covers_every_argument():
    """Every argument `check_argument` knows has a row: those of `validate`
    (but `name`) and the hyperparameters; no row names anything else."""
    assert sorted(options.HYPERPARAMETER_RANGES) == HYPERPARAMETERS
    assert sorted({row.name for row in CHECK_ARGUMENT_TABLE}) == sorted(
        ARGUMENTS + HYPERPARAMETERS)


@pytest.mark.parametrize("row", CHECK_ARGUMENT_TABLE, ids=_row_id)
def test_check_argument_accepts_and_converts_the_good_value(row):
    """The good value is returned checked: numbers as float, counts as int,
    bools as bool."""
    got = options.check_argument(row.name, row.good, use_ema=row.use_ema)
    assert got == row.checked
    assert type(got) is type(row.checked), (row.name, got)


@pytest.mark.parametrize("row", CHECK_ARGUMENT_TABLE, ids=_row_id)
def test_check_argument_refuses_the_bad_value_naming_it(row):
    """The exception type is the documented one and the message names the
    argument and shows what was received."""
    with pytest.raises(row.error) as info:
        options.check_argument(row.name, row.bad, use_ema=row.use_ema)
    message = str(info.value)
    assert type(info.value) is row.error
    assert row.fragment in message
    assert f"Received: {row.name}=" in message


@pytest.mark.parametrize("name", ["learning_rat", "name", "weight_decay "])
def test_check_argument_refuses_an_unknown_name_naming_it(name):
    """A misspelt argument (or one with no rule, like `name`) is a
    ValueError naming it, not a KeyError."""
    with pytest.raises(ValueError, match="is not an AdamW argument") as info:
        options.check_argument(name, 0.5)
    assert f"Received: {name}=0.5" in str(info.value)
    assert "learning_rate" in str(info.value)


@pytest.mark.parametrize("name", HYPERPARAMETERS)
def test_check_hyperparameter_is_check_argument(name):
    """The hyperparameters' numeric rule is the same through both entries."""
    assert options.check_hyperparameter(name, 0.5) == 0.5
    with pytest.raises(ValueError, match=re.escape(f"`{name}`")):
        options.check_hyperparameter(name, -1.0)


# ---------------------------------------------------------------------------
# validate and Options.


def test_validate_returns_frozen_options():
    """`validate` returns an `Options` that cannot be changed afterwards."""
    opts = options.validate(amsgrad=True, clipnorm=1)
    assert isinstance(opts, options.Options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.amsgrad = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.clipnorm = 2.0
    assert opts.amsgrad is True and opts.clipnorm == 1.0


def test_validate_defaults_are_keras_defaults():
    """No arguments: Keras's defaults plus ours (docs/semantics.md,
    "Constructor arguments")."""
    opts = options.validate()
    assert opts == options.Options()
    assert (opts.name, opts.amsgrad, opts.use_ema, opts.ema_momentum,
            opts.jit_compile, opts.skip_nonfinite_gradients, opts.fused) == (
                "adamw", False, False, 0.99, True, False, None)
    assert (opts.clipnorm, opts.clipvalue, opts.global_clipnorm,
            opts.ema_overwrite_frequency, opts.loss_scale_factor,
            opts.gradient_accumulation_steps) == (None,) * 6


def test_validate_converts_values():
    """Numbers come back as float, counts as int."""
    opts = options.validate(global_clipnorm=2, loss_scale_factor=64,
                            ema_overwrite_frequency=np.int32(3),
                            use_ema=True, ema_momentum=1)
    assert type(opts.global_clipnorm) is float and opts.global_clipnorm == 2
    assert type(opts.loss_scale_factor) is float
    assert type(opts.ema_overwrite_frequency) is int
    assert type(opts.ema_momentum) is float and opts.ema_momentum == 1.0


@pytest.mark.parametrize("name", ["", 3, None])
def test_validate_refuses_a_bad_name(name):
    """`name` must be a non-empty string."""
    with pytest.raises(TypeError, match=r"Argument `name` must be a "
                       r"non-empty string\. Received: name="):
        options.validate(name=name)


@pytest.mark.parametrize("clips", [
    {"clipnorm": 1.0, "clipvalue": 1.0},
    {"clipnorm": 1.0, "global_clipnorm": 1.0},
    {"clipvalue": 0.0, "global_clipnorm": -1.0},  # even if neither applies
    {"clipnorm": 1.0, "clipvalue": 1.0, "global_clipnorm": 1.0},
])
def test_validate_refuses_two_clip_arguments(clips):
    """At most one clip argument may be set (Keras's rule and wording)."""
    with pytest.raises(ValueError, match="Only one of `clipnorm`, "
                       "`clipvalue` and `global_clipnorm` can be set") as e:
        options.validate(**clips)
    for key in ("clipnorm", "clipvalue", "global_clipnorm"):
        assert f"{key}=" in str(e.value)


def test_validate_checks_every_argument():
    """`validate` applies `check_argument` to each of its arguments: the
    bad value of each row is refused with the row's error."""
    for row in CHECK_ARGUMENT_TABLE:
        if row.name in HYPERPARAMETERS:
            continue  # AdamW's business, not `validate`'s
        kwargs = {row.name: row.bad}
        if row.name == "ema_momentum":
            kwargs["use_ema"] = row.use_ema
        with pytest.raises(row.error, match=re.escape(row.fragment)):
            options.validate(**kwargs)


def test_validate_ranges_ema_momentum_only_with_ema():
    """`ema_momentum` is in [0, 1] when `use_ema`, any number otherwise."""
    assert options.validate(ema_momentum=1.5).ema_momentum == 1.5
    with pytest.raises(ValueError, match="`ema_momentum`"):
        options.validate(use_ema=True, ema_momentum=1.5)
    with pytest.raises(TypeError, match="Argument `use_ema` must be a bool"):
        options.validate(use_ema="yes")


CLIP_RULES = [
    ({}, None),
    ({"clipnorm": 1.5}, ("clipnorm", 1.5)),
    ({"global_clipnorm": 2}, ("global_clipnorm", 2.0)),
    ({"clipvalue": 0.25}, ("clipvalue", 0.25)),
    # A clip argument <= 0 is accepted and not applied (Keras's rule).
    ({"clipnorm": 0}, None),
    ({"clipnorm": -1.0}, None),
    ({"global_clipnorm": 0.0}, None),
    ({"global_clipnorm": -2}, None),
    ({"clipvalue": 0.0}, None),
    ({"clipvalue": -0.5}, None),
]


@pytest.mark.parametrize("kwargs,rule", CLIP_RULES, ids=str)
def test_clip_rule(kwargs, rule):
    """docs/semantics.md, step 5: `(kind, value)` of the clip in use."""
    got = options.validate(**kwargs).clip_rule()
    assert got == rule
    if rule is not None:
        assert type(got[1]) is float


def test_to_config_keys_and_round_trip():
    """`to_config` has every option but `name`, under Keras's keys plus
    ours, and `validate` rebuilds the same `Options` from it."""
    opts = options.validate(name="opt", amsgrad=True, global_clipnorm=1.0,
                            use_ema=True, ema_momentum=0.5,
                            ema_overwrite_frequency=3, loss_scale_factor=8,
                            gradient_accumulation_steps=4, jit_compile=False,
                            skip_nonfinite_gradients=True, fused=False)
    config = opts.to_config()
    assert sorted(config) == sorted([
        "amsgrad", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
        "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
        "gradient_accumulation_steps", "jit_compile",
        "skip_nonfinite_gradients", "fused"])
    assert config["global_clipnorm"] == 1.0 and config["fused"] is False
    assert options.validate(name="opt", **config) == opts
    assert options.validate(**options.Options().to_config()) == (
        options.Options())


# ---------------------------------------------------------------------------
# check_patterns.


@pytest.mark.parametrize("empty", [None, [], ()])
def test_check_patterns_empty_is_none(empty):
    """No patterns: None (nothing excluded by name)."""
    assert options.check_patterns(empty) is None


def test_check_patterns_compiles_an_alternation():
    """A list of regular expressions becomes one compiled pattern that
    matches where any of them does (docs/semantics.md, step 6)."""
    pattern = options.check_patterns(["bias", "norm/.*scale", "bias"])
    assert isinstance(pattern, re.Pattern)
    assert pattern.search("dense/bias:0")
    assert pattern.search("layer_norm/scale")
    assert not pattern.search("dense/kernel:0")
    assert not pattern.search("norm")


@pytest.mark.parametrize("names", ["bias", ["bias", 3], [None], b"bias"])
def test_check_patterns_refuses_non_strings(names):
    """A plain string (a common slip for `["bias"]`) or a non-string item is
    a TypeError naming `var_names`."""
    with pytest.raises(TypeError, match=r"Argument `var_names` must be a "
                       r"list of strings\. Received: var_names="):
        options.check_patterns(names)


def test_check_patterns_refuses_an_invalid_regex():
    """An invalid regular expression is a ValueError naming `var_names`."""
    with pytest.raises(ValueError, match=r"Argument `var_names` must hold "
                       r"valid regular expressions\. Received: "
                       r"var_names=\['\('\]"):
        options.check_patterns(["("])


# ---------------------------------------------------------------------------
# extra_keywords.


def test_extra_keywords_warns_for_decay_and_ignores_it():
    """`decay` is accepted with Keras's warning and not returned."""
    with pytest.warns(UserWarning, match="Argument `decay` is no longer "
                      "supported and will be ignored"):
        assert options.extra_keywords({"decay": 0.1},
                                      weight_decay=0.004) == {}


def test_extra_keywords_decay_none_is_silent():
    """`decay=None` is what Keras's own signature passes: no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert options.extra_keywords({"decay": None},
                                      weight_decay=0.004) == {}


def test_extra_keywords_returns_ours_without_changing_the_input():
    """`jit_compile`, `skip_nonfinite_gradients`, `fused` and `slot_layout`
    are returned (unchecked: `validate` checks them); the caller's dict is
    untouched."""
    given = {"jit_compile": False, "fused": True,
             "skip_nonfinite_gradients": True, "slot_layout": "packed"}
    assert options.extra_keywords(given, weight_decay=0.0) == given
    assert given == {"jit_compile": False, "fused": True,
                     "skip_nonfinite_gradients": True,
                     "slot_layout": "packed"}
    assert options.extra_keywords({}, weight_decay=0.0) == {}


def test_extra_keywords_refuses_unknown_keys_naming_them():
    """Any other keyword is a ValueError that lists it."""
    with pytest.raises(ValueError, match="Argument\\(s\\) not recognized") as e:
        options.extra_keywords({"lr": 0.1, "momentum": 0.9, "fused": True},
                               weight_decay=0.004)
    assert "'lr'" in str(e.value) and "'momentum'" in str(e.value)
    assert "fused" not in str(e.value)


def test_extra_keywords_refuses_weight_decay_none():
    """`weight_decay=None` is a ValueError with Keras's wording."""
    with pytest.raises(ValueError, match=re.escape(
            "Argument `weight_decay` must be a float. Received: "
            "weight_decay=None")):
        options.extra_keywords({}, weight_decay=None)


# ---------------------------------------------------------------------------
# No TensorFlow.


def test_importing_options_does_not_import_tensorflow():
    """`import tf_adamw.options` loads neither TensorFlow nor Keras (the
    trainer checks its config before starting TensorFlow)."""
    code = ("import sys, tf_adamw.options; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
            "assert 'keras' not in sys.modules, 'keras imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_defaults_pass_their_own_rules():
    """Every default of `Options` is accepted by `check_argument`, with and
    without the EMA."""
    defaults = options.Options()
    for use_ema in (False, True):
        for name in ARGUMENTS:
            value = getattr(defaults, name)
            assert options.check_argument(name, value,
                                          use_ema=use_ema) == value


# ---------------------------------------------------------------------------
# Counts given as doubles (R through reticulate; issue #16).


@pytest.mark.parametrize("name,value,expected", [
    ("gradient_accumulation_steps", 4.0, 4),
    ("gradient_accumulation_steps", 2.0, 2),
    ("gradient_accumulation_steps", np.float64(8.0), 8),
    ("ema_overwrite_frequency", 100.0, 100),
    ("ema_overwrite_frequency", 1.0, 1),
    ("ema_overwrite_frequency", np.float32(3.0), 3),
])
def test_integral_floats_are_counts(name, value, expected):
    """R has only doubles: `4` in R arrives as 4.0. An integral float is
    accepted and stored as a Python int (so configs serialise ints)."""
    got = options.check_argument(name, value, use_ema=True)
    assert got == expected and type(got) is int
    opts = options.validate(use_ema=True, **{name: value})
    assert type(getattr(opts, name)) is int
    assert type(opts.to_config()[name]) is int


@pytest.mark.parametrize("name,value", [
    ("gradient_accumulation_steps", 4.5),
    ("gradient_accumulation_steps", 2.000001),
    ("gradient_accumulation_steps", 1.0),  # integral but below 2
    ("gradient_accumulation_steps", INF),
    ("gradient_accumulation_steps", NAN),
    ("ema_overwrite_frequency", 100.5),
    ("ema_overwrite_frequency", 0.0),
    ("ema_overwrite_frequency", -INF),
    ("ema_overwrite_frequency", np.float64(2.5)),
])
def test_non_integral_or_small_floats_are_refused(name, value):
    """A float that is not a whole number >= the minimum is a ValueError
    naming the argument and the value received."""
    with pytest.raises(ValueError) as info:
        options.check_argument(name, value, use_ema=True)
    message = str(info.value)
    assert f"`{name}` must be an integer >=" in message
    assert f"Received: {name}={value!r}" in message
    assert "integral value" in message


def test_bools_are_still_not_counts():
    """True == 1 and 1.0 == 1, but a bool is not a count."""
    for value in (True, np.bool_(True)):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            options.check_argument("ema_overwrite_frequency", value)
