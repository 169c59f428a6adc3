"""The optimizer's state: variables, slots, the weight-decay mask, a step's view.

`AdamW` holds the tracked state (its attribute names are the checkpoint
keys, see docs/semantics.md, "Checkpoint view"); this module makes it and
describes it:

- `counter`: the optimizer's own counters (hyperparameters:
  `tf_adamw.hyperparameters`).
- `VariableTable`: the model variables an optimizer was built with, with
  what the step needs per variable (decay or not, compute dtype, shape,
  constraint, overwritten with its gradient or not), and the checks that
  align a call's gradients with them.
- `DecayMask`: which variables are excluded from weight decay.
- `create_slots`: the per-variable slots, named as Keras names them, in
  either layout (`tf_adamw.slots`).
- `StepState`: one replica's copies of everything a step reads or writes.
- `write_averages`: the one way EMA averages are written into variables.
"""

import functools
import re
import typing

import tensorflow as tf

from tf_adamw import distribute
from tf_adamw import kernels
from tf_adamw import options as options_lib
from tf_adamw import slots as slots_lib
from tf_adamw import update

SLOT_KINDS = ("momentum", "velocity", "velocity_hat", "average",
              "accumulator")
# The tracked list of each slot kind on `AdamW` (checkpoint keys).
SLOT_ATTRIBUTES = {"momentum": "_momentums", "velocity": "_velocities",
                   "velocity_hat": "_velocity_hats", "average": "_averages",
                   "accumulator": "_accumulators"}


def unwrap(variable):
    """The `tf.Variable` behind a user variable (Keras 3 wraps its own)."""
    if isinstance(variable, tf.Variable):
        return variable
    inner = getattr(variable, "value", None)
    if isinstance(inner, tf.Variable):
        return inner
    raise TypeError(
        "AdamW updates `tf.Variable`s (or Keras variables). Received "
        f"{variable!r} of type {type(variable).__name__}.")


def var_key(variable):
    """A key identifying a variable, the same for every replica's copy."""
    variable = unwrap(variable)
    if not isinstance(variable, tf.distribute.DistributedValues):
        container = getattr(variable, "_distributed_container", None)
        if container is None:
            # ResourceVariables of a strategy carry it on their handle.
            container = getattr(getattr(variable, "handle", None),
                                "_distributed_container", None)
        if container is not None:
            variable = container()
    return variable._unique_id  # pylint: disable=protected-access


def var_name(variable):
    """The name Keras matches exclusion patterns against."""
    return str(getattr(variable, "path", None) or variable.name)


def slot_name(variable, kind):
    """Keras's slot variable name, e.g. `dense_kernel_momentum`."""
    base = re.sub(r":\d+$", "", var_name(variable))
    return f"{base.replace('/', '_').replace(':', '_')}_{kind}"


def slot_kinds(options):
    """The slot kinds an optimizer with `options` keeps, in order."""
    kinds = ["momentum", "velocity"]
    if options.amsgrad:
        kinds.append("velocity_hat")
    if options.use_ema:
        kinds.append("average")
    if options.gradient_accumulation_steps:
        kinds.append("accumulator")
    return kinds


# ----------------------------------------------------------------------------
# The optimizer's own variables.


def counter(prefix, name, initial_value=0, dtype=tf.int64):
    """A counter variable (int64 unless `dtype`), created where the
    caller's scope says."""
    # Aggregation NONE everywhere: every replica writes the same value to its
    # own copy, so no update needs a collective (and TPUs cannot all-reduce
    # int64).
    return tf.Variable(initial_value, dtype=dtype, trainable=False,
                       name=f"{prefix}/{name}",
                       aggregation=tf.VariableAggregation.NONE)


# The optimizer's counters: tracked attribute (its checkpoint key) ->
# `(variable name, in use for these options, initial value, dtype)`. The
# dynamic loss scale's names are Keras LossScaleOptimizer's.
COUNTERS = {
    "_iterations": ("iteration", lambda o: True, 0, tf.int64),
    "_accumulation_count": (
        "accumulation_count", lambda o: bool(o.gradient_accumulation_steps),
        0, tf.int64),
    "_skipped_steps": (
        "skipped_steps", lambda o: o.skip_nonfinite_gradients, 0, tf.int64),
    "_dynamic_scale": (
        "dynamic_scale", lambda o: o.dynamic_loss_scale,
        lambda o: o.initial_scale, tf.float32),
    "_scale_step_counter": (
        "step_counter", lambda o: o.dynamic_loss_scale, 0, tf.int64),
}


