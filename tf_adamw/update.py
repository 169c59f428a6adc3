"""The AdamW update as pure functions: tensors in, tensors out.

Nothing here creates or assigns a variable or knows about `tf.distribute`;
`tf_adamw.pipeline` runs these against the state. The formulas are those of
docs/semantics.md, "Formulas". Every function
follows the operation order of Keras 3 (`keras/src/optimizers/adam.py` and
`base_optimizer.py`) so float32 results agree with Keras to rounding.
"""

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2
# Whether a graph is traced for XLA (`jit_compile`, a TPU replica): no public
# API says so.
from tensorflow.python.ops import control_flow_util


def compute_dtype(dtype):
    """The dtype the update math and slots use for a variable of `dtype`.

    16-bit floats are promoted to float32: in bfloat16 `beta_2=0.999` rounds
    to 1 (so Adam never moves) and in float16 `epsilon=1e-7` underflows.
    """
    dtype = tf.as_dtype(dtype)
    if dtype in (tf.float16, tf.bfloat16):
        return tf.float32
    return dtype


def densify(grad, shape):
    """Returns `grad` as a dense tensor of `shape`.

    `IndexedSlices` are scattered with duplicate indices summed, which is
    exactly the dense gradient of a gather. Indices outside `[0, shape[0])`
    are not checked here (see `indices_in_range`).
    """
    if isinstance(grad, tf.IndexedSlices):
        return tf.math.unsorted_segment_sum(
            grad.values, grad.indices, num_segments=shape[0]
        )
    return tf.convert_to_tensor(grad)


def indices_in_range(indices, rows):
    """A scalar bool: every entry of `indices` is in `[0, rows)`.

    `unsorted_segment_sum` (`densify`) drops a negative index silently on
    every device and, compiled by XLA, an index `>= rows` too: a sparse
    gradient is checked with this first.

    Args:
        indices: an int32 or int64 tensor.
        rows: a Python int.
    """
    rows = tf.constant(rows, indices.dtype)
    return tf.reduce_all(tf.logical_and(indices >= 0, indices < rows))


def traced_for_xla():
    """Whether the code running now is being traced for XLA: inside a
    `tf.function(jit_compile=True)` or a TPU replica, or a function nested
    in one. Never when eager."""
    return not tf.executing_eagerly() and (
        control_flow_util.GraphOrParentsInXlaContext(
            tf.compat.v1.get_default_graph()))


def sqrt(x):
    """`tf.sqrt(x)`: IEEE's correctly rounded square root, so each form
    here rounds as `tf.sqrt` does (and as the fused kernel's `sqrtps`).

    Traced for XLA (half, float and double) it is TF's
    `_UnaryOpsComposition` of one `Sqrt`, which lowers to the same HLO
    `sqrt`: tf2xla translates `Sqrt` itself through an MLIR pipeline built
    anew for every node (~4.6 ms each here: 4.6 s of a 1,000-variable
    step's first call), this op directly (~0.05 ms; benchmarks/README.md,
    "Where tf2xla's time went"). Eager and in plain graphs it is `tf.sqrt`.
    """
    if not traced_for_xla():
        return tf.sqrt(x)
    x = tf.convert_to_tensor(x)
    if x.dtype not in (tf.float16, tf.float32, tf.float64):
        return tf.sqrt(x)
    # pylint: disable-next=protected-access
    return tf.compat.v1.get_default_graph()._create_op_internal(
        "_UnaryOpsComposition", [x], [x.dtype], name="Sqrt",
        attrs={"T": attr_value_pb2.AttrValue(type=x.dtype.as_datatype_enum),
               "op_names": attr_value_pb2.AttrValue(
                   list=attr_value_pb2.AttrValue.ListValue(s=[b"Sqrt"]))},
    ).outputs[0]


def sum_of_squares(grads, flatten=None):
    """The sum of `g * g` over every element of every tensor in `grads`.

    The tensors of each dtype are summed together in that dtype and the
    sums are added in the widest of those dtypes (`tf.add_n` refuses mixed
    dtypes: float32 and float64 variables together). Non-finite when an
    element is NaN or Inf or when squares (or their sum) overflow: the
    global norm needs it finite, and so does the step (`v` holds `g * g`).

    Args:
        grads: a list of tensors.
        flatten: a function of a list of tensors of one dtype that returns
            their elements as one vector, exactly as `flat_concat` here
            does (the fused kernel's one-op `flat_concat`); None for that.
    """
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    flatten = flat_concat if flatten is None else flatten
    # One reduction per dtype over the concatenated gradients, instead of a
    # square and a sum per gradient (on 1,000 variables that is thousands of
    # ops fewer to trace, optimise and compile).
    sums = [tf.reduce_sum(tf.square(
        flatten(group) if len(group) > 1 else group[0]))
        for group in by_dtype.values()]
    if len(sums) == 1:
        return sums[0]
    widest = max((s.dtype for s in sums), key=lambda dtype: dtype.size)
    return tf.add_n([s if s.dtype == widest else tf.cast(s, widest)
                     for s in sums])


