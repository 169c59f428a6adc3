"""`AdamW`: Keras 3's AdamW as a fused or XLA-compiled `tf.Module`.

The update math lives in `tf_adamw.update` (pure functions) and, for CPU, in
the fused kernel `tf_adamw/cc/fused_adamw.cc` (`tf_adamw.kernels`), which does
the same operations for all variables in one pass. This module owns the state
(slots, EMA averages, accumulators, counters, hyperparameters) and runs one
step's pipeline in `AdamW._update_step`, in the order of SPEC.md:

    (all-reduce) -> unscale -> accumulate -> clip -> weight decay -> Adam
    -> EMA (+ overwrite) -> iterations += 1

`AdamW._step_kind` decides per call whether weight decay + Adam run as the
fused kernel or as TF ops (compiled by XLA, or plain for SavedModels).
"""

import re
import warnings

import tensorflow as tf
# Where the step is being traced: inside an XLA cluster (a user's
# `jit_compile=True` function, a TPU replica) or for a SavedModel. Neither has
# a public API; both decide whether the fused kernel may be used.
from tensorflow.python.ops import control_flow_util
from tensorflow.python.saved_model import save_context

from tf_adamw import _validation as check
from tf_adamw import distribute
from tf_adamw import kernels
from tf_adamw import schedules
from tf_adamw import update as adamw_math

# The public methods a user's `tf.function` calls. Autograph would otherwise
# re-compile their source (and all they call) on every trace: 7 s of a 12 s
# first call for 256 variables. They hold no Python control flow on tensors
# (branches are explicit `tf.cond`s), so the conversion would change nothing.
_not_converted = tf.autograph.experimental.do_not_convert

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
        self.compute_dtypes = []  # per variable: dtype of its slots and math
        self.shapes = []  # per variable: shape tuple (None if not fully known)
        # The step as a `tf.function`, one per kind (see `_step_kind`),
        # built lazily.
        self.step_fns = {}
        # Why the fused kernel cannot run these variables (None: it can),
        # decided at build().
        self.fused_blocker = "not built"
        # Device -> the kernel's table of that device's slot copies
        # (`kernels.slot_table`), made at build() when the kernel can run.
        self.slot_tables = {}
        # `_local_state()` of an optimizer on one device, made once.
        self.own_state = None
        self.given = {}  # hyperparameter name -> the Python float given
        self.own = {}  # hyperparameter name -> the variable we created
        self.strategy = None  # the tf.distribute strategy of build()
        self.init_strategy = None  # the strategy of __init__
        self.distributed = False  # built under a non-default strategy


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
    if not isinstance(variable, tf.distribute.DistributedValues):
        container = getattr(variable, "_distributed_container", None)
        if container is None:
            # ResourceVariables of a strategy carry it on their handle.
            container = getattr(getattr(variable, "handle", None),
                                "_distributed_container", None)
        if container is not None:
            variable = container()
    return variable._unique_id  # pylint: disable=protected-access


def _var_name(variable):
    """The name Keras matches exclusion patterns against."""
    return str(getattr(variable, "path", None) or variable.name)


def _slot_name(variable, kind):
    base = re.sub(r":\d+$", "", _var_name(variable))
    base = base.replace("/", "_").replace(":", "_")
    return f"{base}_{kind}"


