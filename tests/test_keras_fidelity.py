"""Keras fidelity: constraints, `overwrite_with_gradient`, pickle, deepcopy.

The Keras workflows of the issue "The Keras workflows the reference pages
name" (item 3), against `keras.optimizers.AdamW` (Keras 3.15, TF backend)
where Keras is right:

a. Variable constraints (`kernel_constraint=NonNeg()`, `MaxNorm`) end every
   applied update, after the EMA as in Keras's `apply` (docs/semantics.md,
   step 9); never on accumulation micro-steps; per replica under
   MirroredStrategy; the fused kernel and the plain-ops step stay
   bit-identical.
b. Variables marked `overwrite_with_gradient` (Keras's float8 layers) are
   set to their gradient: not unscaled, clipped, decayed, stepped or
   averaged; with accumulation to the maximum over the micro-steps (Keras's
   rule); under MirroredStrategy to the maximum over the replicas.
   `tf_adamw.keras.AdamW` fits a float8 model as Keras's AdamW does.
c. `pickle` and `copy.deepcopy` of `tf_adamw.AdamW`, unbuilt (its
   configuration and exclusions) and built (its state, on copies of its
   variables); a plain callable hyperparameter is a clear pickling error;
   under MirroredStrategy deepcopy keeps the strategy and pickle is a clear
   error. `tf_adamw.keras.AdamW` pickles and deep-copies as Keras's
   optimizers do, keeping its state and exclusions.

Modes: "fused" (eager calls: the fused kernel), "function" (the user's
`tf.function`: the kernel traced inline), "xla" (`fused=False`: our
XLA-compiled step) and "jit" (the whole user step under
`tf.function(jit_compile=True)`); and the 4-replica `mirrored_strategy` of
conftest.
"""

# Keras keeps its averages and accumulators in private attributes.
# pylint: disable=protected-access

import copy
import functools
import pickle
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_adamw
import tf_adamw.keras

MODES = ["fused", "function", "xla", "jit"]
RTOL, ATOL = 1e-5, 1e-6


def optimizer(mode, **kwargs):
    """Our AdamW for `mode` (`fused=False` for "xla")."""
    return tf_adamw.AdamW(fused=False if mode == "xla" else None, **kwargs)


def stepper(opt, variables, mode):
    """`step(grads)` applying `grads` to `variables` in `mode`."""
    def step(grads):
        opt.apply_gradients(zip(grads, variables))

    if mode in ("function", "jit"):
        return tf.function(step, jit_compile=mode == "jit")
    return step


def values(variables):
    return [np.array(tf.convert_to_tensor(v)) for v in variables]


def assert_close(got, want, where):
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL,
                                   atol=ATOL, err_msg=f"{where}: [{i}]")


def assert_equal(got, want, where):
    for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w),
                                      err_msg=f"{where}: [{i}]")


def exact(rng, shape, scale=1.0):
    """Random float32 values on a 1/16 grid: sums are exact in any order."""
    return (np.round(rng.normal(size=shape) * 16 * scale) / 16).astype(
        np.float32)


def replica_values(strategy, per_replica):
    """Per-replica values: replica r gets `per_replica[r]` (NumPy list)."""
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: [tf.constant(g)
                     for g in per_replica[ctx.replica_id_in_sync_group]])


def replica_stepper(strategy, opt, variables):
    """`step(per_replica_grads)`: `strategy.run` of `apply_gradients`."""
    @tf.function
    def step(grads):
        strategy.run(lambda g: opt.apply_gradients(zip(g, variables)),
                     args=(grads,))
    return step


def assert_replicas_equal(variable, want, where):
    """Every replica's copy of `variable` equals `want` bit for bit."""
    inner = getattr(variable, "value", variable)
    for r, copy_ in enumerate(getattr(inner, "values", [inner])):
        np.testing.assert_array_equal(copy_.numpy(), want,
                                      err_msg=f"{where}: replica {r}")


# ---------------------------------------------------------------------------
# a. Variable constraints.

CONSTRAINED = dict(learning_rate=0.05, weight_decay=0.05, use_ema=True,
                   ema_momentum=0.5, ema_overwrite_frequency=3,
                   global_clipnorm=2.0)