def flat_concat(tensors):
    """The elements of `tensors` (one dtype) in row-major order, as one
    vector."""
    # Each reshape has its own shape constant: one constant shared by 4,000
    # reshapes made grappler's first run 4x slower (17.5 s against 4.0 s).
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)


def global_norm(grads, flatten=None):
    """The L2 norm of all `grads` taken together (Keras's `global_norm`),
    in the widest of their dtypes; `flatten` as in `sum_of_squares`."""
    return tf.sqrt(sum_of_squares(grads, flatten))


def clip_by_norm(grad, clipnorm):
    """Clips one tensor to L2 norm `clipnorm`: `tf.clip_by_norm`'s
    operations (Keras's too), with `sqrt` above for its square root."""
    grad = tf.convert_to_tensor(grad)
    clipnorm = max(clipnorm, 0)
    l2sum = tf.reduce_sum(grad * grad, keepdims=True)
    positive = l2sum > 0
    # Two selects, so that a zero gradient's norm has no NaN derivative
    # (as in TF's).
    l2sum_safe = tf.where(positive, l2sum, tf.ones_like(l2sum))
    l2norm = tf.where(positive, sqrt(l2sum_safe), l2sum)
    return (grad * clipnorm) / tf.maximum(l2norm, clipnorm)


def clip_by_global_norm(grads, clipnorm, norm=None):
    """Scales `grads` so that their global norm is at most `clipnorm`.

    Keras's formula: a non-finite norm turns every gradient into NaN rather
    than silently applying an unclipped step.

    Args:
        grads: list of tensors.
        clipnorm: the largest global norm.
        norm: `global_norm(grads)` if already computed (the finite guard
            computes it), else None.

    Returns:
        `(clipped_grads, norm)`.
    """
    if norm is None:
        norm = global_norm(grads)
    scale = global_clip_scale(norm, clipnorm)
    return [g * tf.cast(scale, g.dtype) for g in grads], norm


def global_clip_scale(norm, clipnorm):
    """The factor `clip_by_global_norm` multiplies every gradient by (the
    fused kernel takes it as an input): `min(1, clipnorm / norm)`, NaN for
    a non-finite norm."""
    clipnorm = tf.cast(clipnorm, norm.dtype)
    scale_for_finite = clipnorm * tf.minimum(1.0 / norm, 1.0 / clipnorm)
    return scale_for_finite + (norm - norm)


def clip_by_value(grad, clipvalue):
    """Clips every element of `grad` into `[-clipvalue, clipvalue]`."""
    return tf.clip_by_value(grad, -clipvalue, clipvalue)


def clip(grads, rule, norm=None):
    """Clips a list of gradients by `rule` (`Options.clip_rule()`).

    Args:
        grads: list of dense tensors.
        rule: `("clipnorm" | "global_clipnorm" | "clipvalue", value)` or
            None (no clipping).
        norm: `global_norm(grads)` if already computed, else None (used by
            `global_clipnorm` only).

    Returns:
        The clipped list (`grads` itself when `rule` is None).
    """
    if rule is None:
        return grads
    kind, value = rule
    if kind == "clipnorm":
        return [clip_by_norm(g, value) for g in grads]
    if kind == "global_clipnorm":
        return clip_by_global_norm(grads, value, norm)[0]
    return [clip_by_value(g, value) for g in grads]


def step_scalars(hyper, iterations, dtype):
    """The scalars of one step in `dtype`, computed once per step.

    Args:
        hyper: scalar tensors `lr`, `weight_decay`, `beta_1`, `beta_2`,
            `epsilon` (the values for this step).
        iterations: the applied updates before this one (int64).
        dtype: the compute dtype to cast to.

    Returns:
        `hyper` cast to `dtype`, plus `alpha` (`step_size`), `decay`
        (`weight_decay * lr`), `one_minus_beta_1` and `one_minus_beta_2`.
    """
    s = {k: tf.cast(v, dtype) for k, v in hyper.items()}
    step = tf.cast(iterations + 1, dtype)
    s["alpha"] = step_size(s["lr"], s["beta_1"], s["beta_2"], step)
    s["decay"] = s["weight_decay"] * s["lr"]
    s["one_minus_beta_1"] = 1 - s["beta_1"]
    s["one_minus_beta_2"] = 1 - s["beta_2"]
    return s


