"""The embedded data: a synthetic English-like corpus, made at start-up.

Nothing is downloaded. A small probabilistic grammar (seeded, so every
worker and every resume produce the same text) writes sentences about people,
animals and places, plus one arithmetic fact family ("three plus four is
seven.") that rewards learning beyond spelling. A character-level language
model on it starts at ~ln(vocab) nats and drops quickly as it learns
spelling, words and then the grammar.

The input pipeline is a pure function of the step: micro-batch `i` is
`seq_len + 1`-character windows at offsets drawn by a stateless RNG seeded
with `(seed, i)`. Resuming at step `s` therefore sees exactly the batches an
uninterrupted run would have seen, without checkpointing an iterator.
"""

import random

import numpy as np
import tensorflow as tf

# Index 0 is newline; the alphabet is padded to a multiple of 8 so the
# embedding and logits have TPU-friendly shapes.
ALPHABET = "\n !,.?0123456789abcdefghijklmnopqrstuvwxyz"
VOCAB_SIZE = 48
_CHAR_TO_ID = {c: i for i, c in enumerate(ALPHABET)}

_NUMBERS = ("zero one two three four five six seven eight nine ten eleven "
            "twelve thirteen fourteen fifteen sixteen seventeen eighteen "
            "nineteen twenty").split()
_ADJECTIVES = ("old young small big quiet loud happy tired clever brave "
               "red green").split()
_NOUNS = ("cat dog bird fox horse teacher farmer doctor child robot sailor "
          "baker").split()
_VERBS = [("sees", "saw"), ("likes", "liked"), ("follows", "followed"),
          ("helps", "helped"), ("finds", "found"), ("calls", "called"),
          ("watches", "watched"), ("paints", "painted")]
_OBJECTS = ("the river|a red ball|the old bridge|a small boat|the garden|"
            "a bowl of soup|the mountain|a long letter|the blue door|"
            "a basket of apples").split("|")
_PLACES = ("in the garden|at the station|near the river|under the table|"
           "on the hill|in the kitchen|by the sea|at school").split("|")
_TIMES = ("today|yesterday|every morning|at night|in winter|after lunch|"
          "on sunday").split("|")


def _noun_phrase(rng):
    article = rng.choice(["the", "a", "my", "our"])
    if rng.random() < 0.5:
        return f"{article} {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    return f"{article} {rng.choice(_NOUNS)}"


def _sentence(rng):
    kind = rng.random()
    subject = _noun_phrase(rng)
    present, past = rng.choice(_VERBS)
    if kind < 0.35:
        return f"{subject} {present} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
    if kind < 0.6:
        return f"{rng.choice(_TIMES)}, {subject} {past} {rng.choice(_OBJECTS)}."
    if kind < 0.75:
        return f"does {subject} like {rng.choice(_OBJECTS)}? yes, every day."
    if kind < 0.85:
        other = _noun_phrase(rng)
        return f"{subject} and {other} {past} {rng.choice(_OBJECTS)} together."
    a, b = rng.randrange(11), rng.randrange(11)
    return f"{_NUMBERS[a]} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}."


def make_corpus(num_chars, seed):
    """`num_chars` characters of the synthetic corpus (deterministic)."""
    rng = random.Random(seed)
    parts, length = [], 0
    while length < num_chars:
        line = " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
        parts.append(line + "\n")
        length += len(parts[-1])
    return "".join(parts)[:num_chars]


def encode(text):
    """Characters to int32 ids (every character must be in ALPHABET)."""
    return np.array([_CHAR_TO_ID[c] for c in text], np.int32)


def decode(ids):
    """Ids to text; ids outside the alphabet (padding) print as '_'."""
    return "".join(ALPHABET[i] if i < len(ALPHABET) else "_"
                   for i in np.asarray(ids).reshape(-1))


def window_batch(corpus, step, *, seed, batch_size, seq_len):
    """Micro-batch number `step`: (inputs, targets), each [batch, seq_len].

    A pure function of `(seed, step)`: stateless offsets into `corpus`.
    """
    offsets = tf.random.stateless_uniform(
        [batch_size], seed=tf.stack([tf.cast(seed, tf.int64), step]),
        minval=0, maxval=tf.shape(corpus, out_type=tf.int64)[0] - seq_len - 1,
        dtype=tf.int64)
    index = offsets[:, None] + tf.range(seq_len + 1, dtype=tf.int64)[None, :]
    windows = tf.gather(corpus, index)
    windows = tf.ensure_shape(windows, [batch_size, seq_len + 1])
    return windows[:, :-1], windows[:, 1:]


def train_dataset(corpus_ids, *, seed, global_batch_size, seq_len,
                  start_step=0):
    """Infinite dataset of global batches, starting at micro-step `start_step`.

    Elements are already batched by the global batch size (static shape):
    `strategy.experimental_distribute_dataset` splits each across replicas
    (and workers).
    """
    corpus = tf.constant(corpus_ids)

    def batch(step):
        return window_batch(corpus, step, seed=seed,
                            batch_size=global_batch_size, seq_len=seq_len)

    dataset = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
    dataset = dataset.map(batch)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    # No tf.data autotuning (nothing to tune: a batch is one small gather).
    # Its thread can delay deleting an iterator (see loop._input_options).
    options.autotune.enabled = False
    return dataset.with_options(options)


def eval_dataset(corpus_ids, *, seed, batch_size, seq_len, num_batches):
    """`num_batches` held-out (inputs, targets) batches, the same each time.

    Batch `i` is `window_batch(..., step=i)`: the same numbers the trainer
    always evaluated on.
    """
    corpus = tf.constant(corpus_ids)

    def batch(step):
        return window_batch(corpus, step, seed=seed, batch_size=batch_size,
                            seq_len=seq_len)

    dataset = tf.data.Dataset.range(num_batches).map(batch)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    options.autotune.enabled = False  # as in train_dataset
    return dataset.with_options(options)