def create_counters(options):
    """`{attribute: variable}` of the counters `options` use (`COUNTERS`),
    created where the caller's scope says."""
    out = {}
    for attribute, (name, in_use, initial, dtype) in COUNTERS.items():
        if in_use(options):
            out[attribute] = counter(
                options.name, name,
                initial(options) if callable(initial) else initial, dtype)
    return out


# ----------------------------------------------------------------------------
# The model variables.


class DecayMask:
    """Which variables weight decay skips: by variable, or by name pattern.

    Keeps the arguments it was given (`var_list`, `var_names`): a copy of
    the optimizer (pickle, `copy.deepcopy`) carries them.
    """

    def __init__(self, var_list=None, var_names=None):
        self._pattern = options_lib.check_patterns(var_names)
        self.var_list = list(var_list or [])
        self.var_names = list(var_names or [])
        self._keys = {var_key(v) for v in self.var_list}

    def decays(self, variable):
        """True when weight decay applies to `variable`."""
        if var_key(variable) in self._keys:
            return False
        if self._pattern is not None:
            names = {var_name(variable), str(variable.name),
                     str(unwrap(variable).name)}
            if any(self._pattern.search(n) for n in names):
                return False
        return True


class VariableTable:
    """The model variables an optimizer was built with, and their facts."""

    def __init__(self, var_list, decay_mask):
        """Checks `var_list` (floating point, no duplicates) and indexes it.

        Raises:
            ValueError: empty, an integer variable, or a duplicate.
        """
        if not var_list:
            raise ValueError("Argument `var_list` must not be empty.")
        self.var_list = list(var_list)  # as the user passed them
        self.tf_vars = [unwrap(v) for v in self.var_list]
        self.index = {}  # var_key -> position
        for i, (variable, tf_var) in enumerate(zip(self.var_list,
                                                   self.tf_vars)):
            if not tf_var.dtype.is_floating:
                raise ValueError(
                    "AdamW can only update floating-point variables. "
                    f"Variable {var_name(variable)!r} has dtype "
                    f"{tf_var.dtype.name}.")
            key = var_key(variable)
            if key in self.index:
                raise ValueError(
                    f"Variable {var_name(variable)!r} appears twice in "
                    "`var_list`.")
            self.index[key] = i
        self.use_decay = [decay_mask.decays(v) for v in self.var_list]
        # The positions of the variables set to their gradient instead of
        # stepped (Keras's float8 layers mark them; docs/semantics.md,
        # "Variables overwritten with their gradient").
        self.overwrites = frozenset(
            i for i, v in enumerate(self.var_list)
            if getattr(v, "overwrite_with_gradient", False))
        # The projection that ends each applied update (step 9), read here
        # once: a Keras variable's `constraint`, or a tf.Variable's (tf_keras
        # layers set it); None where there is none and for an overwritten
        # variable (Keras skips those).
        self.constraints = [
            None if i in self.overwrites else getattr(v, "constraint", None)
            for i, v in enumerate(self.var_list)]
        self.constrained = [i for i, c in enumerate(self.constraints)
                            if c is not None]
        self.compute_dtypes = [update.compute_dtype(v.dtype)
                               for v in self.tf_vars]
        # Shape tuples (None if not fully known), compared in bulk per call.
        self.shapes = [tuple(v.shape.as_list()) if v.shape.is_fully_defined()
                       else None for v in self.tf_vars]

    def __len__(self):
        return len(self.var_list)

    def keys(self):
        """The variables' keys, in order."""
        return [var_key(v) for v in self.var_list]

    def index_of(self, variable):
        """The position of `variable`, or a ValueError naming it."""
        key = var_key(variable)
        if key not in self.index:
            raise ValueError(
                f"Unknown variable: {var_name(variable)!r}. This optimizer "
                "can only be called for the variables it was built with "
                f"({len(self.var_list)} variables). When working with a new "
                "set of variables, create a new optimizer.")
        return self.index[key]

    def is_built_list(self, variables):
        """True when `variables` is exactly the built list, in order."""
        return len(variables) == len(self.var_list) and all(
            a is b for a, b in zip(variables, self.var_list))

    def matches(self, grads):
        """True when `grads` are dense tensors of exactly the built shapes and
        compute dtypes, one per variable: the common case, checked in bulk
        (eager steps of many small variables are bound by this Python;
        DTypes are interned, so the list comparison is by identity)."""
        try:
            return ([g._shape_tuple() for g in grads] == self.shapes  # pylint: disable=protected-access
                    and [g.dtype for g in grads] == self.compute_dtypes)
        except AttributeError:  # None, IndexedSlices, per-replica values
            return False

    def align(self, grads, variables):
        """`grads` placed at their variables' positions (None elsewhere).

        Raises:
            ValueError: an unknown variable, a variable listed twice, a
                gradient of the wrong shape or a non-float dtype, or no
                gradient at all.
        """
        indices = (range(len(variables)) if self.is_built_list(variables)
                   else self.positions(variables))
        full = [None] * len(self.var_list)
        missing = []
        for grad, variable, i in zip(grads, variables, indices):
            if grad is None:
                missing.append(var_name(variable))
            else:
                full[i] = self.checked_gradient(grad, variable, i)
        if all(g is None for g in full):
            raise ValueError(
                "No gradients provided for any variable: "
                f"{[var_name(v) for v in variables]}.")
        return full, missing

    def positions(self, variables):
        """The positions of `variables` in the built list.

        Raises:
            ValueError: an unknown variable, or one listed twice (its
                gradients would share one slot of the aligned list, and all
                but the last would be dropped).
        """
        positions = [self.index_of(v) for v in variables]
        if len(set(positions)) < len(positions):
            seen = set()
            for variable, i in zip(variables, positions):
                if i in seen:
                    raise ValueError(
                        f"Variable {var_name(variable)!r} appears twice in "
                        "one call: pass one gradient per variable (add its "
                        "gradients first).")
                seen.add(i)
        return positions

    def checked_gradient(self, grad, variable, i):
        """`grad` for variable `i`, checked for shape and dtype.

        Shapes are checked statically. What only the values can tell is
        checked at run time, and the gradient returned depends on the
        check (so the step, which waits for all its gradients, writes
        nothing when one fails): the shape of a gradient whose static shape
        is not fully known (a function traced for unknown shapes; inside
        XLA this is checked when compiling) and a sparse gradient's indices
        (`checked_slices`).
        """
        shape_tuple = getattr(grad, "_shape_tuple", None)
        if shape_tuple is not None and (
                shape_tuple() == self.shapes[i] and grad.dtype.is_floating):
            return grad  # the common case, without building TensorShapes
        if distribute.is_distributed(grad):
            # Per-replica gradients (from `strategy.run`) applied in a
            # cross-replica context: check each replica's component.
            checked = [self.checked_gradient(component, variable, i)
                       for component in grad.values]
            if all(a is b for a, b in zip(checked, grad.values)):
                return grad
            return type(grad)(tuple(checked))  # e.g. PerReplica(values)
        shape = self.tf_vars[i].shape
        if isinstance(grad, tf.IndexedSlices):
            got = grad.values.shape
            ok = got.rank is None or got[1:].is_compatible_with(shape[1:])
        else:
            if not tf.is_tensor(grad):
                grad = tf.convert_to_tensor(grad)
            got = grad.shape
            ok = got.is_compatible_with(shape)
        if not ok:
            raise ValueError(
                f"Gradient shape {got} does not match the shape {shape} of "
                f"variable {var_name(variable)!r}.")
        if not grad.dtype.is_floating:
            raise ValueError(
                f"The gradient of variable {var_name(variable)!r} has dtype "
                f"{grad.dtype.name}; it must be floating point.")
        if isinstance(grad, tf.IndexedSlices):
            return checked_slices(grad, shape, var_name(variable))
        if not got.is_fully_defined():
            # Compatible is not equal: a [1, 3] gradient would broadcast
            # onto a [2, 3] variable, a [3, 2] one fill it in flat order.
            return tf.ensure_shape(grad, shape)
        return grad


