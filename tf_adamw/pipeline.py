"""One replica's step, one function per stage, in the fixed order of
docs/semantics.md, "The step":

    unscale -> finite guard (-> dynamic loss scale) -> accumulate
    -> (overwrite with gradient) -> clip -> weight decay + Adam
    -> EMA (+ overwrite) -> constraints -> count

`run` calls the stages in that order, after evaluating everything a
write needs (the dense gradients, the step's scalars), so that a call that
fails writes nothing. Each stage reads the options it needs from
`Step.options`; a stage that is not in use returns at once. The gradients
have already been summed across replicas (`tf_adamw.distribute`), so every
replica takes the same branches. Branches on tensors are explicit
`tf.cond`s: the step is traced without autograph.

The gradients of variables marked `overwrite_with_gradient` (positions
`table.overwrites`) are values to write, not gradients: they flow through
the same dictionaries, and each stage that transforms gradients leaves
them out (`_regular`).
"""

import typing

import tensorflow as tf

from tf_adamw import kernels
from tf_adamw import options as options_lib
from tf_adamw import slots as slots_lib
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
    return options.loss_scale_factor is not None or options.dynamic_loss_scale


def guards(options):
    # A dynamic loss scale skips non-finite calls, as Keras's
    # LossScaleOptimizer does.
    return options.skip_nonfinite_gradients or options.dynamic_loss_scale


def accumulates(options):
    return bool(options.gradient_accumulation_steps)


def clips(options):
    return options.clip_rule() is not None


def averages(options):
    return options.use_ema


OPTIONAL_STAGES = (unscales, guards, accumulates, clips, averages)


def only_decay_and_adam(options, table=None):
    """True when the step's only per-variable work is weight decay + Adam
    (no optional stage, and, given the built `table`, no constraint and no
    variable overwritten with its gradient)."""
    if table is not None and (table.constrained or table.overwrites):
        return False
    return not any(in_use(options) for in_use in OPTIONAL_STAGES)


def _regular(step, grads):
    """`grads` without the values of overwritten variables (`grads` itself
    when there are none)."""
    if not step.table.overwrites:
        return grads
    return {i: g for i, g in grads.items() if i not in step.table.overwrites}


def run(step, grads, replicas_valid=None):
    """The whole step on `grads` (aligned with the built variables, None
    where a variable has no gradient). Returns `iterations` after it (None
    when eager: the caller returns the variable, and an eager op costs
    ~30 us). `replicas_valid`: under a strategy, whether every replica's
    sparse gradients had valid indices before they were summed
    (`distribute.on_every_replica`), or None.

    Nothing is written until every gradient and the step's scalars are
    computed: a call that fails (a gradient check of
    `state.checked_gradient`, a schedule's assertion) changes nothing.
    Eagerly that is program order; in a graph every write waits for them.
    """
    valid = sparse_indices_valid(step, grads, replicas_valid)
    grads = unscale(step, in_compute_dtype(step, grads))
    scalars, evaluation = evaluate_scalars(step, grads)
    with tf.control_dependencies(_before_writes(grads, evaluation)):
        guard_and_apply(step, grads, scalars, valid)
    if tf.executing_eagerly():
        return None
    return tf.identity(step.state.iterations)


def _done(_, value=True):
    # A tf.cond branch must return a tensor.
    return tf.constant(value)


def _before_writes(grads, evaluation):
    """What every write of a traced step waits for, as one op (one control
    edge per op that needs it, not one per gradient); `[]` when eager."""
    if tf.executing_eagerly():
        return []
    return [tf.group(*grads.values(), *evaluation)]


