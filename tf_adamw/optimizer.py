"""`AdamW`: Keras 3's AdamW as a jit-compiled, checkpointable `tf.Module`.

The update math lives in `tf_adamw.update` (pure functions). This module owns
the state (slots, EMA averages, accumulators, counters, hyperparameters) and
runs one step's pipeline in `AdamW._update_step`, in the order of SPEC.md:

    (all-reduce) -> unscale -> accumulate -> clip -> weight decay -> Adam
    -> EMA (+ overwrite) -> iterations += 1
"""

import re
import warnings

import tensorflow as tf

from tf_adamw import _validation as check
from tf_adamw import schedules
from tf_adamw import update as adamw_math

_SLOT_KINDS = (
    "momentum", "velocity", "velocity_hat", "average", "accumulator"
)


class _Untracked:
    """Holds Python state that must stay out of checkpoints and SavedModels.

    `tf.Module` tracks every trackable attribute: the model's variables and
    our compiled `tf.function` must not become part of the optimizer's saved
    state, so they live in this plain object.
    """

    def __init__(self):
        self.var_list = []  # the model variables, as the user passed them
        self.tf_vars = []  # the same, unwrapped to `tf.Variable`
        self.index = {}  # variable key -> position in var_list
        self.use_decay = []  # per variable: weight decay applies
        self.step_fn = None  # the compiled step, built lazily
        self.given = {}  # hyperparameter name -> the Python float given
        self.strategy = None  # the tf.distribute strategy of build()


def _unwrap(variable):
    """The `tf.Variable` behind a user variable (Keras 3 wraps its own)."""
    if isinstance(variable, tf.Variable):
        return variable
    inner = getattr(variable, "value", None)
    if isinstance(inner, tf.Variable):
        return inner
    raise TypeError(
        "AdamW updates `tf.Variable`s (or Keras variables). Received "
        f"{variable!r} of type {type(variable).__name__}."
    )


def _var_key(variable):
    """A key identifying a variable, the same for every replica's copy."""
    variable = _unwrap(variable)
    if hasattr(variable, "_distributed_container"):
        variable = variable._distributed_container()  # pylint: disable=protected-access
    elif hasattr(getattr(variable, "handle", None), "_distributed_container"):
        variable = variable.handle._distributed_container()  # pylint: disable=protected-access
    return variable._unique_id  # pylint: disable=protected-access


def _var_name(variable):
    """The name Keras matches exclusion patterns against."""
    return str(getattr(variable, "path", None) or variable.name)


def _slot_name(variable, kind):
    base = re.sub(r":\d+$", "", _var_name(variable))
    base = base.replace("/", "_").replace(":", "_")
    return f"{base}_{kind}"


