"""`AdamW`: Keras 3's AdamW as a fused or XLA-compiled `tf.Module`.

This class is the front: the public API, and the tracked state under the
attribute names that are the checkpoint keys. The work is done by layers,
each with a small surface (see the README, "Architecture"):

- `tf_adamw.attributes`: the hyperparameter and option attributes (a
  mixin of this class).
- `tf_adamw.options`: the fixed options, validated once.
- `tf_adamw.hyperparameters`: learning rate, weight decay, betas, epsilon.
- `tf_adamw.engine`: the untracked half: what `build()` makes, the step's
  dispatch.
- `tf_adamw.state`: variables, slots, the decay mask, a step's view.
- `tf_adamw.update`: the math, as pure functions.
- `tf_adamw.pipeline`: one replica's step, stage by stage, in the order of
  docs/semantics.md, "The step".
- `tf_adamw.step_kinds`: which step runs (fused kernel, XLA or plain ops)
  and the compiled functions.
- `tf_adamw.distribute`: the cross-replica sum and the per-replica run.
"""

import copy
import re
import warnings

import tensorflow as tf

from tf_adamw import attributes
from tf_adamw import engine as engine_lib
from tf_adamw import hyperparameters
from tf_adamw import options as options_lib
from tf_adamw import schedules
from tf_adamw import slot_guard
from tf_adamw import state as state_lib
from tf_adamw import step_kinds
from tf_adamw import update

# The public methods a user's `tf.function` calls. Autograph would otherwise
# re-compile their source (and all they call) on every trace: 7 s of a 12 s
# first call for 256 variables. They hold no Python control flow on tensors
# (branches are explicit `tf.cond`s), so the conversion would change nothing.
_not_converted = tf.autograph.experimental.do_not_convert


_SLOTS_IN_FUSED_STEP = (
    "`slots_for()` called inside a `tf.function`: the fused kernel updates "
    "momentum, velocity and the EMA averages through the optimizer's slot "
    "table, so reads or "
    "writes of them in a function that also applies gradients are not "
    "ordered with the step. Read them outside that function, or create the "
    "optimizer with `fused=False`.")


# The SavedModel child holding the packed slot variables (`slots.Stores`).
_PACKED_SLOTS = "_packed_slots"


def _packed_slots(optimizer):
    """`optimizer`'s packed slot variables as one trackable, or None (no
    packed slots, or `__init__` still running)."""
    engine = optimizer.__dict__.get("_engine")
    return engine.packed_children if engine and engine.packed_stores else None


