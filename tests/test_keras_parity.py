"""tf_adamw.AdamW against its two oracles, step by step.

a. `keras.optimizers.AdamW` (Keras 3.15, TF backend, run eagerly) wherever
   Keras is right: fixed seeds draw configurations covering every argument;
   variables, slots, EMA averages, accumulators and `iterations` are compared
   after EVERY step.
b. `numpy_reference.NumpyAdamW` (float64, the step of docs/semantics.md) for
   each deliberate difference from Keras (docs/semantics.md, "Differences
   from Keras 3"): accumulation as exact mean steps with a schedule and EMA,
   callable betas, sparse duplicates (also with `loss_scale_factor`), 16-bit
   variables, hyperparameters changed between calls without retracing.
c. Every case runs eagerly (the optimizer compiles its own step), inside a
   user's `tf.function`, and inside a user's `tf.function(jit_compile=True)`;
   two Keras cases also with `AdamW(..., jit_compile=False)`.

A failure message starts with the case's description (seed and config).
"""

import warnings

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from conftest import step_traces
from numpy_reference import NumpyAdamW
from tf_adamw import AdamW

# Many XLA compilations: `make test` runs these; the Bazel fast subset
# (`-m "not slow"`) leaves them out.
pytestmark = pytest.mark.slow

MODES = ["eager", "function", "jit"]
RTOL, ATOL = 1e-5, 1e-6
NAMES = ["dense/kernel", "dense/bias", "embedding", "norm/scale"]
SHAPES = [(4, 3), (3,), (6, 2), (5,)]
STEPS = 8


def f32(x):
    """`x` rounded to float32, as the optimizers hold hyperparameters."""
    return float(np.float32(x))


def make_step(opt, variables, mode):
    """One training step in `mode`: returns `step(grads)`."""
    def step(grads):
        return opt.apply_gradients(zip(grads, variables))

    if mode == "eager":
        return step
    return tf.function(step, jit_compile=(mode == "jit"))


def to_tf(grad, dtype=tf.float32, dense_shape=None):
    """A NumPy gradient as a tensor; `(values, indices)` as IndexedSlices."""
    if grad is None:
        return None
    if isinstance(grad, tuple):
        values, indices = grad
        return tf.IndexedSlices(
            tf.constant(values, dtype), tf.constant(indices, tf.int64),
            dense_shape=tf.constant(dense_shape, tf.int64))
    return tf.constant(grad, dtype)


def ours_state(opt, variables):
    """Our variables and slots as float64 NumPy, keyed like the oracles."""
    state = {"vars": [np.asarray(tf.cast(v, tf.float64)) for v in variables],
             "iterations": int(opt.iterations.numpy())}
    for key, slot in (("m", "momentum"), ("v", "velocity"),
                      ("v_hat", "velocity_hat"), ("avg", "average"),
                      ("acc", "accumulator")):
        if slot in opt.slots_for(variables[0]):
            state[key] = [np.asarray(opt.slots_for(v)[slot], np.float64)
                          for v in variables]
    return state


def reference_state(ref):
    state = {"vars": [x.copy() for x in ref.variables], "m": ref.m,
             "v": ref.v, "iterations": ref.iterations}
    if ref.amsgrad:
        state["v_hat"] = ref.v_hat
    if ref.use_ema:
        state["avg"] = ref.averages
    if ref.gradient_accumulation_steps:
        state["acc"] = ref.accumulators
    return {k: [x.copy() for x in v] if isinstance(v, list) else v
            for k, v in state.items()}


