"""A training process for tests/test_crash_safety.py, killed at random points.

Usage: python crash_worker.py DIRECTORY TOTAL_STEPS [--out=final.npz]

Resumes from the newest intact checkpoint in DIRECTORY (with
`tf_adamw.restore_latest_good`), trains up to TOTAL_STEPS steps and saves a
checkpoint after every step with `tf.train.CheckpointManager`, so that a kill
at a random moment often lands inside `manager.save`. Every event is printed
and flushed at once, so the test knows where the process was when it died:

    restored <prefix or None> at step <n>
    step <n>          (step n is about to run)
    save-begin <n>    (manager.save(checkpoint_number=n) starts)
    save-end <n>      (it returned)
    done

The gradient of step `s` is `var - 1 + noise(s)` with stateless random
noise: elementwise only, so every process computes the same bits, and the
test can compute the uninterrupted run in its own process (`train`).
"""

import argparse
import os
import sys

# Large enough that a checkpoint write (20 MB: the variable, m, v, v_hat and
# the EMA) takes most of each step, so that random kills land inside saves.
BIG_SHAPE = (1024, 1024)
CONFIG = dict(learning_rate=0.01, weight_decay=0.01, amsgrad=True,
              use_ema=True, ema_momentum=0.9, global_clipnorm=10.0)
MAX_TO_KEEP = 3


def build():
    """The model (a `tf.Module`), optimizer, step counter and checkpoint."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tf_adamw  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(7)
    model = tf.Module(name="model")
    model.big = tf.Variable(
        rng.standard_normal(BIG_SHAPE).astype(np.float32), name="big")
    model.small = tf.Variable(
        rng.standard_normal(5).astype(np.float32), name="small")
    optimizer = tf_adamw.AdamW(**CONFIG)
    optimizer.build([model.big, model.small])
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                     step=step)
    return model, optimizer, step, checkpoint


def make_train_step(model, optimizer):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    variables = [model.big, model.small]

    @tf.function(input_signature=[tf.TensorSpec([], tf.int64)])
    def train_step(s):
        grads = []
        for j, v in enumerate(variables):
            noise = tf.random.stateless_normal(
                v.shape, seed=tf.stack([s, tf.constant(j, tf.int64)]))
            grads.append(v - 1.0 + noise)
        optimizer.apply_gradients(zip(grads, variables))

    return train_step


def final_state(model, optimizer, step):
    """Every value that must match the uninterrupted run, by name."""
    out = {"model/big": model.big.numpy(), "model/small": model.small.numpy(),
           "step": step.numpy()}
    for v in optimizer.variables:
        out[f"optimizer/{v.name}"] = v.numpy()
    return out


def train(total_steps):
    """The uninterrupted run, in this process; returns `final_state`."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    model, optimizer, step, _ = build()
    train_step = make_train_step(model, optimizer)
    for s in range(total_steps):
        train_step(tf.constant(s, tf.int64))
        step.assign(s + 1)
    return final_state(model, optimizer, step)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("total_steps", type=int)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tf_adamw  # pylint: disable=import-outside-toplevel

    model, optimizer, step, checkpoint = build()
    manager = tf.train.CheckpointManager(checkpoint, args.directory,
                                         max_to_keep=MAX_TO_KEEP)
    restored = tf_adamw.restore_latest_good(checkpoint, manager)
    first = int(step.numpy())
    print(f"restored {restored} at step {first}", flush=True)
    train_step = make_train_step(model, optimizer)
    for s in range(first, args.total_steps):
        print(f"step {s}", flush=True)
        train_step(tf.constant(s, tf.int64))
        step.assign(s + 1)
        print(f"save-begin {s + 1}", flush=True)
        manager.save(checkpoint_number=s + 1)
        print(f"save-end {s + 1}", flush=True)
    if args.out:
        np.savez(args.out, **final_state(model, optimizer, step))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
