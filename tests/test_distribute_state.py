"""Checkpoints across replica counts, and the TPU-readiness audit of a step."""

import re

import numpy as np
import pytest
import tensorflow as tf

import tf_adamw

CONFIG = dict(learning_rate=0.05, weight_decay=0.01, amsgrad=True,
              use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=3,
              gradient_accumulation_steps=2, global_clipnorm=1.0)


def _grads(step):
    rng = np.random.default_rng(step)
    return [tf.constant(rng.normal(size=(4, 3)).astype(np.float32)),
            tf.constant(rng.normal(size=(3,)).astype(np.float32))]


def _build(strategy):
    with strategy.scope():
        kernel = tf.Variable(np.full((4, 3), 0.5, np.float32), name="kernel")
        bias = tf.Variable(np.zeros(3, np.float32), name="bias")
        optimizer = tf_adamw.AdamW(**CONFIG)
        optimizer.build([kernel, bias])
    return [kernel, bias], optimizer


def _train(strategy, variables, optimizer, steps):
    """Applies the global gradients of `steps` (same on every replica)."""
    @tf.function
    def step(g0, g1):
        def replica_fn(g0, g1):
            # Each replica contributes 1/N of the global gradient.
            n = tf.distribute.get_replica_context().num_replicas_in_sync
            optimizer.apply_gradients(
                [(g0 / n, variables[0]), (g1 / n, variables[1])])
        strategy.run(replica_fn, args=(g0, g1))

    for s in steps:
        step(*_grads(s))


def _values(strategy, variables, optimizer):
    out = {"iterations": optimizer.iterations.numpy()}
    for i, v in enumerate(variables):
        copies = strategy.experimental_local_results(v)
        for c in copies[1:]:
            np.testing.assert_array_equal(c.numpy(), copies[0].numpy())
        out[f"var{i}"] = copies[0].numpy()
        for name, slot in optimizer.slots_for(v).items():
            out[f"var{i}/{name}"] = slot.numpy()
    return out


@pytest.mark.parametrize("direction", ["4_to_1", "1_to_4"])
def test_checkpoint_restores_across_replica_counts(direction, tmp_path,
                                                   mirrored_strategy):
    one = tf.distribute.get_strategy()
    first, second = ((mirrored_strategy, one) if direction == "4_to_1"
                     else (one, mirrored_strategy))

    # Never switching: 8 calls on `second` alone.
    reference_vars, reference_opt = _build(second)
    _train(second, reference_vars, reference_opt, range(8))
    want = _values(second, reference_vars, reference_opt)

    variables, optimizer = _build(first)
    _train(first, variables, optimizer, range(5))  # mid-accumulation
    path = tf.train.Checkpoint(variables=variables,
                               optimizer=optimizer).save(
                                   str(tmp_path / "ckpt"))

    restored_vars, restored_opt = _build(second)
    tf.train.Checkpoint(variables=restored_vars,
                        optimizer=restored_opt).restore(
                            path).assert_consumed()
    _train(second, restored_vars, restored_opt, range(5, 8))
    got = _values(second, restored_vars, restored_opt)

    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7,
                                   err_msg=key)


def test_tpu_readiness_of_a_whole_training_step():
    """The HLO of forward + backward + apply is TPU-friendly.

    No host transfers or Python callbacks, no dynamic shapes, no float64.
    """
    rng = np.random.default_rng(0)
    kernel = tf.Variable(rng.normal(size=(8, 4)).astype(np.float32))
    embedding = tf.Variable(rng.normal(size=(16, 4)).astype(np.float32))
    norm_scale = tf.Variable(tf.ones([4], tf.bfloat16))
    variables = [kernel, embedding, norm_scale]
    optimizer = tf_adamw.AdamW(
        learning_rate=0.01, amsgrad=True, use_ema=True,
        ema_overwrite_frequency=5, gradient_accumulation_steps=2,
        global_clipnorm=1.0, loss_scale_factor=8.0)
    optimizer.build(variables)

    @tf.function(jit_compile=True)
    def train_step(x, ids, y):
        with tf.GradientTape() as tape:
            h = tf.matmul(x, kernel) + tf.gather(embedding, ids)
            h = h * tf.cast(norm_scale, tf.float32)
            loss = optimizer.scale_loss(tf.reduce_mean(tf.square(h - y)))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    args = (tf.constant(rng.normal(size=(32, 8)).astype(np.float32)),
            tf.constant(rng.integers(0, 16, size=(32,)).astype(np.int32)),
            tf.constant(rng.normal(size=(32, 4)).astype(np.float32)))
    train_step(*args)  # it also runs
    hlo = train_step.experimental_get_compiler_ir(*args)(stage="hlo")
    assert "ENTRY" in hlo
    forbidden = {
        "host transfer": r"\b(send|recv|send-done|recv-done|infeed|outfeed)\(",
        "host callback": r"custom_call_target=\"[^\"]*(py|Py|host|callback)",
        "float64": r"\bf64\[",
        "dynamic shape": r"\[[^\]]*<=",
    }
    for what, pattern in forbidden.items():
        match = re.search(pattern, hlo)
        assert match is None, (
            f"{what} in the HLO: ...{hlo[max(0, match.start() - 200):match.end() + 200]}...")
    # The optimizer step is really inside: its conditional (accumulation)
    # and the int64 counter are part of the computation.
    assert "conditional(" in hlo
    assert "s64[]" in hlo