MAX_NORM = 0.4


def constrained_model(weights=None):
    """NonNeg and MaxNorm kernels (Keras layers), biases unconstrained."""
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(6, kernel_constraint=keras.constraints.NonNeg()),
        keras.layers.Dense(3, kernel_constraint=keras.constraints.MaxNorm(
            MAX_NORM)),
    ])
    if weights is not None:
        model.set_weights(weights)
    return model


@pytest.fixture(scope="module")
def initial_weights():
    keras.utils.set_random_seed(3)
    return constrained_model().get_weights()


def constrained_grads(steps, seed=0, replicas=1):
    """`steps` gradient lists for `constrained_model` (per replica when
    `replicas` > 1: `[step][replica][variable]`; they sum exactly)."""
    rng = np.random.default_rng(seed)
    shapes = [(5, 6), (6,), (6, 3), (3,)]
    if replicas == 1:
        return [[exact(rng, s) for s in shapes] for _ in range(steps)]
    return [[[exact(rng, s, 0.5) for s in shapes] for _ in range(replicas)]
            for _ in range(steps)]


def assert_constraints_hold(weights, where):
    assert weights[0].min() >= 0, f"{where}: NonNeg kernel went negative"
    norms = np.linalg.norm(weights[2], axis=0)
    assert norms.max() <= MAX_NORM * (1 + 1e-6), (
        f"{where}: MaxNorm kernel column norms {norms}")


@pytest.mark.parametrize("mode", MODES)
def test_constraints_match_keras(mode, initial_weights):
    """Each applied update ends with the constraints, after the EMA and its
    overwrite, as Keras's `apply` does: weights and averages equal Keras's
    after every step (steps 3 and 6 overwrite with the averages)."""
    ours, theirs = (constrained_model(initial_weights) for _ in range(2))
    opt = optimizer(mode, **CONSTRAINED)
    reference = keras.optimizers.AdamW(**CONSTRAINED)
    step = stepper(opt, ours.trainable_variables, mode)
    for n, grads in enumerate(constrained_grads(6)):
        step([tf.constant(g) for g in grads])
        reference.apply_gradients(zip([tf.constant(g) for g in grads],
                                      theirs.trainable_variables))
        where = f"[{mode}] step {n + 1}"
        assert_close(ours.get_weights(), theirs.get_weights(), where)
        assert_close(values(opt.moving_averages()),
                     values(reference._model_variables_moving_average),
                     where + " averages")
        assert_constraints_hold(ours.get_weights(), where)
    assert int(opt.iterations.numpy()) == 6


def test_constraints_after_the_kernel_equal_plain_ops(initial_weights):
    """The fused kernel, then the constraints (TF ops), is bit-identical
    to the plain-ops step (`fused=False, jit_compile=False`)."""
    fused, plain = (constrained_model(initial_weights) for _ in range(2))
    fused_opt = tf_adamw.AdamW(**CONSTRAINED)
    plain_opt = tf_adamw.AdamW(fused=False, jit_compile=False, **CONSTRAINED)
    for n, grads in enumerate(constrained_grads(4, seed=1)):
        fused_opt.apply_gradients(zip(map(tf.constant, grads),
                                      fused.trainable_variables))
        plain_opt.apply_gradients(zip(map(tf.constant, grads),
                                      plain.trainable_variables))
        assert_equal(fused.get_weights(), plain.get_weights(),
                     f"step {n + 1}")
    assert fused_opt.uses_fused_kernel and not plain_opt.uses_fused_kernel
    assert_constraints_hold(fused.get_weights(), "fused")


