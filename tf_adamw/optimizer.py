"""`AdamW`: Keras 3's AdamW as a fused or XLA-compiled `tf.Module`.

This class is the front: the public API, and the tracked state under the
attribute names that are the checkpoint keys. The work is done by layers,
each with a small surface (see the README, "Architecture"):

- `tf_adamw.options`: the fixed options, validated once.
- `tf_adamw.state`: variables, slots, the decay mask, a step's view.
- `tf_adamw.update`: the math, as pure functions.
- `tf_adamw.pipeline`: one replica's step, stage by stage, in the order of
  docs/semantics.md, "The step".
- `tf_adamw.step_kinds`: which step runs (fused kernel, XLA or plain ops)
  and the compiled functions.
- `tf_adamw.distribute`: the cross-replica sum and the per-replica run.
"""

import re
import warnings

import tensorflow as tf

from tf_adamw import distribute
from tf_adamw import options as options_lib
from tf_adamw import pipeline
from tf_adamw import schedules
from tf_adamw import state as state_lib
from tf_adamw import step_kinds
from tf_adamw import update

# The public methods a user's `tf.function` calls. Autograph would otherwise
# re-compile their source (and all they call) on every trace: 7 s of a 12 s
# first call for 256 variables. They hold no Python control flow on tensors
# (branches are explicit `tf.cond`s), so the conversion would change nothing.
_not_converted = tf.autograph.experimental.do_not_convert

# Numeric hyperparameters: the tracked attribute each one lives in.
_HYPERPARAMETERS = ("learning_rate", "weight_decay", "beta_1", "beta_2",
                    "epsilon")


class _Untracked:
    """Python state that must stay out of checkpoints and SavedModels.

    `tf.Module` tracks every trackable attribute: the model's variables and
    our compiled `tf.function`s must not become part of the optimizer's saved
    state, so they live in this plain object.
    """

    def __init__(self):
        self.table = None  # state.VariableTable, made by build()
        self.decay_mask = state_lib.DecayMask()
        self.runner = None  # step_kinds.StepRunner
        # Why the fused kernel cannot run these variables (None: it can),
        # decided at build().
        self.fused_blocker = "not built"
        self.slot_tables = {}  # device -> the kernel's slot table
        self.own_state = None  # the StepState of a one-device optimizer
        self.given = {}  # hyperparameter name -> the Python float given
        self.own = {}  # hyperparameter name -> the variable we created
        self.strategy = None  # the tf.distribute strategy of build()
        self.init_strategy = None  # the strategy of __init__
        self.distributed = False  # built under a non-default strategy