def sparse_indices_valid(step, grads, replicas_valid=None):
    """For a traced step of TF ops (the xla and ops kinds), a scalar bool:
    every sparse gradient's indices are in `[0, rows)` (here, and on every
    replica when `replicas_valid` is given); None for the fused kernel,
    eagerly, or without sparse gradients.

    Inside XLA the assertion of `state.checked_slices` compiles to nothing,
    out-of-range indices are dropped when XLA scatters, and nothing can
    raise at run time: there `guard_and_apply` skips a call with a bad
    index instead (docs/semantics.md, "Before step 1"). Called from outside
    XLA the assertion has raised before the step, but a trace made there is
    reused when the same step is later called inside the user's XLA
    function, so every traced step of TF ops carries the check. (The fused
    kernel has no XLA lowering: its steps never run inside XLA.)
    """
    if tf.executing_eagerly() or step.fused:
        return None
    checks = [update.indices_in_range(g.indices,
                                      step.state.variables[i].shape[0])
              for i, g in enumerate(grads) if isinstance(g, tf.IndexedSlices)]
    if replicas_valid is not None:
        checks.append(replicas_valid)
    if not checks:
        return None
    return tf.reduce_all(tf.stack(checks))


def evaluate_scalars(step, grads):
    """The step's scalars for each compute dtype it updates, evaluated
    before any write. On every call, accumulation micro-steps included
    (which use none): they are a few scalar ops, and as `iterations` only
    moves at the end of an applying call, their values are unchanged.

    Returns:
        `({dtype: update.step_scalars(...)}, ops)`: in a graph, `ops` are
        the operations the evaluation created, which the writes wait for
        (a schedule's `tf.debugging.assert_*` is an input of nothing);
        eagerly `[]`.
    """
    if step.fused:
        dtypes = [tf.float32]  # the kernel takes float32 scalars
    else:
        dtypes = list(dict.fromkeys(step.table.compute_dtypes[i]
                                    for i in sorted(_regular(step, grads))))
    graph = None
    if not tf.executing_eagerly():
        graph = tf.compat.v1.get_default_graph()
        first = len(graph.get_operations())
    scalars = {dtype: step.scalars(step.state.iterations, dtype)
               for dtype in dtypes}
    return scalars, (graph.get_operations()[first:] if graph else [])


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
    """Step 2: divides by `loss_scale_factor`, or the dynamic scale as it
    was before this call (not the values of overwritten variables, as in
    Keras)."""
    if not unscales(step.options):
        return grads
    if step.options.dynamic_loss_scale:
        factor = step.state.dynamic_scale.read_value()
    else:
        factor = step.options.loss_scale_factor
    overwrites = step.table.overwrites
    return {i: g if i in overwrites else g / tf.cast(factor, g.dtype)
            for i, g in grads.items()}


def count_skipped(step, where=None):
    """A skipped call only counts itself (in `skipped_steps`, when the
    optimizer keeps it); `where`: a bool scalar, whether this call was
    skipped (None: it was)."""
    if step.options.skip_nonfinite_gradients:
        step.state.skipped_steps.assign_add(
            1 if where is None else tf.cast(where, tf.int64))


def adjust_loss_scale(step, finite, applied):
    """Step 3's dynamic loss scale, after the call (Keras's
    `LossScaleOptimizer`): a non-finite call halves the scale, a finite one
    that was applied counts, and the `dynamic_growth_steps`-th finite call
    in a row doubles it; each change restarts the count. A finite call
    skipped for a bad sparse index changes neither. Scalar `tf.where`s, not
    branches: the same few ops on every path. `finite`, `applied`: scalar
    bools, None for True."""
    if not step.options.dynamic_loss_scale:
        return
    finite = tf.constant(True) if finite is None else finite
    applied = tf.constant(True) if applied is None else applied
    scale = step.state.dynamic_scale
    counter = step.state.scale_step_counter
    count, value = counter.read_value(), scale.read_value()
    counted = tf.logical_and(finite, applied)
    grow = tf.logical_and(counted, tf.equal(
        count, step.options.dynamic_growth_steps - 1))
    zero = tf.zeros_like(count)
    counter.assign(tf.where(grow, zero, tf.where(
        counted, count + 1, tf.where(finite, count, zero))),
        read_value=False)
    scale.assign(tf.where(finite, tf.where(grow, value * 2.0, value),
                          value / 2.0), read_value=False)