def step_size(learning_rate, beta_1, beta_2, step):
    """Adam's bias-corrected step size ("epsilon hat" form).

    Args:
        learning_rate, beta_1, beta_2: scalars in the compute dtype.
        step: the 1-based number of this update, same dtype.

    Returns:
        `learning_rate * sqrt(1 - beta_2**step) / (1 - beta_1**step)`.
    """
    beta_1_power = tf.pow(beta_1, step)
    beta_2_power = tf.pow(beta_2, step)
    return learning_rate * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)


def adamw_update(
    variable,
    grad,
    momentum,
    velocity,
    velocity_hat,
    *,
    alpha,
    one_minus_beta_1,
    one_minus_beta_2,
    epsilon,
    decay,
):
    """One AdamW step for one tensor, in the compute dtype.

    Args:
        variable: current value of the variable.
        grad: its (unscaled, clipped) gradient.
        momentum, velocity: the first and second moment estimates.
        velocity_hat: AMSGrad's running maximum of `velocity`, or None.
        alpha: `step_size(...)` for this step.
        one_minus_beta_1, one_minus_beta_2: `1 - beta`, computed once per
            step rather than once per variable.
        epsilon: scalar.
        decay: `weight_decay * learning_rate`, or None when this variable is
            excluded from weight decay.

    Returns:
        `(variable, momentum, velocity, velocity_hat)` after the step;
        `velocity_hat` is None when it was None.
    """
    momentum, velocity, velocity_hat = adam_moments(
        grad, momentum, velocity, velocity_hat,
        one_minus_beta_1=one_minus_beta_1, one_minus_beta_2=one_minus_beta_2)
    variable = adamw_variable(
        variable, momentum,
        velocity if velocity_hat is None else velocity_hat, alpha=alpha,
        epsilon=epsilon, decay=decay)
    return variable, momentum, velocity, velocity_hat


def adam_moments(grad, momentum, velocity, velocity_hat, *,
                 one_minus_beta_1, one_minus_beta_2):
    """The first half of `adamw_update`: `(momentum, velocity,
    velocity_hat)` after the step (`velocity_hat` None when it was None)."""
    momentum = momentum + (grad - momentum) * one_minus_beta_1
    velocity = velocity + (tf.square(grad) - velocity) * one_minus_beta_2
    if velocity_hat is not None:
        velocity_hat = tf.maximum(velocity_hat, velocity)
    return momentum, velocity, velocity_hat


def adamw_variable(variable, momentum, denominator_velocity, *, alpha,
                   epsilon, decay):
    """The second half of `adamw_update`: the variable after the step, from
    the new `momentum` and `denominator_velocity` (the new velocity, or
    AMSGrad's new maximum)."""
    if decay is not None:
        # Decoupled weight decay, applied before the Adam step (Keras order:
        # `variable - variable * weight_decay * learning_rate`).
        variable = variable - variable * decay
    return variable - (momentum * alpha) / (
        sqrt(denominator_velocity) + epsilon)


def ema_momentum(ema_momentum_option, first_update, dtype):
    """`(momentum, 1 - momentum)` of this applied update's EMA, in `dtype`.

    On the first applied update the momentum is zero, so the average
    becomes a copy of the variable (Keras's rule).
    """
    momentum = tf.cast(tf.logical_not(first_update), dtype) * tf.cast(
        ema_momentum_option, dtype)
    return momentum, 1 - momentum


def ema_update(average, variable, momentum):
    """The moving average after one applied update, with `momentum` of
    `ema_momentum` (the fused kernel does the same operations)."""
    momentum, one_minus_momentum = momentum
    return momentum * average + one_minus_momentum * variable


def scale_loss(loss, scale, promote=False):
    """`loss * scale` (`AdamW.scale_loss`); `loss` itself when `scale` is
    None.

    Args:
        loss: a tensor, or a Python or NumPy number.
        scale: a number, a float32 variable, or None.
        promote: multiply a float16 or bfloat16 `loss` in float32 (and return
            float32), as Keras's type promotion does: a dynamic scale of
            2**16 or more overflows float16.
    """
    if scale is None:
        return loss
    loss = tf.convert_to_tensor(loss)
    if promote and loss.dtype in (tf.float16, tf.bfloat16):
        loss = tf.cast(loss, tf.float32)
    return loss * tf.cast(scale, loss.dtype)