@pytest.mark.parametrize("mode", ["fused", "xla"])
def test_constraints_skip_accumulation_micro_steps(mode):
    """A micro-step leaves the variable as it is (Keras projects on every
    call, so MaxNorm's epsilon would shrink it); the applying call is the
    mean-gradient update, then the projection."""
    start = np.full((3, 2), 0.3, np.float32)  # column norms 0.52 > 0.5
    rng = np.random.default_rng(2)
    g1, g2 = exact(rng, (3, 2)), exact(rng, (3, 2))
    variable = keras.Variable(start, name="w")
    variable.constraint = keras.constraints.MaxNorm(0.5)
    opt = optimizer(mode, learning_rate=0.01, gradient_accumulation_steps=2)
    step = stepper(opt, [variable], mode)
    step([tf.constant(g1)])
    np.testing.assert_array_equal(variable.numpy(), start)
    step([tf.constant(g2)])
    single = keras.Variable(start, name="w")
    single.constraint = keras.constraints.MaxNorm(0.5)
    stepper(optimizer(mode, learning_rate=0.01), [single], mode)(
        [tf.constant((g1 + g2) / 2)])
    np.testing.assert_array_equal(variable.numpy(), single.numpy())
    assert np.linalg.norm(variable.numpy(), axis=0).max() <= 0.5 * (1 + 1e-6)


@pytest.mark.parametrize("fused", [None, False])
def test_constraints_per_replica(mirrored_strategy, initial_weights, fused):
    """4 replicas (split gradients that sum exactly) give the one-device
    weights, bit for bit, on every replica's copy."""
    steps = constrained_grads(4, seed=4, replicas=4)
    with mirrored_strategy.scope():
        model = constrained_model(initial_weights)
        opt = tf_adamw.AdamW(fused=fused, **CONSTRAINED)
        opt.build(model.trainable_variables)
    step = replica_stepper(mirrored_strategy, opt, model.trainable_variables)
    single = constrained_model(initial_weights)
    single_opt = tf_adamw.AdamW(fused=fused, **CONSTRAINED)
    for per_replica in steps:
        step(replica_values(mirrored_strategy, per_replica))
        summed = [np.sum(gs, axis=0) for gs in zip(*per_replica)]
        single_opt.apply_gradients(zip(map(tf.constant, summed),
                                       single.trainable_variables))
    assert_constraints_hold(single.get_weights(), "one device")
    for variable, want in zip(model.trainable_variables,
                              single.get_weights()):
        assert_replicas_equal(variable, want, variable.path)


# ---------------------------------------------------------------------------
# b. Variables overwritten with their gradient.

OVERWRITE = dict(learning_rate=0.01, weight_decay=0.1, amsgrad=True,
                 loss_scale_factor=4.0, global_clipnorm=0.5)


def overwrite_variables():
    """A kernel and a bias, and float8-style `scale` and `history`
    variables marked `overwrite_with_gradient`."""
    kernel = keras.Variable(np.linspace(-1, 1, 12, dtype=np.float32)
                            .reshape(4, 3), name="kernel")
    bias = keras.Variable(np.full(3, 0.5, np.float32), name="bias")
    scale = keras.Variable(np.float32(1.0), name="scale")
    history = keras.Variable(np.zeros(5, np.float32), name="history")
    scale.overwrite_with_gradient = True
    history.overwrite_with_gradient = True
    return [kernel, bias, scale, history]


SHAPES = [(4, 3), (3,), (), (5,)]


def overwrite_grads(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=s).astype(np.float32) for s in SHAPES]
            for _ in range(steps)]


@pytest.mark.parametrize("mode", MODES)
def test_overwrite_with_gradient_matches_keras(mode):
    """Set to the (not unscaled) gradient; the other variables' update, the
    global norm and the EMA leave them out; no slot moves for them."""
    ours, theirs = overwrite_variables(), overwrite_variables()
    config = dict(OVERWRITE, use_ema=True, ema_momentum=0.5)
    opt = optimizer(mode, **config)
    reference = keras.optimizers.AdamW(**config)
    step = stepper(opt, ours, mode)
    for n, grads in enumerate(overwrite_grads(4)):
        step([tf.constant(g) for g in grads])
        reference.apply_gradients(zip(map(tf.constant, grads), theirs))
        where = f"[{mode}] step {n + 1}"
        assert_close(values(ours), values(theirs), where)
        assert_equal(values(ours[2:]), grads[2:], where + " overwritten")
        averages = reference._model_variables_moving_average
        assert_close(values(opt.moving_averages(ours[:2])),
                     values(averages[:2]), where + " averages")
    for variable in ours[2:]:
        for kind, slot in opt.slots_for(variable).items():
            assert not slot.numpy().any(), f"{variable.path} {kind} moved"
        assert opt.moving_averages([variable])[0] is variable.value
    before = values(ours[2:])
    opt.finalize_variable_values(ours)
    assert_equal(values(ours[2:]), before, "finalize")