def guard_and_apply(step, grads, scalars, valid=None):
    """Step 3, then steps 4-10; `valid` is `sparse_indices_valid`.

    With the guard, a call is skipped when the sum of squares of its
    gradients is not finite: a NaN or Inf, or values whose squares (or
    their sum) overflow. Those would make `v` (which holds `g * g`) or the
    global norm infinite, and the step NaN. The sum is also the global
    norm's: `global_clipnorm` reuses it when it clips these very gradients
    (without accumulation), so the guard costs no extra pass there. A call
    that is not `valid` is skipped the same way.

    The verdict is no conditional around the update, whose inputs would be
    every variable's gradient and whose branches XLA compiles apart from
    the rest: the stages take it as a predicate (`apply_update`,
    `accumulate_or_apply`).
    """
    checks = [] if valid is None else [valid]
    norm, finite = None, None
    regular = _regular(step, grads)
    if guards(step.options) and regular:
        total = update.sum_of_squares([regular[i] for i in sorted(regular)],
                                      _flatten(step))
        finite = tf.math.is_finite(total)
        checks.append(finite)
        rule = step.options.clip_rule()
        if rule is not None and rule[0] == "global_clipnorm" and (
                not accumulates(step.options)):
            norm = tf.sqrt(total)  # update.global_norm of the same list
    applied = None
    if checks:
        applied = checks[0] if len(checks) == 1 else tf.logical_and(*checks)
    accumulate_or_apply(step, grads, scalars, norm, applied)
    if applied is not None:
        count_skipped(step, where=tf.logical_not(applied))
    adjust_loss_scale(step, finite, applied)


def _flatten(step):
    """How the global norm's sum of squares flattens the gradients: the
    kernel library's one op beside the fused kernel (the same values; no
    reshape per variable to trace and optimise), else TF's ops."""
    return kernels.flat_concat if step.fused else None


def _kernel_accumulates(step, grads):
    """True when the fused kernel does the accumulation (adds, or applies
    the mean, told which by a flag) instead of TF ops reading, adding and
    writing every accumulator: every variable has a gradient (an applying
    call zeroes every accumulator), none is overwritten with its gradient
    (its accumulator keeps a maximum), and no clipping but the global
    clip, whose norm of the mean gradients `accumulated_means` gives."""
    rule = step.options.clip_rule()
    return (step.fused and not step.table.overwrites
            and len(grads) == len(step.state.variables)
            and (rule is None or rule[0] == "global_clipnorm"))


def accumulate_or_apply(step, grads, scalars, norm=None, applied=None):
    """Step 4: every k-th call applies the mean of the k gradients.

    In the fused kernel when `_kernel_accumulates`, else as TF ops: every
    call computes the update from the means and writes it only on the
    k-th (`apply_update`'s predicate), and every accumulator is written
    with a select (the sum, zeros after an applying call, or unchanged).
    No conditional: XLA compiles both branches and copies what a branch
    leaves alone, so there one saved little per call and cost 1.1x the
    first call and 1.2x its memory (benchmarks/README.md, "The `many`
    layout").
    `norm` is the global norm of `grads` if known (without accumulation
    only); `applied`: a bool scalar, whether the call passed the guard
    (None: it did).
    """
    if not accumulates(step.options):
        apply_update(step, grads, scalars, norm, predicate=applied)
        return
    if _kernel_accumulates(step, grads):
        accumulate_in_kernel(step, grads, scalars, applied)
        return
    k = step.options.gradient_accumulation_steps
    accumulators = step.state.accumulators
    overwrites = step.table.overwrites
    before, last, applies, _ = _accumulation_flags(step, applied)
    reads = [slots_lib.read_slot(accumulator) for accumulator in accumulators]
    olds = [value for value, _ in reads]
    # An overwritten variable's accumulator keeps the maximum (Keras's
    # rule, `_overwrite_variables_directly_with_gradients`).
    summed = {i: tf.maximum(g, olds[i]) if i in overwrites else olds[i] + g
              for i, g in grads.items()}
    # Zero and k once per dtype, not one constant per variable each.
    zero, count = {}, {}
    for dtype in {s.dtype for s in summed.values()}:
        zero[dtype], count[dtype] = tf.zeros([], dtype), tf.constant(k, dtype)
    written = {i: _select(applied, tf.where(last, zero[s.dtype], s), olds[i])
               for i, s in summed.items()}
    # The TF-op update writes the accumulators of the variables it updates
    # with their other slots: packed, one write per variable, not two, and
    # from the rows read here, not read again.
    with_update = {} if step.fused else {
        i: (a, reads[i][1]) for i, a in written.items() if i not in overwrites}
    kernel = apply_update(
        step, {i: s if i in overwrites else s / count[s.dtype]
               for i, s in summed.items()}, scalars, predicate=applies,
        accumulators=with_update)
    # A packed accumulator is written with its variable's other rows as
    # read now: after the kernel's writes to them (out of TF's sight).
    with tf.control_dependencies([] if kernel is None else [kernel]):
        for i, (accumulator, old) in enumerate(zip(accumulators, olds)):
            if i in with_update:
                continue
            if i in written:
                accumulator.assign(written[i], read_value=False)
            else:  # no gradient this call: zeroed only by an applying call
                _assign(accumulator, tf.zeros_like(old), applies, old)
    _count_accumulation(step, before, last, applied)


