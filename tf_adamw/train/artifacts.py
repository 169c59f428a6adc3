"""What a finished run leaves behind: SavedModels, metrics, loss curve.

The SavedModels are written from a *single-device* copy of the run: the model
and the optimizer are rebuilt on the default strategy (on the CPU) and the
final checkpoint is read into them. A SavedModel's `train_step` cannot wrap
`strategy.run`, and the checkpoint restores across replica counts, so this
works the same after a one-device, mirrored, multi-worker or TPU run.

The serving export holds the raw or the EMA weights, as
`trainer.export_weights` and the final eval losses decide
(`evaluation.choose_weights`); `export/serving_weights.json` records which.
"""

import json
import os
import sys

import tensorflow as tf

import tf_adamw
from tf_adamw.train import evaluation
from tf_adamw.train import task as task_lib

# Written last: its presence means both SavedModels are complete.
WEIGHTS_FILE = "serving_weights.json"


def _any_batch(spec):
    """`spec` (a nested structure of TensorSpecs) with any batch size."""
    def relax(s):
        if not isinstance(s, tf.TensorSpec) or s.shape.rank is None:
            return s
        return tf.TensorSpec([None] + s.shape.as_list()[1:], s.dtype,
                             name=s.name)

    return tf.nest.map_structure(relax, spec)


def _named(spec, name):
    """A single TensorSpec named `name` (the serving signature's input);
    a nested structure keeps its own names."""
    if isinstance(spec, tf.TensorSpec):
        return tf.TensorSpec(spec.shape, spec.dtype, name=name)
    return spec