def checked_slices(grad, shape, name):
    """`grad`, sparse gradient of variable `name` of `shape`, with its
    indices checked to lie in `[0, shape[0])` before anything uses them.

    `densify` would drop the others silently (XLA drops indices past the
    end too). Eagerly the check raises at once. In a graph the returned
    indices depend on an assertion, so the step (which waits for its
    gradients) runs only if it passes. Inside XLA assertions are dropped:
    there `pipeline.run` skips the call instead. Values of unknown trailing
    shape are checked against `shape[1:]` at run time.
    """
    rows = shape[0]
    if rows is None:  # `densify` needs it; a variable always has it
        return grad
    # Only a string as data: an Assert with tensor data becomes a
    # conditional (a function call per step) around it.
    check = tf.debugging.Assert(
        update.indices_in_range(grad.indices, rows),
        [f"The sparse gradient of variable `{name}` has an index outside "
         f"[0, {rows})."])
    if tf.executing_eagerly():
        return grad  # the assertion has raised if it failed
    values = grad.values
    if not values.shape[1:].is_fully_defined():
        values = tf.ensure_shape(
            values, tf.TensorShape([None]).concatenate(shape[1:]))
    with tf.control_dependencies([check]):
        indices = tf.identity(grad.indices)
    return tf.IndexedSlices(values, indices, grad.dense_shape)