def _accumulation_flags(step, applied=None):
    """`(count, last, applies, adds)`: `accumulation_count` as read before
    the call, whether this is the k-th call, and whether it applies the
    mean or only adds (False for both when the guard, `applied`, skips
    it)."""
    before = step.state.accumulation_count.read_value()
    last = tf.equal(before + 1, step.options.gradient_accumulation_steps)
    if applied is None:
        return before, last, last, tf.logical_not(last)
    return (before, last, tf.logical_and(applied, last),
            tf.logical_and(applied, tf.logical_not(last)))


def _count_accumulation(step, before, last, applied=None):
    """Writes `accumulation_count` (read as `before`) after a call the
    guard passed (`applied`): back to 0 after the k-th, else one more."""
    _assign(step.state.accumulation_count,
            tf.where(last, tf.zeros_like(before), before + 1), applied,
            before)


def accumulate_in_kernel(step, grads, scalars, applied=None):
    """Step 4 in the fused kernel: it adds `grads` to the accumulators, or
    on every k-th call applies their mean (and zeroes them), told which by
    two flags; no op or conditional per variable. The global clip's norm
    is that of the mean gradients, from `kernels.accumulated_means` on the
    applying call (empty on the others) with `update.global_norm`, the
    reduction the plain-ops step uses, so both round alike. `applied`: as
    in `accumulate_or_apply`."""
    k = step.options.gradient_accumulation_steps
    before, last, applies, adds = _accumulation_flags(step, applied)
    norm = None
    rule = step.options.clip_rule()
    if rule is not None:  # the global clip (`_kernel_accumulates`)
        order = sorted(grads)
        norm = update.global_norm([kernels.accumulated_means(
            _slot_table(step), order, [grads[i] for i in order],
            tf.constant(float(k)), applies)])
    apply_update(step, grads, scalars, norm, predicate=applies,
                 accumulate=adds)
    _count_accumulation(step, before, last, applied)


def _slot_table(step):
    """The fused kernel's slot table on this replica's device."""
    return step.slot_tables[step.state.momentums[0].device]


