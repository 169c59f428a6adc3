"""The pure functions of `tf_adamw.update` against float64 NumPy.

docs/semantics.md, "Formulas": each function takes tensors and returns
tensors, so each is checked on its own, in three modes: eagerly, inside a
`tf.function`, and inside a `tf.function(jit_compile=True)` (XLA). The
clipping and `adamw_update` checks also run on the 4 replicas of the shared
`mirrored_strategy` (`strategy.run`), where every replica must compute what
one device does.

Inputs are float32 and the expectations float64 NumPy (computed from the
float32 inputs), compared with a float32 tolerance, and bit for bit where
the float32 result is exact (clipping by value, `ema_update`'s first copy,
duplicate indices of small integers) or where two runs must agree (each
replica against one device). Inputs are chosen without
cancellation (moments and gradients of one sign per element, small steps)
so that rtol 1e-6 bounds the float32 rounding of every output.

Also `pipeline.only_decay_and_adam`, which decides whether the step can be
just the fused kernel.
"""

import numpy as np
import pytest
import tensorflow as tf

from numpy_reference import NumpyAdamW
from tf_adamw import options
from tf_adamw import pipeline
from tf_adamw import step_kinds
from tf_adamw import update

MODES = ["eager", "function", "jit"]
RTOL = 1e-6  # about 8 float32 ulps
EPS32 = float(np.finfo(np.float32).eps)

_WRAPPED = {}


def in_mode(mode, fn):
    """`fn` as run in `mode`: itself, a `tf.function`, or one compiled by
    XLA. Wrappers are cached per (fn, mode), so tests calling the same
    module-level `fn` share its traces and compilations."""
    if mode == "eager":
        return fn
    key = (fn, mode)
    if key not in _WRAPPED:
        _WRAPPED[key] = tf.function(fn, jit_compile=(mode == "jit"),
                                    autograph=False)
    return _WRAPPED[key]


def on_replicas(strategy, mode, fn, *args):
    """`fn(*args)` on every replica of `strategy` (`strategy.run`), in
    `mode`: eager `strategy.run`, `strategy.run` traced in a `tf.function`,
    or `strategy.run` of `fn` compiled by XLA traced in a `tf.function` (a
    multi-device function cannot itself be one XLA cluster). Checks that
    the 4 replicas ran, each on its own device.

    Returns:
        The per-replica results, as NumPy structures, one per replica.
    """
    key = (fn, mode, strategy)
    if key not in _WRAPPED:
        replica_fn = fn if mode != "jit" else tf.function(
            fn, jit_compile=True, autograph=False)
        placed = set()

        def replica(*a):
            out = replica_fn(*a)
            replica_id = tf.identity(tf.distribute.get_replica_context()
                                     .replica_id_in_sync_group)
            placed.add(tf.DeviceSpec.from_string(replica_id.device))
            return out, replica_id

        def replicated(*a):
            return strategy.run(replica, args=a)

        _WRAPPED[key] = (replicated if mode == "eager" else tf.function(
            replicated, autograph=False)), placed
    replicated, placed = _WRAPPED[key]
    results = strategy.experimental_local_results(replicated(*args))
    assert [int(replica_id) for _, replica_id in results] == [0, 1, 2, 3]
    assert {(d.device_type, d.device_index) for d in placed} == {
        ("CPU", i) for i in range(4)}, placed
    return [as_numpy(out) for out, _ in results]


def as_numpy(structure):
    """Tensors to NumPy arrays; None stays None."""
    return tf.nest.map_structure(
        lambda t: None if t is None else np.asarray(t), structure)


def f32(x):
    """`x` rounded to float32, as float64: what the float32 math sees."""
    return np.asarray(x, np.float32).astype(np.float64)


def _in_xla():
    return tf.constant(step_kinds.current_context().in_xla)


@pytest.mark.parametrize("mode", MODES)
def test_modes_run_where_they_say(mode):
    """The harness: only the jit mode traces into an XLA context, and only
    the eager mode runs eagerly."""
    assert bool(in_mode(mode, _in_xla)()) == (mode == "jit")
    seen = []
    in_mode(mode, lambda: seen.append(tf.executing_eagerly()) or
            tf.constant(0))()
    assert seen == [mode == "eager"]


