"""tf_adamw: Keras's AdamW as a fused/XLA, tf.distribute-correct tf.Module.

Public API:
    AdamW: the optimizer.
    ema_weights: context manager swapping the EMA averages in.
    export_training_model / export_serving_model: SavedModel exports.
    restore_training_variables: a training SavedModel into a module rebuilt
        under a strategy.
    restore_latest_good: restore the newest intact checkpoint.
"""

from tf_adamw.optimizer import AdamW
from tf_adamw.checkpoints import restore_latest_good
from tf_adamw.export import (
    ema_weights,
    export_serving_model,
    export_training_model,
    restore_training_variables,
)

__all__ = [
    "AdamW",
    "ema_weights",
    "export_serving_model",
    "export_training_model",
    "restore_latest_good",
    "restore_training_variables",
]
__version__ = "0.1.0"