def expected_slots(table, options):
    """`{kind: {index: (slot variable name, shape)}}` that `create_slots`
    makes for `table`: what a checkpoint's slots are checked against."""
    return {kind: {i: (f"{options.name}/{slot_name(v, kind)}",
                       v.shape.as_list())
                   for i, v in enumerate(table.tf_vars)}
            for kind in slot_kinds(options)}


def split_pairs(grads_and_vars):
    """`(grads, variables)` lists from `(gradient, variable)` pairs.

    Raises:
        TypeError: an item is not a pair.
    """
    pairs = list(grads_and_vars)
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(
                "Argument `grads_and_vars` must be a list of "
                f"(gradient, variable) pairs. Received an item {pair!r}.")
    return [g for g, _ in pairs], [v for _, v in pairs]


def create_slots(table, options, strategy):
    """Zero slots for every variable of `table`, in `options.slot_layout`.

    Each slot is colocated with its variable (every replica gets a copy under
    a mirroring strategy) and has the variable's compute dtype.

    Returns:
        `({kind: [slot, ...]}, stores)`: the slots are variables, or
        `slots.SlotView`s of the packed `stores` (one per variable; empty
        for the separate layout).
    """
    kinds = slot_kinds(options)
    out = {kind: [] for kind in SLOT_KINDS}
    stores = []
    zeros = _shared_zeros()
    with tf.init_scope():
        for variable, tf_var, dtype in zip(table.var_list, table.tf_vars,
                                           table.compute_dtypes):
            with strategy.extended.colocate_vars_with(tf_var):
                like_var = functools.partial(zeros, device=tf_var.device)
                if options.slot_layout == "packed":
                    store, views = slots_lib.create_packed(
                        variable, tf_var, kinds, dtype, options.name,
                        slot_name, like_var)
                    stores.append(store)
                    for kind in kinds:
                        out[kind].append(views[kind])
                    continue
                for kind in kinds:
                    out[kind].append(tf.Variable(
                        like_var(tf_var.shape, dtype), trainable=False,
                        name=f"{options.name}/{slot_name(variable, kind)}",
                        aggregation=tf.VariableAggregation.NONE))
    return out, stores