def apply_update(step, grads, scalars, norm=None, predicate=None,
                 accumulate=None, accumulators=None):
    """Steps 5-10 on the (mean) gradients `grads`: {index: tensor}.

    The overwritten variables are set first; the other stages run when
    some other variable has a gradient (as in Keras). `predicate`: a bool
    scalar, whether the update applies at all (None: it does); when it
    does not, the fused kernel is told so and every TF-op write selects
    the old value (`_assign`). `accumulate`: for the kernel accumulating
    (`accumulate_in_kernel`), whether the call only adds.
    `accumulators`: `{index: (value, rows)}`, accumulators the TF-op
    update writes with the other slots of their variable, and the rows of
    their packed variable as read (`slots.read_slot`; None: separate)
    (`accumulate_or_apply`).

    Returns:
        The fused kernel's op, which what reads the slots afterwards must
        wait for, or None.
    """
    grads = overwrite_with_gradient(step, grads, predicate)
    kernel = None
    if grads:
        grads, grad_scale = clip(step, grads, norm)
        averaged, kernel = decay_and_adam(step, grads, scalars, grad_scale,
                                          predicate, accumulate, accumulators)
        # The kernel writes through the slot table, out of TF's sight: what
        # reads the variables next waits for it.
        with tf.control_dependencies([] if kernel is None else [kernel]):
            moving_average(step, averaged, predicate)
        constrain(step, grads, predicate)
    step.state.iterations.assign_add(  # step 10
        1 if predicate is None else tf.cast(predicate, tf.int64),
        read_value=False)
    return kernel


def _assign(variable, value, predicate=None, old=None):
    """`variable = value`, or (`predicate` False) its old value: `old`, the
    value it was read as, else read here. A select, not a branch: XLA fuses
    it into the loop computing `value`."""
    if predicate is not None:
        value = _select(predicate, value,
                        variable.read_value() if old is None else old)
    variable.assign(value, read_value=False)
    return value


def overwrite_with_gradient(step, grads, predicate=None):
    """Sets each overwritten variable to its value in `grads` (with
    accumulation: the maximum over the micro-steps); returns the others."""
    if not step.table.overwrites:
        return grads
    for i in sorted(step.table.overwrites.intersection(grads)):
        variable = step.state.variables[i]
        _assign(variable, tf.cast(grads[i], variable.dtype), predicate)
    return _regular(step, grads)


def clip(step, grads, norm=None):
    """Step 5: the clipping rule of the options, if any (`norm`: the
    global norm of `grads` if known).

    Returns:
        `(grads, grad_scale)`: the global clip's factor is one scalar
        (`grad_scale`) that `decay_and_adam` multiplies each gradient by
        where it reads it (`update.clip_by_global_norm`'s product, no op
        per variable here); the other rules clip `grads` here and
        `grad_scale` is None.
    """
    if not clips(step.options):
        return grads, None
    order = sorted(grads)
    rule = step.options.clip_rule()
    if rule[0] == "global_clipnorm":
        if norm is None:
            norm = update.global_norm([grads[i] for i in order],
                                      _flatten(step))
        return grads, update.global_clip_scale(norm, rule[1])
    clipped = update.clip([grads[i] for i in order], rule, norm)
    return dict(zip(order, clipped)), None


def decay_and_adam(step, grads, scalars, grad_scale=None, predicate=None,
                   accumulate=None, accumulators=None):
    """Steps 6 and 7 for the variables of `grads`, with the EMA of step 8
    for each (and the fused kernel's share of steps 4 and 5: the
    accumulators when `accumulate` is given); `scalars` of
    `evaluate_scalars`, `grad_scale` of `clip`, `predicate` and
    `accumulate` of `apply_update`; the TF ops also write `accumulators`
    (`apply_update`'s).

    Returns:
        `(indices whose average moved, the kernel's op)`; the op is None
        for the per-variable ops and when eager.
    """
    order = sorted(grads)
    ema_momentums = _ema_momentums(step)
    averaged = set(order) if ema_momentums else set()
    if not step.fused:
        each = update_variables if tf.executing_eagerly() else _traced()
        for start in range(0, len(order), _VARIABLES_PER_CALL):
            each([_update_variable_args(step, i, grads[i], scalars,
                                        grad_scale, ema_momentums, predicate,
                                        (accumulators or {}).get(i))
                  for i in order[start:start + _VARIABLES_PER_CALL]])
        return averaged, None
    # Every variable in one kernel, one pass over memory
    # (tf_adamw/cc/fused_adamw.cc does `update.adamw_update`'s math).
    s = scalars[tf.float32]
    momentum, one_minus_momentum = (
        ema_momentums(tf.float32) if ema_momentums else (None, None))
    kernel = kernels.fused_apply(
        [step.state.variables[i] for i in order], _slot_table(step), order,
        [grads[i] for i in order], alpha=s["alpha"],
        one_minus_beta_1=s["one_minus_beta_1"],
        one_minus_beta_2=s["one_minus_beta_2"], epsilon=s["epsilon"],
        decay=s["decay"], use_decay=[step.table.use_decay[i] for i in order],
        grad_scale=grad_scale, ema_momentum=momentum,
        ema_one_minus_momentum=one_minus_momentum, apply=predicate,
        accumulate=accumulate, accumulation_steps=None if accumulate is None
        else tf.constant(float(step.options.gradient_accumulation_steps)))
    return averaged, kernel


