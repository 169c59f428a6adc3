"""Linear warmup, then cosine decay: a Keras `LearningRateSchedule`."""

import math

import keras
import tensorflow as tf


class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """`peak * (step + 1) / warmup_steps` for the first `warmup_steps` updates,
    then a cosine from `peak` down to `peak * alpha` at `total_steps`.

    Branch-free (`tf.where`), float32, so it is cheap inside the optimizer's
    compiled step and TPU-friendly. The step is the optimizer's `iterations`
    (applied updates).
    """

    def __init__(self, peak, warmup_steps, total_steps, alpha=0.0,
                 name="warmup_cosine"):
        super().__init__()
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.alpha = float(alpha)
        self.name = name

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = float(max(self.warmup_steps, 1))
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        warm = self.peak * (step + 1.0) / warmup
        progress = tf.clip_by_value(
            (step - float(self.warmup_steps)) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        decayed = self.peak * (self.alpha + (1.0 - self.alpha) * cosine)
        return tf.where(step < float(self.warmup_steps), warm, decayed)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "alpha": self.alpha,
                "name": self.name}
