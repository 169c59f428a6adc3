"""What a finished run leaves behind: SavedModels, evaluation, loss curve.

The SavedModels are written from a *single-device* copy of the run: the model
and the optimizer are rebuilt on the default strategy (on the CPU) and the
final checkpoint is read into them. A SavedModel's `train_step` cannot wrap
`strategy.run`, and the checkpoint restores across replica counts, so this
works the same after a one-device, mirrored, multi-worker or TPU run.
"""

import json
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

import tf_adamw
from tf_adamw.train import data as data_lib
from tf_adamw.train import model as model_lib


VOCABULARY_FILE = "vocab.txt"


def write_vocabulary(path):
    """The char LM's vocabulary: line i holds token id i as a JSON string.

    JSON, because one token is the newline (written `"\\n"`); the ids past
    the alphabet, padding for TPU-friendly shapes, are `""` (no text).
    """
    tokens = list(data_lib.ALPHABET) + [""] * (
        data_lib.VOCAB_SIZE - len(data_lib.ALPHABET))
    lines = [json.dumps(token) for token in tokens]
    for token in tokens:
        # `ServingModule.vocabulary` undoes only the quotes and `\n`.
        if json.dumps(token)[1:-1].replace("\\n", "\n") != token:
            raise ValueError(f"token {token!r} needs another JSON escape")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


class ServingModule(tf.Module):
    """What the serving SavedModel holds for a client.

    - `serve` (the `serving_default` signature): `tokens`, int32 ids of
      shape [batch, length] with 1 <= length <= `max_sequence_length`, to
      `logits` [batch, length, vocab] and the greedy `next_token` [batch].
      A longer input is an InvalidArgumentError saying the maximum.
    - `vocabulary_file`: the asset `assets/vocab.txt`, line i = the token
      of id i as a JSON string (readable without TensorFlow).
    - `vocabulary()`: the same tokens as a string tensor (index = id).
    - `max_sequence_length`: an int32 variable, the model's position count.
    """

    def __init__(self, model, vocabulary_path):
        super().__init__(name="serving")
        self.model = model
        self.vocabulary_file = tf.saved_model.Asset(vocabulary_path)
        self.max_sequence_length = tf.Variable(
            model.seq_len, dtype=tf.int32, trainable=False,
            name="max_sequence_length")
        self._seq_len = model.seq_len
        self._vocab_size = model.vocab_size

    @tf.function(input_signature=[])
    def vocabulary(self):
        text = tf.strings.strip(tf.io.read_file(self.vocabulary_file))
        lines = tf.strings.split(text, "\n")
        lengths = tf.strings.length(lines)
        tokens = tf.strings.substr(lines, tf.ones_like(lengths), lengths - 2)
        return tf.strings.regex_replace(tokens, r"\\n", "\n")

    def _checks(self, tokens):
        length = tf.shape(tokens)[1]
        return [
            tf.debugging.assert_positive(
                length, message="serve: `tokens` needs at least 1 position"),
            tf.debugging.assert_less_equal(
                length, self._seq_len, message=(
                    f"serve: `tokens` may have at most {self._seq_len} "
                    "positions (max_sequence_length, the model's position "
                    f"count); pass the last {self._seq_len} ids of a longer "
                    "text")),
            tf.debugging.assert_non_negative(
                tokens, message="serve: token ids must be >= 0"),
            tf.debugging.assert_less(
                tokens, self._vocab_size, message=(
                    f"serve: token ids must be < {self._vocab_size} (the "
                    "vocabulary size)")),
        ]

    @tf.function(input_signature=[
        tf.TensorSpec([None, None], tf.int32, name="tokens")])
    def serve(self, tokens):
        with tf.control_dependencies(self._checks(tokens)):
            logits = self.model(tokens)
        return {"logits": logits,
                "next_token": tf.argmax(logits[:, -1], axis=-1,
                                        output_type=tf.int32)}


