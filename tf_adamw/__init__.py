"""tf_adamw: Keras's AdamW as a jit-compiled, tf.distribute-correct tf.Module.

Public API:
    AdamW: the optimizer.
"""

from tf_adamw.optimizer import AdamW

__all__ = ["AdamW"]
__version__ = "0.1.0"