@pytest.mark.parametrize("mode", MODES)
def test_overwrite_with_gradient_accumulates_the_maximum(mode):
    """With accumulation, Keras's rule: the accumulator keeps
    `max(gradient, accumulator)` (from zero), the k-th call writes it."""
    ours, theirs = overwrite_variables(), overwrite_variables()
    config = dict(OVERWRITE, gradient_accumulation_steps=3)
    opt = optimizer(mode, **config)
    reference = keras.optimizers.AdamW(**config)
    step = stepper(opt, ours, mode)
    for n, grads in enumerate(overwrite_grads(7, seed=1)):
        step([tf.constant(g) for g in grads])
        reference.apply_gradients(zip(map(tf.constant, grads), theirs))
        where = f"[{mode}] call {n + 1}"
        assert_close(values(ours), values(theirs), where)
        assert_close([opt.slots_for(v)["accumulator"] for v in ours],
                     values(reference._accumulated_gradients),
                     where + " accumulators")
    # Calls 3 and 6 applied: the maximum of calls 4-6 and of the zeroed
    # accumulator.
    grads = overwrite_grads(7, seed=1)
    assert_equal(values(ours[2:]),
                 [functools.reduce(np.maximum, [g[i] for g in grads[3:6]],
                                   np.float32(0)) for i in (2, 3)],
                 "maximum")
    assert int(opt.iterations.numpy()) == 2


@pytest.mark.parametrize("fused", [None, False])
def test_overwrite_with_gradient_takes_the_replica_maximum(mirrored_strategy,
                                                           fused):
    """Replicas' values differ (each sees its own batch, as a float8 amax
    does): every copy gets their maximum, as the accumulated micro-steps
    do; the other variables get the one-device step on the sum. A call
    outside `strategy.run` with per-replica values does the same."""
    rng = np.random.default_rng(5)
    steps = [[[exact(rng, s, 0.5) for s in SHAPES] for _ in range(4)]
             for _ in range(3)]
    with mirrored_strategy.scope():
        variables = overwrite_variables()
        opt = tf_adamw.AdamW(fused=fused, **OVERWRITE)
        opt.build(variables)
    step = replica_stepper(mirrored_strategy, opt, variables)
    single = overwrite_variables()
    single_opt = tf_adamw.AdamW(fused=fused, **OVERWRITE)
    for n, per_replica in enumerate(steps):
        grads = replica_values(mirrored_strategy, per_replica)
        if n < 2:
            step(grads)
        else:  # cross-replica context
            opt.apply_gradients(zip(grads, variables))
        combined = [np.sum(gs, axis=0) for gs in zip(*per_replica)]
        combined[2:] = [np.max(gs, axis=0)
                        for gs in list(zip(*per_replica))[2:]]
        single_opt.apply_gradients(zip(map(tf.constant, combined), single))
        for variable, want in zip(variables, values(single)):
            assert_replicas_equal(variable, want, f"call {n + 1}")
        assert_equal(values(single[2:]), combined[2:], f"call {n + 1}")


def float8_model(weights=None):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
                              keras.layers.Dense(1)])
    with warnings.catch_warnings():  # "InputLayer does not have `quantize`"
        warnings.simplefilter("ignore", UserWarning)
        model.quantize("float8")
    if weights is not None:
        model.set_weights(weights)
    return model


