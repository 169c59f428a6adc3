"""State you can trust: exporting, resuming and checking training state.

Four ways the state of a run leaves the process, and the functions for each:

- **Training SavedModel** (`export_training_model`): a `tf.Module` holding the
  model's variables, a built `tf_adamw.AdamW` and a `train_step`
  `tf.function` with an `input_signature`. A new process calls
  `tf.saved_model.load(export_dir).train_step(...)` and continues training
  bit-identically to a run that never stopped. `tf.saved_model.save(module,
  export_dir)` works the same on such a module; the function adds clear
  errors for the mistakes that otherwise give an unusable SavedModel.
- **Serving SavedModel** (`export_serving_model`): the model's variables and
  a `serve` function, no optimizer state; with `use_ema`, the exported values
  are the EMA averages while the live variables stay exactly as they were.
- **EMA evaluation** (`ema_weights`): a context manager that swaps the EMA
  averages into the variables (every replica copy under a strategy) and puts
  the training values back on exit, bit for bit.
- **Distributed resume** (`restore_training_variables`): reads a training
  SavedModel's variables into the same module rebuilt under a
  `tf.distribute` strategy.

  Do not resume distributed training by loading a SavedModel under a
  strategy: `tf.saved_model.load` inside `strategy.scope()` mirrors the
  variables, but the saved `train_step` has no cross-replica all-reduce in
  it, so every replica silently applies its own shard's gradient and the
  replicas drift apart, with no error. Rebuild the module under the strategy
  and call `restore_training_variables` instead.

Restoring the newest intact checkpoint after a crash is
`tf_adamw.checkpoints.restore_latest_good`.
"""

import contextlib
import os

import tensorflow as tf

from tf_adamw import checkpoints
from tf_adamw import distribute
from tf_adamw import optimizer as optimizer_lib
from tf_adamw import slots as slots_lib
from tf_adamw import state as state_lib

__all__ = [
    "ema_weights",
    "export_serving_model",
    "export_training_model",
    "restore_training_variables",
]

# ----------------------------------------------------------------------------
# Walking the object graph that SavedModel and checkpoints save.


def _variable_ids(objects):
    """`id`s of the `tf.Variable`s in `objects` (Keras variables unwrapped)."""
    ids = set()
    for obj in objects:
        if isinstance(obj, tf.Variable):
            ids.add(id(obj))
        inner = getattr(obj, "value", None)
        if isinstance(inner, tf.Variable):
            ids.add(id(inner))
    return ids


def _optimizers_in(paths):
    return [(p, o) for p, o in paths if isinstance(o, optimizer_lib.AdamW)]


def _describe(path):
    return f"`module.{path.replace('/', '.')}`" if path else "`module`"


def _check_module(module, function_name, role):
    """The `module.<function_name>` tf.function, checked for export.

    Raises:
        TypeError: `module` is not trackable.
        ValueError: the function is missing, is not a `tf.function`, or has
            no `input_signature`.
    """
    if not isinstance(module, tf.__internal__.tracking.Trackable):
        raise TypeError(
            f"Argument `module` must be a `tf.Module` holding the {role}. "
            f"Received: module={module!r} of type {type(module).__name__}."
        )
    function = getattr(module, function_name, None)
    if function is None:
        raise ValueError(
            f"Argument `module` has no `{function_name}`: a {role} export "
            f"needs a `{function_name}` method decorated with "
            "`@tf.function(input_signature=[...])`. Received: "
            f"module={module!r}."
        )
    if not hasattr(function, "get_concrete_function"):
        raise ValueError(
            f"`module.{function_name}` must be a `tf.function` (decorate it "
            f"with `@tf.function(input_signature=[...])`). Received: "
            f"{function!r} of type {type(function).__name__}."
        )
    if getattr(function, "input_signature", None) is None:
        raise ValueError(
            f"`module.{function_name}` has no `input_signature`. A SavedModel "
            "keeps only the traces a function has; a new process could not "
            "call it with other shapes. Declare it as "
            f"`@tf.function(input_signature=[tf.TensorSpec(...), ...])`."
        )
    return function