def assert_states_close(ours, expected, where, rtol=RTOL, atol=ATOL,
                        var_tols=None):
    """Compares every key of `expected` (iterations exactly).

    `var_tols`: optional per-variable (rtol, atol) for the variables and
    averages (16-bit variables).
    """
    assert ours["iterations"] == expected["iterations"], (
        f"{where}: iterations {ours['iterations']} != "
        f"{expected['iterations']}")
    for key, arrays in expected.items():
        if key == "iterations":
            continue
        assert key in ours, f"{where}: our optimizer has no {key!r} state"
        for i, (got, want) in enumerate(zip(ours[key], arrays)):
            r, a = rtol, atol
            if var_tols and key in ("vars", "avg"):
                r, a = var_tols[i]
            np.testing.assert_allclose(
                got, want, rtol=r, atol=a,
                err_msg=f"{where}: {key}[{i}]")


# ---------------------------------------------------------------------------
# a. Parity with Keras on randomised configurations.

LR_KINDS = ["float", "exponential", "cosine", "piecewise", "callable"]
CLIP_KINDS = [None, "clipnorm", "global_clipnorm", "clipvalue"]
EMA_KINDS = [None, "ema", "ema_overwrite"]
EXCLUDE_KINDS = [None, "var_names", "var_list", "both"]
BETA_KINDS = ["float", "tensor"]
PARITY_SEEDS = list(range(14))