class AdamW(tf.Module):
    """Optimizer that implements the AdamW algorithm.

    AdamW is Adam with decoupled weight decay (Loshchilov & Hutter, 2019).
    This class has the signature, defaults and meaning of
    `keras.optimizers.AdamW` (Keras 3) and runs the whole variable list's
    update as one `tf.function`, compiled by XLA by default. It is a
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
        **kwargs: `jit_compile` (bool, default True): compile the step with
            XLA; set False to debug. `decay` is accepted with a warning and
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
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"Argument `name` must be a non-empty string. Received: "
                f"name={name!r}"
            )
        module_name = re.sub(r"\W", "_", name)
        if not re.match(r"[A-Za-z_]", module_name):
            module_name = "_" + module_name
        super().__init__(name=module_name)
        self._untracked = _Untracked()

        if kwargs.pop("decay", None) is not None:
            warnings.warn(
                "Argument `decay` is no longer supported and will be ignored."
            )
        jit_compile = kwargs.pop("jit_compile", True)
        if kwargs:
            raise ValueError(f"Argument(s) not recognized: {kwargs}")
        self._jit_compile = check.boolean("jit_compile", jit_compile)

        # Validation, at construction: every message names the argument.
        if weight_decay is None:
            raise ValueError(
                "Argument `weight_decay` must be a float. Received: "
                "weight_decay=None"
            )
        weight_decay = check.number("weight_decay", weight_decay, low=0.0)
        self._amsgrad = check.boolean("amsgrad", amsgrad)
        self._use_ema = check.boolean("use_ema", use_ema)
        clip_args = (clipnorm, clipvalue, global_clipnorm)
        if sum(a is not None for a in clip_args) > 1:
            raise ValueError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can "
                f"be set. Received: clipnorm={clipnorm}, "
                f"clipvalue={clipvalue}, global_clipnorm={global_clipnorm}"
            )
        self._clipnorm = check.optional_number("clipnorm", clipnorm)
        self._clipvalue = check.optional_number("clipvalue", clipvalue)
        self._global_clipnorm = check.optional_number(
            "global_clipnorm", global_clipnorm
        )
        if self._use_ema:
            ema_momentum = check.number(
                "ema_momentum", ema_momentum, low=0.0, high=1.0
            )
        elif not check.is_number(ema_momentum):
            raise TypeError(
                "Argument `ema_momentum` must be a number. Received: "
                f"ema_momentum={ema_momentum!r}"
            )
        self._ema_momentum = float(ema_momentum)
        self._ema_overwrite_frequency = check.optional_int(
            "ema_overwrite_frequency", ema_overwrite_frequency, 1,
            "applied updates between overwrites",
        )
        self._gradient_accumulation_steps = check.optional_int(
            "gradient_accumulation_steps", gradient_accumulation_steps, 2,
            "calls per applied update",
        )
        self._loss_scale_factor = check.optional_number(
            "loss_scale_factor", loss_scale_factor, low=0.0, low_open=True
        )
        self._keras_name = name
        self._exclude_keys = set()
        self._exclude_pattern = None

        # State created now: counters and hyperparameters. They are
        # variables so that changing them never retraces the step.
        self._strategy_at_init = tf.distribute.get_strategy()
        with tf.init_scope():
            self._iterations = self._counter("iteration")
            if self._gradient_accumulation_steps:
                self._accumulation_count = self._counter(
                    "accumulation_count"
                )
            self._learning_rate = self._hyperparameter(
                "learning_rate", learning_rate, schedule_ok=True
            )
            self._weight_decay = self._hyperparameter(
                "weight_decay", weight_decay
            )
            self._beta_1 = self._hyperparameter(
                "beta_1", beta_1, low=0.0, high=1.0, high_open=True
            )
            self._beta_2 = self._hyperparameter(
                "beta_2", beta_2, low=0.0, high=1.0, high_open=True
            )
            self._epsilon = self._hyperparameter("epsilon", epsilon, low=0.0)

        self._momentums = []
        self._velocities = []
        self._velocity_hats = []
        self._averages = []
        self._accumulators = []
        self.built = False

    # ------------------------------------------------------------------
    # Variables owned by the optimizer.

    def _counter(self, name):
        return tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name=f"{self._keras_name}/{name}",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    def _hyperparameter(self, name, value, *, schedule_ok=False, low=0.0,
                        high=None, high_open=False):
        """A float32 variable for a number, else the schedule/callable."""
        if schedule_ok and schedules.is_schedule(value):
            return value
        if isinstance(value, tf.Variable) or (
            callable(value) and not isinstance(value, tf.Tensor)
        ):
            return value  # read on every step
        scalar = check.eager_scalar(value)
        if scalar is not None:
            value = scalar
        elif not check.is_number(value):
            kinds = "a float, a LearningRateSchedule or a callable" if (
                schedule_ok) else "a float, a scalar float tensor or a callable"
            raise TypeError(
                f"Argument `{name}` must be {kinds}. Received: "
                f"{name}={value!r} of type {type(value).__name__}."
            )
        value = check.number(name, value, low=low, high=high,
                             high_open=high_open)
        self._untracked.given[name] = value
        return tf.Variable(
            value,
            dtype=tf.float32,
            trainable=False,
            name=f"{self._keras_name}/{name}",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    @property
    def iterations(self):
        """The number of applied updates (an int64 variable)."""
        return self._iterations

    @property
    def variables(self):
        """All of the optimizer's variables, in a stable order."""
        out = [self._iterations]
        if self._gradient_accumulation_steps:
            out.append(self._accumulation_count)
        for hyper in (self._learning_rate, self._weight_decay, self._beta_1,
                      self._beta_2, self._epsilon):
            if isinstance(hyper, tf.Variable) and all(
                    hyper is not o for o in out):
                out.append(hyper)
        for i in range(len(self._untracked.var_list)):
            out.extend(self.slots_for(self._untracked.var_list[i]).values())
        return out

    def slots_for(self, variable):
        """The optimizer state of one model variable, by slot name.

        Args:
            variable: a variable this optimizer was built with.

        Returns:
            A dict with `momentum` and `velocity`, plus `velocity_hat`
            (AMSGrad), `average` (EMA) and `accumulator` (accumulation) when
            those are in use.
        """
        i = self._index_of(variable)
        out = {"momentum": self._momentums[i],
               "velocity": self._velocities[i]}
        if self._amsgrad:
            out["velocity_hat"] = self._velocity_hats[i]
        if self._use_ema:
            out["average"] = self._averages[i]
        if self._gradient_accumulation_steps:
            out["accumulator"] = self._accumulators[i]
        return out

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
        if schedules.is_schedule(value) or (
            callable(value) and not isinstance(value, tf.Tensor)
        ) or isinstance(value, tf.Variable):
            self._learning_rate = value
            self._untracked.step_fn = None  # the step reads a new object
            return
        if not isinstance(self._learning_rate, tf.Variable) or (
            self._learning_rate_is_user_variable()
        ):
            raise TypeError(
                "This optimizer was created with a LearningRateSchedule or a "
                "callable as its `learning_rate`, hence its learning rate is "
                "not settable to a number. Received: "
                f"learning_rate={value!r}"
            )
        self._assign_hyperparameter(self._learning_rate, "learning_rate",
                                    value)

    def _learning_rate_is_user_variable(self):
        return isinstance(self._learning_rate, tf.Variable) and not (
            self._learning_rate.name.startswith(f"{self._keras_name}/")
        )

    @property
    def weight_decay(self):
        """The weight decay rate (a float32 variable; assign to change)."""
        return self._weight_decay

    @weight_decay.setter
    def weight_decay(self, value):
        self._assign_hyperparameter(self._weight_decay, "weight_decay", value)

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

    def _assign_hyperparameter(self, variable, name, value):
        scalar = check.eager_scalar(value)
        value = check.number(name, value if scalar is None else scalar,
                             low=0.0)
        variable.assign(value)
        self._untracked.given[name] = value

    amsgrad = property(lambda self: self._amsgrad)
    clipnorm = property(lambda self: self._clipnorm)
    clipvalue = property(lambda self: self._clipvalue)
    global_clipnorm = property(lambda self: self._global_clipnorm)
    use_ema = property(lambda self: self._use_ema)
    ema_momentum = property(lambda self: self._ema_momentum)
    ema_overwrite_frequency = property(
        lambda self: self._ema_overwrite_frequency)
    loss_scale_factor = property(lambda self: self._loss_scale_factor)
    gradient_accumulation_steps = property(
        lambda self: self._gradient_accumulation_steps)
    jit_compile = property(lambda self: self._jit_compile)

    def _current_learning_rate(self):
        lr = self._learning_rate
        if schedules.is_schedule(lr):
            return lr(self._iterations)
        if isinstance(lr, tf.Variable):
            return lr
        return lr()

    @staticmethod
    def _read(hyper):
        """The value of a hyperparameter variable, callable or tensor."""
        if callable(hyper) and not isinstance(hyper, tf.Variable):
            hyper = hyper()
        return tf.convert_to_tensor(hyper)

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
                "`apply_gradients()`."
            )
        if isinstance(var_names, str):
            raise TypeError(
                "Argument `var_names` must be a list of strings. Received: "
                f"var_names={var_names!r}"
            )
        keys = set()
        for variable in var_list or []:
            keys.add(_var_key(variable))
        pattern = None
        if var_names:
            for n in var_names:
                if not isinstance(n, str):
                    raise TypeError(
                        "Argument `var_names` must be a list of strings. "
                        f"Received: var_names={var_names!r}"
                    )
            try:
                pattern = re.compile("|".join(sorted(set(var_names))))
            except re.error as e:
                raise ValueError(
                    "Argument `var_names` must hold valid regular "
                    f"expressions. Received: var_names={var_names!r} ({e})"
                ) from e
        self._exclude_keys = keys
        self._exclude_pattern = pattern

    def _uses_weight_decay(self, variable):
        if _var_key(variable) in self._exclude_keys:
            return False
        if self._exclude_pattern is not None:
            names = {_var_name(variable), str(variable.name),
                     str(_unwrap(variable).name)}
            if any(self._exclude_pattern.search(n) for n in names):
                return False
        return True

    def build(self, var_list):
        """Creates the slots for `var_list` (under the current strategy).

        Custom loops under a `tf.distribute` strategy call this inside
        `strategy.scope()` before tracing their step; otherwise the first
        `apply_gradients` builds.

        Raises:
            ValueError: an integer variable, a duplicate, or a second build
                with a different list.
        """
        var_list = list(var_list)
        if self.built:
            keys = [_var_key(v) for v in var_list]
            if keys != [_var_key(v) for v in self._untracked.var_list]:
                raise ValueError(
                    "This optimizer is already built with "
                    f"{len(self._untracked.var_list)} variables; it cannot be "
                    "built again with a different `var_list`. Create a new "
                    "optimizer for a new set of variables."
                )
            return
        if not var_list:
            raise ValueError("Argument `var_list` must not be empty.")
        index = {}
        for i, variable in enumerate(var_list):
            tf_var = _unwrap(variable)
            if not tf_var.dtype.is_floating:
                raise ValueError(
                    "AdamW can only update floating-point variables. "
                    f"Variable {_var_name(variable)!r} has dtype "
                    f"{tf_var.dtype.name}."
                )
            key = _var_key(variable)
            if key in index:
                raise ValueError(
                    f"Variable {_var_name(variable)!r} appears twice in "
                    "`var_list`."
                )
            index[key] = i
        strategy = tf.distribute.get_strategy()
        with tf.init_scope():
            slots = {kind: [] for kind in _SLOT_KINDS}
            for variable in var_list:
                tf_var = _unwrap(variable)
                dtype = adamw_math.compute_dtype(tf_var.dtype)
                kinds = ["momentum", "velocity"]
                if self._amsgrad:
                    kinds.append("velocity_hat")
                if self._use_ema:
                    kinds.append("average")
                if self._gradient_accumulation_steps:
                    kinds.append("accumulator")
                with strategy.extended.colocate_vars_with(tf_var):
                    for kind in kinds:
                        slots[kind].append(tf.Variable(
                            tf.zeros(tf_var.shape, dtype),
                            trainable=False,
                            name=f"{self._keras_name}/"
                                 f"{_slot_name(variable, kind)}",
                            aggregation=tf.VariableAggregation.NONE,
                        ))
        u = self._untracked
        u.var_list = var_list
        u.tf_vars = [_unwrap(v) for v in var_list]
        u.index = index
        u.use_decay = [self._uses_weight_decay(v) for v in var_list]
        u.strategy = strategy
        # Assigning the lists tracks their elements under stable names
        # (`_momentums/0`, ...); a checkpoint restored into the unbuilt
        # optimizer is applied to them now (deferred restoration).
        self._momentums = slots["momentum"]
        self._velocities = slots["velocity"]
        self._velocity_hats = slots["velocity_hat"]
        self._averages = slots["average"]
        self._accumulators = slots["accumulator"]
        self.built = True

    def _index_of(self, variable):
        try:
            key = _var_key(variable)
        except TypeError:
            raise
        if key not in self._untracked.index:
            raise ValueError(
                f"Unknown variable: {_var_name(variable)!r}. This optimizer "
                "can only be called for the variables it was built with "
                f"({len(self._untracked.var_list)} variables). When working "
                "with a new set of variables, create a new optimizer."
            )
        return self._untracked.index[key]

    # ------------------------------------------------------------------
    # Applying gradients.

    def apply_gradients(self, grads_and_vars):
        """Applies `(gradient, variable)` pairs; returns `iterations`."""
        pairs = list(grads_and_vars)
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(
                    "Argument `grads_and_vars` must be a list of "
                    f"(gradient, variable) pairs. Received an item {pair!r}."
                )
        if not pairs:
            return self._iterations
        grads, variables = zip(*pairs)
        return self.apply(list(grads), list(variables))

    def apply(self, grads, trainable_variables=None):
        """Applies `grads` to `trainable_variables` (or the built list).

        Args:
            grads: gradients (tensors or `tf.IndexedSlices`; None entries are
                skipped with a warning).
            trainable_variables: the variables, in the same order. If None,
                `grads` must match the list the optimizer was built with.

        Returns:
            `iterations`.
        """
        grads = list(grads)
        if not grads:
            return self._iterations
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `trainable_variables`, the "
                    "optimizer must already be built. Call "
                    "`optimizer.build(trainable_variables)` first."
                )
            variables = self._untracked.var_list
        else:
            variables = list(trainable_variables)
        if len(grads) != len(variables):
            raise ValueError(
                f"Received {len(grads)} gradients for {len(variables)} "
                "variables: `grads` and `trainable_variables` must match "
                "one-to-one."
            )
        if not self.built:
            self.build(variables)
        full = [None] * len(self._untracked.var_list)
        missing = []
        for grad, variable in zip(grads, variables):
            i = self._index_of(variable)
            if grad is None:
                missing.append(_var_name(variable))
                continue
            full[i] = self._checked_gradient(grad, variable)
        if all(g is None for g in full):
            raise ValueError(
                "No gradients provided for any variable: "
                f"{[_var_name(v) for v in variables]}."
            )
        if missing:
            warnings.warn(
                f"Gradients do not exist for variables {missing} when "
                "minimizing the loss; they are skipped."
            )
        return self._dispatch(full)

    def _checked_gradient(self, grad, variable):
        shape = _unwrap(variable).shape
        if isinstance(grad, tf.IndexedSlices):
            values_shape = grad.values.shape
            ok = values_shape.rank is None or (
                values_shape[1:].is_compatible_with(shape[1:]))
            got = values_shape
        else:
            if not isinstance(grad, (tf.Tensor, tf.Variable)) and not (
                tf.is_tensor(grad)):
                grad = tf.convert_to_tensor(grad)
            ok = grad.shape.is_compatible_with(shape)
            got = grad.shape
        if not ok:
            raise ValueError(
                f"Gradient shape {got} does not match the shape {shape} of "
                f"variable {_var_name(variable)!r}."
            )
        dtype = grad.dtype
        if not dtype.is_floating:
            raise ValueError(
                f"The gradient of variable {_var_name(variable)!r} has dtype "
                f"{dtype.name}; it must be floating point."
            )
        return grad

    def _dispatch(self, grads):
        """Runs the compiled step on `grads` (aligned with the built list)."""
        strategy = tf.distribute.get_strategy()
        if strategy is not self._untracked.strategy:
            raise ValueError(
                "This optimizer was built under a different tf.distribute "
                f"strategy ({type(self._untracked.strategy).__name__}) than "
                f"the current one ({type(strategy).__name__}). Create and "
                "`build()` the optimizer under `strategy.scope()` of the "
                "strategy that runs the step."
            )
        if self._untracked.step_fn is None:
            self._untracked.step_fn = tf.function(
                self._update_step,
                jit_compile=self._jit_compile,
                reduce_retracing=True,
            )
        return self._untracked.step_fn(grads)

    def _update_step(self, grads):
        """The whole step for all variables, traced once per grad structure.

        Args:
            grads: list aligned with the built variables; None where a
                variable has no gradient this step.
        """
        u = self._untracked
        present = [i for i, g in enumerate(grads) if g is not None]
        dense = {}
        for i in present:
            dtype = adamw_math.compute_dtype(u.tf_vars[i].dtype)
            g = adamw_math.densify(grads[i], u.tf_vars[i].shape)
            g = tf.cast(g, dtype)
            # Unscale (step 2).
            if self._loss_scale_factor is not None:
                g = g / tf.cast(self._loss_scale_factor, dtype)
            dense[i] = g

        k = self._gradient_accumulation_steps
        if not k:
            self._apply_update(dense)
        else:
            # Accumulate (step 3): every k-th call applies the mean of the
            # k gradients; the calls in between only add.
            summed = {i: self._accumulators[i] + g for i, g in dense.items()}
            is_apply = tf.equal(self._accumulation_count + 1, k)

            def apply_mean():
                self._apply_update(
                    {i: s / tf.cast(k, s.dtype) for i, s in summed.items()})
                for acc in self._accumulators:
                    acc.assign(tf.zeros_like(acc))
                self._accumulation_count.assign(0)
                return tf.constant(True)

            def accumulate():
                for i, s in summed.items():
                    self._accumulators[i].assign(s)
                self._accumulation_count.assign_add(1)
                return tf.constant(False)

            tf.cond(is_apply, apply_mean, accumulate)
        return tf.identity(self._iterations)

    def _apply_update(self, grads):
        """Steps 4-8 on the (mean) gradients `grads`: {index: tensor}."""
        u = self._untracked
        order = sorted(grads)
        # Clip (step 4). Keras applies a clip value only when it is > 0.
        if self._clipnorm is not None and self._clipnorm > 0:
            grads = {i: adamw_math.clip_by_norm(grads[i], self._clipnorm)
                     for i in order}
        elif self._global_clipnorm is not None and self._global_clipnorm > 0:
            clipped, _ = adamw_math.clip_by_global_norm(
                [grads[i] for i in order], self._global_clipnorm)
            grads = dict(zip(order, clipped))
        elif self._clipvalue is not None and self._clipvalue > 0:
            grads = {i: adamw_math.clip_by_value(grads[i], self._clipvalue)
                     for i in order}

        # Hyperparameters at `iterations` (before its increment), once per
        # compute dtype.
        hyper = {
            "lr": self._read(self._current_learning_rate()),
            "weight_decay": self._read(self._weight_decay),
            "beta_1": self._read(self._beta_1),
            "beta_2": self._read(self._beta_2),
            "epsilon": self._read(self._epsilon),
        }
        scalars = {}

        def scalars_for(dtype):
            if dtype not in scalars:
                s = {k: tf.cast(v, dtype) for k, v in hyper.items()}
                step = tf.cast(self._iterations + 1, dtype)
                s["alpha"] = adamw_math.step_size(
                    s["lr"], s["beta_1"], s["beta_2"], step)
                s["decay"] = s["weight_decay"] * s["lr"]
                scalars[dtype] = s
            return scalars[dtype]

        new_values = {}
        for i in order:
            variable = u.tf_vars[i]
            dtype = adamw_math.compute_dtype(variable.dtype)
            s = scalars_for(dtype)
            # Weight decay (step 5) and Adam (step 6), in one expression.
            value, m, v, v_hat = adamw_math.adamw_update(
                tf.cast(variable, dtype),
                grads[i],
                self._momentums[i],
                self._velocities[i],
                self._velocity_hats[i] if self._amsgrad else None,
                alpha=s["alpha"],
                beta_1=s["beta_1"],
                beta_2=s["beta_2"],
                epsilon=s["epsilon"],
                decay=s["decay"] if u.use_decay[i] else None,
            )
            self._momentums[i].assign(m)
            self._velocities[i].assign(v)
            if v_hat is not None:
                self._velocity_hats[i].assign(v_hat)
            value = tf.cast(value, variable.dtype)
            variable.assign(value)
            new_values[i] = value

        # EMA (step 7) over every built variable, then the periodic overwrite.
        if self._use_ema:
            first = tf.equal(self._iterations, 0)
            for i, variable in enumerate(u.tf_vars):
                average = self._averages[i]
                current = new_values[i] if i in new_values else (
                    variable.read_value())
                average.assign(adamw_math.ema_update(
                    average, tf.cast(current, average.dtype),
                    self._ema_momentum, first))
            if self._ema_overwrite_frequency:
                overwrite = tf.equal(
                    (self._iterations + 1) % self._ema_overwrite_frequency, 0)

                def overwrite_variables():
                    self._overwrite_with_averages(range(len(u.tf_vars)))
                    return tf.constant(True)

                tf.cond(overwrite, overwrite_variables,
                        lambda: tf.constant(False))
        # Count the applied update (step 8).
        self._iterations.assign_add(1)

    def _overwrite_with_averages(self, indices):
        u = self._untracked
        for i in indices:
            variable = u.tf_vars[i]
            variable.assign(tf.cast(self._averages[i], variable.dtype))

    # ------------------------------------------------------------------
    # The rest of the Keras API.

    def scale_loss(self, loss):
        """Multiplies `loss` by `loss_scale_factor` (if set)."""
        if self._loss_scale_factor is not None:
            return loss * tf.cast(self._loss_scale_factor, loss.dtype)
        return loss

    def finalize_variable_values(self, var_list):
        """Writes the EMA averages into `var_list` (when `use_ema`)."""
        if not self._use_ema:
            return
        if not self.built:
            raise ValueError(
                "`finalize_variable_values()` needs a built optimizer: it "
                "has no moving averages yet."
            )
        indices = [self._index_of(v) for v in var_list]
        self._overwrite_with_averages(indices)

    def get_config(self):
        """The optimizer's configuration, with Keras's keys.

        Raises:
            ValueError: a hyperparameter is a plain Python callable, which
                cannot be serialised without executing code on load.
        """
        config = {
            "name": self._keras_name,
            "learning_rate": self._config_value(
                "learning_rate", self._learning_rate),
            "weight_decay": self._config_value(
                "weight_decay", self._weight_decay),
            "clipnorm": self._clipnorm,
            "global_clipnorm": self._global_clipnorm,
            "clipvalue": self._clipvalue,
            "use_ema": self._use_ema,
            "ema_momentum": self._ema_momentum,
            "ema_overwrite_frequency": self._ema_overwrite_frequency,
            "loss_scale_factor": self._loss_scale_factor,
            "gradient_accumulation_steps": self._gradient_accumulation_steps,
            "beta_1": self._config_value("beta_1", self._beta_1),
            "beta_2": self._config_value("beta_2", self._beta_2),
            "epsilon": self._config_value("epsilon", self._epsilon),
            "amsgrad": self._amsgrad,
            "jit_compile": self._jit_compile,
        }
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
            "or, for the learning rate, a LearningRateSchedule."
        )

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
