"""The `tf_adamw.keras.AdamW` class: a Keras 3 optimizer over the core.

See the package docstring (`tf_adamw/keras/__init__.py`) for the design and
the differences Keras forces.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from tf_adamw import options as options_lib
from tf_adamw import optimizer as core_lib
from tf_adamw import schedules
from tf_adamw.keras import config as config_lib
from tf_adamw.keras import saving

_OUR_KEYWORDS = ("fused", "jit_compile", "skip_nonfinite_gradients")
_CORE_HYPERPARAMETERS = ("learning_rate", "weight_decay", "beta_1", "beta_2",
                         "epsilon")


class _Adapter:
    """The adapter's mutable state, in one plain (untracked) object.

    Keras would track lists of variables assigned to an optimizer as its own
    variables, and TF as checkpoint dependencies; this object hides them.
    """

    def __init__(self, learning_rate, weight_decay, loss_scale_factor, ours):
        self.core = None  # the tf_adamw.AdamW, made by build()
        # The float given for a number learning rate (reported by config).
        self.learning_rate_given = learning_rate
        self.weight_decay = weight_decay
        self.loss_scale_factor = loss_scale_factor
        # fused, jit_compile, skip_nonfinite_gradients, slot_layout
        self.ours = ours
        self.exclusions = None  # (var_list, var_names) for the core
        self.pending = None  # state loaded before build(), as NumPy


@keras.saving.register_keras_serializable(package="tf_adamw")
class AdamW(keras.optimizers.Optimizer):
    """Keras 3's AdamW whose update is `tf_adamw.AdamW`'s step.

    The signature, defaults and meaning of `keras.optimizers.AdamW` (see
    `tf_adamw.AdamW` for each argument). The keyword arguments `fused`,
    `jit_compile`, `skip_nonfinite_gradients` and `slot_layout` are passed
    to the core.

    Example:
        model.compile(optimizer=tf_adamw.keras.AdamW(1e-3,
                                                     global_clipnorm=1.0),
                      loss="mse")
        model.fit(x, y)
    """

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9,
                 beta_2=0.999, epsilon=1e-7, amsgrad=False, clipnorm=None,
                 clipvalue=None, global_clipnorm=None, use_ema=False,
                 ema_momentum=0.99, ema_overwrite_frequency=None,
                 loss_scale_factor=None, gradient_accumulation_steps=None,
                 name=None, **kwargs):
        # The core is made at build(): check everything now, with its rules,
        # so that a mistake fails here rather than in the first fit().
        ours = options_lib.extra_keywords(kwargs, weight_decay=weight_decay)
        options = options_lib.validate(
            amsgrad=amsgrad, clipnorm=clipnorm, clipvalue=clipvalue,
            global_clipnorm=global_clipnorm, use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps, **ours)
        learning_rate = config_lib.check_hyperparameter("learning_rate",
                                                        learning_rate)
        for hyper, value in (("beta_1", beta_1), ("beta_2", beta_2),
                             ("epsilon", epsilon)):
            config_lib.check_hyperparameter(hyper, value)
        super().__init__(
            learning_rate=learning_rate, clipnorm=options.clipnorm,
            clipvalue=options.clipvalue,
            global_clipnorm=options.global_clipnorm, use_ema=options.use_ema,
            ema_momentum=options.ema_momentum,
            ema_overwrite_frequency=options.ema_overwrite_frequency,
            gradient_accumulation_steps=options.gradient_accumulation_steps,
            name=name)
        self._adapter = _Adapter(
            learning_rate if isinstance(learning_rate, float) else None,
            options_lib.check_hyperparameter("weight_decay", weight_decay),
            options.loss_scale_factor, ours)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.amsgrad = options.amsgrad

    def __repr__(self):
        # tf_keras's compile() refuses this class with "Could not interpret
        # optimizer identifier: <repr>": the repr says what to use there.
        return (f"<tf_adamw.keras.AdamW {self.name!r}: a Keras 3 optimizer. "
                "tf_keras models cannot compile with it; with tf_keras use "
                "tf_adamw.AdamW in a custom training loop>")

    # ------------------------------------------------------------------
    # Attributes Keras's base class sets, kept in the adapter.

    @property
    def weight_decay(self):
        """The weight decay rate; setting it changes the built step too."""
        adapter = self.__dict__.get("_adapter")
        return None if adapter is None else adapter.weight_decay

    @weight_decay.setter
    def weight_decay(self, value):
        adapter = self.__dict__.get("_adapter")
        if adapter is None:
            return  # Keras's base __init__ (ours sets it after).
        value = options_lib.check_hyperparameter("weight_decay", value)
        if adapter.core is not None:
            adapter.core.weight_decay = value
        adapter.weight_decay = value

    @property
    def loss_scale_factor(self):
        """The static loss scale (`LossScaleOptimizer` sets it to None)."""
        adapter = self.__dict__.get("_adapter")
        return None if adapter is None else adapter.loss_scale_factor

    @loss_scale_factor.setter
    def loss_scale_factor(self, value):
        adapter = self.__dict__.get("_adapter")
        if adapter is None:
            return  # Keras's base __init__ (ours sets it after).
        value = options_lib.check_argument("loss_scale_factor", value)
        core = adapter.core
        if core is not None and value != core.loss_scale_factor:
            raise ValueError(
                "`loss_scale_factor` of tf_adamw.keras.AdamW is fixed once "
                "the optimizer is built (the step unscales with it). Set it, "
                "or wrap the optimizer in `LossScaleOptimizer`, before the "
                "first `fit()`.")
        adapter.loss_scale_factor = value

    @property
    def core(self):
        """The `tf_adamw.AdamW` doing the updates (None before `build()`)."""
        return self._adapter.core

    @property
    def uses_fused_kernel(self):
        """True when the core runs the fused CPU kernel (see
        `tf_adamw.AdamW.uses_fused_kernel`)."""
        return self.core is not None and self.core.uses_fused_kernel

    # ------------------------------------------------------------------
    # State.

    @property
    def iterations(self):
        """The number of applied updates (an int64 variable)."""
        core = self.core
        return self._iterations if core is None else core.iterations

    @property
    def learning_rate(self):
        """The current learning rate: a variable for a number, else the
        schedule's (or callable's) value now."""
        if self.core is not None:
            return self.core.learning_rate
        value = self._learning_rate
        if schedules.is_schedule(value):
            return value(self._iterations)
        return value if isinstance(value, keras.Variable) else value()

    @learning_rate.setter
    def learning_rate(self, value):
        if self.core is not None:
            self.core.learning_rate = value  # assigns a number: no retrace
            return
        if options_lib.is_number(value):
            value = float(value)
        # Before build, Keras's rules: assign a number, replace otherwise.
        keras.optimizers.Optimizer.learning_rate.fset(self, value)
        self._adapter.learning_rate_given = (
            value if isinstance(value, float) else None)

    @property
    def variables(self):
        """The state Keras saves: counters, the learning rate (when a
        number), then each model variable's slots, in the core's order.
        Before `build()`: Keras's `iterations` and learning-rate variables.
        """
        if self.core is None:
            return self._variables[:]
        return saving.state_variables(self.core)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables from weight decay; call before `build()`.

        As `tf_adamw.AdamW.exclude_from_weight_decay`: `var_names` are
        regular expressions searched in a variable's `path`, else `name`.

        Raises:
            ValueError: after `build()`, or an invalid pattern.
        """
        if self.built:
            raise ValueError(
                "`exclude_from_weight_decay()` can only be configured before "
                "the optimizer is built: the excluded set is compiled into "
                "the step.")
        options_lib.check_patterns(var_names)
        self._adapter.exclusions = (list(var_list) if var_list else None,
                                    list(var_names) if var_names else None)

    # ------------------------------------------------------------------
    # Building.

    def build(self, variables):
        """Creates the core under this optimizer's strategy and builds it.

        Raises:
            ValueError: what `tf_adamw.AdamW.build` raises (e.g. another
                variable list).
        """
        variables = list(variables)
        if self.core is not None:
            self.core.build(variables)  # refuses a different list
            return
        # Keras may build inside its traced train step (no strategy): the
        # core's variables and the state copied into them are made eagerly.
        with tf.init_scope(), self._strategy_scope():
            core = self._make_core()
            core.build(variables)
            # After the build: a tf.train.Checkpoint restored before it
            # fills the core's slots now (deferred restoration).
            self._track_trackable(core, name="core", overwrite=True)
            self._adapter.core = core
            pending, self._adapter.pending = self._adapter.pending, None
            if pending is not None:
                saving.assign(self.variables, pending, self.name)
        # Keras's bookkeeping (read by its callbacks), untracked.
        object.__setattr__(self, "_trainable_variables", variables)
        object.__setattr__(self, "_trainable_variables_indices", {
            self._var_key(v): i for i, v in enumerate(variables)})
        self.built = True

    def _strategy_scope(self):
        """The scope of the strategy this optimizer was created under.

        Raises:
            ValueError: the call is made under another strategy.
        """
        strategy, current = (self._distribution_strategy,
                             tf.distribute.get_strategy())
        if strategy is current:
            return contextlib.nullcontext()
        if tf.distribute.has_strategy():
            raise ValueError(
                "tf_adamw.keras.AdamW was created under "
                f"{type(strategy).__name__} but is used under "
                f"{type(current).__name__}. Create the optimizer inside the "
                "`strategy.scope()` in which the model is created and "
                "compiled.")
        return strategy.scope()

    def _make_core(self):
        """The core, with the hyperparameters and `iterations` of now."""
        adapter = self._adapter
        learning_rate = self._learning_rate
        if isinstance(learning_rate, keras.Variable):
            learning_rate = config_lib.number_of(
                learning_rate, adapter.learning_rate_given)
        core = core_lib.AdamW(
            learning_rate=learning_rate, weight_decay=adapter.weight_decay,
            beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon,
            amsgrad=self.amsgrad, clipnorm=self.clipnorm,
            clipvalue=self.clipvalue, global_clipnorm=self.global_clipnorm,
            use_ema=self.use_ema, ema_momentum=self.ema_momentum,
            ema_overwrite_frequency=self.ema_overwrite_frequency,
            name=self.name, loss_scale_factor=adapter.loss_scale_factor,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            **adapter.ours)
        if adapter.exclusions is not None:
            core.exclude_from_weight_decay(*adapter.exclusions)
        core.iterations.assign(self._iterations.numpy())
        return core

    # ------------------------------------------------------------------
    # Applying gradients.

    def apply_gradients(self, grads_and_vars,
                        skip_gradients_aggregation=False):
        """Applies `(gradient, variable)` pairs; returns `iterations`.

        Args:
            grads_and_vars: iterable of `(gradient, variable)`.
            skip_gradients_aggregation: the caller already summed the
                gradients across replicas (custom loops; `fit()` passes
                each replica's own gradients, which are summed).
        """
        grads, variables = zip(*grads_and_vars)
        self.apply(grads, variables,
                   skip_gradients_aggregation=skip_gradients_aggregation)
        return self.iterations

    def apply(self, grads, trainable_variables=None,
              skip_gradients_aggregation=False):
        """Applies `grads` with the core's step (which ends with the
        variables' constraints, as Keras's `apply` does).

        Args:
            grads: one gradient per variable (None entries are skipped with
                a warning).
            trainable_variables: the variables; None: the built list.
            skip_gradients_aggregation: see `apply_gradients`.
        """
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer "
                    "must already be built on a list of variables. Call "
                    "`optimizer.build(trainable_variables)` first.")
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            self.build(trainable_variables)
        # Keras's fit() divides each replica's loss by the number of
        # replicas, so the sum of the replicas' gradients is the global
        # batch's gradient: the core sums, then clips.
        self.core.apply(grads, trainable_variables,
                        skip_gradients_aggregation=skip_gradients_aggregation)

    def finalize_variable_values(self, var_list):
        """Writes the EMA averages into `var_list` (with `use_ema`; `fit()`
        calls this after the last epoch)."""
        if self.use_ema and self.core is not None:
            self.core.finalize_variable_values(var_list)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        """Unsupported, as in Keras's TensorFlow backend."""
        raise ValueError(
            "stateless_apply is not supported with the TensorFlow backend.")

    # ------------------------------------------------------------------
    # Saving (Keras's `.keras` and `.weights.h5` files).

    def save_own_variables(self, store):
        """Writes `variables` (or the state loaded before `build()`)."""
        values = self._adapter.pending
        if values is None:
            values = [np.asarray(v.numpy()) for v in self.variables]
        for i, value in enumerate(values):
            store[str(i)] = value

    def load_own_variables(self, store):
        """Restores `variables`. Before `build()` the values are kept and
        applied by `build()`; `iterations` and the learning rate are set at
        once (they come first, in a known place)."""
        values = saving.read(store)
        if self.core is not None:
            with self._strategy_scope():
                saving.assign(self.variables, values, self.name)
            return
        self._adapter.pending = values
        position = saving.learning_rate_position(
            self.gradient_accumulation_steps,
            self._adapter.ours.get("skip_nonfinite_gradients"))
        if values and np.shape(values[0]) == ():
            self._iterations.assign(values[0])
        if isinstance(self._learning_rate, keras.Variable) and (
                len(values) > position and np.shape(values[position]) == ()):
            self._learning_rate.assign(values[position])

    def set_weights(self, weights):
        """Assigns `weights` to `variables`, in order (after `build()`)."""
        if not self.built:
            raise ValueError(
                "Call `optimizer.build(trainable_variables)` before "
                "`set_weights()`.")
        with self._strategy_scope():
            saving.assign(self.variables, [np.asarray(w) for w in weights],
                          self.name)

    # ------------------------------------------------------------------
    # Pickle and copy.deepcopy.

    def __reduce__(self):
        """Keras's pickling (its saving format: the config and `variables`,
        applied at the copy's `build()`), plus the weight-decay exclusions,
        which Keras's config leaves out."""
        function, arguments = super().__reduce__()
        return _unpickled, (function, arguments, self._adapter.exclusions)

    # ------------------------------------------------------------------
    # Configuration.

    def get_config(self):
        """Keras AdamW's keys, plus `fused`, `jit_compile`,
        `skip_nonfinite_gradients` and (when not the default)
        `slot_layout`.

        Raises:
            ValueError: a hyperparameter is a plain Python callable.
        """
        config = {"name": self.name}
        if self.core is not None:
            core_config = self.core.get_config()
            config.update({k: core_config[k] for k in _CORE_HYPERPARAMETERS})
        else:
            config["learning_rate"] = config_lib.config_value(
                "learning_rate", self._learning_rate,
                self._adapter.learning_rate_given)
            config["weight_decay"] = self.weight_decay
            for hyper in ("beta_1", "beta_2", "epsilon"):
                config[hyper] = config_lib.config_value(
                    hyper, getattr(self, hyper))
        ours = options_lib.validate(**self._adapter.ours).to_config()
        config.update(
            amsgrad=self.amsgrad, clipnorm=self.clipnorm,
            clipvalue=self.clipvalue, global_clipnorm=self.global_clipnorm,
            use_ema=self.use_ema, ema_momentum=self.ema_momentum,
            ema_overwrite_frequency=self.ema_overwrite_frequency,
            loss_scale_factor=self.loss_scale_factor,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            # `slot_layout` only when not the default, as in the core's.
            **{key: ours[key] for key in _OUR_KEYWORDS + ("slot_layout",)
               if key in ours})
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Rebuilds the optimizer from `get_config()` output.

        A schedule is rebuilt by class name (Keras's built-in schedules,
        `custom_objects`, or classes registered with Keras); no code in the
        config is run.
        """
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = config_lib.deserialize_schedule(
                config["learning_rate"], custom_objects)
        return cls(**config)


def _unpickled(function, arguments, exclusions):
    """Keras's unpickling (`function(*arguments)`), then the exclusions."""
    optimizer = function(*arguments)
    if exclusions is not None:
        optimizer.exclude_from_weight_decay(*exclusions)
    return optimizer
