"""tf_adamw: Keras's AdamW as a fused/XLA, tf.distribute-correct tf.Module.

Public API:
    AdamW: the optimizer.
    ema_weights: context manager swapping the EMA averages in.
    export_training_model / export_serving_model: SavedModel exports.
    restore_training_variables: a training SavedModel into a module rebuilt
        under a strategy.
    restore_latest_good: restore the newest intact checkpoint.
    keras: `tf_adamw.keras.AdamW`, the optimizer as a Keras 3 optimizer
        for `model.compile()` / `fit()` (imports Keras).

The names are imported on first use, so that `tf_adamw.options` (and the
trainer's config checks built on it) load without TensorFlow.
"""

import importlib

_PUBLIC = {
    "AdamW": "tf_adamw.optimizer",
    "ema_weights": "tf_adamw.export",
    "export_serving_model": "tf_adamw.export",
    "export_training_model": "tf_adamw.export",
    "restore_latest_good": "tf_adamw.checkpoints",
    "restore_training_variables": "tf_adamw.export",
}

# Submodules reachable as attributes after `import tf_adamw`, imported on
# first use (not in `__all__`: a star import should not import Keras).
_SUBMODULES = ("keras",)

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _SUBMODULES:
        # Importing a submodule sets it as this package's attribute.
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tf_adamw' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC) | set(_SUBMODULES))