def _overwrite(variables, averages):
    """`variable = average` for each pair, cast to the variable's dtype."""
    for variable, average in zip(variables, averages):
        variable.assign(tf.cast(average, variable.dtype))


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
        skip_nonfinite = kwargs.pop("skip_nonfinite_gradients", False)
        fused = kwargs.pop("fused", None)
        if kwargs:
            raise ValueError(f"Argument(s) not recognized: {kwargs}")
        self._jit_compile = check.boolean("jit_compile", jit_compile)
        self._fused = None if fused is None else check.boolean(
            "fused", fused)
        self._skip_nonfinite = check.boolean(
            "skip_nonfinite_gradients", skip_nonfinite)

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
        self._untracked.init_strategy = tf.distribute.get_strategy()
        with tf.init_scope():
            self._iterations = self._counter("iteration")
            if self._gradient_accumulation_steps:
                self._accumulation_count = self._counter(
                    "accumulation_count"
                )
            if self._skip_nonfinite:
                self._skipped_steps = self._counter("skipped_steps")
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
        # Aggregation NONE everywhere: every replica writes the same value
        # to its own copy, so no update ever needs a collective (and TPUs
        # cannot all-reduce int64).
        return tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name=f"{self._keras_name}/{name}",
            aggregation=tf.VariableAggregation.NONE,
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
        self._untracked.own[name] = tf.Variable(
            value,
            dtype=tf.float32,
            trainable=False,
            name=f"{self._keras_name}/{name}",
            aggregation=tf.VariableAggregation.NONE,
        )
        return self._untracked.own[name]

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
        if self._skip_nonfinite:
            out.append(self._skipped_steps)
        # Only the hyperparameter variables the optimizer created: a
        # variable the user passed as a hyperparameter stays theirs.
        out.extend(self._untracked.own.values())
        for i in range(len(self._untracked.var_list)):
            out.extend(self._slots(i).values())
        return out

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
        """
        i = self._index_of(variable)
        if not tf.executing_eagerly() and self._step_kind() == "fused":
            warnings.warn(
                "`slots_for()` called inside a `tf.function`: the fused "
                "kernel updates momentum and velocity through the "
                "optimizer's slot table, so reads or writes of them in a "
                "function that also applies gradients are not ordered with "
                "the step. Read them outside that function, or create the "
                "optimizer with `fused=False`.")
        return self._slots(i)

    def _slots(self, i):
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
            self._untracked.step_fns = {}  # the step reads a new object
            return
        if self._learning_rate is not self._untracked.own.get(
                "learning_rate"):
            raise TypeError(
                "This optimizer's `learning_rate` is a LearningRateSchedule, "
                "a callable or a variable of yours, hence it is not settable "
                "to a number. Received: "
                f"learning_rate={value!r}"
            )
        self._assign_hyperparameter(self._learning_rate, "learning_rate",
                                    value)

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
    skip_nonfinite_gradients = property(lambda self: self._skip_nonfinite)

    @property
    def skipped_steps(self):
        """Calls skipped for non-finite gradients (an int64 variable).

        Raises:
            AttributeError: the optimizer was built without
                `skip_nonfinite_gradients=True`.
        """
        if not self._skip_nonfinite:
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

    @_not_converted
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
        strategy = tf.distribute.get_strategy()
        distribute.check_supported(strategy)
        if strategy is not self._untracked.init_strategy:
            raise ValueError(
                "This optimizer was created under "
                f"{type(self._untracked.init_strategy).__name__} but is built "
                f"under {type(strategy).__name__}. Create the optimizer and "
                "call `optimizer.build(model.trainable_variables)` inside the "
                "same `strategy.scope()`."
            )
        if tf.distribute.has_strategy() and (
                not tf.distribute.in_cross_replica_context()):
            raise ValueError(
                "The optimizer cannot create its slots inside `strategy.run` "
                "(replica context). Call "
                "`optimizer.build(model.trainable_variables)` under "
                "`strategy.scope()` before running the training step."
            )
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
        u.compute_dtypes = [adamw_math.compute_dtype(v.dtype)
                            for v in u.tf_vars]
        u.shapes = [tuple(v.shape.as_list()) if v.shape.is_fully_defined()
                    else None for v in u.tf_vars]
        u.strategy = strategy
        u.distributed = tf.distribute.has_strategy()
        u.fused_blocker = self._fused_blocker(u.tf_vars, u.compute_dtypes)
        if self._fused and u.fused_blocker:
            raise ValueError(
                "Argument `fused=True`, but the fused AdamW kernel cannot run "
                f"these variables: {u.fused_blocker}. Use `fused=None` (the "
                "default) to fall back to the XLA step.")
        # Extending the tracked lists made in __init__ names the slots
        # `_momentums/0`, ...; a checkpoint restored into the unbuilt
        # optimizer is bound to those lists and fills each slot as it is
        # appended (deferred restoration). Replacing the lists would lose it.
        self._momentums.extend(slots["momentum"])
        self._velocities.extend(slots["velocity"])
        self._velocity_hats.extend(slots["velocity_hat"])
        self._averages.extend(slots["average"])
        self._accumulators.extend(slots["accumulator"])
        if u.fused_blocker is None:
            with tf.init_scope():
                u.slot_tables = self._slot_tables()
        self.built = True

    def _slot_tables(self):
        """The fused kernel's slot table for each device holding slots.

        The kernel reaches the slots through one table per device rather than
        one handle per slot: a `tf.function` running the step then has one
        input for all slots, and TF's cost per function input (~1.4 us per
        call) was most of a step on 200 small variables.
        """
        per_device = {}
        for kind, slots in (("momentums", self._momentums),
                            ("velocities", self._velocities),
                            ("velocity_hats", self._velocity_hats)):
            for slot in slots:
                for copy in distribute.copies(slot):
                    per_device.setdefault(copy.device, {}).setdefault(
                        kind, []).append(copy)
        tables = {}
        for device, kinds in per_device.items():
            with tf.device(device):
                tables[device] = kernels.slot_table(
                    kinds["momentums"], kinds["velocities"],
                    kinds.get("velocity_hats", []))
        return tables

    def _fused_blocker(self, tf_vars, compute_dtypes):
        """Why the fused kernel cannot update `tf_vars`, or None."""
        if self._fused is False:
            return "`fused=False`"
        for variable, dtype in zip(tf_vars, compute_dtypes):
            if dtype != tf.float32:
                return (f"variable {variable.name!r} has dtype "
                        f"{variable.dtype.name} (the kernel updates float32, "
                        "bfloat16 and float16 variables)")
            for copy in distribute.copies(variable):
                device = tf.DeviceSpec.from_string(copy.device or "")
                if device.device_type not in (None, "CPU"):
                    return (f"variable {variable.name!r} is on "
                            f"{copy.device} (the kernel runs on CPU)")
        if kernels.load() is None:
            return "the kernel is unavailable: " + kernels.unavailable_reason()
        return None

    @property
    def uses_fused_kernel(self):
        """True when eager and `tf.function` steps run the fused kernel.

        False before `build()`, with `fused=False`, and when the kernel cannot
        run the variables (see `fused` in the class docstring). Steps traced
        inside XLA use the XLA step regardless, and steps traced for a
        SavedModel its plain-op twin (`_step_kind`).
        """
        return self.built and self._untracked.fused_blocker is None

    def _step_kind(self):
        """Which step the call being dispatched now runs.

        Returns:
            "fused": the fused kernel for steps 5-6, TF ops for the rest.
            "ops": the same pipeline with TF ops only, not compiled: it
                rounds exactly like "fused" (same operations, each rounded
                once) and needs no kernel library, so a SavedModel traced
                from an optimizer running "fused" resumes bit-identically
                wherever it is loaded.
            "xla": the step compiled by XLA (`jit_compile`), everywhere the
                kernel cannot run.
        """
        if not self.uses_fused_kernel:
            return "xla"
        if not tf.executing_eagerly() and (
                control_flow_util.GraphOrParentsInXlaContext(
                    tf.compat.v1.get_default_graph())):
            # A custom op has no XLA lowering: inside a jit-compiled
            # function or a TPU replica XLA compiles the step.
            return "xla"
        if save_context.in_save_context():
            return "ops"
        return "fused"

    def _index_of(self, variable):
        key = _var_key(variable)
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
            skip_gradients_aggregation = not check.boolean(
                "experimental_aggregate_gradients", aggregate)
        if kwargs:
            raise ValueError(f"Argument(s) not recognized: {kwargs}")
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
        aggregate = not check.boolean(
            "skip_gradients_aggregation", skip_gradients_aggregation)
        u = self._untracked
        if len(variables) == len(u.var_list) and all(
                a is b for a, b in zip(variables, u.var_list)):
            if self._as_built(grads):
                return self._dispatch(grads, aggregate=aggregate)
            indices = range(len(variables))  # the built list, in order
        else:
            indices = [self._index_of(v) for v in variables]
        full = [None] * len(u.var_list)
        missing = []
        for grad, variable, i in zip(grads, variables, indices):
            if grad is None:
                missing.append(_var_name(variable))
                continue
            full[i] = self._checked_gradient(grad, variable, i)
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
        return self._dispatch(full, aggregate=aggregate)

    def _as_built(self, grads):
        """True when `grads` are dense tensors of exactly the built shapes
        and compute dtypes, one per built variable: the common case, checked
        in bulk (eager steps of many small variables are bound by this
        Python; DTypes are interned, so the list comparison is by identity).
        """
        u = self._untracked
        try:
            return ([g._shape_tuple() for g in grads] == u.shapes  # pylint: disable=protected-access
                    and [g.dtype for g in grads] == u.compute_dtypes)
        except AttributeError:  # None, IndexedSlices, per-replica values
            return False

    def _checked_gradient(self, grad, variable, i):
        shape_tuple = getattr(grad, "_shape_tuple", None)
        if shape_tuple is not None and (
                shape_tuple() == self._untracked.shapes[i]
                and grad.dtype.is_floating):
            # A dense tensor of exactly the variable's shape: the common
            # case, checked without building TensorShapes (eager steps of
            # many small variables are bound by this Python).
            return grad
        if distribute.is_distributed(grad):
            # Per-replica gradients (from `strategy.run`) applied in a
            # cross-replica context: check one replica's component.
            for component in grad.values:
                self._checked_gradient(component, variable, i)
            return grad
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

    def _dispatch(self, grads, aggregate=True):
        """Runs the step on `grads` (aligned with the built list).

        One device: the step runs once. Under a strategy, in a replica
        context: gradients are summed across replicas (unless `aggregate` is
        False), then every replica runs the step on its own copies. In a
        cross-replica context: per-replica gradients are summed, plain
        tensors are taken as the global gradients, and the step runs once per
        replica.
        """
        u = self._untracked
        strategy = tf.distribute.get_strategy()
        if (strategy is not u.strategy and u.distributed
                and not tf.distribute.has_strategy()):
            # A plain call (outside any scope) on an optimizer built under a
            # strategy: a cross-replica call of that strategy.
            with u.strategy.scope():
                return self._dispatch(grads, aggregate)
        if strategy is not u.strategy:
            raise ValueError(
                "This optimizer was built under a different tf.distribute "
                f"strategy ({type(u.strategy).__name__}) than the current one "
                f"({type(strategy).__name__}). Create and `build()` the "
                "optimizer under `strategy.scope()` of the strategy that runs "
                "the step."
            )
        external = self._external_hyperparameters()
        kind = self._step_kind()
        if not tf.distribute.has_strategy():
            self._run_step(kind, grads, external)
            return self._iterations
        indices = [i for i, g in enumerate(grads) if g is not None]
        present = []
        for i in indices:
            g = grads[i]
            if not distribute.is_distributed(g):
                # Reduce (and copy between devices) in the compute dtype.
                variable = u.tf_vars[i]
                g = tf.cast(adamw_math.densify(g, variable.shape),
                            u.compute_dtypes[i])
            present.append(g)

        def run_on_this_replica(_, present_grads, external):
            full = [None] * len(grads)
            for i, g in zip(indices, present_grads):
                full[i] = g
            return self._run_step(kind, full, external)

        if tf.distribute.in_cross_replica_context():
            if any(distribute.is_distributed(g) for g in present):
                present = strategy.extended.batch_reduce_to(
                    tf.distribute.ReduceOp.SUM,
                    [(g, u.tf_vars[i]) for i, g in zip(indices, present)])
            strategy.extended.update(
                self._iterations, run_on_this_replica,
                args=(present, external))
            return self._iterations
        if aggregate:
            present = distribute.all_reduce_sum(
                tf.distribute.get_replica_context(), present)

        def update_every_replica(strategy, present_grads, external):
            return strategy.extended.update(
                self._iterations, run_on_this_replica,
                args=(present_grads, external), group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            update_every_replica, strategy, present, external)
        return self._iterations

    def _run_step(self, kind, grads, external):
        """Runs the step of `kind` on this replica's (or device's) copies."""
        if kind != "xla" and not tf.executing_eagerly():
            # Traced straight into the caller's graph: a nested function
            # would capture every variable handle twice (a placeholder in
            # each graph) and add a call op with all of them as inputs.
            return self._update_step(grads, external, fused=kind == "fused")
        if kind == "fused" and self._only_fused_ops():
            # One kernel and a few scalar ops: running them eagerly costs
            # less than a function call with every variable's handle as an
            # input.
            return self._update_step(grads, external, fused=True)
        return self._step_function(kind)(grads, external)

    def _only_fused_ops(self):
        """True when the step has no per-variable op but the kernel."""
        return not (
            self._skip_nonfinite or self._gradient_accumulation_steps
            or self._use_ema or self._loss_scale_factor is not None
            or self._clipnorm or self._clipvalue or self._global_clipnorm)

    def _step_function(self, kind):
        """The step as a `tf.function` of `kind` (`_step_kind`).

        Also `kind="scalars"`: `_step_scalars` alone, for eager fused steps.
        """
        u = self._untracked
        if kind not in u.step_fns:
            # autograph=False: the step has no Python control flow on
            # tensors (branches are explicit tf.conds), and autograph's
            # source conversion dominated tracing time (15 s for 200
            # variables).
            function = {"fused": self._fused_update_step,
                        "scalars": self._step_scalars}.get(
                            kind, self._update_step)
            u.step_fns[kind] = tf.function(
                function,
                jit_compile=self._jit_compile if kind == "xla" else False,
                reduce_retracing=True, autograph=False)
        return u.step_fns[kind]

    def _fused_update_step(self, grads, external):
        return self._update_step(grads, external, fused=True)

    def _update_step(self, grads, external, fused=False):
        """The whole step for all variables, traced once per grad structure.

        Runs on one replica (or the only device) against that replica's own
        copies of every variable. Steps 2-8 of SPEC.md, in order.

        Args:
            grads: list aligned with the built variables; None where a
                variable has no gradient this step.
            external: `_external_hyperparameters()` of this call.
            fused: steps 5-6 run as the fused kernel rather than as TF ops.
        """
        state = self._local_state()
        state["external"] = external
        state["fused"] = fused
        dense = {}
        compute_dtypes = self._untracked.compute_dtypes
        for i, g in enumerate(grads):
            if g is None:
                continue
            dtype = compute_dtypes[i]
            # DTypes are interned: `is` is the fast common case.
            if not (isinstance(g, tf.Tensor) and (
                    g.dtype is dtype or g.dtype == dtype)):
                g = tf.cast(adamw_math.densify(
                    g, state["variables"][i].shape), dtype)
            # Step 2: unscale.
            if self._loss_scale_factor is not None:
                g = g / tf.cast(self._loss_scale_factor, dtype)
            dense[i] = g

        if not self._skip_nonfinite:
            self._accumulate_or_apply(state, dense)
            return self._step_result(state)
        # Ours: a call whose gradients hold NaN or Inf changes nothing but
        # the skip counter. The gradients were summed across replicas
        # before this point, so every replica takes the same branch.
        finite = tf.reduce_all(tf.stack(
            [tf.reduce_all(tf.math.is_finite(g)) for g in dense.values()]))

        def apply():
            self._accumulate_or_apply(state, dense)
            return tf.constant(True)

        def skip():
            state["skipped_steps"].assign_add(1)
            return tf.constant(False)

        tf.cond(finite, apply, skip)
        return self._step_result(state)

    @staticmethod
    def _step_result(state):
        """What a step returns: `iterations` after it (None when eager: the
        caller returns the variable itself, and an eager op costs ~30 us)."""
        if tf.executing_eagerly():
            return None
        return tf.identity(state["iterations"])

    def _accumulate_or_apply(self, state, dense):
        """Step 3, then (on applying calls) steps 4-8."""
        k = self._gradient_accumulation_steps
        if not k:
            self._apply_update(state, dense)
            return
        # Step 3: accumulate. Every k-th call applies the mean of the k
        # gradients; the calls in between only add (a tf.cond, so those
        # calls skip the update's memory traffic).
        accumulators = state["accumulators"]
        count = state["accumulation_count"]
        summed = {i: accumulators[i] + g for i, g in dense.items()}

        def apply_mean():
            self._apply_update(
                state,
                {i: s / tf.cast(k, s.dtype) for i, s in summed.items()})
            for accumulator in accumulators:
                accumulator.assign(tf.zeros_like(accumulator))
            count.assign(0)
            return tf.constant(True)

        def accumulate():
            for i, s in summed.items():
                accumulators[i].assign(s)
            count.assign_add(1)
            return tf.constant(False)

        tf.cond(tf.equal(count + 1, k), apply_mean, accumulate)

    def _local_state(self):
        """This replica's copy of every variable the step touches."""
        u = self._untracked
        if not u.distributed:
            if u.own_state is None:
                # Plain lists, made once: iterating the tracked lists costs
                # more than the rest of an eager step's Python.
                u.own_state = self._state_of(lambda variable: variable)
            return dict(u.own_state)
        return self._state_of(distribute.local)

    def _state_of(self, local):
        return {
            "variables": [local(v) for v in self._untracked.tf_vars],
            "momentums": [local(v) for v in self._momentums],
            "velocities": [local(v) for v in self._velocities],
            "velocity_hats": [local(v) for v in self._velocity_hats],
            "averages": [local(v) for v in self._averages],
            "accumulators": [local(v) for v in self._accumulators],
            "iterations": local(self._iterations),
            "accumulation_count": (
                local(self._accumulation_count)
                if self._gradient_accumulation_steps else None),
            "skipped_steps": (
                local(self._skipped_steps) if self._skip_nonfinite else None),
        }

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
        s = {k: tf.cast(v, dtype) for k, v in hyper.items()}
        step = tf.cast(iterations + 1, dtype)
        s["alpha"] = adamw_math.step_size(
            s["lr"], s["beta_1"], s["beta_2"], step)
        s["decay"] = s["weight_decay"] * s["lr"]
        s["one_minus_beta_1"] = 1 - s["beta_1"]
        s["one_minus_beta_2"] = 1 - s["beta_2"]
        return s

    def _apply_update(self, state, grads):
        """Steps 4-8 on the (mean) gradients `grads`: {index: tensor}."""
        order = sorted(grads)
        iterations = state["iterations"]
        # Step 4: clip. Keras applies a clip value only when it is > 0.
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

        # Hyperparameters at `iterations` (before its increment), cast once
        # per compute dtype.
        external = state["external"]
        scalars = {}

        def scalars_for(dtype):
            if dtype not in scalars:
                if tf.executing_eagerly():
                    # One small function call instead of ~20 eager op
                    # dispatches (~30 us each here): ~0.3 ms of a 2.5 ms
                    # eager fused step on 200 small variables.
                    scalars[dtype] = self._step_function("scalars")(
                        iterations, external, dtype)
                else:
                    scalars[dtype] = self._step_scalars(
                        iterations, external, dtype)
            return scalars[dtype]

        variables = state["variables"]
        new_values = {}
        if state["fused"]:
            # Steps 5 and 6 for every variable in one kernel, one pass over
            # memory (tf_adamw/cc/fused_adamw.cc does adamw_update's math).
            s = scalars_for(tf.float32)
            kernels.fused_apply(
                [variables[i] for i in order],
                self._untracked.slot_tables[state["momentums"][0].device],
                order,
                [grads[i] for i in order],
                alpha=s["alpha"], one_minus_beta_1=s["one_minus_beta_1"],
                one_minus_beta_2=s["one_minus_beta_2"],
                epsilon=s["epsilon"], decay=s["decay"],
                use_decay=[self._untracked.use_decay[i] for i in order])
        else:
            for i in order:
                variable = variables[i]
                dtype = self._untracked.compute_dtypes[i]
                s = scalars_for(dtype)
                # Steps 5 and 6: weight decay, then Adam, in one expression.
                # Each variable is read once (every use of a tf.Variable in an
                # op would add a read) and written without reading it back.
                value, m, v, v_hat = adamw_math.adamw_update(
                    tf.cast(variable.read_value(), dtype),
                    grads[i],
                    state["momentums"][i].read_value(),
                    state["velocities"][i].read_value(),
                    state["velocity_hats"][i].read_value()
                    if self._amsgrad else None,
                    alpha=s["alpha"],
                    one_minus_beta_1=s["one_minus_beta_1"],
                    one_minus_beta_2=s["one_minus_beta_2"],
                    epsilon=s["epsilon"],
                    decay=s["decay"] if self._untracked.use_decay[i] else None,
                )
                state["momentums"][i].assign(m, read_value=False)
                state["velocities"][i].assign(v, read_value=False)
                if v_hat is not None:
                    state["velocity_hats"][i].assign(v_hat, read_value=False)
                value = tf.cast(value, variable.dtype)
                variable.assign(value, read_value=False)
                new_values[i] = value

        # Step 7: EMA of every built variable, then the periodic overwrite.
        if self._use_ema:
            averages = state["averages"]
            first = tf.equal(iterations, 0)
            for i, variable in enumerate(variables):
                current = new_values[i] if i in new_values else (
                    variable.read_value())
                averages[i].assign(adamw_math.ema_update(
                    averages[i], tf.cast(current, averages[i].dtype),
                    self._ema_momentum, first))
            if self._ema_overwrite_frequency:
                overwrite = tf.equal(
                    (iterations + 1) % self._ema_overwrite_frequency, 0)

                def overwrite_variables():
                    _overwrite(variables, averages)
                    return tf.constant(True)

                tf.cond(overwrite, overwrite_variables,
                        lambda: tf.constant(False))
        # Step 8: count the applied update.
        iterations.assign_add(1, read_value=False)

    # ------------------------------------------------------------------
    # The rest of the Keras API.

    @_not_converted
    def scale_loss(self, loss):
        """Multiplies `loss` by `loss_scale_factor` (if set)."""
        if self._loss_scale_factor is not None:
            return loss * tf.cast(self._loss_scale_factor, loss.dtype)
        return loss

    @_not_converted
    def finalize_variable_values(self, var_list):
        """Writes the EMA averages into `var_list` (when `use_ema`).

        Call in a cross-replica context (outside `strategy.run`); under a
        strategy every replica's copy is overwritten.
        """
        if not self._use_ema:
            return
        if not self.built:
            raise ValueError(
                "`finalize_variable_values()` needs a built optimizer: it "
                "has no moving averages yet."
            )
        indices = [self._index_of(v) for v in var_list]

        def overwrite_on_this_replica(*_):
            _overwrite(
                [distribute.local(self._untracked.tf_vars[i])
                 for i in indices],
                [distribute.local(self._averages[i]) for i in indices])

        strategy = self._untracked.strategy
        if not self._untracked.distributed:
            overwrite_on_this_replica()
        elif tf.distribute.has_strategy() and (
                not tf.distribute.in_cross_replica_context()):
            raise ValueError(
                "Call `finalize_variable_values()` outside `strategy.run` "
                "(in a cross-replica context): it overwrites every replica's "
                "copy.")
        else:
            with strategy.scope():
                strategy.extended.update(
                    self._iterations, overwrite_on_this_replica)

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
            "skip_nonfinite_gradients": self._skip_nonfinite,
            "fused": self._fused,
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