class AdamW(tf.Module, attributes.Attributes):
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
        **kwargs: `fused` (None: the fused CPU kernel wherever it can run,
            else the XLA step; True: `build()` fails if the kernel cannot
            run; False: always the XLA step), `jit_compile` (default True;
            False runs the non-fused step uncompiled, to debug) and
            `skip_nonfinite_gradients` (default False: a call whose summed
            gradients hold NaN or Inf changes nothing but
            `skipped_steps`) and `slot_layout` (`"separate"`, the
            default; `"packed"`: each variable's slots are the rows of one
            variable, for XLA on many variables; `slots_for()` gives views).
            `decay` is ignored with a warning, as in
            Keras; any other key is an error. See docs/semantics.md.
    """

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9,
                 beta_2=0.999, epsilon=1e-7, amsgrad=False, clipnorm=None,
                 clipvalue=None, global_clipnorm=None, use_ema=False,
                 ema_momentum=0.99, ema_overwrite_frequency=None,
                 name="adamw", loss_scale_factor=None,
                 gradient_accumulation_steps=None, **kwargs):
        super().__init__(name=_module_name(name))
        self._options = options_lib.validate(
            name=name, amsgrad=amsgrad, clipnorm=clipnorm,
            clipvalue=clipvalue, global_clipnorm=global_clipnorm,
            use_ema=use_ema, ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **options_lib.extra_keywords(kwargs, weight_decay=weight_decay))
        given, own = {}, {}
        # Made now: counters and hyperparameters. They are variables so that
        # changing them never retraces the step.
        with tf.init_scope():
            for attribute, counter in state_lib.create_counters(
                    self._options).items():
                setattr(self, attribute, counter)
            values = (learning_rate, weight_decay, beta_1, beta_2, epsilon)
            for hyper, value in zip(hyperparameters.NAMES, values):
                variable, number = hyperparameters.create(name, hyper, value)
                setattr(self, "_" + hyper, variable)
                if number is not None:
                    given[hyper], own[hyper] = number, variable
        # Tracked lists, extended by build(): a checkpoint restored into the
        # unbuilt optimizer is bound to them (deferred restoration).
        self._momentums = []
        self._velocities = []
        self._velocity_hats = []
        self._averages = []
        self._accumulators = []
        # In checkpoints only (`_trackable_children`): which variables the
        # slots belong to; refuses other variables' slots on restore.
        self._slot_guard = self._no_dependency(
            slot_guard.SlotGuard(self._slot_lists()))
        self._engine = engine_lib.Engine(
            self._options, self._counters(), self._slot_lists(),
            self._hyperparameter_values, own, given)
        self.built = False

    # ------------------------------------------------------------------
    # Checkpoints: hyperparameters are configuration, not state.

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "savedmodel" and _packed_slots(self):
            # What the saved functions capture; first: loading restores it
            # before the slot views, which read it.
            children = {_PACKED_SLOTS: _packed_slots(self), **children}
        if save_type == "checkpoint":
            # The slot guard first: checked before the slot lists are walked
            # (tf_adamw/slot_guard.py). Hyperparameter guards replace their
            # variables (hyperparameters.CheckpointGuard).
            guards = self._checkpoint_guards()
            if guards:
                first = {slot_guard.CHILD_NAME: guards.pop(
                    slot_guard.CHILD_NAME)}
                children = {**first, **children, **guards}
        return children

    def _lookup_dependency(self, name, cached_dependencies=None):
        guard = self._checkpoint_guards().get(name)
        if guard is not None:
            return guard
        if name == _PACKED_SLOTS and _packed_slots(self):
            return _packed_slots(self)  # `restore_training_variables`
        return super()._lookup_dependency(name, cached_dependencies)

    def _checkpoint_guards(self):
        # What checkpoints hold beside or instead of the tracked state:
        # `{key: guard}`; empty while __init__ runs (tracking calls in
        # before the engine).
        engine = self.__dict__.get("_engine")
        if engine is None:
            return {}
        return {slot_guard.CHILD_NAME: self._slot_guard, **engine.guards}

    # ------------------------------------------------------------------
    # Copies: the arguments, exclusions and, once built, the state and the
    # variables (docs/semantics.md, "Copies"; `engine.Engine.copy_payload`).

    def __reduce__(self):
        """Pickles the optimizer (its variables' values included).

        Raises:
            ValueError: a plain callable hyperparameter, or an optimizer
                built under a `tf.distribute` strategy.
        """
        return engine_lib.rebuild, (
            type(self), self._engine.copy_payload(for_pickle=True))

    def __deepcopy__(self, memo):
        """A copy built on deep copies of the variables (`memo`'s, when the
        model is copied in the same call), under the same strategy."""
        with self._engine.copy_scope():
            payload = copy.deepcopy(
                self._engine.copy_payload(for_pickle=False), memo)
            copied = engine_lib.rebuild(type(self), payload)
        memo[id(self)] = copied
        return copied

    # ------------------------------------------------------------------
    # State.

    @property
    def iterations(self):
        """The number of applied updates (an int64 variable)."""
        return self._iterations

    @property
    def variables(self):
        """All of the optimizer's variables, in a stable order."""
        out = [c for c in self._counters() if c is not None]
        # Only the hyperparameter variables the optimizer created: a
        # variable the user passed as a hyperparameter stays theirs.
        out.extend(self._engine.own_hyperparameters.values())
        for i in range(len(self.var_list)):
            out.extend(self._slots(i).values())
        return out

    @property
    def var_list(self):
        """The variables this optimizer was built with (empty before)."""
        table = self._engine.table
        return [] if table is None else list(table.var_list)

    @property
    def distribution_strategy(self):
        """The `tf.distribute` strategy of `build()`, or None when the
        optimizer was built outside any strategy (or is not built)."""
        engine = self._engine
        return engine.strategy if engine.distributed else None

    def slots_for(self, variable):
        """The optimizer state of one model variable, by slot name.

        With the fused kernel (`uses_fused_kernel`) the step reaches
        `momentum`, `velocity`, `velocity_hat` and `average` through a
        table, not their handles: inside one `tf.function` that applies
        gradients, TF does not order your reads or writes of them with the
        step (calling this there warns). Use them outside that function, or
        `fused=False`.

        Args:
            variable: a variable this optimizer was built with.

        Returns:
            A dict with `momentum` and `velocity`, plus `velocity_hat`
            (AMSGrad), `average` (EMA) and `accumulator` (accumulation) when
            those are in use.

        Raises:
            ValueError: the optimizer is not built with `variable`.
        """
        i = self._engine.index_of(variable)
        if not tf.executing_eagerly() and (
                self._engine.choose().kind == step_kinds.FUSED):
            warnings.warn(_SLOTS_IN_FUSED_STEP)
        return self._slots(i)

    def moving_averages(self, var_list=None):
        """The EMA averages of `var_list` (default: all built variables);
        a variable overwritten with its gradient is its own "average".

        Raises:
            ValueError: `use_ema` is False, or an unknown variable.
        """
        if not self._options.use_ema:
            raise ValueError(
                "`moving_averages()` needs an optimizer created with "
                "`use_ema=True`: this one keeps no moving averages.")
        variables = self.var_list if var_list is None else var_list
        return [self._engine.average_of(v) for v in variables]

    def _slot_lists(self):
        return {kind: getattr(self, attribute)
                for kind, attribute in state_lib.SLOT_ATTRIBUTES.items()}

    def _counters(self):
        # In `state.COUNTERS`' order, None for one not in use.
        return tuple(self.__dict__.get(attribute)
                     for attribute in state_lib.COUNTERS)

    def _hyperparameter_values(self):
        return {name: getattr(self, "_" + name)
                for name in hyperparameters.NAMES}

    def _slots(self, i):
        lists = self._slot_lists()
        return {kind: lists[kind][i]
                for kind in state_lib.slot_kinds(self._options)}


    def tracing_count(self):
        """How many times the optimizer's own step functions were traced.

        Changing a hyperparameter variable never retraces; a step inside
        your `tf.function` is traced into it and counts 0 here.
        """
        return sum(f.experimental_get_tracing_count()
                   for f in self._engine.runner.functions.values())

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
        self._engine.decay_mask = state_lib.DecayMask(var_list, var_names)

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
        self._engine.build(list(var_list), self._slot_guard.pending)
        self._slot_guard.pending = None
        self.built = True

    @property
    def uses_fused_kernel(self):
        """True when a step applied here and now runs the fused kernel.

        Asked eagerly or while a plain `tf.function` is traced: True once
        built when the kernel can run the variables. False before `build()`,
        with `fused=False`, when the kernel cannot run the variables (see
        `fused` in the class docstring), while a `jit_compile=True` function
        or a TPU replica is traced (the XLA step runs there) and while a
        SavedModel is traced (its plain-op twin runs; `tf_adamw.step_kinds`).
        """
        return self.built and (
            self._engine.choose().kind == step_kinds.FUSED)

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
        grads, variables = state_lib.split_pairs(grads_and_vars)
        return self.apply(grads, variables,
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
        variables = (self._engine.table.var_list
                     if trainable_variables is None
                     else list(trainable_variables))
        if len(grads) != len(variables):
            raise ValueError(
                f"Received {len(grads)} gradients for {len(variables)} "
                "variables: `grads` and `trainable_variables` must match "
                "one-to-one.")
        aggregate = not options_lib.boolean("skip_gradients_aggregation",
                                            skip_gradients_aggregation)
        with self._engine.turn():
            if not self.built:
                self.build(variables)
            return self._engine.apply(grads, variables, aggregate)

    # ------------------------------------------------------------------
    # The rest of the Keras API.

    @_not_converted
    def scale_loss(self, loss):
        """Multiplies `loss` by the loss scale: `loss_scale_factor`, or
        with `loss_scale="dynamic"` the current `dynamic_scale`.

        Args:
            loss: a tensor, or a Python or NumPy number.

        Returns:
            `loss` itself without a scale. With a factor, `loss * factor` as
            a tensor of `loss`'s dtype. With the dynamic scale, a float32
            tensor when `loss` is float16 or bfloat16 (2**16 and above
            overflow float16, as in Keras, which promotes), else of
            `loss`'s dtype.
        """
        if self._options.dynamic_loss_scale:
            return update.scale_loss(loss, self._dynamic_scale, promote=True)
        return update.scale_loss(loss, self._options.loss_scale_factor)

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
        self._engine.write_averages([self._engine.index_of(v) for v in var_list])

    def get_config(self):
        """The optimizer's configuration, with Keras's keys.

        Raises:
            ValueError: a hyperparameter is a plain Python callable, which
                cannot be serialised without executing code on load.
        """
        config = {"name": self._options.name}
        for name, value in self._hyperparameter_values().items():
            config[name] = hyperparameters.config_value(
                name, value, self._engine.given.get(name))
        config.update(self._options.to_config())
        return config

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