# ---------------------------------------------------------------------------
# compute_dtype.


@pytest.mark.parametrize("dtype,expected", [
    (tf.float16, tf.float32), (tf.bfloat16, tf.float32),
    ("float16", tf.float32), (np.float16, tf.float32),
    (tf.float32, tf.float32), ("float32", tf.float32),
    (tf.float64, tf.float64), (np.float64, tf.float64),
])
def test_compute_dtype(dtype, expected):
    """docs/semantics.md, "Formulas" (compute dtype): 16-bit floats are
    computed in float32, every other float in its own dtype."""
    got = update.compute_dtype(dtype)
    assert isinstance(got, tf.DType) and got == expected


# ---------------------------------------------------------------------------
# step_size and step_scalars.

# (lr, beta_1, beta_2, iterations): float32-exact powers first, then
# Keras's defaults early and later in training.
SCALAR_CASES = [(0.5, 0.5, 0.75, 2), (1e-3, 0.9, 0.999, 0),
                (1e-3, 0.9, 0.999, 9), (0.03, 0.8, 0.99, 99)]


def _alpha64(lr, beta_1, beta_2, iterations):
    t = iterations + 1
    return lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)


def _alpha_rtol(beta_1, beta_2, iterations, eps):
    """The rounding bound of `step_size` in a dtype with `eps`: each power
    is off by an ulp or so, and `1 - beta**t` magnifies that by
    `beta**t / (1 - beta**t)` (cancellation, not an error of the code)."""
    t = iterations + 1
    b1, b2 = beta_1 ** t, beta_2 ** t
    return 4 * eps * (2 + b1 / (1 - b1) + b2 / (1 - b2) / 2)


def _step_size(lr, beta_1, beta_2, step):
    return update.step_size(lr, beta_1, beta_2, step)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", SCALAR_CASES, ids=str)
def test_step_size(mode, case):
    """docs/semantics.md, "Formulas":
    `alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)`."""
    lr, beta_1, beta_2, iterations = (f32(case[0]), f32(case[1]),
                                      f32(case[2]), case[3])
    got = in_mode(mode, _step_size)(
        *[tf.constant(x, tf.float32) for x in (lr, beta_1, beta_2)],
        tf.constant(iterations + 1, tf.float32))
    assert got.dtype == tf.float32
    np.testing.assert_allclose(
        float(got), _alpha64(lr, beta_1, beta_2, iterations),
        rtol=_alpha_rtol(beta_1, beta_2, iterations, EPS32))


def _step_scalars(hyper, iterations, dtype):
    return update.step_scalars(hyper, iterations, dtype)


