"""The untracked half of an `AdamW`: what `build()` makes, and the step.

`tf.Module` tracks every trackable attribute. The model's variables, the
compiled step functions and the fused kernel's slot tables must not become
part of the optimizer's saved state, so they live in an `Engine`, a plain
object the optimizer holds. The engine reaches the tracked state (counters,
slot lists, hyperparameters) through the optimizer's own containers, which
it is given, so that checkpoints keep their keys.
"""

import contextlib
import threading
import warnings

import numpy as np
import tensorflow as tf

from tf_adamw import checkpoints
from tf_adamw import distribute
from tf_adamw import hyperparameters
from tf_adamw import pipeline
from tf_adamw import schedules
from tf_adamw import slots as slots_lib
from tf_adamw import state as state_lib
from tf_adamw import step_kinds
from tf_adamw import update


class Engine:
    """Builds an optimizer's slots and runs its steps.

    Args:
        options: the optimizer's `Options`.
        counters: `(iterations, accumulation_count, skipped_steps,
            dynamic_scale, scale_step_counter)`, all but the first None
            when not in use.
        slot_lists: `{kind: tracked list}` for every kind in
            `state.SLOT_KINDS`; `build` extends them.
        hyperparameter_values: a callable returning `{name: value}` of the
            hyperparameters now (a setter may replace one).
        own_hyperparameters: `{name: variable}` the optimizer created for
            numbers.
        given: `{name: the Python float given}` for those; a setter updates
            it (`get_config` reports the float, not its float32 rounding).
    """

    def __init__(self, options, counters, slot_lists, hyperparameter_values,
                 own_hyperparameters, given):
        self.options = options
        self.counters = counters
        self.slot_lists = slot_lists
        self.hyperparameter_values = hyperparameter_values
        self.own_hyperparameters = own_hyperparameters
        self.given = given
        # Checkpoint key -> the guard standing for that hyperparameter
        # variable in checkpoints (hyperparameters.CheckpointGuard).
        self.guards = {
            "_" + name: hyperparameters.CheckpointGuard(
                name, variable, self.restore_hyperparameter)
            for name, variable in own_hyperparameters.items()}
        self.restored_hyperparameters = {}  # name -> the checkpoint's value
        self.decay_mask = state_lib.DecayMask()
        self.runner = step_kinds.StepRunner(
            self.replica_step, self.step_scalars, options.jit_compile)
        self.table = None  # state.VariableTable, made by build()
        # Why the fused kernel cannot run these variables (None: it can).
        self.fused_blocker = "not built"
        self.slot_tables = {}  # device -> the kernel's slot table
        # The packed slot variables (`slot_layout="packed"`), one per model
        # variable; the tracked slot lists hold views of their rows.
        self.packed_stores = []
        self.packed_children = slots_lib.Stores(self.packed_stores)
        self.own_state = None  # the StepState of a one-device optimizer
        self.init_strategy = tf.distribute.get_strategy()
        self.strategy = None  # the strategy of build()
        self.distributed = False  # built under a non-default strategy
        # Eager calls from several threads take turns: a step reads
        # `iterations` (bias correction) before it increments it.
        self.lock = threading.RLock()

    @property
    def iterations(self):
        return self.counters[0]

    def restore_hyperparameter(self, name, variable, saved):
        """A checkpoint's value of a hyperparameter: kept aside and, when it
        differs from this optimizer's, named in a warning."""
        if not tf.executing_eagerly():
            return tf.no_op()  # TF1-style graph restores: nothing to compare
        saved = float(saved.numpy())
        self.restored_hyperparameters[name] = saved
        current = self.given.get(name, float(variable.numpy()))
        if hyperparameters.differs(saved, current):
            saved_text = hyperparameters.as_float32_text(saved)
            warnings.warn(
                f"The checkpoint holds {name}={saved_text}, but this "
                f"optimizer was configured with {name}={current!r}; it keeps "
                f"{current!r}: hyperparameters are configuration, not state. "
                "Call `optimizer.use_restored_hyperparameters()` to take the "
                "checkpoint's values instead.", stacklevel=2)
        return None

    def forget_hyperparameter(self, name):
        """Drops the variable the optimizer made for `name` (replaced by a
        schedule, callable or variable of the user's): it is no longer
        state, in `variables` or in checkpoints."""
        self.own_hyperparameters.pop(name, None)
        self.given.pop(name, None)
        self.guards.pop("_" + name, None)

    # ------------------------------------------------------------------
    # Building.

    def build(self, var_list, recorded=None):
        """Checks `var_list`, creates the slots and the kernel's tables;
        `recorded`: the slot guard's record of a restore waiting for them
        (`checkpoints.pending_slots`).

        Raises:
            ValueError: see `AdamW.build`.
        """
        if self.table is not None:
            if [state_lib.var_key(v) for v in var_list] != self.table.keys():
                raise ValueError(
                    f"This optimizer is already built with {len(self.table)} "
                    "variables; it cannot be built again with a different "
                    "`var_list`. Create a new optimizer for a new set of "
                    "variables.")
            return
        if not var_list:
            raise ValueError("Argument `var_list` must not be empty.")
        strategy = distribute.strategy_for_build(self.init_strategy)
        table = state_lib.VariableTable(var_list, self.decay_mask)
        problem = checkpoints.slot_problem(
            checkpoints.pending_slots(self.slot_lists, recorded),
            state_lib.expected_slots(table, self.options))
        if problem:
            raise ValueError(
                "A checkpoint restored into this optimizer before `build()` "
                "does not fit the variables it is built with, so nothing was "
                f"built: {problem}.")
        blocker = step_kinds.kernel_blocker(
            self.options.fused, table.tf_vars, table.compute_dtypes)
        if self.options.fused and blocker:
            raise ValueError(
                "Argument `fused=True`, but the fused AdamW kernel cannot run "
                f"these variables: {blocker}. Use `fused=None` (the default) "
                "to fall back to the XLA step.")
        slots, stores = state_lib.create_slots(table, self.options, strategy)
        self.packed_stores.extend(stores)
        self.table, self.fused_blocker = table, blocker
        self.strategy = strategy
        self.distributed = tf.distribute.has_strategy()
        # Extending the tracked lists made in AdamW.__init__ names the slots
        # `_momentums/0`, ...; a checkpoint restored into the unbuilt
        # optimizer is bound to those lists and fills each slot as it is
        # appended (deferred restoration). Replacing the lists would lose it.
        for kind, slot_list in self.slot_lists.items():
            slot_list.extend(slots[kind])
        if blocker is None:
            with tf.init_scope():
                self.slot_tables = state_lib.slot_tables(
                    self.slot_lists["momentum"], self.slot_lists["velocity"],
                    self.slot_lists["velocity_hat"],
                    self.slot_lists["average"],
                    self.slot_lists["accumulator"])

    def turn(self):
        """A context in which this optimizer's state is this call's alone.

        Eager calls take the lock. Replica threads of a strategy
        (`strategy.run` eagerly) do not: they meet in the merge call, which
        a lock held by one of them would deadlock, and they write only their
        own replica's copies.
        """
        if tf.executing_eagerly() and not (
                tf.distribute.has_strategy()
                and tf.distribute.in_cross_replica_context() is False):
            return self.lock
        return contextlib.nullcontext()

    def index_of(self, variable):
        """The position of `variable` in the built list.

        Raises:
            ValueError: naming it, when the optimizer was not built with it.
        """
        if self.table is None:
            raise ValueError(
                f"Unknown variable: {state_lib.var_name(variable)!r}. This "
                "optimizer is not built yet.")
        return self.table.index_of(variable)

    @property
    def kernel_ready(self):
        """The fused kernel can run the built variables."""
        return self.table is not None and self.fused_blocker is None

    def choose(self):
        """The step for the call being made now (`step_kinds.choose`)."""
        return step_kinds.choose(
            self.kernel_ready,
            pipeline.only_decay_and_adam(self.options, self.table),
            step_kinds.current_context())

    # ------------------------------------------------------------------
    # Stepping.

    def apply(self, grads, variables, aggregate):
        """Checks and aligns a call's gradients, then `dispatch`es them."""
        table = self.table
        if table.is_built_list(variables) and table.matches(grads):
            return self.dispatch(grads, aggregate)
        grads, missing = table.align(grads, variables)
        if missing:
            warnings.warn(
                f"Gradients do not exist for variables {missing} when "
                "minimizing the loss; they are skipped.")
        return self.dispatch(grads, aggregate)

    def dispatch(self, grads, aggregate):
        """Runs the step on `grads` (aligned with the built list), once on
        one device or on every replica (`distribute.on_every_replica`)."""
        current = tf.distribute.get_strategy()
        if (self.distributed and not tf.distribute.has_strategy()
                and current is not self.strategy):
            # A plain call (outside any scope) on an optimizer built under a
            # strategy: a cross-replica call of that strategy.
            with self.strategy.scope():
                return self.dispatch(grads, aggregate)
        distribute.check_same_strategy(self.strategy, current)
        external = hyperparameters.external(self.hyperparameter_values(),
                                            self.own_hyperparameters.values())
        choice = self.choose()

        def step(full_grads, external):
            return self.runner.run(choice, full_grads, external)

        if not tf.distribute.has_strategy():
            step(grads, external)
        else:
            grads, external = self.set_overwrites_aside(grads, external,
                                                        aggregate)
            distribute.on_every_replica(
                self.strategy, grads, step, external, anchor=self.iterations,
                targets=self.table.tf_vars,
                compute_dtypes=self.table.compute_dtypes, aggregate=aggregate)
        return self.iterations

    def set_overwrites_aside(self, grads, external, aggregate):
        """Under a strategy, the values of the variables overwritten with
        their gradient, reduced to their maximum over the replicas, move
        from `grads` into `external[_OVERWRITES]` (the sum of step 1 is for
        gradients). Returns `(grads, external)`."""
        overwrites = [i for i in sorted(self.table.overwrites)
                      if grads[i] is not None]
        if not overwrites:
            return grads, external
        grads = list(grads)
        values = {}
        for i in overwrites:
            values[i] = _replica_maximum(
                grads[i], self.table.tf_vars[i].shape,
                self.table.compute_dtypes[i], aggregate)
            grads[i] = None
        return grads, dict(external, **{_OVERWRITES: values})

    def replica_step(self, grads, external, fused):
        """One replica's step (`pipeline.run`) against its own copies."""
        valid = None
        if _OVERWRITES in external or (
                distribute.SPARSE_INDICES_VALID in external):
            external = dict(external)
            valid = external.pop(distribute.SPARSE_INDICES_VALID, None)
            grads = list(grads)
            for i, value in external.pop(_OVERWRITES, {}).items():
                grads[i] = value
        return pipeline.run(pipeline.Step(
            options=self.options, table=self.table, state=self.local_state(),
            fused=fused, slot_tables=self.slot_tables,
            scalars=lambda iterations, dtype: self.runner.scalars(
                iterations, external, dtype)), grads, valid)

    def step_scalars(self, iterations, external, dtype):
        """The step's scalars in `dtype`, at `iterations` (a local copy)."""
        hyper = hyperparameters.for_step(self.hyperparameter_values(),
                                         external, iterations)
        return update.step_scalars(hyper, iterations, dtype)

    def local_state(self):
        """This replica's copy of every variable the step touches."""
        if self.distributed:
            return self._step_state(distribute.local)
        if self.own_state is None:
            # Made once: iterating the tracked lists costs more than the
            # rest of an eager step's Python.
            self.own_state = self._step_state(lambda variable: variable)
        return self.own_state

    def _step_state(self, local):
        return state_lib.step_state(self.table.tf_vars, self.slot_lists,
                                    self.counters, local)

    def write_averages(self, indices):
        """Writes the EMA averages of variables `indices` into them, on every
        replica's copy (`finalize_variable_values`)."""
        averages = self.slot_lists["average"]
        # An overwritten variable has no average (`average_of`).
        indices = [i for i in indices if i not in self.table.overwrites]

        def overwrite_on_this_replica(*_):
            state_lib.write_averages(
                [distribute.local(self.table.tf_vars[i]) for i in indices],
                [slots_lib.local_slot(averages[i], distribute.local)
                 for i in indices])

        if not self.distributed:
            overwrite_on_this_replica()
            return
        distribute.require_cross_replica(
            "finalize_variable_values()", "it overwrites every replica's "
            "copy.")
        with self.strategy.scope():
            self.strategy.extended.update(self.iterations,
                                          overwrite_on_this_replica)

    def average_of(self, variable):
        """The EMA average of `variable`; for a variable overwritten with
        its gradient (never averaged, as in Keras), the variable itself."""
        i = self.index_of(variable)
        if i in self.table.overwrites:
            return self.table.tf_vars[i]
        return self.slot_lists["average"][i]

    # ------------------------------------------------------------------
    # Copies: pickle and copy.deepcopy (`AdamW.__reduce__`,
    # `AdamW.__deepcopy__`), made by `rebuild`.

    def copy_payload(self, for_pickle):
        """What a copy of the optimizer is made from (`rebuild`): its
        arguments, exclusions and restored hyperparameters; when built, its
        variables (the objects: pickle and deepcopy copy them, once per
        memo) and its state's values.

        Raises:
            ValueError: (`for_pickle`) a plain callable hyperparameter, or
                an optimizer built under a strategy.
        """
        if for_pickle and self.distributed:
            raise ValueError(
                "An optimizer built under "
                f"{type(self.strategy).__name__} cannot be pickled: its "
                "variables are distributed values, which TensorFlow does "
                "not pickle. Save it with `tf.train.Checkpoint`, or copy it "
                "with `copy.deepcopy`.")
        payload = {
            "arguments": self.copy_arguments(for_pickle),
            "exclusions": (list(self.decay_mask.var_list),
                           list(self.decay_mask.var_names)),
            "restored": dict(self.restored_hyperparameters),
            "var_list": None, "state": None}
        if self.table is not None:
            payload["var_list"] = list(self.table.var_list)
            payload["state"] = {
                "counters": [None if c is None else np.array(c.numpy())
                             for c in self.counters],
                "slots": {kind: [np.array(v.numpy()) for v in slots]
                          for kind, slots in self.slot_lists.items()}}
        return payload

    def copy_arguments(self, for_pickle):
        """The constructor arguments of a copy: the options, and each
        hyperparameter as the number it holds now (the optimizer's own
        variables), else the schedule, variable or callable itself.

        Raises:
            ValueError: (`for_pickle`) a plain callable hyperparameter.
        """
        arguments = dict(self.options.to_config(), name=self.options.name)
        for name, value in self.hyperparameter_values().items():
            if value is self.own_hyperparameters.get(name):
                value = hyperparameters.config_value(name, value,
                                                     self.given.get(name))
            elif for_pickle and not (schedules.is_schedule(value)
                                     or isinstance(value, tf.Variable)):
                raise ValueError(
                    f"This optimizer cannot be pickled: argument `{name}` "
                    f"is a plain Python callable ({value!r}), and a pickle, "
                    "like a config, carries no code. Use a number, a "
                    "variable or, for the learning rate, a "
                    "LearningRateSchedule (`copy.deepcopy` shares the "
                    "callable).")
            arguments[name] = value
        return arguments

    def copy_scope(self):
        """The scope a copy is made in: that of the strategy of `build()`
        (or of creation, when not built), unless a strategy's scope is
        entered already."""
        strategy = self.init_strategy if self.table is None else self.strategy
        if tf.distribute.has_strategy() or (
                strategy is tf.distribute.get_strategy()):
            return contextlib.nullcontext()
        return strategy.scope()

    def load_state(self, state):
        """Assigns `copy_payload`'s state values (every replica's copy)."""
        for counter, value in zip(self.counters, state["counters"]):
            if counter is not None:
                counter.assign(value)
        for kind, values in state["slots"].items():
            for slot, value in zip(self.slot_lists[kind], values):
                slot.assign(value)


