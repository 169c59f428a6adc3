"""A float64 NumPy reference of the AdamW step of docs/semantics.md ("The
step"; not of Keras's bugs).

`NumpyAdamW` is a test oracle: short, unoptimised, one stage per step of
docs/semantics.md. Step 3 (`skip_nonfinite_gradients`) is not modelled.
It holds plain NumPy arrays:

    variables, m, v, v_hat, averages, accumulators: lists aligned with the
        variables given to the constructor;
    iterations: the number of applied updates (an int).

Hyperparameters are plain attributes and may be changed between calls
(`ref.learning_rate = 0.5`, `ref.weight_decay = 0.1`).

`learning_rate` is a float or a Python function of `iterations` (an int)
returning a float, which emulates a schedule (and, ignoring its argument, a
zero-argument callable). `beta_1`/`beta_2` are floats or zero-argument
callables.

Dtype emulation: with `dtypes=[..., "bfloat16", ...]` a variable is rounded
to that dtype after each change (weight decay + Adam, and the EMA
overwrite), while the math and the slots stay float64. `None` (the default)
keeps float64 values.
"""

import ml_dtypes
import numpy as np

_NUMPY_DTYPES = {
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16,
    "float32": np.float32,
    "float64": np.float64,
}


def _round(value, dtype):
    if dtype is None:
        return value
    return value.astype(_NUMPY_DTYPES[dtype]).astype(np.float64)


def _dense(grad, shape):
    """A dense float64 gradient; `(values, indices)` are scatter-added."""
    if isinstance(grad, tuple):
        values, indices = grad
        out = np.zeros(shape, np.float64)
        np.add.at(out, np.asarray(indices), np.asarray(values, np.float64))
        return out
    return np.asarray(grad, np.float64)


class NumpyAdamW:
    """docs/semantics.md's AdamW in float64 NumPy. See the module docstring."""

    def __init__(self, variables, learning_rate=0.001, weight_decay=0.004,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
                 clipnorm=None, clipvalue=None, global_clipnorm=None,
                 use_ema=False, ema_momentum=0.99,
                 ema_overwrite_frequency=None, loss_scale_factor=None,
                 gradient_accumulation_steps=None, exclude=(), dtypes=None):
        self.dtypes = list(dtypes) if dtypes else [None] * len(variables)
        self.variables = [_round(np.array(x, np.float64), d)
                          for x, d in zip(variables, self.dtypes)]
        zeros = lambda: [np.zeros_like(x) for x in self.variables]  # noqa: E731
        self.m, self.v, self.v_hat = zeros(), zeros(), zeros()
        self.averages, self.accumulators = zeros(), zeros()
        self.iterations = 0
        self.calls = 0  # calls of apply(), for accumulation
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.amsgrad = amsgrad
        self.clipnorm, self.clipvalue = clipnorm, clipvalue
        self.global_clipnorm = global_clipnorm
        self.use_ema, self.ema_momentum = use_ema, ema_momentum
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.loss_scale_factor = loss_scale_factor
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.exclude = set(exclude)

    @staticmethod
    def _value(hyper, *args):
        return float(hyper(*args)) if callable(hyper) else float(hyper)

    def apply(self, grads):
        """One call with `grads` aligned with `variables` (None = no grad).

        Returns True when the call applied an update (False on an
        accumulation micro-step).
        """
        assert len(grads) == len(self.variables)
        # Gradients present this call, dense and float64 (sparse duplicates
        # summed). Step 1 (cross-replica sum) does not arise on one device.
        g = {i: _dense(x, self.variables[i].shape)
             for i, x in enumerate(grads) if x is not None}
        assert g, "all gradients are None"

        # Step 2: unscale. (Step 3, the non-finite guard, is not modelled.)
        if self.loss_scale_factor is not None:
            g = {i: x / self.loss_scale_factor for i, x in g.items()}

        # Step 4: accumulate; every k-th call continues with the mean. That
        # call updates the variables with a gradient in it, and resets every
        # accumulator (tf_adamw's and Keras's behaviour; docs/semantics.md,
        # step 4).
        k = self.gradient_accumulation_steps
        if k:
            for i, x in g.items():
                self.accumulators[i] = self.accumulators[i] + x
            self.calls += 1
            if self.calls % k:
                return False
            g = {i: self.accumulators[i] / k for i in g}
            self.accumulators = [np.zeros_like(a) for a in self.accumulators]

        # Step 5: clip (a clip value applies only when > 0).
        positive = lambda c: c is not None and c > 0  # noqa: E731
        if positive(self.clipnorm):
            g = {i: x * self.clipnorm / max(np.linalg.norm(x), self.clipnorm)
                 for i, x in g.items()}
        elif positive(self.global_clipnorm):
            norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
            scale = self.global_clipnorm / max(norm, self.global_clipnorm)
            g = {i: x * scale for i, x in g.items()}
        elif positive(self.clipvalue):
            g = {i: np.clip(x, -self.clipvalue, self.clipvalue)
                 for i, x in g.items()}

        # Hyperparameters at `iterations`, before its increment.
        lr = self._value(self.learning_rate, self.iterations)
        wd = float(self.weight_decay)
        b1, b2 = self._value(self.beta_1), self._value(self.beta_2)
        t = self.iterations + 1
        alpha = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)

        for i, x in g.items():
            var = self.variables[i]
            # Step 6: decoupled weight decay, before the Adam update.
            if i not in self.exclude:
                var = var - var * wd * lr
            # Step 7: Adam with "epsilon hat" (and AMSGrad).
            self.m[i] = self.m[i] + (x - self.m[i]) * (1 - b1)
            self.v[i] = self.v[i] + (x * x - self.v[i]) * (1 - b2)
            denom = self.v[i]
            if self.amsgrad:
                self.v_hat[i] = np.maximum(self.v_hat[i], self.v[i])
                denom = self.v_hat[i]
            var = var - alpha * self.m[i] / (np.sqrt(denom) + self.epsilon)
            self.variables[i] = _round(var, self.dtypes[i])

        # Step 8: EMA over every variable; first update copies; overwrite.
        if self.use_ema:
            mom = self.ema_momentum if self.iterations > 0 else 0.0
            self.averages = [mom * a + (1 - mom) * x
                             for a, x in zip(self.averages, self.variables)]
            freq = self.ema_overwrite_frequency
            if freq and (self.iterations + 1) % freq == 0:
                self.variables = [_round(a.copy(), d) for a, d in
                                  zip(self.averages, self.dtypes)]

        # Step 9: count the applied update.
        self.iterations += 1
        return True

    def finalize_variable_values(self):
        """Writes the EMA averages into the variables (if `use_ema`)."""
        if self.use_ema:
            self.variables = [_round(a.copy(), d) for a, d in
                              zip(self.averages, self.dtypes)]