class TrainingModule(tf.Module):
    """Model, optimizer and `train_step` for a training SavedModel."""

    def __init__(self, model, optimizer, compute_dtype, seq_len):
        super().__init__(name="training")
        self.model = model
        self.optimizer = optimizer
        self._compute_dtype = compute_dtype
        spec = tf.TensorSpec([None, seq_len], tf.int32)
        self.train_step = tf.function(
            self._train_step, input_signature=[spec, spec], autograph=False)

    def _train_step(self, inputs, targets):
        with tf.GradientTape() as tape:
            loss = model_lib.token_loss_sum(
                self.model, inputs, targets, self._compute_dtype) / tf.cast(
                    tf.size(targets), tf.float32)
        grads = tape.gradient(loss, self.model.params)
        self.optimizer.apply_gradients(zip(grads, self.model.params))
        return {"loss": loss, "grad_norm": tf.linalg.global_norm(grads)}


def evaluate(model, batches):
    """Mean next-token loss (nats) of `model` on numpy `batches`."""
    @tf.function(autograph=False)
    def loss_sum(inputs, targets):
        return model_lib.token_loss_sum(model, inputs, targets, tf.float32)

    total = sum(float(loss_sum(x, y)) for x, y in batches)
    count = sum(y.size for _, y in batches)
    return total / count


def generate(serving, prompt, num_chars, seq_len):
    """Greedy continuation of `prompt` with a `ServingModule` (or loaded)."""
    ids = list(data_lib.encode(prompt))
    for _ in range(num_chars):
        window = np.array([ids[-seq_len:]], np.int32)
        ids.append(int(serving.serve(tf.constant(window))["next_token"][0]))
    return data_lib.decode(ids)


def export(run, checkpoint_path, export_dir):
    """Rebuilds the run on one device from `checkpoint_path`; exports both.

    Args:
        run: the `loop.Run` (config, builders, eval data).
        checkpoint_path: the final checkpoint's prefix.
        export_dir: parent directory of `serving/` and `training/`.

    Returns:
        dict with eval losses (live and EMA weights), a text sample and the
        export paths.
    """
    config = run.config
    with tf.device("/CPU:0"):
        model = run.make_model()
        optimizer = run.make_optimizer()
        optimizer.build(model.params)
        status = tf.train.Checkpoint(model=model, optimizer=optimizer).read(
            checkpoint_path)
        status.assert_existing_objects_matched().expect_partial()
        results = {"eval_loss": evaluate(model, run.eval_data)}
        if optimizer.use_ema:
            with tf_adamw.ema_weights(optimizer):
                results["eval_loss_ema"] = evaluate(model, run.eval_data)
        serving_dir = os.path.join(export_dir, "serving")
        training_dir = os.path.join(export_dir, "training")
        with tempfile.TemporaryDirectory() as scratch:
            # The SavedModel copies the asset into its assets/ directory.
            vocabulary = os.path.join(scratch, VOCABULARY_FILE)
            write_vocabulary(vocabulary)
            serving = ServingModule(model, vocabulary)
            tf_adamw.export_serving_model(serving_dir, serving, optimizer)
        tf_adamw.export_training_model(training_dir, TrainingModule(
            model, optimizer, run.compute_dtype, config.task.data.seq_len))
        if optimizer.use_ema:
            with tf_adamw.ema_weights(optimizer):
                results["sample"] = generate(
                    serving, "the ", 72, config.task.data.seq_len)
        else:
            results["sample"] = generate(serving, "the ", 72,
                                         config.task.data.seq_len)
    results["serving_dir"] = serving_dir
    results["training_dir"] = training_dir
    return results


# ---------------------------------------------------------------------------
# Metrics history and the loss curve.


def _warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_history(path, warn=_warn):
    """The logged rows of `metrics.jsonl` (later rows win for a step).

    A line that is not a JSON row with a step (a write cut short by a crash
    leaves a torn last line) is skipped, with a `warn(message)`.
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
                rows[int(row["step"])] = row
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
    """Training loss (and learning rate) against step, as a PNG."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

    steps = [r["step"] for r in history]
    fig, (ax_loss, ax_lr) = plt.subplots(
        2, 1, figsize=(7, 5.5), sharex=True,
        gridspec_kw={"height_ratios": [3, 1]})
    ax_loss.plot(steps, [r["loss"] for r in history], marker="o",
                 markersize=3, label="train loss (mean over interval)")
    ax_loss.set_ylabel("loss (nats / char)")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.plot(steps, [r["learning_rate"] for r in history], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
