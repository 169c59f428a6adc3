"""One MultiWorkerMirroredStrategy worker for tests/test_multiworker.py.

Usage: python mwms_worker.py TASK_INDEX PORT0,PORT1 MODEL_DIR STEPS
       [--die_at_step=N] [--out=weights.npz]

Trains a small deterministic problem with tf_adamw.AdamW, one replica per
worker, the global batch split between workers; checkpoints every 2 applied
steps with CheckpointManager and resumes from the latest checkpoint. With
`--die_at_step`, the worker SIGKILLs itself after that many steps (the fault
test). The chief writes the final weights to `--out`.
"""

import argparse
import json
import os
import signal
import sys

GLOBAL_BATCH = 16
CONFIG = dict(learning_rate=0.05, weight_decay=0.01, amsgrad=True,
              use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=3,
              gradient_accumulation_steps=2, global_clipnorm=1.0)


def data(step):
    import numpy as np  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(500 + step)
    x = rng.normal(size=(GLOBAL_BATCH, 4)).astype(np.float32)
    y = rng.normal(size=(GLOBAL_BATCH, 3)).astype(np.float32)
    return x, y


def initial_values():
    import numpy as np  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(3)
    return (rng.normal(size=(4, 3)).astype(np.float32),
            np.zeros(3, np.float32))


def make_train_step(strategy, variables, optimizer):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    def replica_fn(x, y):
        with tf.GradientTape() as tape:
            pred = tf.matmul(x, variables[0]) + variables[1]
            loss = tf.reduce_sum(tf.square(pred - y)) / GLOBAL_BATCH
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))

    @tf.function
    def train_step(x, y):
        strategy.run(replica_fn, args=(x, y))

    return train_step


def shard(strategy, array):
    per = GLOBAL_BATCH // strategy.num_replicas_in_sync

    def fn(ctx):
        r = ctx.replica_id_in_sync_group
        return array[r * per:(r + 1) * per]

    return strategy.experimental_distribute_values_from_function(fn)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("task_index", type=int)
    parser.add_argument("ports")
    parser.add_argument("model_dir")
    parser.add_argument("steps", type=int)
    parser.add_argument("--die_at_step", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    ports = args.ports.split(",")
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": args.task_index},
    })
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tf_adamw  # pylint: disable=g-import-not-at-top

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    kernel0, bias0 = initial_values()
    with strategy.scope():
        variables = [tf.Variable(kernel0, name="kernel"),
                     tf.Variable(bias0, name="bias")]
        optimizer = tf_adamw.AdamW(**CONFIG)
        optimizer.build(variables)
    checkpoint = tf.train.Checkpoint(variables=variables, optimizer=optimizer)
    is_chief = args.task_index == 0
    # Non-chief workers write to their own directory (the TF convention);
    # everyone restores from the chief's.
    directory = args.model_dir if is_chief else os.path.join(
        args.model_dir, f"worker_{args.task_index}")
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=2)
    latest = tf.train.latest_checkpoint(args.model_dir)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
    # Calls so far: applied updates times k plus the pending micro-steps.
    k = CONFIG["gradient_accumulation_steps"]
    done = int(optimizer.iterations.numpy()) * k + int(
        optimizer._accumulation_count.numpy())  # pylint: disable=protected-access
    print(f"worker {args.task_index} starts at call {done}", flush=True)

    train_step = make_train_step(strategy, variables, optimizer)
    for call in range(done, args.steps):
        x, y = data(call)
        train_step(shard(strategy, x), shard(strategy, y))
        if (call + 1) % (2 * k) == 0:
            manager.save(checkpoint_number=call + 1)
        if args.die_at_step is not None and call + 1 == args.die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
    if is_chief and args.out:
        np.savez(args.out, kernel=variables[0].numpy(),
                 bias=variables[1].numpy(),
                 iterations=optimizer.iterations.numpy())
    print(f"worker {args.task_index} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