class AdamW(tf.Module):
    """Optimizer that implements the AdamW algorithm.

    AdamW is Adam with decoupled weight decay (Loshchilov & Hutter, 2019).
    This class has the signature, defaults and meaning of
    `keras.optimizers.AdamW` (Keras 3). On CPU the whole variable list's
    update is one fused kernel (one pass over memory); elsewhere (TPU, GPU,
    inside `jit_compile=True`) it is one XLA-compiled `tf.function`. It is a
    `tf.Module`: `tf.train.Checkpoint` and SavedModel track its state.

    Args:
        learning_rate: A float, a `keras.optimizers.schedules.
            LearningRateSchedule` (Keras 3 or tf_keras), or a callable that
            takes no arguments and returns the value to use. Schedules are
            evaluated at `iterations`, the number of applied updates.
            Defaults to `0.001`.
        weight_decay: Float, the decoupled weight decay rate. Each applied
            update first does `var -= var * weight_decay * learning_rate`.
            Defaults to `0.004`.
        beta_1: A float, a scalar float tensor, or a zero-argument callable:
            the decay rate of the first moment. Defaults to `0.9`.
        beta_2: Same for the second moment. Defaults to `0.999`.
        epsilon: "Epsilon hat" of Kingma & Ba (before Section 2.1).
            Defaults to `1e-7`.
        amsgrad: Whether to use the AMSGrad variant. Defaults to `False`.
        clipnorm: Float. If set (> 0), each gradient is clipped to this L2
            norm.
        clipvalue: Float. If set (> 0), each gradient element is clipped to
            `[-clipvalue, clipvalue]`.
        global_clipnorm: Float. If set (> 0), all gradients are scaled so
            that their global L2 norm is at most this value.
        use_ema: Whether to keep an exponential moving average of the
            variables. Defaults to `False`.
        ema_momentum: The EMA's momentum:
            `average = ema_momentum * average + (1 - ema_momentum) * var`.
            Defaults to `0.99`.
        ema_overwrite_frequency: Int or None. With `use_ema`, every this many
            applied updates the variables are overwritten by their average.
            If None, call `finalize_variable_values()` at the end.
        name: String, prefix of the optimizer's variable names.
            Defaults to `"adamw"`.
        loss_scale_factor: Float or None. `scale_loss()` multiplies the loss
            by it and each step divides the gradients by it.
        gradient_accumulation_steps: Int >= 2 or None. If set, `k`
            consecutive calls are one update on the mean of their gradients;
            the calls in between only accumulate (variables, slots, EMA,
            learning-rate schedule and `iterations` do not move).
        **kwargs: `fused` (None, True or False; default None): None uses
            the fused CPU kernel (one pass over memory for all variables,
            see `tf_adamw.kernels`) wherever it can run and the XLA step
            elsewhere; True makes `build()` fail if the kernel cannot run
            these variables; False always uses the XLA step. Inside a
            `jit_compile=True` function and on TPU the XLA step is always
            used; while a SavedModel is traced, the same pipeline as plain
            TF ops (no custom op in the SavedModel).
            `jit_compile` (bool, default True): compile the non-fused step
            with XLA; set False to debug. `skip_nonfinite_gradients` (bool,
            default False, Keras's behaviour): when True, a call whose
            (cross-replica summed) gradients contain NaN or Inf changes no
            variable, slot, EMA average, accumulator or counter except
            `skipped_steps`. `decay` is accepted with a warning and
            ignored (Keras compatibility). Any other key is an error.
    """

    def __init__(
        self,
        learning_rate=0.001,
        weight_decay=0.004,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        name="adamw",
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        **kwargs,
    ):
        super().__init__(name=_module_name(name))
        self._untracked = _Untracked()
        if kwargs.pop("decay", None) is not None:
            warnings.warn(
                "Argument `decay` is no longer supported and will be ignored.")
        ours = {k: kwargs.pop(k) for k in
                ("jit_compile", "skip_nonfinite_gradients", "fused")
                if k in kwargs}
        if kwargs:
            raise ValueError(f"Argument(s) not recognized: {kwargs}")
        if weight_decay is None:
            raise ValueError(
                "Argument `weight_decay` must be a float. Received: "
                "weight_decay=None")
        weight_decay = options_lib.number("weight_decay", weight_decay,
                                          low=0.0)
        self._options = options_lib.validate(
            name=name, amsgrad=amsgrad, clipnorm=clipnorm,
            clipvalue=clipvalue, global_clipnorm=global_clipnorm,
            use_ema=use_ema, ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps, **ours)
        self._untracked.runner = step_kinds.StepRunner(
            self._replica_step, self._step_scalars,
            self._options.jit_compile)
        # Made now: counters and hyperparameters. They are variables so that
        # changing them never retraces the step.
        self._untracked.init_strategy = tf.distribute.get_strategy()
        with tf.init_scope():
            self._iterations = state_lib.counter(name, "iteration")
            if self._options.gradient_accumulation_steps:
                self._accumulation_count = state_lib.counter(
                    name, "accumulation_count")
            if self._options.skip_nonfinite_gradients:
                self._skipped_steps = state_lib.counter(name, "skipped_steps")
            given = (learning_rate, weight_decay, beta_1, beta_2, epsilon)
            for hyper, value in zip(_HYPERPARAMETERS, given):
                setattr(self, "_" + hyper, self._hyperparameter(hyper, value))
        # Tracked lists, extended by build(): a checkpoint restored into the
        # unbuilt optimizer is bound to them (deferred restoration).
        self._momentums = []
        self._velocities = []
        self._velocity_hats = []
        self._averages = []
        self._accumulators = []
        self.built = False

    def _hyperparameter(self, name, value):
        variable, given = state_lib.hyperparameter(
            self._options.name, name, value,
            schedule_ok=name == "learning_rate")
        if given is not None:
            self._untracked.given[name] = given
            self._untracked.own[name] = variable
        return variable

    # ------------------------------------------------------------------
    # State.

    @property
    def iterations(self):
        """The number of applied updates (an int64 variable)."""
        return self._iterations

    @property
    def variables(self):
        """All of the optimizer's variables, in a stable order."""
        out = [self._iterations]
        if self._options.gradient_accumulation_steps:
            out.append(self._accumulation_count)
        if self._options.skip_nonfinite_gradients:
            out.append(self._skipped_steps)
        # Only the hyperparameter variables the optimizer created: a
        # variable the user passed as a hyperparameter stays theirs.
        out.extend(self._untracked.own.values())
        for i in range(len(self.var_list)):
            out.extend(self._slots(i).values())
        return out

    @property
    def var_list(self):
        """The variables this optimizer was built with (empty before)."""
        table = self._untracked.table
        return [] if table is None else list(table.var_list)

    @property
    def distribution_strategy(self):
        """The `tf.distribute` strategy of `build()`, or None when the
        optimizer was built outside any strategy (or is not built)."""
        u = self._untracked
        return u.strategy if u.distributed else None

    def slots_for(self, variable):
        """The optimizer state of one model variable, by slot name.

        With the fused kernel (`uses_fused_kernel`), the step reaches
        `momentum`, `velocity` and `velocity_hat` through a table the
        optimizer holds, not through these variables' handles, so inside one
        `tf.function` TF does not order your reads or writes of them with
        the step. Read or assign them outside the function that applies
        gradients (eager code, another `tf.function`, a checkpoint), or use
        `fused=False`. Calling this while a function that would run the
        fused step is traced warns.

        Args:
            variable: a variable this optimizer was built with.

        Returns:
            A dict with `momentum` and `velocity`, plus `velocity_hat`
            (AMSGrad), `average` (EMA) and `accumulator` (accumulation) when
            those are in use.

        Raises:
            ValueError: the optimizer is not built with `variable`.
        """
        i = self._index_of(variable)
        if not tf.executing_eagerly() and (
                self._choose().kind == step_kinds.FUSED):
            warnings.warn(
                "`slots_for()` called inside a `tf.function`: the fused "
                "kernel updates momentum and velocity through the "
                "optimizer's slot table, so reads or writes of them in a "
                "function that also applies gradients are not ordered with "
                "the step. Read them outside that function, or create the "
                "optimizer with `fused=False`.")
        return self._slots(i)

    def moving_averages(self, var_list=None):
        """The EMA averages of `var_list` (default: all built variables).

        Raises:
            ValueError: `use_ema` is False, or a variable is not one the
                optimizer was built with (checked before anything is
                returned).
        """
        if not self._options.use_ema:
            raise ValueError(
                "`moving_averages()` needs an optimizer created with "
                "`use_ema=True`: this one keeps no moving averages.")
        variables = self.var_list if var_list is None else var_list
        return [self._averages[self._index_of(v)] for v in variables]

    def _slot_lists(self):
        return {kind: getattr(self, attribute)
                for kind, attribute in state_lib.SLOT_ATTRIBUTES.items()}

    def _slots(self, i):
        lists = self._slot_lists()
        return {kind: lists[kind][i]
                for kind in state_lib.slot_kinds(self._options)}

    def _index_of(self, variable):
        if self._untracked.table is None:
            raise ValueError(
                f"Unknown variable: {state_lib.var_name(variable)!r}. This "
                "optimizer is not built yet.")
        return self._untracked.table.index_of(variable)

    def tracing_count(self):
        """How many times the optimizer's own step functions were traced.

        Changing a hyperparameter variable never retraces; a step inside
        your `tf.function` is traced into it and counts 0 here.
        """
        return sum(f.experimental_get_tracing_count()
                   for f in self._untracked.runner.functions.values())

    # ------------------------------------------------------------------
    # Hyperparameters.

    @property
    def learning_rate(self):
        """The current learning rate.

        The variable when the learning rate is a number; the schedule's value
        at `iterations` for a schedule; the callable's value for a callable.
        Setting a number assigns it (a traced step is not retraced).
        """
        return self._current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value):
        if state_lib.is_read_each_step(value):
            self._learning_rate = value
            self._untracked.runner.functions.clear()  # reads a new object
            return
        if self._learning_rate is not self._untracked.own.get(
                "learning_rate"):
            raise TypeError(
                "This optimizer's `learning_rate` is a LearningRateSchedule, "
                "a callable or a variable of yours, hence it is not settable "
                f"to a number. Received: learning_rate={value!r}")
        self._assign_hyperparameter("learning_rate", value)

    @property
    def weight_decay(self):
        """The weight decay rate (a float32 variable; assign to change)."""
        return self._weight_decay

    @weight_decay.setter
    def weight_decay(self, value):
        self._assign_hyperparameter("weight_decay", value)

    @property
    def beta_1(self):
        """`beta_1`: a variable, or the callable/variable given."""
        return self._beta_1

    @property
    def beta_2(self):
        """`beta_2`: a variable, or the callable/variable given."""
        return self._beta_2

    @property
    def epsilon(self):
        """`epsilon`: a variable, or the callable/variable given."""
        return self._epsilon

    def _assign_hyperparameter(self, name, value):
        value = state_lib.checked_float(name, value)
        getattr(self, "_" + name).assign(value)
        self._untracked.given[name] = value

    amsgrad = property(lambda self: self._options.amsgrad)
    clipnorm = property(lambda self: self._options.clipnorm)
    clipvalue = property(lambda self: self._options.clipvalue)
    global_clipnorm = property(lambda self: self._options.global_clipnorm)
    use_ema = property(lambda self: self._options.use_ema)
    ema_momentum = property(lambda self: self._options.ema_momentum)
    ema_overwrite_frequency = property(
        lambda self: self._options.ema_overwrite_frequency)
    loss_scale_factor = property(
        lambda self: self._options.loss_scale_factor)
    gradient_accumulation_steps = property(
        lambda self: self._options.gradient_accumulation_steps)
    jit_compile = property(lambda self: self._options.jit_compile)
    skip_nonfinite_gradients = property(
        lambda self: self._options.skip_nonfinite_gradients)

    @property
    def skipped_steps(self):
        """Calls skipped for non-finite gradients (an int64 variable).

        Raises:
            AttributeError: the optimizer was built without
                `skip_nonfinite_gradients=True`.
        """
        if not self._options.skip_nonfinite_gradients:
            raise AttributeError(
                "`skipped_steps` exists only with "
                "`skip_nonfinite_gradients=True`.")
        return self._skipped_steps

    def _current_learning_rate(self, iterations=None):
        lr = self._learning_rate
        if schedules.is_schedule(lr):
            return lr(self._iterations if iterations is None else iterations)
        if isinstance(lr, tf.Variable):
            return lr
        return lr()

    def _external_hyperparameters(self):
        """Callables and user variables given as hyperparameters, read now.

        They are read in the caller's context on every call and passed into
        the compiled step as tensors: a callable that returns a Python float
        would otherwise be frozen into the trace. (Inside the caller's own
        `tf.function` they are read when that function is traced, as with
        Keras.) Schedules are evaluated inside the step, at `iterations`.
        """
        out = {}
        for name, hyper in (("lr", self._learning_rate),
                            ("beta_1", self._beta_1),
                            ("beta_2", self._beta_2),
                            ("epsilon", self._epsilon)):
            if schedules.is_schedule(hyper) or any(
                    hyper is own for own in self._untracked.own.values()):
                continue
            value = hyper() if callable(hyper) and not isinstance(
                hyper, tf.Variable) else hyper
            out[name] = tf.cast(tf.convert_to_tensor(value), tf.float32)
        return out

    def _step_scalars(self, iterations, external, dtype):
        """The step's scalars in `dtype`, at `iterations` (a local copy)."""
        local = distribute.local
        hyper = {
            "lr": external["lr"] if "lr" in external else tf.convert_to_tensor(
                local(self._current_learning_rate(iterations))),
            "weight_decay": tf.convert_to_tensor(local(self._weight_decay)),
        }
        for name in ("beta_1", "beta_2", "epsilon"):
            hyper[name] = external[name] if name in external else (
                tf.convert_to_tensor(local(getattr(self, "_" + name))))
        return update.step_scalars(hyper, iterations, dtype)

    # ------------------------------------------------------------------
    # Building.

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from weight decay. Call before `build`.

        Args:
            var_list: variables to exclude.
            var_names: regular expressions; a variable whose name (Keras's
                `path` when it has one, else `name`) contains a match is
                excluded, e.g. `["bias", "LayerNorm"]`.

        Raises:
            ValueError: the optimizer is already built, or a pattern is not
                a valid regular expression.
        """
        if self.built:
            raise ValueError(
                "`exclude_from_weight_decay()` can only be configured before "
                "the optimizer is built: the excluded set is compiled into the "
                "step. Call it before `build()` or the first "
                "`apply_gradients()`.")
        self._untracked.decay_mask = state_lib.DecayMask(var_list, var_names)

    @_not_converted
    def build(self, var_list):
        """Creates the slots for `var_list` (under the current strategy).

        Custom loops under a `tf.distribute` strategy call this inside
        `strategy.scope()` before tracing their step; otherwise the first
        `apply_gradients` builds.

        Raises:
            ValueError: an integer variable, a duplicate, a second build
                with a different list, or a build under another strategy
                than the optimizer's or inside `strategy.run`.
        """
        var_list = list(var_list)
        u = self._untracked
        if self.built:
            if [state_lib.var_key(v) for v in var_list] != u.table.keys():
                raise ValueError(
                    f"This optimizer is already built with {len(u.table)} "
                    "variables; it cannot be built again with a different "
                    "`var_list`. Create a new optimizer for a new set of "
                    "variables.")
            return
        if not var_list:
            raise ValueError("Argument `var_list` must not be empty.")
        strategy = self._strategy_for_build()
        table = state_lib.VariableTable(var_list, u.decay_mask)
        blocker = step_kinds.kernel_blocker(
            self._options.fused, table.tf_vars, table.compute_dtypes)
        if self._options.fused and blocker:
            raise ValueError(
                "Argument `fused=True`, but the fused AdamW kernel cannot run "
                f"these variables: {blocker}. Use `fused=None` (the default) "
                "to fall back to the XLA step.")
        slots = state_lib.create_slots(table, self._options, strategy)
        u.table, u.fused_blocker, u.strategy = table, blocker, strategy
        u.distributed = tf.distribute.has_strategy()
        # Extending the tracked lists made in __init__ names the slots
        # `_momentums/0`, ...; a checkpoint restored into the unbuilt
        # optimizer is bound to those lists and fills each slot as it is
        # appended (deferred restoration). Replacing the lists would lose it.
        for kind, slot_list in self._slot_lists().items():
            slot_list.extend(slots[kind])
        if blocker is None:
            with tf.init_scope():
                u.slot_tables = state_lib.slot_tables(
                    self._momentums, self._velocities, self._velocity_hats)
        self.built = True

    def _strategy_for_build(self):
        """The current strategy, checked: the optimizer's, cross-replica."""
        strategy = tf.distribute.get_strategy()
        distribute.check_supported(strategy)
        init = self._untracked.init_strategy
        if strategy is not init:
            raise ValueError(
                f"This optimizer was created under {type(init).__name__} but "
                f"is built under {type(strategy).__name__}. Create the "
                "optimizer and call `optimizer.build(model.trainable_"
                "variables)` inside the same `strategy.scope()`.")
        distribute.require_cross_replica(
            "optimizer.build(model.trainable_variables)",
            "the optimizer cannot create its slots inside `strategy.run` "
            "(replica context). Call it under `strategy.scope()` before "
            "running the training step.")
        return strategy

    @property
    def uses_fused_kernel(self):
        """True when eager and `tf.function` steps run the fused kernel.

        False before `build()`, with `fused=False`, and when the kernel cannot
        run the variables (see `fused` in the class docstring). Steps traced
        inside XLA use the XLA step regardless, and steps traced for a
        SavedModel its plain-op twin (`tf_adamw.step_kinds`).
        """
        return self.built and self._untracked.fused_blocker is None

    def _choose(self):
        return step_kinds.choose(
            self.uses_fused_kernel,
            pipeline.only_decay_and_adam(self._options),
            step_kinds.current_context())

    # ------------------------------------------------------------------
    # Applying gradients.

    @_not_converted
    def apply_gradients(self, grads_and_vars, name=None,
                        skip_gradients_aggregation=False, **kwargs):
        """Applies `(gradient, variable)` pairs; returns `iterations`.

        Args:
            grads_and_vars: iterable of `(gradient, variable)`.
            name: ignored (tf_keras compatibility).
            skip_gradients_aggregation: in a replica context, do not sum the
                gradients across replicas: the caller already did. tf_keras's
                `experimental_aggregate_gradients=False` means the same.
        """
        del name
        if "experimental_aggregate_gradients" in kwargs:
            aggregate = kwargs.pop("experimental_aggregate_gradients")
            skip_gradients_aggregation = not options_lib.boolean(
                "experimental_aggregate_gradients", aggregate)
        if kwargs:
            raise ValueError(f"Argument(s) not recognized: {kwargs}")
        pairs = list(grads_and_vars)
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(
                    "Argument `grads_and_vars` must be a list of "
                    f"(gradient, variable) pairs. Received an item {pair!r}.")
        if not pairs:
            return self._iterations
        grads, variables = zip(*pairs)
        return self.apply(list(grads), list(variables),
                          skip_gradients_aggregation=skip_gradients_aggregation)

    @_not_converted
    def apply(self, grads, trainable_variables=None,
              skip_gradients_aggregation=False):
        """Applies `grads` to `trainable_variables` (or the built list).

        Args:
            grads: gradients (tensors or `tf.IndexedSlices`; None entries are
                skipped with a warning).
            trainable_variables: the variables, in the same order. If None,
                `grads` must match the list the optimizer was built with.
            skip_gradients_aggregation: see `apply_gradients`.

        Returns:
            `iterations`.
        """
        grads = list(grads)
        if not grads:
            return self._iterations
        if trainable_variables is None and not self.built:
            raise ValueError(
                "When passing `grads` without `trainable_variables`, the "
                "optimizer must already be built. Call "
                "`optimizer.build(trainable_variables)` first.")
        variables = (self._untracked.table.var_list
                     if trainable_variables is None
                     else list(trainable_variables))
        if len(grads) != len(variables):
            raise ValueError(
                f"Received {len(grads)} gradients for {len(variables)} "
                "variables: `grads` and `trainable_variables` must match "
                "one-to-one.")
        if not self.built:
            self.build(variables)
        aggregate = not options_lib.boolean(
            "skip_gradients_aggregation", skip_gradients_aggregation)
        table = self._untracked.table
        if table.is_built_list(variables) and table.matches(grads):
            return self._dispatch(grads, aggregate)
        grads, missing = table.align(grads, variables)
        if missing:
            warnings.warn(
                f"Gradients do not exist for variables {missing} when "
                "minimizing the loss; they are skipped.")
        return self._dispatch(grads, aggregate)

    def _dispatch(self, grads, aggregate):
        """Runs the step on `grads` (aligned with the built list), once on
        one device or on every replica (`distribute.on_every_replica`)."""
        u = self._untracked
        if (u.distributed and not tf.distribute.has_strategy()
                and tf.distribute.get_strategy() is not u.strategy):
            # A plain call (outside any scope) on an optimizer built under a
            # strategy: a cross-replica call of that strategy.
            with u.strategy.scope():
                return self._dispatch(grads, aggregate)
        distribute.check_same_strategy(u.strategy,
                                       tf.distribute.get_strategy())
        external = self._external_hyperparameters()
        choice = self._choose()

        def step(full_grads, external):
            return u.runner.run(choice, full_grads, external)

        if not tf.distribute.has_strategy():
            step(grads, external)
            return self._iterations
        distribute.on_every_replica(
            u.strategy, grads, step, external, anchor=self._iterations,
            targets=u.table.tf_vars, compute_dtypes=u.table.compute_dtypes,
            aggregate=aggregate)
        return self._iterations

    def _replica_step(self, grads, external, fused):
        """One replica's step (`pipeline.run`) against its own copies."""
        u = self._untracked
        return pipeline.run(pipeline.Step(
            options=self._options, table=u.table, state=self._local_state(),
            fused=fused, slot_tables=u.slot_tables,
            scalars=lambda iterations, dtype: u.runner.scalars(
                iterations, external, dtype)), grads)

    def _local_state(self):
        """This replica's copy of every variable the step touches."""
        u = self._untracked
        if u.distributed:
            return self._step_state(distribute.local)
        if u.own_state is None:
            # Made once: iterating the tracked lists costs more than the
            # rest of an eager step's Python.
            u.own_state = self._step_state(lambda variable: variable)
        return u.own_state

    def _step_state(self, local):
        options = self._options
        counters = (
            self._iterations,
            self._accumulation_count
            if options.gradient_accumulation_steps else None,
            self._skipped_steps if options.skip_nonfinite_gradients else None)
        return state_lib.step_state(self._untracked.table.tf_vars,
                                    self._slot_lists(), counters, local)

    # ------------------------------------------------------------------
    # The rest of the Keras API.

    @_not_converted
    def scale_loss(self, loss):
        """Multiplies `loss` by `loss_scale_factor` (if set)."""
        factor = self._options.loss_scale_factor
        if factor is not None:
            return loss * tf.cast(factor, loss.dtype)
        return loss

    @_not_converted
    def finalize_variable_values(self, var_list):
        """Writes the EMA averages into `var_list` (when `use_ema`).

        Call in a cross-replica context (outside `strategy.run`); under a
        strategy every replica's copy is overwritten.
        """
        if not self._options.use_ema:
            return
        if not self.built:
            raise ValueError(
                "`finalize_variable_values()` needs a built optimizer: it "
                "has no moving averages yet.")
        indices = [self._index_of(v) for v in var_list]
        u = self._untracked

        def overwrite_on_this_replica(*_):
            state_lib.write_averages(
                [distribute.local(u.table.tf_vars[i]) for i in indices],
                [distribute.local(self._averages[i]) for i in indices])

        if not u.distributed:
            overwrite_on_this_replica()
            return
        distribute.require_cross_replica(
            "finalize_variable_values()", "it overwrites every replica's "
            "copy.")
        with u.strategy.scope():
            u.strategy.extended.update(self._iterations,
                                       overwrite_on_this_replica)

    def get_config(self):
        """The optimizer's configuration, with Keras's keys.

        Raises:
            ValueError: a hyperparameter is a plain Python callable, which
                cannot be serialised without executing code on load.
        """
        config = {"name": self._options.name}
        for name in _HYPERPARAMETERS:
            config[name] = self._config_value(name,
                                              getattr(self, "_" + name))
        config.update(self._options.to_config())
        return config

    def _config_value(self, name, value):
        if schedules.is_schedule(value):
            return schedules.serialize(value)
        if isinstance(value, tf.Variable):
            current = float(value.numpy())
            given = self._untracked.given.get(name)
            # Report the float the user gave, not its float32 rounding,
            # unless the variable has been assigned a different value since.
            if given is not None and value.dtype == tf.float32 and (
                    float(tf.constant(given, tf.float32).numpy()) == current):
                return given
            return current
        raise ValueError(
            f"Argument `{name}` is a plain Python callable ({value!r}), which "
            "cannot be serialised: a config never carries code. Use a number "
            "or, for the learning rate, a LearningRateSchedule.")

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Rebuilds an optimizer from `get_config()` output.

        A serialised schedule is rebuilt by class name from Keras's (or
        tf_keras's) built-in schedules or `custom_objects`; no code in the
        config is executed.
        """
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(
                config["learning_rate"], custom_objects)
        return cls(**config)


def _module_name(name):
    """`name` as a valid `tf.Module` name (Keras allows any string)."""
    if not isinstance(name, str) or not name:
        raise TypeError(
            "Argument `name` must be a non-empty string. Received: "
            f"name={name!r}")
    module_name = re.sub(r"\W", "_", name)
    if not re.match(r"[A-Za-z_]", module_name):
        module_name = "_" + module_name
    return module_name