def _shared_zeros():
    """`zeros(shape, dtype, device)`: `tf.zeros(shape, dtype)`, one tensor
    per shape and dtype for the slots of variables on `device`.

    Slots of equal shape start from one tensor: a model repeats few shapes,
    and a `tf.zeros` per slot was a fifth of `build()` on 1,000 variables.
    Variables may share their initial buffer: every write to a variable
    (TF's ops, XLA's, the fused kernel's `Writable`) copies a buffer that
    another holder still references before it writes.
    """
    cache = {}

    def zeros(shape, dtype, device):
        key = (tuple(tf.TensorShape(shape).as_list()), tf.as_dtype(dtype),
               device)
        if key not in cache:
            cache[key] = tf.zeros(shape, dtype)
        return cache[key]

    return zeros


class StepState(typing.NamedTuple):
    """One replica's (or the only device's) copy of what a step touches.

    Lists are aligned with the built variables; a list of a slot kind not in
    use is empty, and a counter not in use is None.
    """
    variables: list
    momentums: list
    velocities: list
    velocity_hats: list
    averages: list
    accumulators: list
    iterations: tf.Variable
    accumulation_count: typing.Optional[tf.Variable]
    skipped_steps: typing.Optional[tf.Variable]
    # Dynamic loss scaling: the scale and the finite calls since it last
    # changed (None without `loss_scale="dynamic"`).
    dynamic_scale: typing.Optional[tf.Variable] = None
    scale_step_counter: typing.Optional[tf.Variable] = None


def step_state(tf_vars, slots, counters, local=distribute.local):
    """A `StepState` of `local` copies.

    Args:
        tf_vars: the model variables.
        slots: `{kind: [variable, ...]}` for every kind in `SLOT_KINDS`.
        counters: `(iterations, accumulation_count, skipped_steps,
            dynamic_scale, scale_step_counter)`, all but the first possibly
            None.
        local: maps a (possibly mirrored) variable to the copy to use.
    """
    iterations, *optional = counters
    accumulation_count, skipped_steps, dynamic_scale, step_counter = [
        None if c is None else local(c) for c in optional]

    def local_slots(kind):
        return [slots_lib.local_slot(s, local) for s in slots[kind]]

    return StepState(
        variables=[local(v) for v in tf_vars],
        momentums=local_slots("momentum"),
        velocities=local_slots("velocity"),
        velocity_hats=local_slots("velocity_hat"),
        averages=local_slots("average"),
        accumulators=local_slots("accumulator"),
        iterations=local(iterations),
        accumulation_count=accumulation_count, skipped_steps=skipped_steps,
        dynamic_scale=dynamic_scale, scale_step_counter=step_counter)


def write_averages(variables, averages):
    """`variable = average` for each pair, cast to the variable's dtype.

    The one way averages reach variables: the periodic overwrite inside a
    step, `finalize_variable_values` and `tf_adamw.ema_weights`. Averages of
    16-bit variables are float32.
    """
    for variable, average in zip(variables, averages):
        variable.assign(tf.cast(average, variable.dtype))


def slot_tables(momentums, velocities, velocity_hats, averages=(),
                accumulators=()):
    """The fused kernel's slot table for each device holding slots.

    The kernel reaches the slots through one table per device rather than
    one handle per slot: a `tf.function` running the step then has one input
    for all slots, and TF's cost per function input (~1.4 us per call) was
    most of a step on 200 small variables. Make it under `tf.init_scope()`.

    Returns:
        `{device: table}`.
    """
    per_device = {}
    packed_rows = 0
    for kind, slots in (("momentums", momentums), ("velocities", velocities),
                        ("velocity_hats", velocity_hats),
                        ("averages", averages),
                        ("accumulators", accumulators)):
        for slot in slots:
            for copy in slots_lib.copies(slot):
                if isinstance(copy, slots_lib.SlotView):
                    # Packed: the table holds the variable of the rows.
                    packed_rows = int(copy.store.shape[0])
                    copy = copy.store
                per_device.setdefault(copy.device, {}).setdefault(
                    kind, []).append(copy)
    tables = {}
    for device, kinds in per_device.items():
        with tf.device(device):
            tables[device] = kernels.slot_table(
                kinds["momentums"], kinds["velocities"],
                kinds.get("velocity_hats", []), kinds.get("averages", []),
                kinds.get("accumulators", []), packed_rows=packed_rows)
    return tables
