"""One replica's step, one function per stage, in the fixed order of
docs/semantics.md, "The step":

    unscale -> finite guard -> accumulate -> clip -> weight decay + Adam
    -> EMA (+ overwrite) -> count

`run` calls the stages in that order. Each stage reads the options it needs
from `Step.options`; a stage that is not in use returns at once. The
gradients have already been summed across replicas (`tf_adamw.distribute`),
so every replica takes the same branches. Branches on tensors are explicit
`tf.cond`s: the step is traced without autograph.
"""

import typing

import tensorflow as tf

from tf_adamw import kernels
from tf_adamw import options as options_lib
from tf_adamw import state as state_lib
from tf_adamw import update


class Step(typing.NamedTuple):
    """What one replica's step needs, made per call."""
    options: options_lib.Options
    table: state_lib.VariableTable
    state: state_lib.StepState  # this replica's copies
    fused: bool  # weight decay + Adam as the fused kernel
    slot_tables: dict  # device -> the kernel's slot table (fused only)
    # scalars(iterations, dtype) -> `update.step_scalars` of this step.
    scalars: typing.Callable


# Which optional stages an optimizer's options put in its step.
def unscales(options):
    return options.loss_scale_factor is not None


def guards(options):
    return options.skip_nonfinite_gradients


def accumulates(options):
    return bool(options.gradient_accumulation_steps)


def clips(options):
    return options.clip_rule() is not None


def averages(options):
    return options.use_ema


OPTIONAL_STAGES = (unscales, guards, accumulates, clips, averages)


def only_decay_and_adam(options):
    """True when the step's only per-variable work is weight decay + Adam."""
    return not any(in_use(options) for in_use in OPTIONAL_STAGES)


def run(step, grads):
    """The whole step on `grads` (aligned with the built variables, None
    where a variable has no gradient). Returns `iterations` after it (None
    when eager: the caller returns the variable, and an eager op costs
    ~30 us)."""
    grads = unscale(step, in_compute_dtype(step, grads))
    if guards(step.options):
        tf.cond(update.all_finite(list(grads.values())),
                lambda: _done(accumulate_or_apply(step, grads)),
                lambda: _done(count_skipped(step), value=False))
    else:
        accumulate_or_apply(step, grads)
    if tf.executing_eagerly():
        return None
    return tf.identity(step.state.iterations)


def _done(_, value=True):
    # A tf.cond branch must return a tensor.
    return tf.constant(value)


def in_compute_dtype(step, grads):
    """`{index: dense gradient in its variable's compute dtype}`."""
    dense = {}
    for i, g in enumerate(grads):
        if g is None:
            continue
        dtype = step.table.compute_dtypes[i]
        # DTypes are interned: `is` is the fast common case.
        if not (isinstance(g, tf.Tensor) and (
                g.dtype is dtype or g.dtype == dtype)):
            g = tf.cast(update.densify(g, step.state.variables[i].shape),
                        dtype)
        dense[i] = g
    return dense


def unscale(step, grads):
    """Step 2: divides by `loss_scale_factor`."""
    if not unscales(step.options):
        return grads
    factor = step.options.loss_scale_factor
    return {i: g / tf.cast(factor, g.dtype) for i, g in grads.items()}


def count_skipped(step):
    """Step 3's other branch: a non-finite call only counts itself."""
    step.state.skipped_steps.assign_add(1)


def accumulate_or_apply(step, grads):
    """Step 4: every k-th call applies the mean of the k gradients.

    The calls in between only add (a tf.cond, so those calls skip the
    update's memory traffic).
    """
    if not accumulates(step.options):
        apply_update(step, grads)
        return
    k = step.options.gradient_accumulation_steps
    accumulators = step.state.accumulators
    count = step.state.accumulation_count
    summed = {i: accumulators[i] + g for i, g in grads.items()}

    def apply_mean():
        apply_update(step, {i: s / tf.cast(k, s.dtype)
                            for i, s in summed.items()})
        for accumulator in accumulators:
            accumulator.assign(tf.zeros_like(accumulator))
        count.assign(0)
        return tf.constant(True)

    def add():
        for i, s in summed.items():
            accumulators[i].assign(s)
        count.assign_add(1)
        return tf.constant(False)

    tf.cond(tf.equal(count + 1, k), apply_mean, add)


