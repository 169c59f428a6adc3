"""The task protocol: what the trainer needs to know about a model and data.

`task.name` in the config names a *factory*: a built-in task (`char_lm`, the
default) or an import path `package.module:callable`. The trainer calls
`factory(params, context)` once per run, with `task.params` (a dict, the
task's own keys) and a `TaskContext`; it returns the task, an object with
these methods (subclassing `Task` is optional):

- `build_model()`: a new model, e.g. a `tf.Module`, whose
  `trainable_variables` the optimizer trains (in that order: keep it fixed,
  checkpoints number the optimizer's slots by it). The trainer calls it
  under the strategy's scope, and again on the CPU for the exports. Seed
  its initial values (`context.seed`) so a re-run starts the same.
  The trainer calls `model(inputs, training=True)` to train and
  `model(inputs, training=False)` to evaluate.
- `train_dataset(global_batch_size, start_step)`: an endless
  `tf.data.Dataset` of `(inputs, targets)` batches of `global_batch_size`
  examples (static shapes), starting with batch number `start_step` (the
  batches already consumed: optimizer steps x gradient accumulation). Make
  batch `i` a pure function of `i` (e.g. stateless random ops seeded with
  `(seed, i)`): a resumed run then sees exactly the batches of one that never
  stopped. `strategy.experimental_distribute_dataset` splits each batch
  across replicas and workers.
- `eval_dataset(global_batch_size)`: a finite `tf.data.Dataset` of held-out
  `(inputs, targets)` batches; the same data every time it is iterated.
- `loss(targets, outputs)`: per-example losses, float32, shape `[batch]`
  or `[batch, ...]` (static trailing dimensions, e.g. one loss per token).
  The trainer averages them over every element of the global batch; the
  eval loss is their mean over the whole eval dataset.

Optional:

- `serving_module(model)`: a `tf.Module` holding `model` with a `serve`
  `tf.function` declared with an `input_signature`; exported as the
  `serving_default` signature. Without it the trainer exports
  `serve(inputs) -> {"outputs": model(inputs, training=False)}`, its input
  signature the eval dataset's inputs with any batch size.
- `export_summary(serving)`: a line the trainer prints after the export,
  e.g. a sample from the exported weights.
- `describe_example()`: the size of one example for the trainer's first
  line, e.g. "64 chars" (read "global batch 32 x 64 chars").

Errors: a `task.name` that does not import, an object that does not
implement the protocol, or a factory that raises `ValueError` (bad
`task.params`) is a one-line `ConfigError` naming the key.

Imports no TensorFlow itself (a task's module usually does).
"""

import abc
import dataclasses
import importlib
import inspect

from tf_adamw.train import config as config_lib

REQUIRED = ("build_model", "train_dataset", "eval_dataset", "loss")
OPTIONAL = ("serving_module", "export_summary", "describe_example")


@dataclasses.dataclass(frozen=True)
class TaskContext:
    """What a task factory is told besides its `task.params`.

    Attributes:
        seed: `task.seed`, for initial values and data order.
        compute_dtype: `runtime.mixed_precision_dtype`, "float32",
            "bfloat16" or "float16": the dtype to compute in (variables
            stay float32).
    """
    seed: int
    compute_dtype: str


class Task(abc.ABC):
    """Optional base class of a task; see the module docstring."""

    @abc.abstractmethod
    def build_model(self):
        """A new model (its variables created, seeded)."""

    @abc.abstractmethod
    def train_dataset(self, global_batch_size, start_step):
        """Endless (inputs, targets) batches from batch `start_step` on."""

    @abc.abstractmethod
    def eval_dataset(self, global_batch_size):
        """Finite held-out (inputs, targets) batches."""

    @abc.abstractmethod
    def loss(self, targets, outputs):
        """Per-example (or per-element) float32 losses, `[batch, ...]`."""

    def serving_module(self, model):  # pylint: disable=unused-argument
        """A `tf.Module` with `serve`, or None for the trainer's default."""
        return None

    def export_summary(self, serving):  # pylint: disable=unused-argument
        """A line to print after the export, or None."""
        return None

    def describe_example(self):
        """One example's size for the first console line, or None."""
        return None


def _config_error(name, message):
    return config_lib.ConfigError(f"key `task.name` ({name!r}) {message}")


def resolve(name):
    """The factory that `task.name` names (a built-in or an import path).

    Raises:
        config_lib.ConfigError: the module does not import, the attribute is
            missing, or it is not callable.
    """
    path = config_lib.BUILTIN_TASKS.get(name, name)
    module_name, _, attribute = path.partition(":")
    if not attribute:
        raise _config_error(name, "must be a built-in task or an import "
                            "path `package.module:callable`.")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise _config_error(name, f"does not resolve: importing "
                            f"{module_name!r} failed ({type(e).__name__}: "
                            f"{e}).") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise _config_error(name, f"does not resolve: {module_name!r} "
                                f"has no attribute {attribute!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _config_error(name, f"names {obj!r} (type "
                            f"{type(obj).__name__}), not a callable "
                            "`factory(params, context)`.")
    return obj


def check(task, name):
    """`task` if it implements the protocol, else a ConfigError."""
    missing = [m for m in REQUIRED if not callable(getattr(task, m, None))]
    if missing:
        raise _config_error(
            name, f"returned a {type(task).__name__}, which does not "
            f"implement the task protocol: no {', '.join(missing)} (see "
            "tf_adamw.train.task).")
    return task


def build(config):
    """The task of `config`: resolved, called, checked.

    Call it before TensorFlow creates a tensor in the process (devices are
    set up after it): a factory should check its params and keep datasets
    and variables for the protocol's methods.

    Raises:
        config_lib.ConfigError: see `resolve` and `check`; the factory does
            not take `(params, context)`, or raised a ValueError (its
            message names what is wrong with `task.params`).
    """
    name = config.task.name
    factory = resolve(name)
    context = TaskContext(seed=config.task.seed,
                          compute_dtype=config.runtime.mixed_precision_dtype)
    params = dict(config.task.params)
    try:
        inspect.signature(factory).bind(params, context)
    except TypeError:
        raise _config_error(name, "must take two arguments, "
                            "`factory(params, context)`.") from None
    except ValueError:
        pass  # no signature to inspect (a builtin): just call it
    try:
        task = factory(params, context)
    except ValueError as e:
        if isinstance(e, config_lib.ConfigError):
            raise
        raise config_lib.ConfigError(
            f"key `task.params` is invalid for task {name!r}: {e}") from None
    except TypeError as e:
        # A `Task` subclass without one of the required methods; any other
        # TypeError is a bug in the factory, with its traceback.
        if "abstract method" not in str(e):
            raise
        raise _config_error(name, "does not implement the task protocol: "
                            f"{e}.") from None
    return check(task, name)


def optional(task, method):
    """The task's optional `method`, or None when it has none."""
    function = getattr(task, method, None)
    return function if callable(function) else None