SCALAR_KEYS = ["alpha", "beta_1", "beta_2", "decay", "epsilon", "lr",
               "one_minus_beta_1", "one_minus_beta_2", "weight_decay"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("case", SCALAR_CASES, ids=str)
def test_step_scalars(mode, dtype, case):
    """The step's scalars in the compute dtype, from float32
    hyperparameters and an int64 `iterations` (docs/semantics.md,
    "Formulas": `t = iterations + 1`; `decay = weight_decay * lr`; a
    float64 variable uses the float32-rounded hyperparameters)."""
    lr, beta_1, beta_2, iterations = case
    hyper = {"lr": lr, "weight_decay": 0.004, "beta_1": beta_1,
             "beta_2": beta_2, "epsilon": 1e-7}
    got = in_mode(mode, _step_scalars)(
        {k: tf.constant(v, tf.float32) for k, v in hyper.items()},
        tf.constant(iterations, tf.int64), dtype)
    assert sorted(got) == SCALAR_KEYS
    for key, value in got.items():
        assert value.dtype == dtype and value.shape == (), key
    h = {k: f32(v) for k, v in hyper.items()}  # as the float32 variables
    eps = float(np.finfo(dtype.as_numpy_dtype).eps)
    for key in hyper:  # cast exactly
        assert float(got[key]) == h[key], key
    # 1 - beta is exact for beta in [0.5, 1) (Sterbenz) in either dtype.
    assert float(got["one_minus_beta_1"]) == 1 - h["beta_1"]
    assert float(got["one_minus_beta_2"]) == 1 - h["beta_2"]
    np.testing.assert_allclose(float(got["decay"]),
                               h["weight_decay"] * h["lr"], rtol=eps)
    np.testing.assert_allclose(
        float(got["alpha"]),
        _alpha64(h["lr"], h["beta_1"], h["beta_2"], iterations),
        rtol=_alpha_rtol(h["beta_1"], h["beta_2"], iterations, eps))


# ---------------------------------------------------------------------------
# adamw_update.

LR, WD, BETA_1, BETA_2, EPSILON = 0.01, 0.1, 0.9, 0.999, 1e-7


def _adam_inputs(seed, shape=(4, 5)):
    """Variable, gradient and moments without cancellation: the gradient
    has the momentum's sign in each element, the variable is in [1, 2]
    (much larger than a step), `v_hat` straddles `v`. Gradients span
    1e-7..3 and `v` is about `g * g`, so `sqrt(v)` is sometimes as small as
    `epsilon` (where `sqrt(v) + epsilon` and `sqrt(v + epsilon)` differ)."""
    rng = np.random.default_rng(seed)
    sign = rng.choice([-1.0, 1.0], size=shape)
    var = rng.uniform(1, 2, shape) * rng.choice([-1.0, 1.0], size=shape)
    magnitude = 10 ** rng.uniform(-7, 0.5, shape)
    grad = sign * magnitude
    m = sign * magnitude * rng.uniform(0.0, 2, shape)
    v = magnitude ** 2 * rng.uniform(0.5, 2, shape)
    v_hat = v * rng.uniform(0.5, 1.5, shape)
    return [np.float32(x) for x in (var, grad, m, v, v_hat)]


def _adamw(variable, grad, m, v, v_hat, scalars, decay):
    return update.adamw_update(
        variable, grad, m, v, v_hat, alpha=scalars["alpha"],
        one_minus_beta_1=scalars["one_minus_beta_1"],
        one_minus_beta_2=scalars["one_minus_beta_2"],
        epsilon=scalars["epsilon"], decay=decay)


def _adam_scalars(iterations):
    """Float32 scalars as `step_scalars` makes them, and the float64
    values the reference uses (the float32 hyperparameters)."""
    h = {"lr": f32(LR), "weight_decay": f32(WD), "beta_1": f32(BETA_1),
         "beta_2": f32(BETA_2), "epsilon": f32(EPSILON)}
    scalars = {
        "alpha": _alpha64(h["lr"], h["beta_1"], h["beta_2"], iterations),
        "one_minus_beta_1": 1 - h["beta_1"],
        "one_minus_beta_2": 1 - h["beta_2"],
        "epsilon": h["epsilon"], "decay": h["weight_decay"] * h["lr"]}
    return ({k: tf.constant(v, tf.float32) for k, v in scalars.items()}, h)


def _adam_reference(inputs, h, iterations, amsgrad, decay):
    """One step of `numpy_reference.NumpyAdamW` from the given state."""
    var, grad, m, v, v_hat = [np.float64(x) for x in inputs]
    ref = NumpyAdamW([var], learning_rate=h["lr"],
                     weight_decay=h["weight_decay"], beta_1=h["beta_1"],
                     beta_2=h["beta_2"], epsilon=h["epsilon"],
                     amsgrad=amsgrad, exclude=() if decay else (0,))
    ref.m, ref.v, ref.v_hat = [m], [v], [v_hat]
    ref.iterations = iterations
    ref.apply([grad])
    return ref.variables[0], ref.m[0], ref.v[0], ref.v_hat[0]


ADAM_CASES = [  # (amsgrad, decay, iterations)
    (False, True, 0), (False, True, 6), (True, True, 6), (False, False, 3),
    (True, False, 0)]


def _adam_case_id(case):
    amsgrad, decay, iterations = case
    return f"amsgrad={amsgrad}-decay={decay}-iterations={iterations}"


def _adam_args(case, seed):
    amsgrad, decay, iterations = case
    inputs = _adam_inputs(seed)
    scalars, h = _adam_scalars(iterations)
    var, grad, m, v, v_hat = [tf.constant(x) for x in inputs]
    args = (var, grad, m, v, v_hat if amsgrad else None, scalars,
            scalars["decay"] if decay else None)
    return args, _adam_reference(inputs, h, iterations, amsgrad, decay)


def _check_adam(got, want, amsgrad, where):
    names = ["variable", "momentum", "velocity", "velocity_hat"]
    for name, g, w in zip(names, got, want):
        if name == "velocity_hat" and not amsgrad:
            assert g is None, f"{where}: velocity_hat should stay None"
            continue
        assert g.dtype == np.float32, (where, name)
        np.testing.assert_allclose(g, w, rtol=RTOL, err_msg=f"{where}: {name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ADAM_CASES, ids=_adam_case_id)
def test_adamw_update(mode, case):
    """docs/semantics.md, steps 6 and 7 ("Formulas"): decoupled weight
    decay (or none: `decay=None`), then Adam in the epsilon-hat form, with
    AMSGrad's running maximum when `velocity_hat` is given; against
    `NumpyAdamW` from the same state."""
    amsgrad = case[0]
    args, want = _adam_args(case, seed=sum(case))
    got = as_numpy(in_mode(mode, _adamw)(*args))
    _check_adam(got, want, amsgrad, f"{mode} {case}")


@pytest.mark.parametrize("mode", MODES)
def test_adamw_update_decay_none_is_no_decay(mode):
    """`decay=None` (an excluded variable) is exactly `decay=0`."""
    (var, grad, m, v, _, scalars, decay), _ = _adam_args(
        (False, True, 2), seed=7)
    fn = in_mode(mode, _adamw)
    without = as_numpy(fn(var, grad, m, v, None, scalars, None))
    zero = as_numpy(fn(var, grad, m, v, None, scalars, decay * 0))
    decayed = as_numpy(fn(var, grad, m, v, None, scalars, decay))
    for a, b in zip(without[:3], zero[:3]):
        np.testing.assert_array_equal(a, b)
    assert np.all(np.abs(decayed[0]) < np.abs(without[0]))


@pytest.mark.parametrize("mode", MODES)
def test_adamw_update_on_every_replica(mirrored_strategy, mode):
    """docs/semantics.md, "Distribution" (same step everywhere): on each of
    the 4 replicas `adamw_update` gives bit for bit the one-device result
    of the same mode (and the reference's)."""
    for case in [(True, True, 4), (False, False, 0)]:
        args, want = _adam_args(case, seed=11)
        one_device = as_numpy(in_mode(mode, _adamw)(*args))
        _check_adam(one_device, want, case[0], f"{mode} one device")
        for r, got in enumerate(on_replicas(mirrored_strategy, mode,
                                            _adamw, *args)):
            for name, g, d in zip(["variable", "m", "v", "v_hat"], got,
                                  one_device):
                if d is None:
                    assert g is None
                else:
                    np.testing.assert_array_equal(
                        g, d, err_msg=f"{mode} {case} replica {r}: {name}")


# ---------------------------------------------------------------------------
# sqrt: tf.sqrt, as an op tf2xla translates cheaply.

SQRT_INPUTS = [0.0, -0.0, 1e-45, 1.2e-38, 2.0, 3.0, 1e-7, 0.999, 1e30,
               3.4e38, np.inf, -np.inf, -1.0, np.nan]


def _sqrts(x):
    return update.sqrt(x), tf.sqrt(x)


def _graph_op_types(fn, *args):
    return {op.type for op in fn.get_concrete_function(*args)
            .graph.get_operations()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_sqrt_is_tf_sqrt_bit_for_bit(mode, dtype):
    """`update.sqrt` rounds as `tf.sqrt` (IEEE's correctly rounded root)
    on random values across 70 binades and on every special value: zeros
    of both signs, subnormals, the largest finite, infinities, negatives,
    NaN."""
    rng = np.random.default_rng(11)
    with np.errstate(over="ignore"):  # float16: the large ones become Inf
        x = np.concatenate([
            np.array(SQRT_INPUTS, dtype),
            (rng.uniform(1, 2, 4096) * 2.0 ** rng.integers(-40, 30, 4096))
            .astype(dtype)])
    got, want = as_numpy(in_mode(mode, _sqrts)(tf.constant(x)))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)  # NaN where NaN
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_sqrt_under_xla_is_not_the_sqrt_op():
    """Traced for XLA (only), `update.sqrt` is `_UnaryOpsComposition`:
    tf2xla lowers `Sqrt` through an MLIR pipeline made per node (4.6 ms
    each on the benchmark machine, against 0.05 ms: benchmarks/README.md,
    "Where tf2xla's time went"). The HLO is the same `sqrt`."""
    spec = tf.TensorSpec([3], tf.float32)
    jit = tf.function(update.sqrt, jit_compile=True, autograph=False)
    plain = tf.function(update.sqrt, autograph=False)
    assert "_UnaryOpsComposition" in _graph_op_types(jit, spec)
    assert "Sqrt" not in _graph_op_types(jit, spec)
    assert "Sqrt" in _graph_op_types(plain, spec)
    assert "_UnaryOpsComposition" not in _graph_op_types(plain, spec)
    hlo = jit.experimental_get_compiler_ir(tf.ones([3]))(stage="hlo")
    assert " sqrt(" in hlo, hlo
    # A dtype the composition op does not take: `tf.sqrt`, still exact.
    x = tf.constant([4.0, 2.0, 0.0], tf.bfloat16)
    np.testing.assert_array_equal(jit(x).numpy(), tf.sqrt(x).numpy())
    assert "Sqrt" in _graph_op_types(jit, tf.TensorSpec([3], tf.bfloat16))


# ---------------------------------------------------------------------------
# ema_update.


def _ema(average, variable, ema_momentum, first_update):
    return update.ema_update(average, variable, update.ema_momentum(
        ema_momentum, first_update, average.dtype))


@pytest.mark.parametrize("mode", MODES)
def test_ema_update(mode):
    """docs/semantics.md, step 8 ("Formulas"): the first applied update
    copies the variable (exactly); later ones move the average by
    `mu * average + (1 - mu) * var`."""
    rng = np.random.default_rng(3)
    sign = rng.choice([-1.0, 1.0], size=(5,))
    average = np.float32(sign * rng.uniform(0.5, 2, 5))
    variable = np.float32(sign * rng.uniform(0.5, 2, 5))
    fn = in_mode(mode, _ema)
    first = fn(tf.constant(average), tf.constant(variable),
               tf.constant(0.99), tf.constant(True))
    np.testing.assert_array_equal(first.numpy(), variable)
    later = fn(tf.constant(average), tf.constant(variable),
               tf.constant(0.99), tf.constant(False))
    mu = f32(0.99)
    np.testing.assert_allclose(later.numpy(),
                               mu * average + (1 - mu) * f32(variable),
                               rtol=RTOL)
    assert later.dtype == tf.float32


# ---------------------------------------------------------------------------
# Clipping.

CLIP_GRADS = [np.float32([[3.0, -4.0], [0.5, 12.0]]),  # norm ~12.8
              np.float32([0.0, 0.0, 0.0]),
              np.float32([0.3, -0.4, 0.0, 1.0])]  # norm ~1.12


def _clip_reference(grads, rule):
    """docs/semantics.md, "Formulas" (clipping), in float64."""
    grads = [np.float64(g) for g in grads]
    kind, c = rule[0], f32(rule[1])  # the limit as the float32 math sees it
    if kind == "clipnorm":
        return [g * c / max(np.linalg.norm(g), c) for g in grads]
    if kind == "global_clipnorm":
        norm = np.sqrt(sum(np.sum(g * g) for g in grads))
        return [g * c / max(norm, c) for g in grads]
    return [np.clip(g, -c, c) for g in grads]


CLIP_RULES = [("clipnorm", 1.0), ("clipnorm", 100.0),
              ("global_clipnorm", 2.0), ("global_clipnorm", 100.0),
              ("clipvalue", 0.35), ("clipvalue", 100.0)]


def _clip(grads, rule):
    return update.clip(grads, rule)


def _check_clip(got, grads, rule, where):
    want = _clip_reference(grads, rule)
    assert len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == np.float32, where
        if rule[0] == "clipvalue":  # no arithmetic: exact
            np.testing.assert_array_equal(g, w, err_msg=f"{where}: [{i}]")
        else:
            np.testing.assert_allclose(g, w, rtol=RTOL,
                                       err_msg=f"{where}: [{i}]")
    # A zero gradient stays exactly zero under every rule.
    np.testing.assert_array_equal(got[1], np.zeros(3, np.float32))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", CLIP_RULES, ids=str)
def test_clip(mode, rule):
    """docs/semantics.md, step 5: `clipnorm` clips each gradient to that
    norm, `global_clipnorm` scales all together, `clipvalue` clips each
    element; a large limit leaves the gradients (almost) unchanged."""
    got = as_numpy(in_mode(mode, _clip)(
        [tf.constant(g) for g in CLIP_GRADS], rule))
    _check_clip(got, CLIP_GRADS, rule, f"{mode} {rule}")


def test_clip_none_returns_the_same_list():
    """No rule: `clip` returns its argument itself (nothing traced)."""
    grads = [tf.constant(g) for g in CLIP_GRADS]
    assert update.clip(grads, None) is grads


@pytest.mark.parametrize("mode", MODES)
def test_clip_on_every_replica(mirrored_strategy, mode):
    """docs/semantics.md, "Distribution": each replica clips its (already
    summed) gradients exactly as one device does, for every rule."""
    grads = [tf.constant(g) for g in CLIP_GRADS]
    for rule in (("clipnorm", 1.0), ("global_clipnorm", 2.0),
                 ("clipvalue", 0.35)):
        one_device = as_numpy(in_mode(mode, _clip)(grads, rule))
        for r, got in enumerate(on_replicas(mirrored_strategy, mode, _clip,
                                            grads, rule)):
            _check_clip(got, CLIP_GRADS, rule, f"{mode} {rule} replica {r}")
            for g, d in zip(got, one_device):
                np.testing.assert_array_equal(
                    g, d, err_msg=f"{mode} {rule} replica {r}")


def _clips_by_norm(grad, clipnorm):
    return update.clip_by_norm(grad, clipnorm), tf.clip_by_norm(grad,
                                                                clipnorm)


@pytest.mark.parametrize("mode", MODES)
def test_clip_by_norm_is_tf_clip_by_norm_bit_for_bit(mode):
    """`update.clip_by_norm` (written out so that its square root is
    `update.sqrt`) gives `tf.clip_by_norm`'s bits: below, at and above the
    limit, for zero, huge, Inf and NaN gradients, and a negative limit
    (clipped to 0, as TF does)."""
    rng = np.random.default_rng(5)
    cases = [rng.standard_normal((7, 3)), np.zeros(4), [3.0, 4.0],
             [1e20, -3e19], [1.0, np.inf], [np.nan, 1.0], [0.5, -0.25]]
    fn = in_mode(mode, _clips_by_norm)
    for grad in cases:
        for clipnorm in (1.0, 5.0, 0.3, -1.0):
            got, want = as_numpy(fn(tf.constant(grad, tf.float32),
                                    clipnorm))
            np.testing.assert_array_equal(
                got, want, err_msg=f"{mode} {grad} {clipnorm}")


def _global(grads, clipnorm):
    return update.clip_by_global_norm(grads, clipnorm)


@pytest.mark.parametrize("mode", MODES)
def test_clip_by_global_norm_returns_the_norm(mode):
    """`clip_by_global_norm` also returns the norm before clipping."""
    clipped, norm = in_mode(mode, _global)(
        [tf.constant(g) for g in CLIP_GRADS], tf.constant(2.0))
    want = np.sqrt(sum(np.sum(np.float64(g) ** 2) for g in CLIP_GRADS))
    np.testing.assert_allclose(float(norm), want, rtol=RTOL)
    assert len(clipped) == 3


NONFINITE_CASES = {
    "inf": [np.float32([1.0, np.inf]), np.float32([0.5])],
    "nan": [np.float32([1.0, 2.0]), np.float32([np.nan])],
    # Finite gradients whose squares overflow float32.
    "overflow": [np.float32([3e38, 1.0]), np.float32([0.5, -0.25])],
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(NONFINITE_CASES))
def test_clip_by_global_norm_nonfinite_norm_gives_nan(mode, case):
    """docs/semantics.md, "Formulas" (Keras's formula): a non-finite global
    norm makes every gradient NaN (finite ones too) rather than applying an
    unclipped step."""
    grads = [tf.constant(g) for g in NONFINITE_CASES[case]]
    clipped, norm = in_mode(mode, _global)(grads, tf.constant(1.0))
    assert not np.isfinite(float(norm))
    for g in clipped:
        assert np.all(np.isnan(g.numpy())), (case, g)


@pytest.mark.parametrize("mode", MODES)
def test_clip_by_global_norm_of_zero_gradients(mode):
    """`n = 0` leaves (zero) gradients unchanged: no NaN from `1 / n`."""
    grads = [tf.zeros([2, 2]), tf.zeros([3])]
    clipped, norm = in_mode(mode, _global)(grads, tf.constant(1.0))
    assert float(norm) == 0.0
    for g in clipped:
        np.testing.assert_array_equal(g.numpy(), np.zeros_like(g.numpy()))


def test_clip_global_norm_of_mixed_dtypes():
    """Gradients in different compute dtypes (a float32 and a float64
    variable) are clipped by their joint norm."""
    grads = [np.float32([3.0, 4.0]), np.float64([12.0])]
    got = update.clip([tf.constant(g) for g in grads],
                      ("global_clipnorm", 1.0))
    assert [g.dtype for g in got] == [tf.float32, tf.float64]
    for g, w in zip(got, _clip_reference(grads, ("global_clipnorm", 1.0))):
        np.testing.assert_allclose(g.numpy(), w, rtol=RTOL)


# ---------------------------------------------------------------------------
# densify, indices_in_range and sum_of_squares.


def _densify(grad):
    return update.densify(grad, (5, 2))


@pytest.mark.parametrize("mode", MODES)
def test_densify_sums_duplicate_indices(mode):
    """The step's preamble (docs/semantics.md, "The step"): IndexedSlices
    are scattered with duplicate indices summed, exactly the dense
    gradient of a gather; small integers make every sum exact."""
    values = np.float32([[1, 2], [10, 20], [100, 200], [-3, 4]])
    indices = np.int64([3, 0, 3, 3])
    grad = tf.IndexedSlices(tf.constant(values), tf.constant(indices),
                            dense_shape=tf.constant([5, 2], tf.int64))
    got = in_mode(mode, _densify)(grad)
    want = np.zeros((5, 2), np.float32)
    np.add.at(want, indices, values)
    assert want[3].tolist() == [98, 206]  # the duplicates, summed
    assert got.dtype == tf.float32
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("mode", MODES)
def test_densify_passes_dense_gradients_through(mode):
    """A dense gradient comes back as the same values."""
    dense = np.float32(np.arange(10).reshape(5, 2))
    got = in_mode(mode, _densify)(tf.constant(dense))
    np.testing.assert_array_equal(got.numpy(), dense)
    got = update.densify(dense, (5, 2))  # a NumPy array becomes a tensor
    assert tf.is_tensor(got)
    np.testing.assert_array_equal(got.numpy(), dense)


def _indices_in_range(indices):
    return update.indices_in_range(indices, 5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("indices,expected", [
    ([0, 4, 4, 2], True), ([], True), ([0, -1], False), ([5], False),
    ([4, 2**40], False), ([-2**40], False)])
def test_indices_in_range(mode, indices, expected):
    """docs/semantics.md, "Before step 1": a sparse gradient's indices must
    lie in `[0, rows)` (`densify` would drop the others)."""
    got = in_mode(mode, _indices_in_range)(tf.constant(indices, tf.int64))
    assert got.dtype == tf.bool and got.shape == ()
    assert bool(got) is expected
    if max(abs(i) for i in indices + [0]) < 2**31:
        assert bool(in_mode(mode, _indices_in_range)(
            tf.constant(indices, tf.int32))) is expected


def _sum_of_squares(grads):
    return update.sum_of_squares(grads)


@pytest.mark.parametrize("mode", MODES)
def test_sum_of_squares(mode):
    """Every element of every tensor, squared and summed; mixed dtypes are
    summed in the widest; squares that overflow make it infinite (the
    finite guard, step 3, skips such a call)."""
    got = in_mode(mode, _sum_of_squares)(
        [tf.constant([3.0, -4.0]), tf.constant([[12.0]])])
    assert got.dtype == tf.float32 and float(got) == 169.0
    # 1e40 overflows float32, not float64.
    got = in_mode(mode, _sum_of_squares)(
        [tf.constant([3.0, 4.0]), tf.constant([1e20], tf.float64)])
    assert got.dtype == tf.float64 and float(got) == 25.0 + 1e40
    for bad in ([1e20, 0.0], [1e19] * 4, [np.nan, 1.0], [np.inf, 0.0]):
        got = in_mode(mode, _sum_of_squares)(
            [tf.constant(np.float32(bad)), tf.constant([1.0])])
        assert not np.isfinite(float(got)), bad


@pytest.mark.parametrize("mode", MODES)
def test_clip_by_global_norm_with_a_given_norm(mode):
    """A norm computed before (by the guard, from the same gradients) gives
    the very result of computing it inside, bit for bit."""
    grads = [tf.constant(g) for g in CLIP_GRADS]

    def both(grads):
        norm = update.global_norm(grads)
        return (update.clip(grads, ("global_clipnorm", 2.0)),
                update.clip(grads, ("global_clipnorm", 2.0), norm))

    inside, given = in_mode(mode, both)(grads)
    for a, b in zip(inside, given):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---------------------------------------------------------------------------
# pipeline.only_decay_and_adam.

ONLY_DECAY_AND_ADAM = [
    ({}, True),
    # Each optional stage of docs/semantics.md, "The step".
    ({"loss_scale_factor": 2.0}, False),  # step 2
    ({"skip_nonfinite_gradients": True}, False),  # step 3
    ({"gradient_accumulation_steps": 2}, False),  # step 4
    ({"clipnorm": 1.0}, False),  # step 5
    ({"global_clipnorm": 0.5}, False),
    ({"clipvalue": 1e-3}, False),
    ({"use_ema": True}, False),  # step 8
    ({"use_ema": True, "ema_overwrite_frequency": 3}, False),
    # A clip argument <= 0 is not applied (Keras's rule), so no stage.
    ({"clipnorm": 0.0}, True),
    ({"global_clipnorm": -1.0}, True),
    ({"clipvalue": 0}, True),
    # Not stages: AMSGrad is in the kernel; the overwrite frequency without
    # the EMA does nothing; the others choose how the step runs.
    ({"amsgrad": True}, True),
    ({"ema_overwrite_frequency": 3}, True),
    ({"ema_momentum": 0.5}, True),
    ({"jit_compile": False, "fused": False}, True),
]


@pytest.mark.parametrize("kwargs,expected", ONLY_DECAY_AND_ADAM, ids=str)
def test_only_decay_and_adam(kwargs, expected):
    """True exactly when no optional stage is in use (then an eager fused
    step can be the kernel alone, docs/semantics.md "Step kinds")."""
    assert pipeline.only_decay_and_adam(options.validate(**kwargs)) is (
        expected)


def test_only_decay_and_adam_for_default_options():
    """The dataclass's defaults are Keras's: no optional stage."""
    assert pipeline.only_decay_and_adam(options.Options()) is True