def _ema_momentums(step):
    """`dtype -> update.ema_momentum` of this step, each made once; None
    without EMA."""
    if not averages(step.options):
        return None
    made = {}

    def momentum(dtype):
        if dtype not in made:
            made[dtype] = update.ema_momentum(
                step.options.ema_momentum,
                tf.equal(step.state.iterations, 0), dtype)
        return made[dtype]
    return momentum


# Variables per call of the traced `update_variables`: a call costs ~1 ms
# to make while tracing, whatever it holds, and its body is traced again
# for each new kind of argument list; 4 traced 1,000 variables fastest
# (1.3 s, against 2.0 s for 1 and 1.7-1.8 s for 2, 8 or 16).
_VARIABLES_PER_CALL = 4


def update_variables(args):
    """`update_variable(*a)` for each `a` in `args`."""
    for a in args:
        update_variable(*a)


def _traced():
    """`update_variables` as a function traced once per kind of argument
    list (dtypes, options; shapes and ranks are generalised) and called
    once per few variables: on 1,000 variables the graph to trace and
    optimise is seven times smaller, and XLA compiles faster
    (benchmarks/README.md, "The `many` layout").

    A new one for each step traced: a trace keeps the variables it was
    traced with, weakly, and refuses to run once they are gone, so one
    shared across optimizers fails when the first is deleted. Shapes are
    generalised after the first trace (`reduce_retracing`): 1,000
    variables of 1,000 shapes trace a handful of times, not 1,000.
    """
    return tf.function(update_variables, autograph=False,
                       reduce_retracing=True)


def _update_variable_args(step, i, grad, scalars, grad_scale=None,
                          ema_momentums=None, predicate=None,
                          accumulator=None):
    """The arguments of `update_variable` for variable `i`
    (`ema_momentums` of `_ema_momentums`; `accumulator`: `(the value to
    write into its accumulator, its store's rows as read or None)`, or
    None)."""
    st, options = step.state, step.options
    s = scalars[step.table.compute_dtypes[i]]
    hyper = (s["alpha"], s["one_minus_beta_1"], s["one_minus_beta_2"],
             s["epsilon"], s["decay"] if step.table.use_decay[i] else None)
    # `grads` holds no overwritten variable here: each one averaged has
    # its average.
    average = None if ema_momentums is None else st.averages[i]
    value, rows = (None, None) if accumulator is None else accumulator
    slots = slots_lib.for_update(
        st.momentums[i], st.velocities[i],
        st.velocity_hats[i] if options.amsgrad else None, average,
        None if accumulator is None else st.accumulators[i], rows)
    return (st.variables[i], slots, grad, hyper, grad_scale,
            None if average is None else ema_momentums(average.dtype),
            predicate, value)


