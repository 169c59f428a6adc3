"""The fused AdamW kernel's ops, as the optimizer calls them.

Each wrapper runs an op of the library `tf_adamw.kernels.loader` loads; it
raises RuntimeError when the kernel is unavailable (check `load()` first).
"""

import tensorflow as tf

from tf_adamw.kernels import loader


def slot_table(momentums, velocities, velocity_hats, averages=(),
               accumulators=(), packed_rows=0):
    """A `TfAdamwSlotTable`: one device's slots, for `fused_apply`.

    Args:
        momentums, velocities: float32 resource variables, one of each per
            model variable, on one device (packed: the same variable in
            every list, see `packed_rows`).
        velocity_hats: `[]`, or AMSGrad's maxima, one per model variable.
        averages: `[]`, or the EMA averages, one per model variable: then
            `fused_apply` also moves the averages.
        accumulators: `[]`, or the gradient accumulators, one per model
            variable: then `fused_apply` applies their mean or adds to them.
        packed_rows: 0 for separate slot variables; `k` when each list
            holds, per model variable, its packed slots (`tf_adamw.slots`):
            one variable of `k` rows, the kinds given in the order above.

    Returns:
        A scalar resource tensor on that device (make it eagerly, under
        `tf.init_scope()`). It keeps the slot variables' storage alive and
        sees every later assignment to them.
    """
    return _loaded().tf_adamw_slot_table(
        momentums=[v.handle for v in momentums],
        velocities=[v.handle for v in velocities],
        velocity_hats=[v.handle for v in velocity_hats],
        averages=[v.handle for v in averages],
        accumulators=[v.handle for v in accumulators],
        packed_rows=packed_rows)


def fused_apply(variables, table, slot_indices, grads, *, alpha,
                one_minus_beta_1, one_minus_beta_2, epsilon, decay,
                use_decay, grad_scale=None, ema_momentum=None,
                ema_one_minus_momentum=None, apply=None, accumulate=None,
                accumulation_steps=None):
    """Runs the fused op: one AdamW step for all `variables`.

    Args:
        variables: resource variables (float32/bfloat16/float16).
        table: a `slot_table` on the variables' device.
        slot_indices: for each variable, the position of its slots in
            `table`.
        grads: float32 tensors, one per variable, of its shape (the op
            checks full shapes, not only element counts).
        alpha, one_minus_beta_1, one_minus_beta_2, epsilon, decay: float32
            scalars as in `tf_adamw.update.adamw_update`.
        use_decay: list of bools, one per variable.
        grad_scale: float32 scalar every gradient is multiplied by first
            (the global clip's factor), or None for 1.
        ema_momentum, ema_one_minus_momentum: float32 scalars of
            `update.ema_update`, when the table holds averages (else
            unused; None for 0 and 1).
        apply: a bool scalar: False checks the inputs and changes nothing
            (a skipped step); None for True. When `table` holds
            accumulators and `accumulation_steps` is given, an applying
            call applies the mean of the accumulated gradients and this
            call's, `(accumulator + grad) / accumulation_steps`, and zeroes
            the accumulators.
        accumulate: a bool scalar, with accumulators only: True (and
            `apply` False) adds the gradients to them and changes nothing
            else; None for False.
        accumulation_steps: float32 scalar, the number of calls one update
            averages; None (0) for a step that leaves the table's
            accumulators alone (it applies `grads` as they are).

    Returns:
        The op (graph mode; a group of them for more than
        `VARIABLES_PER_OP` variables) or None (eager).
    """
    scalars = dict(
        alpha=alpha, one_minus_beta_1=one_minus_beta_1,
        one_minus_beta_2=one_minus_beta_2, epsilon=epsilon, decay=decay,
        grad_scale=_or_constant(grad_scale, 1.0),
        ema_momentum=_or_constant(ema_momentum, 0.0),
        ema_one_minus_momentum=_or_constant(ema_one_minus_momentum, 1.0),
        accumulation_steps=_or_constant(accumulation_steps, 0.0))
    return _apply_in_chunks(
        variables, table, slot_indices, grads, list(use_decay), scalars,
        _or_constant(apply, True), _or_constant(accumulate, False))