def parity_config(seed):
    """A random configuration; the seed's index cycles through every kind."""
    rng = np.random.default_rng(1000 + seed)
    cfg = {
        "seed": seed,
        "lr_kind": LR_KINDS[seed % 5],
        "lr": f32(10 ** rng.uniform(-2.5, -1)),
        "weight_decay": float(rng.choice([0.0, 0.004, 0.1, 0.5])),
        "beta_kind": BETA_KINDS[(seed // 2) % 2],
        "beta_1": float(rng.uniform(0.5, 0.95)),
        "beta_2": float(rng.uniform(0.9, 0.999)),
        "epsilon": float(10 ** rng.uniform(-7, -3)),
        "amsgrad": bool(seed % 3 == 1 or rng.random() < 0.3),
        "clip_kind": CLIP_KINDS[seed % 4],
        "clip_value": float(rng.uniform(0.3, 2.0)),
        "ema_kind": EMA_KINDS[seed % 3],
        "ema_momentum": float(rng.uniform(0.5, 0.95)),
        "ema_overwrite_frequency": int(rng.integers(2, 4)),
        "loss_scale_factor": [None, 64.0, 0.5][seed % 3] if seed % 2 else None,
        "exclude_kind": EXCLUDE_KINDS[(seed // 3) % 4],
        "exclude_names": ["bias", "norm"][: int(rng.integers(1, 3))],
        "exclude_index": int(rng.integers(0, len(NAMES))),
        "accumulation": None,
        "keras_variables": seed % 5 == 2,
        "none_grad": None,
    }
    # Keras is right about accumulation only with a constant learning rate
    # and no EMA (docs/semantics.md, step 4: k calls are one step on the
    # mean gradient).
    if seed in (5, 10, 13):
        cfg.update(lr_kind="float", ema_kind=None,
                   accumulation=int(rng.integers(2, 4)))
    elif seed % 4 == 2:
        cfg["none_grad"] = (int(rng.integers(1, STEPS)),
                            int(rng.integers(0, len(NAMES))))
    if seed == 7:
        cfg["clip_value"] = 0.0  # a zero clip value is not applied
    cfg["lr_values"] = [f32(cfg["lr"] * rng.uniform(0.2, 2.0))
                        for _ in range(STEPS * 3)]
    cfg["init"] = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    scale = cfg["loss_scale_factor"] or 1.0
    calls = STEPS * (cfg["accumulation"] or 1)
    cfg["grads"] = [[(rng.normal(size=s) * rng.uniform(0.1, 3) * scale)
                     .astype(np.float32) for s in SHAPES]
                    for _ in range(calls)]
    if cfg["none_grad"]:
        step, i = cfg["none_grad"]
        cfg["grads"][step][i] = None
    return cfg


def describe(cfg):
    keys = ["seed", "lr_kind", "lr", "weight_decay", "beta_kind", "beta_1",
            "beta_2", "epsilon", "amsgrad", "clip_kind", "clip_value",
            "ema_kind", "ema_momentum", "ema_overwrite_frequency",
            "loss_scale_factor", "exclude_kind", "exclude_names",
            "exclude_index", "accumulation", "keras_variables", "none_grad"]
    return "config " + ", ".join(f"{k}={cfg[k]!r}" for k in keys)


def build_learning_rate(cfg):
    """A fresh learning rate and a per-step hook (for the callable kind)."""
    kind, lr = cfg["lr_kind"], cfg["lr"]
    schedules = keras.optimizers.schedules
    if kind == "float":
        return lr, lambda step: None
    if kind == "exponential":
        return schedules.ExponentialDecay(
            lr, decay_steps=3, decay_rate=0.6,
            staircase=bool(cfg["seed"] % 2)), lambda step: None
    if kind == "cosine":
        warmup = cfg["seed"] % 2
        return schedules.CosineDecay(
            lr, decay_steps=STEPS, alpha=0.1,
            warmup_target=2 * lr if warmup else None,
            warmup_steps=3 if warmup else 0), lambda step: None
    if kind == "piecewise":
        return schedules.PiecewiseConstantDecay(
            [2, 5], [lr, lr / 2, lr / 5]), lambda step: None
    # A zero-argument callable, re-read at every step.
    holder = tf.Variable(cfg["lr_values"][0], trainable=False)
    return (lambda: holder * 1.0), (
        lambda step: holder.assign(cfg["lr_values"][step]))


def optimizer_kwargs(cfg):
    """Constructor arguments (and the per-step hook) for either optimizer."""
    lr, hook = build_learning_rate(cfg)
    betas = (cfg["beta_1"], cfg["beta_2"])
    if cfg["beta_kind"] == "tensor":
        betas = tuple(tf.constant(b, tf.float32) for b in betas)
    kwargs = dict(learning_rate=lr, weight_decay=cfg["weight_decay"],
                  beta_1=betas[0], beta_2=betas[1], epsilon=cfg["epsilon"],
                  amsgrad=cfg["amsgrad"],
                  loss_scale_factor=cfg["loss_scale_factor"],
                  gradient_accumulation_steps=cfg["accumulation"])
    if cfg["clip_kind"]:
        kwargs[cfg["clip_kind"]] = cfg["clip_value"]
    if cfg["ema_kind"]:
        kwargs.update(use_ema=True, ema_momentum=cfg["ema_momentum"])
        if cfg["ema_kind"] == "ema_overwrite":
            kwargs["ema_overwrite_frequency"] = cfg[
                "ema_overwrite_frequency"]
    return kwargs, hook


def make_variables(cfg):
    if cfg["keras_variables"]:
        return [keras.Variable(x, name=n.replace("/", "_"))
                for x, n in zip(cfg["init"], NAMES)]
    return [tf.Variable(x, name=n) for x, n in zip(cfg["init"], NAMES)]


def configure_exclusions(opt, cfg, variables):
    kind = cfg["exclude_kind"]
    names = cfg["exclude_names"] if kind in ("var_names", "both") else None
    var_list = ([variables[cfg["exclude_index"]]]
                if kind in ("var_list", "both") else None)
    if kind:
        opt.exclude_from_weight_decay(var_list=var_list, var_names=names)


def keras_state(ko, variables, cfg):
    state = {"vars": [np.asarray(tf.cast(v, tf.float64)) for v in variables],
             "iterations": int(ko.iterations.numpy())}
    slots = {"m": ko._momentums, "v": ko._velocities}
    if cfg["amsgrad"]:
        slots["v_hat"] = ko._velocity_hats
    if cfg["ema_kind"]:
        slots["avg"] = ko._model_variables_moving_average
    if cfg["accumulation"]:
        slots["acc"] = ko._accumulated_gradients
    for key, vs in slots.items():
        state[key] = [np.asarray(v, np.float64) for v in vs]
    return state


_KERAS_CACHE = {}


def keras_trajectory(seed):
    """Keras's state after every call (and after finalize), cached."""
    if seed not in _KERAS_CACHE:
        cfg = parity_config(seed)
        variables = make_variables(cfg)
        kwargs, hook = optimizer_kwargs(cfg)
        ko = keras.optimizers.AdamW(**kwargs)
        configure_exclusions(ko, cfg, variables)
        states = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the None-gradient warning
            for step, grads in enumerate(cfg["grads"]):
                hook(step)
                ko.apply_gradients(zip([to_tf(g) for g in grads], variables))
                states.append(keras_state(ko, variables, cfg))
        if cfg["ema_kind"]:
            ko.finalize_variable_values(variables)
            states.append(keras_state(ko, variables, cfg))
        _KERAS_CACHE[seed] = states
    return _KERAS_CACHE[seed]


def run_ours_parity(seed, mode, jit_compile=True):
    cfg = parity_config(seed)
    where = f"[{mode}, jit_compile={jit_compile}] {describe(cfg)}"
    expected = keras_trajectory(seed)
    variables = make_variables(cfg)
    kwargs, hook = optimizer_kwargs(cfg)
    opt = AdamW(**kwargs, jit_compile=jit_compile)
    configure_exclusions(opt, cfg, variables)
    step_fn = make_step(opt, variables, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, grads in enumerate(cfg["grads"]):
            hook(step)
            step_fn([to_tf(g) for g in grads])
            assert_states_close(ours_state(opt, variables), expected[step],
                                f"{where}, after call {step + 1}")
    if cfg["ema_kind"]:
        opt.finalize_variable_values(variables)
        assert_states_close(ours_state(opt, variables), expected[-1],
                            f"{where}, after finalize_variable_values")


def test_parity_configs_cover_every_argument():
    cfgs = [parity_config(s) for s in PARITY_SEEDS]

    def seen(key):
        return {c[key] for c in cfgs}

    assert seen("lr_kind") == set(LR_KINDS)
    assert seen("clip_kind") == set(CLIP_KINDS)
    assert seen("ema_kind") == set(EMA_KINDS)
    assert seen("exclude_kind") == set(EXCLUDE_KINDS)
    assert seen("beta_kind") == set(BETA_KINDS)
    assert seen("amsgrad") == {True, False}
    assert {None, 64.0, 0.5} <= seen("loss_scale_factor")
    assert {True, False} == seen("keras_variables")
    assert {0.0, 0.1, 0.5} <= seen("weight_decay")
    assert len(seen("accumulation") - {None}) >= 1
    assert any(c["accumulation"] and c["clip_kind"] for c in cfgs)
    assert any(c["none_grad"] for c in cfgs)
    assert any(c["clip_value"] == 0.0 and c["clip_kind"] for c in cfgs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", PARITY_SEEDS)
def test_matches_keras(seed, mode):
    run_ours_parity(seed, mode)


@pytest.mark.parametrize("seed", [3, 5])
def test_matches_keras_without_xla(seed):
    run_ours_parity(seed, "eager", jit_compile=False)


def reference_for(cfg):
    """The NumPy reference configured like `parity_config`'s optimizers."""
    if cfg["lr_kind"] == "callable":
        # The hook sets lr_values[call] before each call; no configuration
        # combines the callable with accumulation, so call == iterations.
        learning_rate = lambda it: cfg["lr_values"][it]  # noqa: E731
    elif cfg["lr_kind"] == "float":
        learning_rate = cfg["lr"]
    else:  # the Keras schedule itself, called with a Python int
        schedule, _ = build_learning_rate(cfg)
        learning_rate = lambda it: float(schedule(it))  # noqa: E731
    exclude = set()
    if cfg["exclude_kind"] in ("var_list", "both"):
        exclude.add(cfg["exclude_index"])
    if cfg["exclude_kind"] in ("var_names", "both"):
        exclude |= {i for i, n in enumerate(NAMES)
                    if any(p in n for p in cfg["exclude_names"])}
    clip = {cfg["clip_kind"]: cfg["clip_value"]} if cfg["clip_kind"] else {}
    return NumpyAdamW(
        cfg["init"], learning_rate=learning_rate,
        weight_decay=f32(cfg["weight_decay"]), beta_1=f32(cfg["beta_1"]),
        beta_2=f32(cfg["beta_2"]), epsilon=f32(cfg["epsilon"]),
        amsgrad=cfg["amsgrad"], use_ema=bool(cfg["ema_kind"]),
        ema_momentum=cfg["ema_momentum"],
        ema_overwrite_frequency=(cfg["ema_overwrite_frequency"]
                                 if cfg["ema_kind"] == "ema_overwrite"
                                 else None),
        loss_scale_factor=cfg["loss_scale_factor"],
        gradient_accumulation_steps=cfg["accumulation"], exclude=exclude,
        **clip)


@pytest.mark.parametrize("seed", PARITY_SEEDS)
def test_numpy_reference_matches_keras(seed):
    """The oracle itself agrees with Keras where Keras is right."""
    cfg = parity_config(seed)
    ref = reference_for(cfg)
    for step, grads in enumerate(cfg["grads"]):
        ref.apply(grads)
        assert_states_close(reference_state(ref), keras_trajectory(seed)[step],
                            f"reference, {describe(cfg)}, call {step + 1}")


# ---------------------------------------------------------------------------
# b. The deliberate differences, against the NumPy reference.

def test_accumulation_reference_differs_from_keras():
    """Guards the oracle choice: Keras advances the schedule on micro-steps.

    If this starts failing, Keras was fixed and the accumulation test below
    could compare with Keras instead.
    """
    sched = keras.optimizers.schedules.ExponentialDecay(0.05, 1, 0.5)
    ko = keras.optimizers.AdamW(learning_rate=sched,
                                gradient_accumulation_steps=2)
    v = tf.Variable([1.0, 2.0])
    for _ in range(4):
        ko.apply_gradients([(tf.constant([1.0, -1.0]), v)])
    ref = NumpyAdamW([[1.0, 2.0]], learning_rate=lambda it: 0.05 * 0.5 ** it,
                     gradient_accumulation_steps=2)
    for _ in range(4):
        ref.apply([np.array([1.0, -1.0])])
    assert not np.allclose(v.numpy(), ref.variables[0], rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_accumulation_is_exact_mean_step(mode):
    """k calls = one step on the mean gradient; schedule, EMA, iterations
    and the variables move only on the k-th call."""
    k = 3
    rng = np.random.default_rng(7)
    init = [rng.normal(size=s).astype(np.float32) for s in SHAPES[:3]]
    sched = keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=2, decay_rate=0.5)
    kwargs = dict(weight_decay=0.1, beta_1=0.8, beta_2=0.95, amsgrad=True,
                  use_ema=True, ema_momentum=0.7, ema_overwrite_frequency=2,
                  loss_scale_factor=8.0, global_clipnorm=3.0,
                  gradient_accumulation_steps=k)
    variables = [tf.Variable(x) for x in init]
    opt = AdamW(learning_rate=sched, **kwargs)
    ref = NumpyAdamW(init, learning_rate=lambda it: float(sched(it)),
                     **{**kwargs, "beta_1": f32(0.8), "beta_2": f32(0.95)})
    step_fn = make_step(opt, variables, mode)
    where = f"[{mode}] accumulation k={k}, {kwargs}"
    previous = reference_state(ref)  # the initial values, zero slots
    for call in range(5 * k):
        grads = [(rng.normal(size=x.shape) * 8.0).astype(np.float32)
                 for x in init]
        step_fn([to_tf(g) for g in grads])
        applied = ref.apply(grads)
        state = ours_state(opt, variables)
        assert_states_close(state, reference_state(ref),
                            f"{where}, after call {call + 1}")
        if not applied:
            for key in ("vars", "m", "v", "v_hat", "avg"):
                for got, before in zip(state[key], previous[key]):
                    assert np.array_equal(got, before), (
                        f"{where}: {key} moved on micro-step {call + 1}")
        previous = state
        assert float(opt.learning_rate) == pytest.approx(
            float(sched(ref.iterations)), rel=1e-6), where
    assert ref.iterations == 5


@pytest.mark.parametrize("mode", MODES)
def test_callable_betas(mode):
    """Callable beta_1/beta_2 (Keras crashes) are re-read at every step."""
    rng = np.random.default_rng(11)
    init = [rng.normal(size=s).astype(np.float32) for s in SHAPES[:2]]
    beta_1_holder = tf.Variable(0.9, trainable=False)
    values = [0.9, 0.6, 0.8, 0.5, 0.7, 0.85]
    variables = [tf.Variable(x) for x in init]
    opt = AdamW(learning_rate=0.05, weight_decay=0.05,
                beta_1=lambda: beta_1_holder * 1.0, beta_2=lambda: 0.99,
                amsgrad=True)
    ref = NumpyAdamW(init, learning_rate=f32(0.05), weight_decay=f32(0.05),
                     beta_1=lambda: f32(beta_1_holder.numpy()),
                     beta_2=lambda: f32(0.99), amsgrad=True)
    step_fn = make_step(opt, variables, mode)
    for step, b1 in enumerate(values):
        beta_1_holder.assign(b1)
        grads = [rng.normal(size=x.shape).astype(np.float32) for x in init]
        step_fn([to_tf(g) for g in grads])
        ref.apply(grads)
        assert_states_close(ours_state(opt, variables), reference_state(ref),
                            f"[{mode}] callable betas, step {step + 1}")


SCHEDULE_BY_CALLS = [(0.1, 0.9), (0.0, 0.5), (0.02, 0.7), (0.0, 0.6)]


def test_callable_lr_returning_python_float_is_reread_every_eager_step():
    """A zero-argument callable gives "the actual value to use" at every step
    (Keras's contract; Keras re-reads it on every eager call).

    Eager calls only: inside a user's tf.function a Python value is fixed at
    trace time by TensorFlow itself, for Keras as for us.
    """
    box = {"lr": 0.1}
    rng = np.random.default_rng(13)
    init = [rng.normal(size=s).astype(np.float32) for s in SHAPES[:2]]
    ours_vars = [tf.Variable(x) for x in init]
    keras_vars = [tf.Variable(x) for x in init]
    opt = AdamW(learning_rate=lambda: box["lr"], weight_decay=0.1)
    ko = keras.optimizers.AdamW(learning_rate=lambda: box["lr"],
                                weight_decay=0.1)
    for step, (lr, _) in enumerate(SCHEDULE_BY_CALLS):
        box["lr"] = lr
        grads = [to_tf(rng.normal(size=x.shape).astype(np.float32))
                 for x in init]
        opt.apply_gradients(zip(grads, ours_vars))
        ko.apply_gradients(zip(grads, keras_vars))
        for i, (got, want) in enumerate(zip(ours_vars, keras_vars)):
            np.testing.assert_allclose(
                got.numpy(), want.numpy(), rtol=RTOL, atol=ATOL,
                err_msg=f"learning_rate=lambda: {lr} (a Python float), "
                        f"step {step + 1}, variable {i}: vs Keras")


def test_callable_beta_returning_python_float_is_reread_every_eager_step():
    """Same for `beta_1` (Keras crashes on callable betas: the reference)."""
    box = {"beta_1": 0.9}
    rng = np.random.default_rng(17)
    init = [rng.normal(size=s).astype(np.float32) for s in SHAPES[:2]]
    variables = [tf.Variable(x) for x in init]
    opt = AdamW(learning_rate=0.05, beta_1=lambda: box["beta_1"])
    ref = NumpyAdamW(init, learning_rate=f32(0.05),
                     beta_1=lambda: f32(box["beta_1"]))
    for step, (_, b1) in enumerate(SCHEDULE_BY_CALLS):
        box["beta_1"] = b1
        grads = [rng.normal(size=x.shape).astype(np.float32) for x in init]
        opt.apply_gradients(zip([to_tf(g) for g in grads], variables))
        ref.apply(grads)
        assert_states_close(ours_state(opt, variables), reference_state(ref),
                            f"beta_1=lambda: {b1} (a Python float), "
                            f"step {step + 1}: vs the NumPy reference")


def exact_values(rng, shape):
    """Random float32 values on a 1/8 grid: sums are exact in any order."""
    return (np.round(rng.normal(size=shape) * 8) / 8).astype(np.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["plain", "loss_scale"])
def test_sparse_duplicates_equal_dense(variant, mode):
    """IndexedSlices with duplicate indices: exactly the dense result.

    Two identical embedding variables get the same gradient, one as
    IndexedSlices (with duplicates), one dense; a third variable is dense.
    """
    rng = np.random.default_rng(3)
    rows, dim = 8, 3
    table = rng.normal(size=(rows, dim)).astype(np.float32)
    other = rng.normal(size=(4,)).astype(np.float32)
    kwargs = dict(learning_rate=0.05, weight_decay=0.1, beta_1=0.8,
                  beta_2=0.9, amsgrad=True, clipnorm=4.0)
    if variant == "loss_scale":
        kwargs.update(loss_scale_factor=32.0, clipnorm=None,
                      global_clipnorm=6.0)
    scale = kwargs.get("loss_scale_factor") or 1.0
    variables = [tf.Variable(table), tf.Variable(table), tf.Variable(other)]
    opt = AdamW(**kwargs)
    ref_kwargs = {k: (f32(v) if isinstance(v, float) else v)
                  for k, v in kwargs.items()}
    ref = NumpyAdamW([table, table, other], **ref_kwargs)
    step_fn = make_step(opt, variables, mode)
    where = f"[{mode}] sparse {variant}, {kwargs}"
    for step in range(6):
        indices = rng.integers(0, rows, size=7)
        indices[:3] = indices[3]  # four copies of one row at least
        values = exact_values(rng, (7, dim)) * scale
        dense = np.zeros((rows, dim), np.float32)
        np.add.at(dense, indices, values)
        other_grad = exact_values(rng, (4,)) * scale
        step_fn([to_tf((values, indices), dense_shape=(rows, dim)),
                 to_tf(dense), to_tf(other_grad)])
        ref.apply([(values, indices), dense, other_grad])
        state = ours_state(opt, variables)
        assert_states_close(state, reference_state(ref),
                            f"{where}, step {step + 1}")
        for key in ("vars", "m", "v", "v_hat"):
            assert np.array_equal(state[key][0], state[key][1]), (
                f"{where}, step {step + 1}: sparse and dense {key} differ: "
                f"{state[key][0]} vs {state[key][1]}")


DTYPE_NUMPY = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16,
               "float32": np.float32}


@pytest.mark.parametrize("mode", MODES)
def test_16_bit_variables(mode):
    """bfloat16/float16 variables: float32 slots and math, then cast back."""
    rng = np.random.default_rng(5)
    dtypes = ["bfloat16", "float16", "float32"]
    shapes = [(4, 5), (6,), (3,)]
    init = [rng.normal(size=s).astype(DTYPE_NUMPY[d])
            for s, d in zip(shapes, dtypes)]
    kwargs = dict(learning_rate=1e-2, weight_decay=0.05, use_ema=True,
                  ema_momentum=0.7, ema_overwrite_frequency=3)
    variables = [tf.Variable(x, dtype=d) for x, d in zip(init, dtypes)]
    opt = AdamW(**kwargs)
    ref = NumpyAdamW([x.astype(np.float64) for x in init],
                     **{**kwargs, "learning_rate": f32(1e-2),
                        "weight_decay": f32(0.05)},
                     dtypes=dtypes)
    step_fn = make_step(opt, variables, mode)
    # Variables within 2 units in the last place of their own dtype.
    var_tols = [(2 ** -7, 1e-6), (2 ** -10, 1e-6), (RTOL, ATOL)]
    where = f"[{mode}] 16-bit {dtypes}, {kwargs}"
    for step in range(8):
        grads = []
        for x, d in zip(init, dtypes):
            g = rng.normal(size=x.shape)
            if d == "float16":
                g[:3] *= 1e-4  # v ~ 1e-11 underflows in float16 math
            grads.append(g.astype(DTYPE_NUMPY[d]))
        step_fn([to_tf(g, dtype=d) for g, d in zip(grads, dtypes)])
        ref.apply([g.astype(np.float64) for g in grads])
        state = ours_state(opt, variables)
        assert_states_close(state, reference_state(ref),
                            f"{where}, step {step + 1}", var_tols=var_tols)
        for i, v in enumerate(variables[:2]):  # the 16-bit ones
            exact = np.mean(state["vars"][i] == ref.variables[i])
            assert exact >= 0.8, (
                f"{where}, step {step + 1}: only {exact:.0%} of {v.dtype.name}"
                " values equal the reference's rounding")
    for v, x, d in zip(variables, init, dtypes):
        assert v.dtype == tf.as_dtype(d)
        for slot in opt.slots_for(v).values():
            assert slot.dtype == tf.float32, (where, d, slot.name)
        assert not np.array_equal(v.numpy(), x), (
            f"{where}: the {d} variable never moved")
        assert np.all(np.isfinite(v.numpy().astype(np.float32))), where


@pytest.mark.parametrize("mode", MODES)
def test_lr_and_weight_decay_changes_take_effect_without_retracing(mode):
    """`opt.learning_rate = ...; opt.weight_decay = ...` between 5 steps:
    the results follow the new values and the step is traced once."""
    rng = np.random.default_rng(9)
    init = [rng.normal(size=s).astype(np.float32) for s in SHAPES[:2]]
    variables = [tf.Variable(x) for x in init]
    opt = AdamW(learning_rate=0.01, weight_decay=0.004)
    ref = NumpyAdamW(init, learning_rate=f32(0.01), weight_decay=f32(0.004))
    step_fn = make_step(opt, variables, mode)
    changes = [(0.5, 0.1), (0.02, 0.0), (0.1, 0.3), (0.003, 0.05)]
    for step in range(5):
        if step:
            lr, wd = changes[step - 1]
            opt.learning_rate = lr
            opt.weight_decay = wd
            ref.learning_rate, ref.weight_decay = f32(lr), f32(wd)
        grads = [rng.normal(size=x.shape).astype(np.float32) for x in init]
        step_fn([to_tf(g) for g in grads])
        ref.apply(grads)
        if step == 0 and mode != "eager":
            # A tf.function that creates variables (the lazy build) is
            # traced again once without variable creation: TF's rule.
            user_traces = step_fn.experimental_get_tracing_count()
            assert user_traces <= 2
        # With lr=0.5, float32's `1 - beta_2**t` (1e-5 relative at t=2)
        # moves the update by ~1e-6 absolute: Keras's formula, not a bug.
        assert_states_close(ours_state(opt, variables), reference_state(ref),
                            f"[{mode}] lr/wd changes, step {step + 1}",
                            atol=1e-5)
    # Traced once, whatever the changes: eagerly, the fused step's scalars
    # function. In a tf.function, plain or jit-compiled, the step is traced
    # into the caller's graph (no function of ours).
    assert step_traces(opt) == (1 if mode == "eager" else 0)
    if mode != "eager":
        assert step_fn.experimental_get_tracing_count() == user_traces