def apply_update(step, grads):
    """Steps 5-9 on the (mean) gradients `grads`: {index: tensor}."""
    grads = clip(step, grads)
    new_values = decay_and_adam(step, grads)
    moving_average(step, new_values)
    step.state.iterations.assign_add(1, read_value=False)  # step 9


def clip(step, grads):
    """Step 5: the clipping rule of the options, if any."""
    if not clips(step.options):
        return grads
    order = sorted(grads)
    clipped = update.clip([grads[i] for i in order],
                          step.options.clip_rule())
    return dict(zip(order, clipped))


def decay_and_adam(step, grads):
    """Steps 6 and 7. Returns `{index: new value}` where known without a
    read (the per-variable ops), `{}` after the kernel."""
    order = sorted(grads)
    cache = {}

    def scalars(dtype):
        # Once per compute dtype and step.
        if dtype not in cache:
            cache[dtype] = step.scalars(step.state.iterations, dtype)
        return cache[dtype]

    if step.fused:
        # Every variable in one kernel, one pass over memory
        # (tf_adamw/cc/fused_adamw.cc does `update.adamw_update`'s math).
        s = scalars(tf.float32)
        kernels.fused_apply(
            [step.state.variables[i] for i in order],
            step.slot_tables[step.state.momentums[0].device], order,
            [grads[i] for i in order], alpha=s["alpha"],
            one_minus_beta_1=s["one_minus_beta_1"],
            one_minus_beta_2=s["one_minus_beta_2"], epsilon=s["epsilon"],
            decay=s["decay"],
            use_decay=[step.table.use_decay[i] for i in order])
        return {}
    return {i: _decay_and_adam_one(step, i, grads[i], scalars)
            for i in order}


def _decay_and_adam_one(step, i, grad, scalars):
    """Steps 6 and 7 for variable `i` as TF ops; returns its new value."""
    st = step.state
    variable = st.variables[i]
    dtype = step.table.compute_dtypes[i]
    s = scalars(dtype)
    # Each variable is read once (every use of a tf.Variable in an op would
    # add a read) and written without reading it back.
    value, m, v, v_hat = update.adamw_update(
        tf.cast(variable.read_value(), dtype), grad,
        st.momentums[i].read_value(), st.velocities[i].read_value(),
        st.velocity_hats[i].read_value() if step.options.amsgrad else None,
        alpha=s["alpha"], one_minus_beta_1=s["one_minus_beta_1"],
        one_minus_beta_2=s["one_minus_beta_2"], epsilon=s["epsilon"],
        decay=s["decay"] if step.table.use_decay[i] else None)
    st.momentums[i].assign(m, read_value=False)
    st.velocities[i].assign(v, read_value=False)
    if v_hat is not None:
        st.velocity_hats[i].assign(v_hat, read_value=False)
    value = tf.cast(value, variable.dtype)
    variable.assign(value, read_value=False)
    return value


def moving_average(step, new_values):
    """Step 8: the EMA of every built variable, then the periodic overwrite.

    Args:
        step: the `Step`.
        new_values: `{index: value}` of variables updated by TF ops this
            step; the others are read.
    """
    if not averages(step.options):
        return
    st, options = step.state, step.options
    first = tf.equal(st.iterations, 0)
    for i, variable in enumerate(st.variables):
        current = new_values[i] if i in new_values else variable.read_value()
        average = st.averages[i]
        average.assign(update.ema_update(
            average, tf.cast(current, average.dtype), options.ema_momentum,
            first))
    if options.ema_overwrite_frequency:
        due = tf.equal(
            (st.iterations + 1) % options.ema_overwrite_frequency, 0)
        tf.cond(due,
                lambda: _done(state_lib.write_averages(st.variables,
                                                       st.averages)),
                lambda: tf.constant(False))
