"""Keras's attributes of `AdamW`: its hyperparameters and options.

A mixin of `tf_adamw.AdamW`, kept apart so the class reads as the optimizer:
the hyperparameters (`learning_rate`, `weight_decay`, `beta_1`, `beta_2`,
`epsilon`), their setters, what a restored checkpoint held for them, and the
read-only options. It uses the optimizer's tracked attributes (`_learning_rate`,
...), its `_options` and its `_engine`.
"""

from tf_adamw import hyperparameters


class Attributes:
    """The hyperparameter and option attributes of `tf_adamw.AdamW`."""

    @property
    def learning_rate(self):
        """The current learning rate.

        The variable when the learning rate is a number; the schedule's value
        at `iterations` for a schedule; the callable's value for a callable.
        Setting a number assigns it (a traced step is not retraced).
        """
        return hyperparameters.learning_rate_at(self._learning_rate,
                                                self._iterations)

    @learning_rate.setter
    def learning_rate(self, value):
        if hyperparameters.is_read_each_step(value):
            # Deleting first untracks the variable (assigning an untrackable
            # value would keep it as a checkpoint dependency).
            del self._learning_rate
            self._learning_rate = value
            # As Keras: the variable it replaces is no longer state.
            self._engine.forget_hyperparameter("learning_rate")
            self._engine.runner.functions.clear()  # reads a new object
            return
        if self._learning_rate is not self._engine.own_hyperparameters.get(
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
        value = hyperparameters.checked_float(name, value)
        getattr(self, "_" + name).assign(value)
        self._engine.given[name] = value

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

    loss_scale = property(lambda self: self._options.loss_scale)
    initial_scale = property(lambda self: self._options.initial_scale)
    dynamic_growth_steps = property(
        lambda self: self._options.dynamic_growth_steps)

    @property
    def dynamic_scale(self):
        """The current dynamic loss scale (a float32 variable), as Keras's
        `LossScaleOptimizer.dynamic_scale`.

        Raises:
            AttributeError: without `loss_scale="dynamic"`.
        """
        if not self._options.dynamic_loss_scale:
            raise AttributeError(
                "`dynamic_scale` exists only with `loss_scale=\"dynamic\"`.")
        return self._dynamic_scale

    @property
    def skipped_steps(self):
        """Calls skipped for non-finite gradients (an int64 variable).

        Raises:
            AttributeError: without `skip_nonfinite_gradients=True`.
        """
        if not self._options.skip_nonfinite_gradients:
            raise AttributeError(
                "`skipped_steps` exists only with "
                "`skip_nonfinite_gradients=True`.")
        return self._skipped_steps

    @property
    def restored_hyperparameters(self):
        """`{name: value}` of the hyperparameters the last restored
        checkpoint held (empty before any restore)."""
        return dict(self._engine.restored_hyperparameters)

    def use_restored_hyperparameters(self):
        """Sets every hyperparameter the last restored checkpoint held to
        its value there (e.g. a learning rate a callback lowered during the
        run). A restore alone keeps this optimizer's own values.

        Returns:
            `{name: value}` of what was set.
        """
        restored = self.restored_hyperparameters
        for name, value in restored.items():
            self._assign_hyperparameter(name, value)
        return restored