class TrainingModule(tf.Module):
    """Model, optimizer and `train_step` for a training SavedModel.

    `train_step(inputs, targets)` takes a batch like the task's training
    batches (any batch size) and applies one update with the mean of the
    task's losses; it returns that loss and the gradients' global norm.
    """

    def __init__(self, model, optimizer, task, element_spec):
        super().__init__(name="training")
        self.model = model
        self.optimizer = optimizer
        self._loss = task.loss
        inputs, targets = _any_batch(element_spec)
        self.train_step = tf.function(
            self._train_step, input_signature=[inputs, targets],
            autograph=False)

    def _train_step(self, inputs, targets):
        variables = list(self.model.trainable_variables)
        # The loss scale as the trainer applies it (1 without one; with
        # `loss_scale: dynamic` the SavedModel carries the scale variable).
        scale = tf.convert_to_tensor(self.optimizer.scale_loss(1.0),
                                     tf.float32)
        with tf.GradientTape() as tape:
            losses = tf.cast(self._loss(
                targets, self.model(inputs, training=True)), tf.float32)
            loss = tf.reduce_sum(losses) / tf.cast(tf.size(losses),
                                                   tf.float32)
            scaled_loss = loss * scale
        grads = tape.gradient(scaled_loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        return {"loss": loss,
                "grad_norm": tf.linalg.global_norm(grads) / scale}


class DefaultServingModule(tf.Module):
    """The serving module of a task without `serving_module`:
    `serve(inputs) -> {"outputs": model(inputs, training=False)}` (a dict of
    outputs is returned as it is)."""

    def __init__(self, model, inputs_spec):
        super().__init__(name="serving")
        self.model = model
        self.serve = tf.function(
            self._serve, input_signature=[_named(_any_batch(inputs_spec),
                                                 "inputs")],
            autograph=False)

    def _serve(self, inputs):
        outputs = self.model(inputs, training=False)
        return outputs if isinstance(outputs, dict) else {"outputs": outputs}


def _serving_module(task, model, eval_spec):
    make = task_lib.optional(task, "serving_module")
    serving = make(model) if make else None
    return serving if serving is not None else DefaultServingModule(
        model, eval_spec[0])


def _restore(run, checkpoint_path):
    """A single-device model and optimizer holding the checkpoint."""
    model = run.make_model()
    optimizer = run.make_optimizer()
    optimizer.build(run.variables(model))
    status = tf.train.Checkpoint(model=model, optimizer=optimizer).read(
        checkpoint_path)
    status.assert_existing_objects_matched().expect_partial()
    return model, optimizer


def _summary(task, serving, optimizer, weights):
    """The task's `export_summary` line, computed with the exported
    weights (None if the task has none)."""
    summarize = task_lib.optional(task, "export_summary")
    if not summarize:
        return None
    if weights == "ema":
        with tf_adamw.ema_weights(optimizer):
            return summarize(serving)
    return summarize(serving)


def export(run, checkpoint_path, export_dir, losses=None):
    """Rebuilds the run on one device from `checkpoint_path`; exports both.

    Args:
        run: the `loop.Run` (config, task, builders).
        checkpoint_path: the final checkpoint's prefix.
        export_dir: parent directory of `serving/` and `training/`.
        losses: the final `evaluation.Evaluator` results of this
            checkpoint; None evaluates it here.

    Returns:
        dict: "losses" (as `losses`), "eval_loss" and "eval_loss_ema" (None
        without EMA), "weights" ("raw" or "ema": in the serving export),
        "summary" (the task's line, or None) and the paths.
    """
    config = run.config
    batch = config.task.data.global_batch_size
    with tf.device("/CPU:0"):
        model, optimizer = _restore(run, checkpoint_path)
        if losses is None:
            losses = evaluation.Evaluator(tf.distribute.get_strategy(), model,
                                          optimizer, run.task, batch)()
        weights = evaluation.choose_weights(config.trainer.export_weights,
                                            losses)
        serving = _serving_module(run.task, model,
                                  run.task.eval_dataset(batch).element_spec)
        serving_dir = os.path.join(export_dir, "serving")
        training_dir = os.path.join(export_dir, "training")
        tf_adamw.export_serving_model(
            serving_dir, serving, optimizer if weights == "ema" else None)
        tf_adamw.export_training_model(training_dir, TrainingModule(
            model, optimizer, run.task,
            run.task.train_dataset(batch, 0).element_spec))
        summary = _summary(run.task, serving, optimizer, weights)
    results = {"losses": losses, "eval_loss": losses[evaluation.LOSS],
               "eval_loss_ema": losses.get(evaluation.LOSS_EMA),
               "weights": weights, "summary": summary,
               "serving_dir": serving_dir, "training_dir": training_dir,
               "weights_file": os.path.join(export_dir, WEIGHTS_FILE)}
    _write_json(results["weights_file"], {
        "weights": weights, "export_weights": config.trainer.export_weights,
        "checkpoint": checkpoint_path, **losses})
    return results


def _write_json(path, data):
    """Writes `data` as JSON, atomically (a reader never sees half)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(temporary, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    tf.io.gfile.rename(temporary, path, overwrite=True)


# ---------------------------------------------------------------------------
# Metrics history and the loss curve.


def _warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_history(path, warn=_warn):
    """The logged rows of `metrics.jsonl`, one per step.

    A step's training row and its eval row (`eval/loss`, ...) are separate
    lines: they are merged into one row (later values win). A line that is
    not a JSON row with a step (a write cut short by a crash leaves a torn
    last line) is skipped, with a `warn(message)`.
    """
    rows = {}
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                rows.setdefault(int(row["step"]), {}).update(row)
            except (ValueError, TypeError, KeyError) as e:
                warn(f"{path} line {number} is not a metrics row (a write "
                     f"cut short?): {line[:60]!r} ({type(e).__name__}); "
                     "skipped.")
    return [rows[s] for s in sorted(rows)]


def truncate_history(path, last_step, warn=_warn):
    """Drops rows after `last_step` (logged after the checkpoint resumed),
    and lines that are not rows (see `read_history`)."""
    rows = [r for r in read_history(path, warn) if r["step"] <= last_step]
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def append_history(path, row):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def plot_loss_curve(history, png_path, title):
    """Training loss (and learning rate) against step, as a PNG, with the
    eval losses as markers."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

    train = [r for r in history if "loss" in r]
    steps = [r["step"] for r in train]
    fig, (ax_loss, ax_lr) = plt.subplots(
        2, 1, figsize=(7, 5.5), sharex=True,
        gridspec_kw={"height_ratios": [3, 1]})
    ax_loss.plot(steps, [r["loss"] for r in train], marker="o",
                 markersize=3, label="train loss (mean over interval)")
    for key, marker, label in (
            (evaluation.LOSS, "s", "eval loss"),
            (evaluation.LOSS_EMA, "^", "eval loss, EMA weights")):
        rows = [r for r in history if key in r]
        if rows:
            ax_loss.plot([r["step"] for r in rows], [r[key] for r in rows],
                         marker=marker, linestyle="--", label=label)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.plot(steps, [r["learning_rate"] for r in train],
               color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