def update_variable(variable, slots, grad, hyper, grad_scale=None, ema=None,
                    predicate=None, accumulator=None):
    """One variable's weight decay, Adam and EMA, as TF ops.

    Args:
        variable: its copy.
        slots: its momentum, velocity, velocity hat (AMSGrad) and average
            (EMA), as `slots.SeparateSlots` or `slots.PackedSlots` (read
            once, written once).
        grad: its gradient, in the compute dtype.
        hyper: `(alpha, one_minus_beta_1, one_minus_beta_2, epsilon,
            decay or None)` of `update.adamw_update`.
        grad_scale: the global clip's factor, or None.
        ema: `update.ema_momentum` for the average, or None.
        predicate: a bool scalar, whether to write new values (None: do).
        accumulator: the value its accumulator is set to (whatever
            `predicate`), or None to leave it alone.
    """
    # Each variable is read once (every use of a tf.Variable in an op would
    # add a read) and written without reading it back.
    if grad_scale is not None:
        grad = grad * tf.cast(grad_scale, grad.dtype)
    old_value = variable.read_value()
    read, (m, v, v_hat, average) = slots.read()
    alpha, one_minus_beta_1, one_minus_beta_2, epsilon, decay = hyper
    new = update.adam_moments(
        grad, m, v, v_hat, one_minus_beta_1=one_minus_beta_1,
        one_minus_beta_2=one_minus_beta_2)
    # The variable's step reads the slots as written (the new values, or
    # with `predicate` False the old ones, and then the step is discarded):
    # from the unselected values, XLA would recompute them in the
    # variable's kernel from the old slots, which the slots' own kernels
    # overwrite in place, and copy every slot first.
    written = [None if n is None else _select(predicate, n, o)
               for n, o in zip(new, (m, v, v_hat))]
    value = update.adamw_variable(
        tf.cast(old_value, grad.dtype), written[0],
        written[1] if v_hat is None else written[2], alpha=alpha,
        epsilon=epsilon, decay=decay)
    value = _select(predicate, tf.cast(value, variable.dtype), old_value)
    if average is not None:
        average = _select(predicate, update.ema_update(
            average, tf.cast(value, average.dtype), ema), average)
    slots.write(read, written + [average, accumulator])
    variable.assign(value, read_value=False)


def _select(predicate, new, old):
    """`new`, or (`predicate` False) `old`: a select, not a branch."""
    return new if predicate is None else tf.where(predicate, new, old)


def moving_average(step, averaged=(), predicate=None):
    """Step 8: the EMA of the variables `decay_and_adam` did not average
    (those without a gradient this call), then the periodic overwrite.

    Args:
        step: the `Step`.
        averaged: indices whose average `decay_and_adam` moved.
        predicate: `apply_update`'s (the averages move and the overwrite
            is due only if it holds).
    """
    if not averages(step.options):
        return
    st, options = step.state, step.options
    overwrites = step.table.overwrites
    ema_momentums = _ema_momentums(step)
    for i, variable in enumerate(st.variables):
        # An overwritten variable is not averaged (Keras keeps no average
        # for it).
        if i in overwrites or i in averaged:
            continue
        average = st.averages[i]
        old = average.read_value()
        _assign(average, update.ema_update(
            old, tf.cast(variable.read_value(), average.dtype),
            ema_momentums(average.dtype)), predicate, old)
    if options.ema_overwrite_frequency:
        due = tf.equal(
            (st.iterations + 1) % options.ema_overwrite_frequency, 0)
        if predicate is not None:
            due = tf.logical_and(due, predicate)
        kept = [i for i in range(len(st.variables)) if i not in overwrites]
        tf.cond(due,
                lambda: _done(state_lib.write_averages(
                    [st.variables[i] for i in kept],
                    [st.averages[i] for i in kept])),
                lambda: tf.constant(False))


def constrain(step, grads, predicate=None):
    """Step 9: each variable updated here that has a constraint is set to
    its projection, `constraint(value)` (after the EMA, as in Keras's
    `apply`), on this replica's copy (when `predicate` holds)."""
    for i in step.table.constrained:
        if i in grads:
            variable = step.state.variables[i]
            old = variable.read_value()
            projected = step.table.constraints[i](old)
            _assign(variable, tf.cast(projected, variable.dtype), predicate,
                    old)