def _apply_in_chunks(variables, table, slot_indices, grads, use_decay,
                     scalars, apply, accumulate):
    """`fused_apply` as one op per `VARIABLES_PER_OP` variables.

    Each op checks its inputs before it writes; the later chunks are
    checked first (a call that only checks), so that a bad input fails the
    step before any chunk writes. TF runs these ops in program order: they
    share the table.
    """
    op = _loaded().tf_adamw_fused_apply

    def run(chunk, apply, accumulate):
        return op(variables=[v.handle for v in variables[chunk]],
                  slot_table=table, grads=grads[chunk], apply=apply,
                  accumulate=accumulate, use_decay=use_decay[chunk],
                  slot_indices=list(slot_indices[chunk]),
                  first_variable=chunk.start, **scalars)

    chunks = _chunks(len(variables))
    no = _or_constant(None, False)
    ops = [run(chunk, no, no) for chunk in chunks[1:]]
    ops += [run(chunk, apply, accumulate) for chunk in chunks]
    if tf.executing_eagerly():
        return None
    return ops[0] if len(ops) == 1 else tf.group(*ops)


# Variables per fused op: TF's graph optimizer (grappler) spends time
# quadratic in the inputs of one node (4,000 variables in one op: a 4.7 s
# first call, against 2.6 s in ops of 512, and 0.6 s for 1,000 in one op).
VARIABLES_PER_OP = 512


def _chunks(n):
    """Slices cutting `range(n)` into `VARIABLES_PER_OP`-long runs."""
    return [slice(i, i + VARIABLES_PER_OP)
            for i in range(0, n, VARIABLES_PER_OP)]


def accumulated_means(table, slot_indices, grads, accumulation_steps,
                      compute):
    """The mean gradients an accumulating `fused_apply` would apply, as one
    flat float32 tensor: `(accumulator + grad) / accumulation_steps` for each
    variable, flattened and concatenated in order (empty when `compute` is
    False). Changes nothing.

    Args:
        table: a `slot_table` holding accumulators.
        slot_indices: as in `fused_apply`.
        grads: float32 tensors, one per variable.
        accumulation_steps: float32 scalar.
        compute: bool scalar.
    """
    means = [_loaded().tf_adamw_accumulated_means(
        slot_table=table, grads=grads[chunk],
        accumulation_steps=accumulation_steps, compute=compute,
        slot_indices=list(slot_indices[chunk]), first_variable=chunk.start)
        for chunk in _chunks(len(grads))]
    return means[0] if len(means) == 1 else tf.concat(means, 0)


def flat_concat(values):
    """`tf.concat([tf.reshape(v, [-1]) for v in values], 0)` as one op.

    The same values bit for bit (a copy); traced, one op for any number of
    `values` instead of a reshape and a shape constant each, which on
    1,000 variables was most of the fused step's tracing and graph
    optimisation beyond the kernel's (benchmarks/README.md).

    Args:
        values: a non-empty list of tensors of one dtype (float16,
            bfloat16, float32 or float64), on the CPU.
    """
    return _loaded().tf_adamw_flat_concat(values=list(values))


_EAGER_CONSTANTS = {}


def _or_constant(value, default):
    """`value`, or `default` (a float: float32; a bool) as a scalar tensor:
    made once when eager (an eager call converting a Python value costs
    microseconds per step)."""
    if value is not None:
        return value
    dtype = tf.bool if isinstance(default, bool) else tf.float32
    if not tf.executing_eagerly():
        return tf.constant(default, dtype)
    key = (default, dtype)
    if key not in _EAGER_CONSTANTS:
        with tf.init_scope():
            _EAGER_CONSTANTS[key] = tf.constant(default, dtype)
    return _EAGER_CONSTANTS[key]


def _loaded():
    module = loader.load()
    if module is None:
        raise RuntimeError(
            "The fused AdamW kernel is unavailable: "
            + str(loader.unavailable_reason()))
    return module
