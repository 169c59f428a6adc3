"""`tf_adamw.keras.AdamW`: this project's AdamW as a Keras 3 optimizer.

`model.compile(optimizer=tf_adamw.keras.AdamW(...))` trains with the same
step as the custom-loop `tf_adamw.AdamW` (the fused CPU kernel, XLA
elsewhere, sum-then-clip across replicas). The class is an adapter, not a
second optimizer: at `build()` it creates one `tf_adamw.AdamW` (its `core`)
under the strategy it was created in, and hands it every update.

How it is wired (`tf_adamw/keras/optimizer.py`):

- `__init__` checks every argument at once with the core's rules. Until
  `build()`, Keras's own `iterations` and learning-rate variables stand in.
- `build(var_list)` creates the core with the hyperparameters of that
  moment, copies `iterations` into it, passes `exclude_from_weight_decay`
  on, builds it, then applies any state loaded before the build.
- `apply()` / `apply_gradients()` delegate to the core. Under a strategy
  Keras calls them inside `strategy.run` with each replica's gradients of
  its loss, which Keras has already divided by the number of replicas
  (`keras.src.losses.loss.scale_loss_for_distribution`), so the core sums
  them across replicas (`skip_gradients_aggregation=False`), then unscales,
  clips and steps. The core also applies the variables' constraints and
  sets `overwrite_with_gradient` variables (float8 layers), as Keras's
  `apply()` does (docs/semantics.md, step 9 and "Variables overwritten with
  their gradient"): the adapter has no step logic of its own.
- `iterations`, `learning_rate`, `weight_decay`, `variables` and
  `finalize_variable_values` (which `fit()` calls after the last epoch) read
  or write the core once it exists.
- `save_own_variables` / `load_own_variables` (`.keras` and `.weights.h5`
  files) store `variables`: the counters, the learning rate when it is a
  number, then every slot in the core's order (`tf_adamw/keras/saving.py`).
  A load into an unbuilt optimizer is kept and applied at `build()`.
- The core is tracked as `core` by TF: `tf.train.Checkpoint` of the
  optimizer (or of a model holding it) saves and restores its state.
- `pickle` and `copy.deepcopy` are Keras's (`KerasSaveable.__reduce__`:
  the config and `variables` in Keras's saving format, loaded into an
  unbuilt copy, which applies them at `build()` like any state loaded
  before the build), plus the weight-decay exclusions, which Keras's config
  does not hold. Copied with the model's variables (one `deepcopy` or
  pickle of both), the exclusions name the copied variables.

Differences forced by Keras:

- `variables` are the core's `tf.Variable`s, not `keras.Variable`s: they
  have no `path`, so `Model.get_state_tree()` cannot list them. Their
  layout differs from `keras.optimizers.AdamW`'s, so optimizer state saved
  by one does not load into the other (a warning, and it is skipped, as
  Keras does for any mismatch).
- Keras reads its options from attributes on every step; the core fixes
  them at `build()`. After it only `learning_rate` and `weight_decay`
  change the step, and setting `loss_scale_factor` to another value raises
  (`LossScaleOptimizer` sets it to None when it wraps an optimizer:
  `compile()` does that before the build).
- Before `build()`, `iterations` and `learning_rate` are Keras's variables;
  after it, the core's (with the same values).
- The learning rate is saved with the optimizer's state, as Keras does (a
  rate lowered by `ReduceLROnPlateau` survives `load_model`); the core's
  `tf.train.Checkpoint` treats it as configuration instead.
- With gradient accumulation the schedule is evaluated at applied updates
  (`iterations`), not at micro-steps (docs/semantics.md).
- `stateless_apply` is unsupported (as in Keras's TF backend);
  `SwapEMAWeights` reads private attributes of Keras's own optimizers and
  does not work with this one.
- `get_config()` refuses plain callables (a config carries no code);
  schedules come back by class name, including ones registered with
  `keras.saving.register_keras_serializable`.
- tf_keras cannot compile with it: tf_keras's `compile()` accepts only its
  own optimizer classes, and its error shows this optimizer's repr, which
  names `tf_adamw.AdamW`, the custom-loop optimizer for tf_keras models.
  In a custom loop the adapter updates tf_keras variables too.
- `keras.models.load_model` finds the class only once `tf_adamw.keras` is
  imported (the registration as `tf_adamw>AdamW`).

Everything else (accumulation, EMA, sparse and 16-bit gradients,
`skip_nonfinite_gradients`) is `tf_adamw.AdamW`'s behaviour, described in
docs/semantics.md; the user-facing summary is docs/keras.md.
"""

from tf_adamw.keras.optimizer import AdamW

__all__ = ["AdamW"]