# ----------------------------------------------------------------------------
# Training SavedModel.


def _check_training_optimizers(module):
    """The optimizers in `module` can be exported with it (see
    `export_training_model`'s Raises)."""
    paths = checkpoints.trackable_paths(module)
    optimizers = _optimizers_in(paths)
    if not optimizers:
        raise ValueError(
            "Argument `module` holds no `tf_adamw.AdamW`: a training export "
            "must carry the optimizer's state, or the loaded `train_step` "
            "cannot resume it. Assign the optimizer to an attribute, e.g. "
            "`module.optimizer = optimizer`.")
    tracked = _variable_ids(o for _, o in paths)
    for path, opt in optimizers:
        if not opt.built:
            raise ValueError(
                f"The optimizer {_describe(path)} is not built: its slots do "
                "not exist yet, and would be created as a side effect of the "
                "SavedModel tracing `train_step` (or not at all). Call "
                "`optimizer.build(model.trainable_variables)` (or run one "
                "training step) before exporting.")
        if opt.distribution_strategy is not None:
            raise ValueError(
                f"The optimizer {_describe(path)} was built under "
                f"{type(opt.distribution_strategy).__name__}. A training "
                "SavedModel cannot hold a distributed step: a `train_step` "
                "wrapping `strategy.run` does not save, and one applying "
                "gradients in a cross-replica context saves a graph pinned "
                "to the strategy's devices that fails once loaded. Export "
                "from a single-device copy of the module (rebuild it outside "
                "the strategy and read a `tf.train.Checkpoint` into it), and "
                "resume under a strategy with "
                "`tf_adamw.restore_training_variables`.")
        missing = [v for v in map(state_lib.unwrap, opt.var_list)
                   if id(v) not in tracked]
        if missing:
            raise ValueError(
                f"The optimizer {_describe(path)} updates variables that "
                "`module` does not track, so the export would lose them: "
                f"{[v.name for v in missing]}. Assign the model (or its "
                "variables) to an attribute of `module`.")


def export_training_model(export_dir, module):
    """Saves a module that a new process can load and keep training.

    The new process needs no Python code of the model or of `tf_adamw`:

        loaded = tf.saved_model.load(export_dir)
        loss = loaded.train_step(x, y)  # continues bit-identically

    Under the hood this is `tf.saved_model.save(module, export_dir,
    signatures={})`: no serving signature is exported, so that no serving
    system runs a function that updates the weights. The checks below turn
    the mistakes that would otherwise give an unusable or silently wrong
    SavedModel into errors.

    Args:
        export_dir: directory to write the SavedModel to.
        module: a `tf.Module` holding the model's variables, a
            `tf_adamw.AdamW` (as an attribute, at any depth) and a
            `train_step` `tf.function` declared with an `input_signature`.

    Raises:
        TypeError: `module` is not a `tf.Module` (or other trackable).
        ValueError: `module` has no `train_step`, or it is not a
            `tf.function`, or it has no `input_signature`; `module` holds no
            `tf_adamw.AdamW`; an optimizer is not built; an optimizer was
            built under a `tf.distribute` strategy (export from a
            single-device copy of the module instead);
            a variable the optimizer updates is not tracked by `module`;
            `train_step` captures a variable `module` does not track.
    """
    _check_module(module, "train_step", "training step")
    _check_training_optimizers(module)
    try:
        tf.saved_model.save(module, export_dir, signatures={})
    except (AssertionError, KeyError) as e:
        # TF says this in two ways, naming a handle, not where it comes from.
        if "untracked" not in str(e) and "not reachable from root" not in str(
                e):
            raise
        raise ValueError(
            "`module.train_step` captures a variable that `module` does not "
            "track, so the export could not restore it: e.g. a variable read "
            "by a learning-rate callable, or a model kept outside `module`. "
            "Assign it to an attribute of `module`. TensorFlow said: "
            + str(e).splitlines()[0]) from e


