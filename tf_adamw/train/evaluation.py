"""Held-out evaluation, with the raw and the EMA weights, and which to export.

The eval loss is the mean of the task's per-example (or per-element) losses
over the whole eval dataset: each replica sums its share of a batch and
counts it, the strategy sums both over the replicas (and workers), and the
totals are added in float64 on the host. Evaluation reads the variables and
writes nothing: the EMA weights are evaluated inside `tf_adamw.ema_weights`,
which puts the training values back bit for bit, and the training data, a
function of the step, is another dataset. A run that evaluates is therefore
bit-identical to one that does not.
"""

import math

import tensorflow as tf

import tf_adamw

LOSS = "eval/loss"
LOSS_EMA = "eval/loss_ema"


def _eval_step(strategy, model, task):
    """A tf.function: one distributed batch to (loss sum, element count)."""
    def replica_step(inputs, targets):
        outputs = model(inputs, training=False)
        losses = tf.cast(task.loss(targets, outputs), tf.float32)
        return tf.reduce_sum(losses), tf.cast(tf.size(losses), tf.float32)

    @tf.function(autograph=False)
    def step(inputs, targets):
        total, count = strategy.run(replica_step, args=(inputs, targets))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, total, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None))

    return step


class Evaluator:
    """Evaluates a model on its task's eval dataset under `strategy`.

    Every worker of a multi-worker job calls it at the same steps (its
    reductions are collectives).

    Args:
        strategy: the run's strategy (the default strategy on one device).
        model: the task's model, built under `strategy`.
        optimizer: its `tf_adamw.AdamW`; with `use_ema`, the EMA weights are
            evaluated too.
        task: the task (`eval_dataset`, `loss`).
        global_batch_size: passed to `task.eval_dataset`.
        input_options: `tf.distribute.InputOptions` for the dataset, or None.
    """

    def __init__(self, strategy, model, optimizer, task, global_batch_size,
                 input_options=None):
        self._optimizer = optimizer
        self._dataset = strategy.experimental_distribute_dataset(
            task.eval_dataset(global_batch_size), input_options)
        self._step = _eval_step(strategy, model, task)

    def _mean_loss(self):
        total = count = 0.0
        for inputs, targets in self._dataset:
            batch_total, batch_count = self._step(inputs, targets)
            total += float(batch_total)
            count += float(batch_count)
        if not count:
            raise ValueError("the task's eval dataset yielded no examples.")
        return total / count

    def __call__(self):
        """`{"eval/loss": raw weights' loss, "eval/loss_ema": EMA's}` (the
        second only with EMA)."""
        results = {LOSS: self._mean_loss()}
        if self._optimizer.use_ema:
            with tf_adamw.ema_weights(self._optimizer):
                results[LOSS_EMA] = self._mean_loss()
        return results


def _rank(loss):
    """Sort key: lower is better, and a non-finite loss is the worst."""
    return loss if math.isfinite(loss) else math.inf


def choose_weights(export_weights, losses):
    """Which weights the serving export holds: "raw" or "ema".

    Args:
        export_weights: `trainer.export_weights`: "best" (the EMA weights
            only when their eval loss is lower), "ema" or "raw".
        losses: `Evaluator` results (no "eval/loss_ema" without EMA).
    """
    if LOSS_EMA not in losses or export_weights == "raw":
        return "raw"
    if export_weights == "ema":
        return "ema"
    return ("ema" if _rank(losses[LOSS_EMA]) < _rank(losses[LOSS])
            else "raw")


def describe_choice(weights, export_weights, losses):
    """The console line saying which weights were exported, and why."""
    raw = f"{losses[LOSS]:.4f}"
    if LOSS_EMA not in losses:
        return (f"Serving export: raw weights (eval loss {raw}; no EMA: "
                "task.optimizer.use_ema is false).")
    ema = f"{losses[LOSS_EMA]:.4f}"
    if weights == "ema":
        what = f"EMA weights (eval loss {ema}; raw weights {raw}"
    else:
        what = f"raw weights (eval loss {raw}; EMA weights {ema}"
    return (f"Serving export: {what}; "
            f"trainer.export_weights={export_weights}).")
