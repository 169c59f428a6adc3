"""What `tf_adamw.keras.AdamW` saves with a Keras model, and loads back.

Keras saves an optimizer by writing `optimizer.variables` into a store
(`store["0"]`, `store["1"]`, ...) and loads by assigning them back in the
same order (`BaseOptimizer.save_own_variables` / `load_own_variables`). The
adapter's state list is the core's variables in the core's fixed order,
without the hyperparameters that are configuration.
"""

import warnings

import numpy as np


def state_variables(core):
    """The core's state, in a fixed order.

    `core.variables` is: the counters (`iterations`, then
    `accumulation_count` and `skipped_steps` when in use), the variables it
    made for number hyperparameters (learning rate, weight decay, betas,
    epsilon, in that order), then each model variable's slots. Weight decay,
    betas and epsilon are configuration (`get_config()` reports them), so
    they are left out; the learning rate stays, as in Keras.
    """
    config_only = [core.weight_decay, core.beta_1, core.beta_2, core.epsilon]
    return [v for v in core.variables
            if not any(v is h for h in config_only)]


def learning_rate_position(gradient_accumulation_steps,
                           skip_nonfinite_gradients):
    """Where a number learning rate sits in `state_variables`: after the
    counters in use."""
    return 1 + bool(gradient_accumulation_steps) + bool(
        skip_nonfinite_gradients)


def read(store):
    """A Keras store's values, in order, as NumPy copies (the store may be
    an HDF5 group that closes after loading)."""
    return [np.array(store[str(i)]) for i in range(len(store.keys()))]


def assign(variables, values, optimizer_name):
    """Assigns `values` to `variables`, or warns and skips when the counts
    differ (another optimizer's layout), as Keras does.

    Returns:
        True when the values were assigned.
    """
    if len(values) != len(variables):
        warnings.warn(
            f"Skipping variable loading for optimizer '{optimizer_name}', "
            f"because it has {len(variables)} variables whereas the saved "
            f"optimizer has {len(values)} variables.", stacklevel=3)
        return False
    for variable, value in zip(variables, values):
        variable.assign(value)
    return True