def restore_training_variables(export_dir, module):
    """Reads a training SavedModel's variables into a rebuilt `module`.

    This is how training exported by `export_training_model` resumes under a
    `tf.distribute` strategy: rebuild the same module structure (same
    attribute names, same optimizer configuration) under `strategy.scope()`,
    then call this. The SavedModel's `variables/` directory is a checkpoint
    whose object graph uses the module's attribute paths, so every mirrored
    copy of every variable, slot and counter receives its saved value. If the
    optimizer is not built yet, its slots receive their values when it is
    built (deferred restoration).

    Do not load the SavedModel under the strategy instead: its saved
    `train_step` has no all-reduce, so the replicas silently diverge.

    Args:
        export_dir: a directory written by `export_training_model` (or
            `tf.saved_model.save`).
        module: the rebuilt module (e.g. created under `strategy.scope()`).

    Returns:
        The `tf.train.Checkpoint` load status; it has already passed
        `assert_consumed()` when every optimizer in `module` is built (else
        `assert_existing_objects_matched()`).

    Raises:
        ValueError: `export_dir` holds no SavedModel variables, or the saved
            objects do not match `module`'s structure.
    """
    prefix = os.path.join(export_dir, "variables", "variables")
    if not tf.io.gfile.exists(prefix + ".index"):
        raise ValueError(
            f"No SavedModel variables in {export_dir!r}: "
            f"{prefix + '.index'!r} does not exist. Pass the directory given "
            "to `export_training_model`."
        )
    status = tf.train.Checkpoint(module).read(prefix)
    optimizers = _optimizers_in(checkpoints.trackable_paths(module))
    all_built = all(o.built for _, o in optimizers)
    try:
        if all_built:
            status.assert_consumed()
        else:
            status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ValueError(
            f"The variables of the SavedModel in {export_dir!r} do not match "
            "`module`: rebuild it with the same attribute names and the same "
            f"optimizer configuration as the exported module. {e}"
        ) from e
    return status


# ----------------------------------------------------------------------------
# EMA weights and the serving export.


def _check_ema_optimizer(optimizer, what):
    if not isinstance(optimizer, optimizer_lib.AdamW):
        raise TypeError(
            f"Argument `optimizer` of `{what}` must be a `tf_adamw.AdamW`. "
            f"Received: optimizer={optimizer!r} of type "
            f"{type(optimizer).__name__}."
        )
    if not optimizer.use_ema:
        raise ValueError(
            f"`{what}` needs an optimizer created with `use_ema=True`: this "
            "one keeps no moving averages."
        )
    if not optimizer.built:
        raise ValueError(
            f"`{what}` needs a built optimizer: it has no moving averages "
            "yet. Call `optimizer.build(var_list)` or apply a step first."
        )


def _replica_pairs(variables, averages):
    """`(variable copy, average copy)` for every replica's copy of each.

    Raises:
        ValueError: in a replica context, or a variable and its average
            have different numbers of copies.
    """
    distribute.require_cross_replica("ema_weights()",
                                     "it swaps every replica's copy.")
    pairs = []
    for variable, average in zip(variables, averages):
        copies = distribute.copies(state_lib.unwrap(variable))
        average_copies = slots_lib.copies(average)
        if len(copies) != len(average_copies):
            raise ValueError(
                f"Variable {variable.name!r} has {len(copies)} copies but its "
                f"average has {len(average_copies)}: the optimizer must be "
                "built under the strategy that created the variable.")
        pairs.extend(zip(copies, average_copies))
    return pairs