def test_keras_adapter_fits_a_float8_model():
    """`fit()` of a float8-quantized model (its scales and amax histories
    are overwritten with their gradients): Keras's AdamW's weights."""
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = rng.normal(size=(64, 1)).astype(np.float32)
    weights = float8_model().get_weights()
    results = []
    for make in (tf_adamw.keras.AdamW, keras.optimizers.AdamW):
        model = float8_model(weights)
        model.compile(optimizer=make(learning_rate=0.01, weight_decay=0.01),
                      loss="mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append(model)
    ours, theirs = results
    flags = [v.overwrite_with_gradient for v in ours.trainable_variables]
    assert sum(flags) == 12 and ours.optimizer.uses_fused_kernel
    assert_close(ours.get_weights(), theirs.get_weights(), "float8 fit")


# ---------------------------------------------------------------------------
# c. pickle and copy.deepcopy.

def pickled(value):
    return pickle.loads(pickle.dumps(value))


COPIERS = {"pickle": pickled, "deepcopy": copy.deepcopy}
STATEFUL = dict(learning_rate=0.02, weight_decay=0.1, amsgrad=True,
                use_ema=True, gradient_accumulation_steps=2,
                skip_nonfinite_gradients=True)


def model_variables():
    rng = np.random.default_rng(8)
    return [tf.Variable(rng.normal(size=s).astype(np.float32), name=n)
            for n, s in (("dense/kernel", (4, 3)), ("dense/bias", (3,)),
                         ("norm/gamma", (3,)))]


def grads_at(n):
    rng = np.random.default_rng(100 + n)
    grads = [tf.constant(rng.normal(size=s).astype(np.float32))
             for s in ((4, 3), (3,), (3,))]
    if n == 2:  # skipped: counts in skipped_steps
        grads[0] = tf.fill((4, 3), np.float32(np.nan))
    return grads


def all_state(opt):
    return [v.numpy() for v in opt.variables]


@pytest.mark.parametrize("copier", sorted(COPIERS))
def test_unbuilt_copy_keeps_configuration_and_exclusions(copier):
    variables = model_variables()
    opt = tf_adamw.AdamW(**dict(
        STATEFUL, beta_1=tf.Variable(0.8), clipnorm=1.0, name="my adamw",
        learning_rate=keras.optimizers.schedules.CosineDecay(0.1, 100),
        fused=False, jit_compile=False))
    opt.exclude_from_weight_decay(var_list=[variables[1]],
                                  var_names=["gamma"])
    copied_variables, copied = COPIERS[copier]((variables, opt))
    assert type(copied) is tf_adamw.AdamW and not copied.built
    assert copied.get_config() == opt.get_config()
    for original, copy_ in ((variables, opt), (copied_variables, copied)):
        copy_.build(original)
        for n in range(4):
            copy_.apply_gradients(zip(grads_at(n), original))
    assert_equal(values(copied_variables), values(variables), copier)
    assert_equal(all_state(copied), all_state(opt), copier + " state")
    assert copied._engine.table.use_decay == [True, False, False]


@pytest.mark.parametrize("mode", ["fused", "xla", "jit"])
@pytest.mark.parametrize("copier", sorted(COPIERS))
def test_built_copy_keeps_state_on_copied_variables(copier, mode):
    """State (iterations, slots, averages, accumulators, counters) and
    exclusions; built on the variables copied with it (pickle's and
    deepcopy's memo); both continue identically."""
    variables = model_variables()
    opt = optimizer(mode, **STATEFUL)
    opt.exclude_from_weight_decay(var_names=["bias"])
    for n in range(6):  # 6 calls, one skipped: 2 updates, 1 micro-step
        opt.apply_gradients(zip(grads_at(n), variables))
    assert [int(opt.iterations.numpy()), int(opt.skipped_steps.numpy()),
            int(opt._accumulation_count.numpy())] == [2, 1, 1]
    copied_variables, copied = COPIERS[copier]((variables, opt))
    assert copied.built and copied is not opt
    assert all(a is b for a, b in zip(copied.var_list, copied_variables))
    assert not any(a is b for a, b in zip(copied_variables, variables))
    assert_equal(values(copied_variables), values(variables), "variables")
    assert_equal(all_state(copied), all_state(opt), "state")
    assert len(copied.variables) == len(opt.variables)
    for original, copy_ in ((variables, opt), (copied_variables, copied)):
        step = stepper(copy_, original, mode)
        for n in range(6, 9):
            step(grads_at(n))
    assert_equal(values(copied_variables), values(variables), "continued")
    assert_equal(all_state(copied), all_state(opt), "continued state")


def test_deepcopy_alone_copies_the_variables_too():
    variables = model_variables()
    opt = tf_adamw.AdamW(**STATEFUL)
    opt.apply_gradients(zip(grads_at(0), variables))
    copied = copy.deepcopy(opt)
    assert not any(a is b for a, b in zip(copied.var_list, variables))
    assert_equal(values(copied.var_list), values(variables), "variables")
    assert_equal(all_state(copied), all_state(opt), "state")


def test_plain_callables_are_a_pickling_error():
    """As with `get_config()`: a pickle carries no code. deepcopy shares
    the callable."""
    def beta_1():
        return 0.8
    opt = tf_adamw.AdamW(learning_rate=lambda: 0.01)
    with pytest.raises(ValueError, match="`learning_rate` is a plain Python"):
        pickle.dumps(opt)
    opt = tf_adamw.AdamW(beta_1=beta_1)
    with pytest.raises(ValueError, match="`beta_1` is a plain Python"):
        pickle.dumps(opt)
    assert copy.deepcopy(opt).beta_1 is beta_1


def test_deepcopy_under_a_strategy(mirrored_strategy, initial_weights):
    """A deep copy of an optimizer built under MirroredStrategy is built
    under it, on the copied mirrored variables; pickling is refused."""
    steps = constrained_grads(4, seed=6, replicas=4)
    with mirrored_strategy.scope():
        model = constrained_model(initial_weights)
        opt = tf_adamw.AdamW(**CONSTRAINED)
        opt.build(model.trainable_variables)
    variables = model.trainable_variables
    replica_stepper(mirrored_strategy, opt, variables)(
        replica_values(mirrored_strategy, steps[0]))
    copied_variables, copied = copy.deepcopy((variables, opt))
    assert copied.distribution_strategy is mirrored_strategy
    assert all(a is b for a, b in zip(copied.var_list, copied_variables))
    assert_equal(all_state(copied), all_state(opt), "state")
    for original, copy_ in ((variables, opt), (copied_variables, copied)):
        step = replica_stepper(mirrored_strategy, copy_, original)
        for per_replica in steps[1:]:
            step(replica_values(mirrored_strategy, per_replica))
    for variable, want in zip(copied_variables, values(variables)):
        assert_replicas_equal(variable, want, "continued")
    with pytest.raises(ValueError, match="MirroredStrategy cannot be pickled"):
        pickle.dumps(opt)
    # Unbuilt: copied outside the scope, the copy belongs to the strategy
    # it was created under (it builds there); its configuration pickles.
    with mirrored_strategy.scope():
        unbuilt = tf_adamw.AdamW(**CONSTRAINED)
    assert pickled(unbuilt).get_config() == unbuilt.get_config()
    copied = copy.deepcopy(unbuilt)
    with mirrored_strategy.scope():
        copied.build(copied_variables)
    assert copied.distribution_strategy is mirrored_strategy


@pytest.mark.parametrize("copier", sorted(COPIERS))
def test_keras_adapter_copies(copier):
    """As Keras's optimizers: pickle and deepcopy go through Keras's saving
    format (config and `variables`); the copy applies the state when it is
    built, and keeps the weight-decay exclusions (Keras's config drops
    them)."""
    variables = [keras.Variable(v.numpy(), name=f"v{i}")
                 for i, v in enumerate(model_variables())]
    opt = tf_adamw.keras.AdamW(learning_rate=0.02, weight_decay=0.5,
                               use_ema=True)
    opt.exclude_from_weight_decay(var_list=[variables[1]])
    unbuilt = COPIERS[copier](opt)
    assert unbuilt.get_config() == opt.get_config()
    assert unbuilt._adapter.exclusions[0] is not None
    for n in range(3):
        opt.apply_gradients(zip(grads_at(n + 3), variables))
    copied_variables, copied = COPIERS[copier]((variables, opt))
    assert int(copied.iterations.numpy()) == 3
    for original, copy_ in ((variables, opt), (copied_variables, copied)):
        for n in range(3):
            copy_.apply_gradients(zip(grads_at(n + 6), original))
    assert_equal(values(copied_variables), values(variables), copier)
    assert_equal(values(copied.variables), values(opt.variables), "state")
