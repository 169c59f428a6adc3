"""The built-in task (`task.name: char_lm`, the default): a character LM.

A small decoder-only transformer (`model.TransformerLM`) learns the
synthetic corpus of `data` (made in-process: nothing is downloaded). Its
keys are `task.params` (`config.CharLMParams`). The loss is the next-token
cross-entropy of every position; the serving export carries the vocabulary.
"""

import json
import os
import tempfile

import numpy as np
import tensorflow as tf

from tf_adamw.train import config as config_lib
from tf_adamw.train import data as data_lib
from tf_adamw.train import model as model_lib
from tf_adamw.train import task as task_lib

VOCABULARY_FILE = "vocab.txt"
# The corpus seeds, offsets from task.seed (what the trainer always used).
_EVAL_CORPUS_SEED = 1_000_003
_EVAL_WINDOWS_SEED = 7
_MAX_EVAL_BATCH = 64


def build(params, context):
    """The task factory: `task.params` checked as `config.CharLMParams`.

    Raises:
        config.ConfigError: a key is unknown, of the wrong type or out of
            range.
    """
    params = config_lib.task_params(config_lib.CharLMParams, params)

    def fail(key, message):
        raise config_lib.ConfigError(f"key `{key}` {message}")

    config_lib.check_char_lm_params(params, fail)
    return CharLMTask(params, context)


class CharLMTask(task_lib.Task):
    """Next-character prediction on the synthetic corpus.

    Args:
        params: a `config.CharLMParams`.
        context: the `task.TaskContext`.
    """

    def __init__(self, params, context):
        self.params = params
        self._seed = context.seed
        self._compute_dtype = context.compute_dtype
        # NumPy only: no tensor exists before the trainer sets up devices.
        self._corpus = data_lib.encode(data_lib.make_corpus(
            params.corpus_chars, context.seed))
        self._eval_corpus = data_lib.encode(data_lib.make_corpus(
            params.eval_corpus_chars, context.seed + _EVAL_CORPUS_SEED))

    def build_model(self):
        p = self.params
        return model_lib.TransformerLM(
            vocab_size=data_lib.VOCAB_SIZE, seq_len=p.seq_len,
            d_model=p.d_model, num_layers=p.num_layers,
            num_heads=p.num_heads, mlp_ratio=p.mlp_ratio, seed=self._seed,
            compute_dtype=self._compute_dtype)

    def train_dataset(self, global_batch_size, start_step):
        return data_lib.train_dataset(
            self._corpus, seed=self._seed,
            global_batch_size=global_batch_size, seq_len=self.params.seq_len,
            start_step=start_step)

    def eval_dataset(self, global_batch_size):
        return data_lib.eval_dataset(
            self._eval_corpus, seed=self._seed + _EVAL_WINDOWS_SEED,
            batch_size=min(global_batch_size, _MAX_EVAL_BATCH),
            seq_len=self.params.seq_len,
            num_batches=self.params.eval_batches)

    def loss(self, targets, outputs):
        """Cross-entropy (nats) of each position: `[batch, seq_len]`."""
        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=targets, logits=outputs)

    def serving_module(self, model):
        return ServingModule(model)

    def export_summary(self, serving):
        text = generate(serving, "the ", 72, self.params.seq_len)
        return f"Sample (greedy): {text!r}"

    def describe_example(self):
        return f"{self.params.seq_len} chars"


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
      Computed in float32 whatever the training precision.
    - `vocabulary_file`: the asset `assets/vocab.txt`, line i = the token
      of id i as a JSON string (readable without TensorFlow).
    - `vocabulary()`: the same tokens as a string tensor (index = id).
    - `max_sequence_length`: an int32 variable, the model's position count.
    """

    def __init__(self, model):
        super().__init__(name="serving")
        # The asset's source file must exist until the SavedModel is
        # written (it copies it into assets/); removed with this module.
        self._scratch = tempfile.TemporaryDirectory()
        vocabulary_path = os.path.join(self._scratch.name, VOCABULARY_FILE)
        write_vocabulary(vocabulary_path)
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
            logits = self.model(tokens, compute_dtype=tf.float32)
        return {"logits": logits,
                "next_token": tf.argmax(logits[:, -1], axis=-1,
                                        output_type=tf.int32)}


def generate(serving, prompt, num_chars, seq_len):
    """Greedy continuation of `prompt` with a `ServingModule` (or loaded)."""
    ids = list(data_lib.encode(prompt))
    for _ in range(num_chars):
        window = np.array([ids[-seq_len:]], np.int32)
        ids.append(int(serving.serve(tf.constant(window))["next_token"][0]))
    return data_lib.decode(ids)