@contextlib.contextmanager
def ema_weights(optimizer, var_list=None):
    """Swaps the EMA averages into the variables for the `with` block.

        with tf_adamw.ema_weights(optimizer):
            evaluate(model)  # sees the averaged weights
        # the training values are back, bit for bit

    On exit (also when the block raises) every variable gets back exactly the
    value it had on entry. Do not apply training steps inside the block: they
    would update the averaged weights, and the exit discards that. Under a
    `tf.distribute` strategy every replica's copy is swapped and restored on
    its own device; call it in a cross-replica context (outside
    `strategy.run`). Unlike `finalize_variable_values`, nothing is
    permanent.

    Args:
        optimizer: a built `tf_adamw.AdamW` with `use_ema=True`.
        var_list: the variables to swap; None for all the variables the
            optimizer was built with.

    Yields:
        The list of swapped variables (as the optimizer holds them).

    Raises:
        TypeError: `optimizer` is not a `tf_adamw.AdamW`.
        ValueError: `use_ema` is False, the optimizer is not built, a
            variable is not one the optimizer was built with, or the call is
            in a replica context.
    """
    _check_ema_optimizer(optimizer, "ema_weights")
    variables = optimizer.var_list if var_list is None else list(var_list)
    pairs = _replica_pairs(variables, optimizer.moving_averages(variables))
    # The backups are tensors read from the variables. A tensor read from a
    # resource variable keeps its value when the variable is assigned later
    # (TF replaces or copies a variable's buffer on write when it is shared),
    # so no temporary variables are needed. Each backup stays on its copy's
    # device.
    backups = []
    for variable, _ in pairs:
        with tf.device(variable.device):
            backups.append(tf.identity(variable))
    try:
        state_lib.write_averages([v for v, _ in pairs], [a for _, a in pairs])
        yield variables
    finally:
        for (variable, _), backup in zip(pairs, backups):
            variable.assign(backup)


def _check_no_training_state(paths, optimizer):
    """Refuses a serving module holding an optimizer or its variables."""
    for path, _ in _optimizers_in(paths):
        raise ValueError(
            f"Argument `module` holds an optimizer at {_describe(path)}: a "
            "serving export must not carry training state. Export a module "
            "with only the model and `serve` (e.g. `tf.Module()` with "
            "`module.model = model`)."
        )
    if optimizer is not None:
        state = {id(v): v for v in optimizer.variables}
        for path, obj in paths:
            if id(obj) in state:
                raise ValueError(
                    f"Argument `module` holds the optimizer variable "
                    f"{obj.name!r} at {_describe(path)}: a serving export "
                    "must not carry training state."
                )


def export_serving_model(export_dir, module, optimizer=None):
    """Saves a serving SavedModel: `module.serve` and the model's variables.

    The SavedModel has one signature, `serving_default` (`module.serve`), and
    no optimizer state. When `optimizer` is given and uses EMA, the exported
    variable values are its moving averages (via `ema_weights`); the live
    variables are left exactly as they were.

    Args:
        export_dir: directory to write the SavedModel to.
        module: a `tf.Module` holding the model's variables and a `serve`
            `tf.function` with an `input_signature`. It must not hold the
            optimizer (the export would carry the training state).
        optimizer: optional `tf_adamw.AdamW`. With `use_ema=True` (built),
            its averages are exported instead of the training values; without
            EMA the training values are exported as they are.

    Raises:
        TypeError: `module` is not trackable, or `optimizer` is not a
            `tf_adamw.AdamW`.
        ValueError: `module` has no `serve` `tf.function` with an
            `input_signature`; `module` holds an optimizer or an optimizer
            variable; with EMA, the optimizer is not built or updates none of
            `module`'s variables.
    """
    serve = _check_module(module, "serve", "serving function")
    if optimizer is not None and not isinstance(optimizer,
                                                optimizer_lib.AdamW):
        raise TypeError(
            "Argument `optimizer` must be a `tf_adamw.AdamW` or None. "
            f"Received: optimizer={optimizer!r} of type "
            f"{type(optimizer).__name__}."
        )
    paths = checkpoints.trackable_paths(module)
    _check_no_training_state(paths, optimizer)
    if optimizer is None or not optimizer.use_ema:
        tf.saved_model.save(module, export_dir,
                            signatures={"serving_default": serve})
        return
    _check_ema_optimizer(optimizer, "export_serving_model")
    tracked = _variable_ids(o for _, o in paths)
    if not any(id(state_lib.unwrap(v)) in tracked
               for v in optimizer.var_list):
        raise ValueError(
            "None of `module`'s variables is updated by `optimizer`, so its "
            "moving averages cannot be exported. Pass the optimizer that "
            "trains this module's variables."
        )
    with ema_weights(optimizer):
        tf.saved_model.save(module, export_dir,
                            signatures={"serving_default": serve})