# The key of the overwritten variables' values in a distributed step's
# `external` (`Engine.set_overwrites_aside`).
_OVERWRITES = "overwrite_with_gradient"


def _replica_maximum(value, shape, dtype, aggregate):
    """An overwritten variable's value for the step of every replica: dense,
    in `dtype`, and its maximum over the replicas (as Keras takes the
    maximum over accumulated micro-steps), unless `aggregate` is False in a
    replica context (the caller reduced)."""
    def dense(v):
        return tf.cast(update.densify(v, shape), dtype)

    if tf.distribute.in_cross_replica_context():
        if not distribute.is_distributed(value):
            return dense(value)  # the global value
        return tf.reduce_max(tf.stack([dense(v) for v in value.values]),
                             axis=0)
    value = dense(value)
    if not aggregate:
        return value
    gathered = tf.distribute.get_replica_context().all_gather(
        tf.expand_dims(value, 0), axis=0)
    return tf.reduce_max(gathered, axis=0)


def rebuild(cls, payload):
    """The optimizer of class `cls` that `Engine.copy_payload` describes:
    made, given its exclusions, and when built, built on the payload's
    variables with the state's values (unpickling and deepcopy call it)."""
    optimizer = cls(**payload["arguments"])
    var_list, var_names = payload["exclusions"]
    if var_list or var_names:
        optimizer.exclude_from_weight_decay(var_list or None,
                                            var_names or None)
    engine = optimizer._engine  # pylint: disable=protected-access
    engine.restored_hyperparameters.update(payload["restored"])
    if payload["var_list"] is not None:
        optimizer.build(payload["var_list"])
        engine.load_state(payload["state"])
    return optimizer
